"""Every object lifecycle path, through the SDK, against a real controller process."""

import gc
import json
import threading
import time

import numpy as np
import pytest

from faastube import errors, protocol, refs, sdk
from faastube.connection import COPY_SPIN_BYTES_PER_S, COPY_SPIN_MAX_S, reply_spin_s
from faastube.refs import REF_MARKER

from .conftest import ControllerProcess, wait_for

NUMERIC = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
           "float16", "float32", "float64", "complex64", "complex128", ">i4", ">f8"]


@pytest.mark.parametrize("dtype", NUMERIC)
def test_put_get_roundtrips_every_numeric_dtype(ft, dtype):
    rng = np.random.default_rng(0)
    data = (rng.random((3, 5, 7)) * 100).astype(dtype)
    ref = ft.put(data)
    view = ft.get(ref)
    assert view.dtype == data.dtype and view.shape == data.shape
    np.testing.assert_array_equal(view, data)


def test_a_ref_is_small_json_with_a_marker(ft):
    ref = ft.put(np.zeros((1080, 1920, 3), np.uint8))
    assert json.loads(json.dumps(ref)) == ref
    assert ref[REF_MARKER] == 1
    assert ref["shape"] == [1080, 1920, 3] and ref["dtype"] == "uint8" and ref["nbytes"] == 6220800
    assert len(json.dumps(ref)) < 200


@pytest.mark.parametrize("shape", [(), (0,), (4, 0, 3), (1,), (2, 3, 4, 5, 6)])
def test_any_shape_including_scalars_and_empty(ft, shape):
    data = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
    view = ft.get(ft.put(data))
    assert view.shape == shape
    np.testing.assert_array_equal(view, data)


def test_get_is_a_read_only_zero_copy_view(ft):
    ref = ft.put(np.arange(1000, dtype=np.float64))
    a, b = ft.get(ref), ft.get(ref)
    assert not a.flags.writeable and not a.flags.owndata
    with pytest.raises(ValueError):
        a[0] = 1
    with pytest.raises(ValueError):
        a.flags.writeable = True
    # Two gets are two views of the same bytes (same process, same mapping): no copy.
    assert a.__array_interface__["data"][0] == b.__array_interface__["data"][0]


def test_non_contiguous_arrays_are_made_contiguous_once(ft):
    base = np.arange(100, dtype=np.int64).reshape(10, 10)
    for data in (base.T, base[::2, 1::3], base[:, ::-1]):
        assert not data.flags.c_contiguous
        view = ft.get(ft.put(data))
        assert view.flags.c_contiguous
        np.testing.assert_array_equal(view, data)


def test_empty_then_seal_is_a_zero_copy_put(ft):
    out = ft.empty((256, 256), "float32")
    assert out.flags.writeable
    out[...] = 3.5
    address = out.__array_interface__["data"][0]
    ref = ft.seal(out)
    assert not out.flags.writeable                     # immutable once sealed
    view = ft.get(ref)
    assert float(view.sum()) == 3.5 * 256 * 256
    # The consumer's view and the producer's array are the same pool bytes.
    np.testing.assert_array_equal(view, out)
    assert address != 0


def test_seal_twice_and_seal_foreign_arrays_are_refused(ft):
    out = ft.empty(4, "int8")
    ft.seal(out)
    with pytest.raises(errors.InvalidStateError, match="already sealed"):
        ft.seal(out)
    with pytest.raises(errors.InvalidStateError, match="not returned by faastube.empty"):
        ft.seal(np.zeros(4))
    with pytest.raises(errors.NotAnArrayError):
        ft.seal([1, 2])


def test_get_of_a_pending_object_waits_for_the_seal(ft, controller):
    out = ft.empty(1000, "int32")
    ref = ft.ref_of(out)
    result = {}

    def consumer():
        started = time.monotonic()
        result["sum"] = int(ft.get(ref, timeout=30).sum())
        result["waited"] = time.monotonic() - started

    thread = threading.Thread(target=consumer)
    thread.start()
    wait_for(lambda: controller.status()["namespaces"]["test"]["waiting_gets"] == 1,
             message="the consumer to wait in the controller")
    out[:] = 2
    ft.seal(out)
    thread.join(10)
    assert result["sum"] == 2000
    assert controller.status()["namespaces"]["test"]["waiting_gets"] == 0


def test_get_of_a_pending_object_times_out_clearly(ft):
    out = ft.empty(10, "int32")
    with pytest.raises(errors.FaasTubeTimeoutError, match=r"was not sealed within 0\.2 s"):
        ft.get(ft.ref_of(out), timeout=0.2)


def test_delete_frees_the_object_and_get_says_so(ft, controller):
    ref = ft.put(np.ones(10))
    ft.delete(ref)
    with pytest.raises(errors.ObjectDeletedError, match=f"object {ref['id']} was deleted"):
        ft.get(ref)
    with pytest.raises(errors.ObjectDeletedError):
        ft.delete(ref)


def test_unknown_object(ft):
    ref = {REF_MARKER: 1, "id": "0" * 32, "shape": [1], "dtype": "uint8", "nbytes": 1}
    with pytest.raises(errors.UnknownObjectError, match="no object 0{32}: it never existed"):
        ft.get(ref)


def test_consumers_free_the_object_after_n_releases(ft, controller):
    ref = ft.put(np.arange(10), consumers=2)
    first = ft.get(ref)
    ft.release(first)                                 # explicit: counts at once
    second = ft.get(ref)
    del second                                        # collected: counts when the GC runs
    gc.collect()

    def gone():
        try:
            ft.get(ref)
        except errors.ObjectDeletedError as exc:
            return "after all its consumers released it" in str(exc)
        return False
    wait_for(gone, message="object freed by its consumers")
    assert int(first.sum()) == 45                     # the released view is still valid


def test_ttl_expires_the_object(ft):
    ref = ft.put(np.arange(10), ttl=0.3)
    assert int(ft.get(ref).sum()) == 45

    def expired():
        try:
            ft.get(ref)
        except errors.ObjectExpiredError as exc:
            return "expired" in str(exc)
        return False
    wait_for(expired, timeout=5, message="ttl expiry")


def test_closing_a_scope_frees_its_objects_only(ft):
    in_scope = [ft.put(np.arange(i + 1), scope="activation-1") for i in range(3)]
    outside = ft.put(np.arange(5), scope="activation-2")
    assert ft.close_scope("activation-1") == 3
    for ref in in_scope:
        with pytest.raises(errors.ObjectDeletedError, match="scope was closed"):
            ft.get(ref)
    assert int(ft.get(outside).sum()) == 10
    assert ft.close_scope("activation-1") == 0


def test_memory_is_not_reused_while_a_deleted_object_is_still_viewed(ft, controller):
    ft.connect(socket=controller.socket, namespace="test", spare_bytes=0)   # a spare would take a hole
    a = np.full(1 << 16, 0xAA, np.uint8)
    ref = ft.put(a)
    view = ft.get(ref)
    ft.delete(ref)
    for _ in range(50):                                # plenty of chances to reuse the region
        ft.put(np.full(1 << 16, 0x55, np.uint8))
    assert (view == 0xAA).all()
    del view
    gc.collect()
    wait_for(lambda: controller.leases() == 0, message="the view's lease to end")
    # Now the region comes back (best fit: it is the only 64 KiB hole). empty() memory is
    # uninitialised, like numpy.empty, so the old bytes show that it is the same region.
    reused = ft.empty(1 << 16, "uint8")
    assert (reused == 0xAA).all()


@pytest.mark.parametrize("value, error, text", [
    ([1, 2, 3], errors.NotAnArrayError, "needs a numpy array, a CuPy array or a CUDA torch tensor, got list"),
    ("bytes", errors.NotAnArrayError, "got str"),
    (np.array(["a"]), errors.UnsupportedDtypeError, "dtype <U1 is not supported"),
    (np.array([object()]), errors.UnsupportedDtypeError, "dtype object is not supported"),
    (np.zeros(2, "datetime64[s]"), errors.UnsupportedDtypeError, "is not supported"),
    (np.zeros(2, [("a", "i4")]), errors.UnsupportedDtypeError, "is not supported"),
])
def test_put_refuses_what_it_cannot_store(ft, value, error, text):
    with pytest.raises(error, match=text.replace("[", r"\[")):
        ft.put(value)


@pytest.mark.parametrize("kwargs, text", [
    ({"consumers": 0}, "consumers must be a positive integer"),
    ({"consumers": 1.5}, "consumers must be a positive integer"),
    ({"ttl": -1}, "ttl must be a number of seconds above 0"),
])
def test_put_refuses_bad_lifetimes(ft, kwargs, text):
    with pytest.raises(errors.InvalidArgumentError, match=text):
        ft.put(np.zeros(1), **kwargs)


@pytest.mark.parametrize("ref, text", [
    ({"id": "x"}, "expected a FaaSTube ref"),
    ("abc", "got str"),
    ({REF_MARKER: 2, "id": "x", "shape": [], "dtype": "uint8"}, "ref version 2 is not supported"),
    ({REF_MARKER: 1, "shape": [], "dtype": "uint8"}, "ref has no 'id'"),
    ({REF_MARKER: 1, "id": "x", "shape": "3", "dtype": "uint8"}, "ref 'shape' must be a list"),
    ({REF_MARKER: 1, "id": "x", "shape": [1], "dtype": "object"}, "ref 'dtype' is not usable"),
])
def test_get_refuses_what_is_not_a_ref(ft, ref, text):
    with pytest.raises(errors.InvalidRefError, match=text):
        ft.get(ref)


@pytest.mark.parametrize("slo_ms, text", [
    (0, "slo_ms must be a number of milliseconds between 0.01 and 3600000, got 0"),
    (True, "got True"),
    ("50", "got '50'"),
])
def test_get_refuses_a_nonsense_slo(ft, slo_ms, text):
    ref = ft.put(np.arange(3))
    with pytest.raises(errors.InvalidArgumentError, match=text):
        ft.get(ref, slo_ms=slo_ms)


def test_a_get_with_an_slo_is_served_and_the_default_comes_from_the_environment(ft):
    from faastube.config import Config
    ref = ft.put(np.arange(5))
    assert ft.get(ref, slo_ms=2.5).tolist() == [0, 1, 2, 3, 4]   # the controller accepts it
    assert Config.from_env({"FAASTUBE_SLO_MS": "40"}).slo_ms == 40.0
    with pytest.raises(errors.InvalidArgumentError, match=r"FAASTUBE_SLO_MS='-1' is not valid: write milliseconds"):
        Config.from_env({"FAASTUBE_SLO_MS": "-1"})


def test_namespaces_cannot_see_each_other(controller):
    alice, bob = controller.client("alice"), controller.client("bob")
    try:
        target, object_id, _ = alice.create_for_put((4,), np.dtype("int32"))
        target[:] = 1
        del target
        alice.seal(object_id, drop_writer=True)
        with pytest.raises(errors.NamespaceError, match="belongs to another namespace than 'bob'"):
            bob.get(object_id, 0)
        from faastube import protocol
        with pytest.raises(errors.NamespaceError):
            bob.request(protocol.Delete(object_id))
        assert int(alice.get(object_id, 0).sum()) == 4
        assert set(controller.status()["namespaces"]) >= {"alice"}
    finally:
        alice.close()
        bob.close()


def test_operations_before_hello_are_refused(controller):
    from faastube import protocol
    from faastube.client import Client
    from faastube.config import Config
    anonymous = Client(Config.from_env(socket=controller.socket), anonymous=True)
    try:
        with pytest.raises(errors.InvalidStateError, match="send 'hello' with your namespace before 'get'"):
            anonymous.request(protocol.Get("x" * 32, 0))
    finally:
        anonymous.close()


def test_gpu_devices_on_a_node_without_gpus_are_refused_clearly(ft, controller):
    conn = sdk.client()
    with pytest.raises(errors.InvalidArgumentError,
                       match=r"device 'GPU-0000' is not one of this node's pools: host \(the "
                             r"controller found no GPU, or runs with --gpus none\)"):
        conn.create((4,), np.dtype("uint8"), device="GPU-0000")
    ref = ft.put(np.arange(4))
    with pytest.raises(errors.InvalidArgumentError, match="not one of this node's pools"):
        ft.get(ref, device="GPU-0000")
    with pytest.raises(errors.InvalidArgumentError, match="device must be 'cpu', 'cuda', 'cuda:N'"):
        ft.empty(4, device="tpu")
    assert ft.get(ref, device="cpu").tolist() == [0, 1, 2, 3]
    assert controller.leases() <= 1           # the refused get left no lease behind


def test_an_abandoned_lease_ends_without_consuming(ft, controller):
    # What the SDK sends for a grant it could not use (a reply that came after its timeout).
    ref = ft.put(np.arange(3), consumers=1)
    conn = sdk.client()
    reply = conn.request(protocol.Get(ref["id"]))
    conn.connection.releases.append((reply.lease, "abandon"))
    conn.request(protocol.Release())
    assert controller.leases() == 0
    assert ft.get(ref).tolist() == [0, 1, 2]      # not consumed: still there


def test_put_does_not_wait_for_its_seal_yet_every_later_get_sees_it_sealed(ft, worker_env):
    # Note [Seal without waiting]: the same connection answers in order; another process's
    # get either finds it sealed or waits for the seal.
    for i in range(20):
        ref = ft.put(np.full(1000, i, np.int32))
        assert int(ft.get(ref).sum()) == 1000 * i
    got = worker_env.run("function.py", "get", json.dumps(ft.put(np.arange(256, dtype=np.uint8))))
    assert got["shape"] == [256]


def test_a_client_that_polls_for_its_replies_gets_the_same_answers(controller, worker_env):
    # FAASTUBE_REPLY_SPIN_US: the reader polls before it sleeps in recv; replies, pipelined
    # ones and passed descriptors included, come out the same.
    conn = controller.client(reply_spin_us=2000)
    try:
        for i in range(30):
            target, object_id, lifetime = conn.create_for_put((1000,), np.dtype("int32"))
            target[:] = i
            del target
            conn.seal(object_id, drop_writer=True, wait=False, lifetime=lifetime)
            assert int(conn.get(object_id, 1).sum()) == 1000 * i
        got = worker_env.run("function.py", "get", json.dumps(refs.make_ref(object_id, (1000,), np.dtype("int32"))),
                             env={"FAASTUBE_REPLY_SPIN_US": "500"})
        assert got["shape"] == [1000]
    finally:
        conn.close()


def test_a_get_that_copies_spins_longer_only_where_the_reply_spin_is_on():
    # Note [A get that copies spins longer]: at a slow link's rate, capped; never on a
    # machine where the reply spin is off (it would take the controller's core).
    assert reply_spin_s(0, 64 << 20) == 0
    assert reply_spin_s(100) == reply_spin_s(100, 0) == pytest.approx(100e-6)
    assert reply_spin_s(100, 1 << 20) == pytest.approx(100e-6 + (1 << 20) / COPY_SPIN_BYTES_PER_S)
    assert reply_spin_s(100, 1 << 30) == pytest.approx(100e-6 + COPY_SPIN_MAX_S)


def test_gets_that_copy_between_tiers_under_a_long_spin_give_the_same_bytes(tmp_path, redis_server):
    # A host object got on a stand-in GPU tier and back: the reply comes after the copy,
    # which the spinning reader waits out like any other.
    ctl = ControllerProcess(tmp_path, redis_server.url, stand_in_gpus="1", gpu_slab_size="4MiB",
                            gpu_pool_limit="16MiB").start()
    conn = ctl.client(reply_spin_us=500)
    try:
        data = np.random.default_rng(7).integers(0, 256, 3 << 20, dtype=np.uint8)
        target, object_id, lifetime = conn.create_for_put(data.shape, data.dtype)
        target[:] = data
        del target
        conn.seal(object_id, drop_writer=True, wait=True, lifetime=lifetime)
        for _ in range(3):
            on_tier = conn.get(object_id, 1, device="host:0", copy_bytes=data.nbytes)
            np.testing.assert_array_equal(on_tier, data)
            del on_tier
    finally:
        conn.close()
        assert ctl.stop() == 0, ctl.log()


def test_a_request_nobody_waits_for_that_fails_is_logged(ft, controller, caplog):
    conn = sdk.client()
    conn.seal("0" * 32, wait=False)              # no such object: the controller says so
    conn.request(protocol.Ping())                # reading this reply reads the seal's first
    assert any("did not wait for failed: UnknownObjectError" in r.getMessage() for r in caplog.records)


def test_a_forked_child_that_drops_its_parents_views_ends_none_of_the_parents_leases(ft, controller):
    # Note [After fork]: the child inherits the parent's views and their finalizers; when the
    # child drops them, nothing may reach the controller in the parent's name. (The writer
    # comes from a spare, so the parent's SDK would delete it if collected unsealed.)
    import gc
    import os
    ref = ft.put(np.arange(1000), consumers=1)
    view = ft.get(ref)
    for _ in range(2):
        ft.seal(ft.empty((10,), "int64"))
    writer = ft.empty((10,), "int64")
    assert ft.client().leases.lifetimes            # from a spare: its lifetime waits for the seal
    ft.client().request(protocol.Ping())
    assert controller.leases() == 3                # reader, writer, the next spare
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            del view, writer
            gc.collect()
            own = ft.put(np.full(10, 5))          # the child's own connection, its own requests
            code = 0 if int(ft.get(own).sum()) == 50 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    ft.client().request(protocol.Ping())
    # The parent's reader, writer and spare: the child's own lease ends once the controller
    # has seen the child's connection close, which may come after this Ping.
    wait_for(lambda: controller.leases() == 3, timeout=5, message="the child's lease to end")
    assert int(view.sum()) == 499500
    writer[...] = 4
    assert int(ft.get(ft.seal(writer)).sum()) == 40     # still the parent's to seal
    del view, writer
