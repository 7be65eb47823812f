"""Spare objects (Note [Spare objects] in faastube/spares.py): a process that puts one
signature again gets the next object's create made ahead, without waiting; the seal gives
it the put's consumers, ttl and scope. Real controller, real Redis, real processes."""

import importlib

import numpy as np
import pytest

from faastube import errors, protocol
from tests.conftest import wait_for


def pending(controller, namespace="test") -> int:
    return controller.status()["namespaces"].get(namespace, {}).get("pending", 0)


def spare_grant(conn):
    """The create reply this process's (only) spare will hand to the next put."""
    spare = conn.spares.held()[0]
    conn.request(protocol.Ping())          # replies come in order: the spare's is read by now
    return conn.connection.peek(spare.create)


def test_the_second_put_of_a_shape_asks_for_a_spare_and_the_third_takes_it(ft, controller):
    conn = ft.client()
    first = ft.put(np.full(1000, 1, np.int32))
    assert not conn.spares.held()                            # one put says nothing yet
    second = ft.put(np.full(1000, 2, np.int32))
    assert wait_for(lambda: pending(controller) == 1, message="the spare's create")
    spare = spare_grant(conn)                                # the create reply it will take
    third = ft.put(np.full(1000, 3, np.int32), scope="run-1", ttl=60)
    assert third["id"] == spare.id
    conn.request(protocol.Ping())                            # the seal and next create landed
    assert pending(controller) == 1                          # the next spare, already asked for
    for ref, value in ((first, 1), (second, 2), (third, 3)):
        assert (ft.get(ref) == value).all()
    # The seal gave the spare the put's lifetime: its scope frees it ...
    assert ft.close_scope("run-1") == 1
    with pytest.raises(errors.ObjectDeletedError):
        ft.get(third)


def test_a_spare_takes_the_puts_consumers_and_ttl(ft, controller):
    for _ in range(2):
        ft.put(np.zeros(64, np.uint8))
    counted = ft.put(np.arange(64, dtype=np.uint8), consumers=1)
    view = ft.get(counted)
    assert (view == np.arange(64)).all()
    ft.release(view)
    wait_for(lambda: not _gets(ft, counted), message="the consumed spare to go")
    short = ft.put(np.ones(64, np.uint8), ttl=0.2)
    wait_for(lambda: isinstance(_error(ft, short), errors.ObjectExpiredError), timeout=5,
             message="the spare's ttl to run out")
    del view


def _gets(ft, ref) -> bool:
    return _error(ft, ref) is None


def _error(ft, ref):
    try:
        ft.get(ref, timeout=0)
    except errors.ObjectNotFoundError as exc:
        return exc
    return None


def test_an_idle_spare_is_freed(ft, controller, monkeypatch):
    # faastube.client is also the SDK's client() function: the module by its import name.
    monkeypatch.setattr(importlib.import_module("faastube.spares"), "SPARE_IDLE_S", 0.2)
    for _ in range(2):
        ft.put(np.zeros(1000, np.uint8))
    assert wait_for(lambda: pending(controller) == 1, message="the spare")
    wait_for(lambda: pending(controller) == 0 and controller.leases() == 0, timeout=5,
             message="the idle spare to be freed")
    assert not ft.client().spares.held()


def test_spares_are_off_with_no_spare_bytes_and_for_arrays_above_them(ft, controller):
    for spare_bytes, size in ((0, 1000), (4096, 8192)):       # none; bigger than spare_bytes
        conn = ft.connect(socket=controller.socket, namespace="test", spare_bytes=spare_bytes)
        for _ in range(3):
            ft.put(np.zeros(size, np.uint8))
        assert not conn.spares.held()
        # Seals go without waiting; replies come in order, so after a ping they have landed.
        conn.request(protocol.Ping())
        assert pending(controller) == 0


def test_a_full_pool_frees_the_spares_before_it_fails_a_put(tmp_path, redis_server):
    from tests.conftest import ControllerProcess
    with ControllerProcess(tmp_path, redis_server.url, slab_size="1MiB", pool_limit="2MiB") as ctl:
        conn = ctl.client()
        try:
            def put(shape):
                target, object_id, lifetime = conn.create_for_put(shape, np.dtype("uint8"))
                target[...] = 7
                del target
                conn.seal(object_id, drop_writer=True, wait=False, lifetime=lifetime)
                return object_id
            conn.request(protocol.Delete(put((700_000,))))
            conn.request(protocol.Delete(put((700_000,))))   # a spare of 700 kB now holds a slab
            assert conn.spares.held()
            kept = put((700, 1000))                          # another signature: the other slab
            last = put((1000, 700))                          # no room left but the spare's
            assert not conn.spares.held()
            assert (conn.get(last, 1) == 7).all() and (conn.get(kept, 1) == 7).all()
        finally:
            conn.close()


def test_a_seal_gives_a_lifetime_only_to_an_object_created_without_one(controller):
    conn = controller.client()
    try:
        with pytest.raises(errors.InvalidArgumentError, match="only with lifetime: true"):
            conn.request(protocol.Seal("0" * 32, True, False, 2))
        target, object_id, _lease = conn.create((4,), np.dtype("uint8"), scope="run")
        with pytest.raises(errors.InvalidStateError, match="got its consumers, ttl and scope when it was created"):
            conn.request(protocol.Seal(object_id, False, True, 1))
        conn.seal(object_id)                                # still pending, sealable as usual
        del target
    finally:
        conn.close()


def test_a_killed_process_leaves_no_spare(controller, worker_env):
    workers = worker_env
    process = workers.start("function.py", "held-puts", 5000, 3)
    assert len(workers.read_json(process)["refs"]) == 3
    assert wait_for(lambda: pending(controller) == 1, message="the worker's spare")
    process.kill()
    process.wait()
    wait_for(lambda: pending(controller) == 0 and controller.leases() == 0, timeout=10,
             message="the killed process's spare to go")
    assert controller.status()["namespaces"]["test"]["sealed"] == 3


def test_a_forked_child_never_takes_its_parents_spare(ft, controller):
    import os
    for value in (1, 2):
        ft.put(np.full(1000, value, np.int32))               # the parent now holds a spare
    spare_id = spare_grant(ft.client()).id
    pid = os.fork()
    if pid == 0:                                             # the child: its own connection
        code = 1
        try:
            ref = ft.put(np.full(1000, 7, np.int32))
            code = 0 if ref["id"] != spare_id and int(ft.get(ref).sum()) == 7000 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    mine = ft.put(np.full(1000, 3, np.int32))                # the parent's spare is intact
    assert mine["id"] == spare_id and int(ft.get(mine).sum()) == 3000


def test_a_repeated_empty_takes_a_spare_and_its_seal_gives_it_the_consumers_and_scope(ft, controller):
    made = []
    for value in (1, 2):
        out = ft.empty((1000,), "int32", consumers=1, scope="run-e")
        out[...] = value
        made.append(ft.seal(out))
    assert wait_for(lambda: pending(controller) == 1, message="the spare's create")
    spare_id = spare_grant(ft.client()).id
    out = ft.empty((1000,), "int32", consumers=1, scope="run-e")
    assert ft.ref_of(out)["id"] == spare_id
    out[...] = 3
    made.append(ft.seal(out))
    view = ft.get(made[2])                                   # after the seal, on its connection
    assert (view == 3).all()
    assert pending(controller) == 1                          # the next spare, already asked for
    ft.release(view)                                         # its one consumer: the seal gave it
    wait_for(lambda: _error(ft, made[2]) is not None, message="the consumed object to go")
    assert ft.close_scope("run-e") == 2                      # the other two, by their scope
    del view


def test_closing_a_scope_deletes_an_unsealed_empty_that_took_a_spare(ft, controller):
    for _ in range(2):
        ft.seal(ft.empty((500,), "uint8", scope="run-f"))
    out = ft.empty((500,), "uint8", scope="run-f")           # from the spare: no scope yet
    ref = ft.ref_of(out)
    assert ft.close_scope("run-f") == 3                      # two sealed, one unsealed
    assert pending(controller) == 1                          # only the next spare is left
    with pytest.raises(errors.ObjectNotFoundError):
        ft.get(ref, timeout=0)
    del out


def test_an_empty_with_a_ttl_never_takes_a_spare(ft, controller):
    for _ in range(2):
        ft.seal(ft.empty((300,), "uint8"))
    spare_id = spare_grant(ft.client()).id
    out = ft.empty((300,), "uint8", ttl=60)
    assert ft.ref_of(out)["id"] != spare_id
    ft.seal(out)


def test_an_empty_from_a_spare_dropped_unsealed_is_deleted(ft, controller):
    import gc
    for _ in range(2):
        ft.seal(ft.empty((700,), "uint8", scope="run-g"))
    out = ft.empty((700,), "uint8", scope="run-g")           # from the spare: no scope yet
    ref = ft.ref_of(out)
    del out
    gc.collect()

    def deleted() -> bool:
        try:
            ft.get(ref, timeout=0)
        except errors.FaasTubeTimeoutError:
            return False                                     # still pending: not yet
        except errors.ObjectDeletedError:
            return True
        raise AssertionError("an unsealed object was got")
    wait_for(deleted, timeout=5, message="the unsealed object to be deleted")
    assert ft.close_scope("run-g") == 2
