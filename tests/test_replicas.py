"""Note [Copies for another device] in the object table, on CPU: a get on another device
than the object's leases a replica in that device's pool, which lives exactly as long as it
must (the lease, or the copy still running). The GPU pool here is a second pool of memfd
slabs labelled as a GPU: the table only looks at a slab's device, and the GPU tests
(tests/test_gpu.py) run the same paths with CUDA slabs and real copies."""

import functools
import os
import secrets

import pytest

from controller.directory import Directory
from controller.objects import ObjectTable, Session
from controller.pool import Pool
from controller.slabs import MemfdSlab
from faastube import errors

GPU = "GPU-00000000-test"
MiB = 1 << 20


@pytest.fixture
def table(redis_server):
    directory = Directory(redis_server.url, f"replica-test-{secrets.token_hex(4)}", "e1", 60)
    pools = [Pool("host", 4 * MiB, 64 * MiB, 30.0),
             Pool(GPU, 4 * MiB, 64 * MiB, 30.0, slab_factory=functools.partial(MemfdSlab, device=GPU))]
    table = ObjectTable(pools, directory)
    yield table
    table.shutdown()
    directory.close()


@pytest.fixture
def session(table):
    session = Session(os.getpid(), os.getuid(), os.getgid(), admin=False)
    session.namespace = "ns"
    table.open_session(session)
    yield session
    table.close_session(session)


def closing(grant):
    for fd, _info in grant.fds:
        os.close(fd)
    return grant


def sealed(table, session, device="host", consumers=None) -> str:
    grant = closing(table.create(session, (MiB,), "uint8", MiB, consumers, None, None, device))
    table.seal(session, grant.record.id, drop_writer=True)
    return grant.record.id


def used(table, device) -> int:
    return table.pools[device].stats()["used"]


def test_a_get_elsewhere_leases_a_replica_that_goes_with_the_lease(table, session):
    object_id = sealed(table, session)
    grant = closing(table.get(session, object_id, 0.0, device=GPU))
    assert grant.copy.src is grant.record.region and grant.copy.dst.slab.device == GPU
    assert grant.lease.region is grant.copy.dst and grant.lease.copying
    assert used(table, GPU) == MiB
    table.copied(grant.lease)
    table.release(session, [(grant.lease.id, "drop")])
    assert used(table, GPU) == 0 and used(table, "host") == MiB        # the object stays


def test_a_lease_that_ends_during_its_copy_frees_the_replica_only_after_the_copy(table, session):
    grant = closing(table.get(session, sealed(table, session), 0.0, device=GPU))
    table.release(session, [(grant.lease.id, "drop")])                 # e.g. the client died
    assert used(table, GPU) == MiB                                      # the copy still writes it
    table.copied(grant.lease)
    assert used(table, GPU) == 0


def test_an_abandoned_grant_consumes_nothing_and_forgets_its_descriptors(table, session):
    object_id = sealed(table, session, consumers=1)
    grant = closing(table.get(session, object_id, 0.0, device=GPU))
    assert grant.fds and session.slabs_sent                             # the GPU slab's descriptor
    table.copied(grant.lease)
    table.abandon(session, grant)
    assert used(table, GPU) == 0 and not session.leases
    assert grant.copy.dst.slab.id not in session.slabs_sent             # sent again next time
    closing(table.get(session, object_id, 0.0))                         # not consumed: still there


def test_where_a_get_lands_by_default(table, session):
    on_gpu = sealed(table, session, device=GPU)
    assert closing(table.get(session, on_gpu, 0.0, prefer=GPU)).copy is None      # its own GPU
    to_host = closing(table.get(session, on_gpu, 0.0))                           # no GPU: host
    assert to_host.copy.dst.slab.device == "host"
    on_host = sealed(table, session)
    assert closing(table.get(session, on_host, 0.0, prefer=GPU)).copy is None    # stays on host


def test_an_unknown_device_is_refused_before_anything_is_leased(table, session):
    object_id = sealed(table, session)
    with pytest.raises(errors.InvalidArgumentError, match="'GPU-nope' is not one of this node's pools"):
        table.get(session, object_id, 0.0, device="GPU-nope")
    assert not session.leases


def test_a_full_target_pool_fails_the_get_and_leases_nothing(table, session):
    object_id = sealed(table, session)
    for _ in range(4):                                                  # fill the GPU pool
        closing(table.create(session, (16 * MiB,), "uint8", 16 * MiB, None, None, None, GPU))
    leases = len(session.leases)
    with pytest.raises(errors.PoolExhaustedError, match="the GPU-00000000-test pool cannot hold"):
        table.get(session, object_id, 0.0, device=GPU)
    assert len(session.leases) == leases
