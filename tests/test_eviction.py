"""Eviction to the host tier and restore (Note [Queue-aware eviction], controller/eviction.py),
through a real controller whose device tier is a host-backed stand-in for a GPU (Note
[Host-backed stand-ins]): 4 slabs of 1 MiB, each object fills one."""

import gc
import time

import numpy as np
import pytest
import redis

from faastube import errors, sdk
from faastube.cli import render_status
from faastube.config import format_size

from .conftest import ControllerProcess, wait_for
from .test_metrics import scrape

MiB = 1 << 20
OBJECT = 900_000            # one per 1 MiB slab
TIER = "host:0"


def stand_in(tmp_path, redis_url, **settings):
    return ControllerProcess(tmp_path, redis_url, stand_in_gpus="1", gpu_slab_size="1MiB",
                             gpu_pool_limit="4MiB", slab_size="4MiB", pool_limit="64MiB",
                             **settings).start()


@pytest.fixture
def tier(tmp_path, redis_server, request, metrics_port):
    ctl = stand_in(tmp_path, redis_server.url, metrics_port=metrics_port, **getattr(request, "param", {}))
    sdk.connect(socket=ctl.socket, namespace="test", spare_bytes=0)
    yield ctl
    gc.collect()
    try:
        wait_for(lambda: ctl.leases() == 0, timeout=10, message="every lease to end")
    finally:
        sdk._client.close()
        sdk._client = None
        assert ctl.stop() == 0, ctl.log()


def put_on_tier(value: int, client=None) -> dict | str:
    """An object of OBJECT bytes of ``value`` made on the stand-in tier."""
    if client is None:
        array = sdk.empty(OBJECT, "uint8", device=TIER)
        array[...] = value
        ref = sdk.seal(array)
        del array
        return ref
    array, object_id, _lease = client.create((OBJECT,), np.dtype("uint8"), device=TIER)
    array[...] = value
    client.seal(object_id, wait=True)
    del array
    return object_id


def tier_stats(ctl) -> dict:
    return next(p for p in ctl.status()["pools"] if p["device"] == TIER)


def where(redis_url, ref) -> str | None:
    """The device Redis says an object's bytes are on (written behind the request path, Note
    [Directory writes are coalesced]: None until it is written)."""
    object_id = ref["id"] if isinstance(ref, dict) else ref
    device = redis.Redis.from_url(redis_url).hget(f"faastube:obj:{object_id}", "device")
    return None if device is None else device.decode()


def evicted(redis_url, refs) -> set:
    return {name for name, ref in refs.items() if where(redis_url, ref) == "host"}


def test_a_full_device_tier_moves_objects_to_the_host_and_gets_bring_back_the_same_bytes(tier, redis_server,
                                                                                       metrics_port):
    refs = [put_on_tier(n) for n in range(6)]             # 6 objects, room for 4
    stats = tier_stats(tier)
    assert stats["moves"]["evict"]["objects"] == 2 and stats["evicted"] == {"objects": 2, "bytes": 2 * OBJECT}
    assert stats["waits"]["requests"] == 2 and stats["waits"]["failed"] == 0
    wait_for(lambda: sum(where(redis_server.url, r) == "host" for r in refs) == 2, message="Redis to follow")
    # The host tier keeps room ahead for as many evictions again (made off the table's lock).
    host = next(p for p in tier.status()["pools"] if p["device"] == "host")
    assert host["ahead_wanted"] == {"test": 2 * OBJECT}
    # On the host, a get reads an evicted object where it is; on the tier, it restores it.
    for n, ref in enumerate(refs):
        assert int(sdk.get(ref).sum()) == n * OBJECT
    for n, ref in enumerate(refs):
        view = sdk.get(ref, device=TIER)
        assert view.min() == view.max() == n and view.size == OBJECT
        del view
    stats = tier_stats(tier)
    assert stats["moves"]["restore"]["objects"] >= 2
    assert stats["evicted"]["objects"] == 2                 # each restore evicted another
    assert stats["moves"]["evict"]["bytes"] == stats["moves"]["evict"]["objects"] * OBJECT
    assert stats["eviction"] == "queue"
    assert next(p for p in tier.status()["pools"] if p["device"] == "host")["eviction"] == "none"
    # The same figures in `faastube status` and on /metrics.
    text = render_status(tier.status())
    assert (f"  eviction queue: 2 objects (1.7 MiB) on the host now; evicted {stats['moves']['evict']['objects']} "
            f"({format_size(stats['moves']['evict']['bytes'])},") in text
    samples = scrape(metrics_port)
    labels = (("device", TIER), ("kind", "evict"), ("name", "stand-in 0 (host memory for a GPU)"))
    assert samples[("faastube_pool_moved_objects_total", labels)] == stats["moves"]["evict"]["objects"]
    assert samples[("faastube_pool_evicted_bytes", labels[:1] + labels[2:])] == 2 * OBJECT


@pytest.mark.parametrize("tier, expected", [
    ({"eviction": "queue"}, ["W", "B", "C"]),     # got first, then the back of the consumer's queue
    ({"eviction": "lru"}, ["W", "A1", "A2"]),     # least recently used first: the queue's front
], indirect=["tier"], ids=["queue", "lru"])
def test_eviction_takes_the_objects_needed_last_first_on_a_scripted_queue(tier, redis_server, expected):
    refs = {}
    with sdk.activation(None, "producer"):
        refs["W"] = put_on_tier(0)
    with sdk.activation(None, "consumer"):           # the consumer gets what the producer puts
        assert int(sdk.get(refs["W"], device=TIER)[0]) == 0
    wait_for(lambda: any(d["consumer"] == "consumer" for d in tier.status()["demand"]
                         if d["function"] == "producer"), message="the producer's consumer to be known")
    with sdk.activation(None, "producer"):
        for name in ("A1", "A2", "A3"):                # the tier is full: W A1 A2 A3
            refs[name] = put_on_tier(1)
        order = []
        for name in ("B", "C", "D"):                  # each put evicts one
            refs[name] = put_on_tier(2)
            wait_for(lambda: len(evicted(redis_server.url, refs)) == len(order) + 1,
                     message=f"one more object evicted by {name}")
            order += sorted(evicted(redis_server.url, refs) - set(order))
    assert order == expected
    for name, ref in refs.items():                     # nothing lost or changed
        assert int(sdk.get(ref)[0]) == {"W": 0, "A": 1}.get(name[0], 2)


@pytest.mark.parametrize("tier", [{"evict_wait": "0.3"}], indirect=True)
def test_objects_with_a_live_view_never_move_and_the_put_fails_clearly_after_the_wait(tier, redis_server):
    refs = [put_on_tier(n) for n in range(4)]
    views = [sdk.get(ref, device=TIER) for ref in refs]        # every object held
    started = time.monotonic()
    with pytest.raises(errors.PoolExhaustedError, match=r"stand-in 0.*eviction to the host tier could "
                                                        r"not make room within 0\.3 s, --evict-wait"):
        put_on_tier(9)
    assert time.monotonic() - started < 5
    assert [int(v[0]) for v in views] == [0, 1, 2, 3]
    stats = tier_stats(tier)
    assert stats["moves"]["evict"]["objects"] == 0 and stats["waits"] == {
        "requests": 1, "seconds": pytest.approx(stats["waits"]["seconds"]), "failed": 1}
    del views
    gc.collect()
    ref = put_on_tier(9)                               # the views are gone: one can move now
    assert int(sdk.get(ref, device=TIER)[0]) == 9
    assert tier_stats(tier)["moves"]["evict"]["objects"] == 1


@pytest.mark.parametrize("tier", [{"namespace_quota": "50%"}], indirect=True)
def test_a_namespace_at_its_quota_evicts_its_own_objects_never_another_namespaces(tier, redis_server):
    other = tier.client("other", spare_bytes=0)
    try:
        theirs = [put_on_tier(7, other), put_on_tier(8, other)]       # their half of the tier
        mine = [put_on_tier(n) for n in range(5)]                      # 5 objects in my 2 slabs
        wait_for(lambda: sum(where(redis_server.url, ref) == "host" for ref in mine) == 3,
                 message="three of mine on the host")
        # Written before mine's moves (the directory's writes are in order): still on the tier.
        assert [where(redis_server.url, ref) for ref in theirs] == [TIER, TIER]
        assert [int(sdk.get(ref)[0]) for ref in mine] == list(range(5))
        assert [int(other.get(i, 1)[0]) for i in theirs] == [7, 8]
    finally:
        other.close()


def test_the_front_of_an_active_consumers_queue_is_restored_ahead_when_room_frees_up(tier, redis_server):
    refs = {}
    with sdk.activation(None, "producer"):
        refs["W"] = put_on_tier(0)
    with sdk.activation(None, "consumer"):
        assert int(sdk.get(refs["W"], device=TIER)[0]) == 0
    sdk.delete(refs.pop("W"))
    with sdk.activation(None, "producer"):
        # Each put evicts the back of the queue on the tier: A4 evicts A3, A5 A4, A6 A5.
        for n in range(7):
            refs[f"A{n}"] = put_on_tier(n)
    wait_for(lambda: evicted(redis_server.url, refs) == {"A3", "A4", "A5"}, message="A3, A4, A5 evicted")
    with sdk.activation(None, "consumer"):            # the consumer takes A0..A3, on the host
        for n in range(4):
            assert int(sdk.get(refs[f"A{n}"])[0]) == n
    for n in range(4):
        sdk.delete(refs.pop(f"A{n}"))                 # room on the tier again
    # A4 and A5 are the consumer's next inputs: they come back ahead of their gets.
    wait_for(lambda: evicted(redis_server.url, refs) == set(), message="A4 and A5 restored ahead")
    assert tier_stats(tier)["moves"]["ahead"]["objects"] == 2
    assert tier_stats(tier)["moves"]["restore"]["objects"] == 0
    assert [int(sdk.get(refs[f"A{n}"], device=TIER)[0]) for n in (4, 5, 6)] == [4, 5, 6]


@pytest.mark.parametrize("tier, spilled", [({"eviction": "queue"}, True), ({"eviction": "lru"}, False)],
                         indirect=["tier"], ids=["queue", "lru"])
def test_a_put_that_would_be_evicted_first_goes_to_the_host_at_once_and_comes_back_ahead(tier, redis_server,
                                                                                         spilled):
    """Note [Puts that rank last]: A4 joins the back of the consumer's queue behind A0..A3, so
    with queue-aware eviction the put writes it to the host tier instead of evicting A3 (which
    would be needed first); LRU evicts the least recently used, A0."""
    with sdk.activation(None, "producer"):
        first = sdk.put(np.zeros(OBJECT, np.uint8), device=TIER)
    with sdk.activation(None, "consumer"):
        assert int(sdk.get(first, device=TIER)[0]) == 0
    sdk.delete(first)                             # carries the consumer's activation
    wait_for(lambda: any(d["consumer"] == "consumer" for d in tier.status()["demand"]
                         if d["function"] == "producer"), message="the producer's consumer to be known")
    wait_for(lambda: any(d["reserving"] for d in tier.status()["demand"] if d["function"] == "consumer"),
             message="the consumer's activation to be counted")
    refs = {}
    with sdk.activation(None, "producer"):
        for n in range(5):
            refs[f"A{n}"] = sdk.put(np.full(OBJECT, n, np.uint8), device=TIER)
    assert all(ref["device"] == TIER for ref in refs.values())       # the ref names its tier either way
    stats = tier_stats(tier)
    wait_for(lambda: len(evicted(redis_server.url, refs)) == 1, message="one object on the host")
    if spilled:
        assert evicted(redis_server.url, refs) == {"A4"}
        assert stats["moves"]["spill"] == {"objects": 1, "bytes": OBJECT, "seconds": 0.0}
        assert stats["moves"]["evict"]["objects"] == 0 and stats["waits"]["requests"] == 0
        assert f"put to the host 1 ({format_size(OBJECT)}, 0.000 s)" in render_status(tier.status())
    else:
        assert evicted(redis_server.url, refs) == {"A0"}
        assert stats["moves"]["spill"]["objects"] == 0 and stats["moves"]["evict"]["objects"] == 1
    with sdk.activation(None, "consumer"):
        assert int(sdk.get(refs["A0"], device=TIER)[0]) == 0
    sdk.delete(refs.pop("A0"))                    # room on the tier: A4 is the queue's next
    if spilled:                                   # restored ahead (LRU restores on gets only)
        wait_for(lambda: evicted(redis_server.url, refs) == set(), message="everything back on the tier")
    with sdk.activation(None, "consumer"):
        assert [int(sdk.get(refs[f"A{n}"], device=TIER).max()) for n in range(1, 5)] == [1, 2, 3, 4]


def test_put_to_another_tier_is_refused_clearly(tier):
    with pytest.raises(errors.InvalidArgumentError, match="a numpy array is put on the host tier"):
        sdk.put(np.zeros(4, np.uint8), device="GPU-00000000-0000-0000-0000-000000000000")


# -- the table's evictor in process (a real Redis; the device's free memory is what the probe says)

@pytest.fixture
def table(redis_server):
    import ctypes
    import functools
    import os
    from controller.directory import Directory
    from controller.objects import ObjectTable, Session
    from controller.pool import Pool
    from controller.slabs import MemfdSlab
    from controller.transfer import move_region

    free = [8 * MiB]
    host = Pool("host", 4 * MiB, 64 * MiB, 30.0, slab_factory=functools.partial(MemfdSlab, mapped=True))
    device = Pool(TIER, MiB, 8 * MiB, 30.0, free_probe=lambda: free[0], watermark=4 * MiB,
                  slab_factory=functools.partial(MemfdSlab, mapped=True, device=TIER))
    directory = Directory(redis_server.url, f"evict-node-{os.getpid()}", "e1", 60)
    table = ObjectTable([host, device], directory, move=functools.partial(move_region, None))
    session = Session(os.getpid(), os.getuid(), os.getgid(), admin=False)
    session.namespace = "ns"
    table.open_session(session)

    def put(value: int) -> str:
        grant = table.create(session, (OBJECT,), "uint8", OBJECT, None, None, None, device=TIER)
        for fd, _descriptor in grant.fds:
            os.close(fd)
        region = grant.record.region
        ctypes.memset(region.slab.address + region.offset, value, OBJECT)
        table.seal(session, grant.record.id, drop_writer=True)
        return grant.record.id

    def read(object_id: str) -> bytes:
        region = table.objects[object_id].region
        return ctypes.string_at(region.slab.address + region.offset, region.nbytes)

    table.test = (session, put, read, free)
    yield table
    table.shutdown()
    directory.close()


def test_free_memory_under_the_watermark_moves_whole_slabs_to_the_host_and_gives_them_back(table):
    _session, put, read, free = table.test
    device = table.pools[TIER]
    ids = [put(n) for n in range(6)]                 # 6 slabs of 1 MiB
    free[0] = MiB                                    # a model took the GPU's memory
    table.housekeeping()                             # 3 MiB short of the 4 MiB watermark
    assert device.reserved == 3 * MiB and device.stats()["given_back"] == {"slabs": 3, "bytes": 3 * MiB}
    moved = [i for i in ids if table.objects[i].region.slab.device == "host"]
    assert len(moved) == 3 and device.stats()["moves"]["evict"]["objects"] == 3
    assert [read(i) == bytes([n]) * OBJECT for n, i in enumerate(ids)] == [True] * 6
    free[0] = 6 * MiB                                # over the watermark: nothing more moves
    table.housekeeping()
    assert device.reserved == 3 * MiB and device.stats()["moves"]["evict"]["objects"] == 3


def test_an_object_deleted_while_it_moves_frees_both_regions(table):
    from controller.eviction import Grow
    session, put, _read, _free = table.test
    object_id = put(5)
    with table.lock:
        (grow,) = table.evictor.pick(table.pools[TIER], OBJECT, "ns", own_only=True)
    assert isinstance(grow, Grow)                    # no host room yet: made outside the lock
    table.evictor.run([grow])
    assert table.pools["host"].stats()["grown"]["request"]["slabs"] == 1
    with table.lock:
        (move,) = table.evictor.pick(table.pools[TIER], OBJECT, "ns", own_only=True)
    table.delete(session, object_id)                 # the move still holds both regions
    assert table.pools["host"].stats()["used"] > 0 and table.pools[TIER].stats()["used"] > 0
    table.evictor.run([move])
    assert table.pools["host"].stats()["used"] == 0 and table.pools[TIER].stats()["used"] == 0
    with pytest.raises(errors.ObjectDeletedError):
        table.get(session, object_id, 0)
