"""The host pool seen through a real controller: exhaustion, growth, idle release."""

import gc

import numpy as np
import pytest

from faastube import errors, protocol

from .conftest import wait_for

MiB = 1 << 20


@pytest.fixture
def controller_settings():
    return {"slab_size": "1MiB", "pool_limit": "4MiB", "idle_release": "0.3"}


def pool_of(controller):
    return controller.status()["pools"][0]


def test_exhaustion_is_a_clear_error_and_other_objects_stay_intact(ft, controller):
    kept = [np.full(700_000, i, np.uint8) for i in range(4)]
    refs = [ft.put(a) for a in kept]
    with pytest.raises(errors.PoolExhaustedError,
                       match=r"cannot hold 2\.9 MiB for namespace 'test'.*4\.0 MiB limit.*--pool-limit"):
        ft.put(np.zeros(3_000_000, np.uint8))
    for ref, original in zip(refs, kept):
        np.testing.assert_array_equal(ft.get(ref), original)
    ft.delete(refs[0])
    ft.delete(refs[1])
    ft.put(np.zeros(1_500_000, np.uint8))   # room again once objects are deleted


def test_the_pool_grows_on_demand_and_releases_idle_slabs(ft, controller):
    ft.connect(socket=controller.socket, namespace="test", spare_bytes=0)   # slab counts without spares
    assert pool_of(controller)["slabs"] == 0
    refs = [ft.put(np.ones(600_000, np.uint8)) for _ in range(3)]
    assert pool_of(controller)["slabs"] == 3
    for ref in refs:
        ft.delete(ref)
    wait_for(lambda: pool_of(controller)["slabs"] == 0, timeout=5, message="idle slabs released")
    assert pool_of(controller)["slabs_retired"] == 3
    # The client learns of retired slabs on its next reply and drops its cached mappings.
    client = ft.client()
    assert client.slabs
    ft.put(np.ones(10, np.uint8))
    assert len(client.slabs) == 1


def test_a_retired_slab_stays_readable_through_a_live_view(ft, controller):
    ref = ft.put(np.arange(1000, dtype=np.int64))
    view = ft.get(ref)
    ft.delete(ref)
    # Still leased, so the slab is not empty and cannot be retired.
    other = ft.put(np.ones(10))
    ft.delete(other)
    assert int(view.sum()) == 499500
    del view
    gc.collect()
    wait_for(lambda: pool_of(controller)["slabs"] == 0, timeout=5, message="slab retired after the view")


def test_slabs_are_never_shared_between_namespaces(controller):
    alice, bob = controller.client("alice"), controller.client("bob")
    try:
        a, a_id, _ = alice.create_for_put((10,), np.dtype("uint8"))
        b, b_id, _ = bob.create_for_put((10,), np.dtype("uint8"))
        del a, b
        alice.seal(a_id, drop_writer=True)
        bob.seal(b_id, drop_writer=True)
        assert set(alice.slabs).isdisjoint(bob.slabs)
        namespaces = controller.status()["namespaces"]
        assert namespaces["alice"]["slabs"] == namespaces["bob"]["slabs"] == 1
    finally:
        alice.close()
        bob.close()


@pytest.mark.parametrize("controller_settings", [{"slab_size": "1MiB", "pool_limit": "8MiB", "idle_release": "60",
                                                  "idle_minimum": "8MiB"}])
def test_each_writer_writes_in_slabs_of_its_own_and_a_closed_writers_slab_is_retired_once_empty(controller):
    # Note [Slabs of one writer]: two connections of one namespace never share a slab they
    # write in; once a writer's connection closes its slab takes no new object and goes when
    # its last object does, though the idle time (60 s) and idle minimum would keep it.
    first, second = controller.client(spare_bytes=0), controller.client(spare_bytes=0)
    try:
        def put(client, value):
            target, object_id, lifetime = client.create_for_put((1000,), np.dtype("uint8"))
            target[...] = value
            del target
            client.seal(object_id, drop_writer=True, lifetime=lifetime)
            return object_id
        kept = put(first, 1)
        put(second, 2)
        put(second, 3)
        writable = {client: {i for i in client.slabs if client.slabs[i].writable is not None}
                    for client in (first, second)}
        assert len(writable[first]) == len(writable[second]) == 1
        assert writable[first].isdisjoint(writable[second])
        assert pool_of(controller)["slabs"] == 2 and pool_of(controller)["writers"] == 2
        first.close()
        wait_for(lambda: pool_of(controller)["writers"] == 1, message="the closed writer's slab given up")
        assert int(second.get(kept, 1).sum()) == 1000           # its object is still there, read-only
        put(second, 4)
        assert pool_of(controller)["slabs"] == 2                 # not in the closed writer's slab
        second.request(protocol.Delete(kept))
        wait_for(lambda: pool_of(controller)["slabs"] == 1, message="the closed writer's empty slab retired")
    finally:
        first.close()
        second.close()


def test_a_namespace_at_its_quota_gets_a_clear_error_and_another_namespace_still_has_room(tmp_path, redis_server):
    from .conftest import ControllerProcess
    ctl = ControllerProcess(tmp_path, redis_server.url, slab_size="1MiB", pool_limit="8MiB",
                            namespace_quota="50%").start()
    greedy, other = ctl.client("greedy", spare_bytes=0), ctl.client("other", spare_bytes=0)
    try:
        def put(client, nbytes, value):
            target, object_id, lifetime = client.create_for_put((nbytes,), np.dtype("uint8"))
            target[...] = value
            del target
            client.seal(object_id, drop_writer=True, lifetime=lifetime)
            return object_id
        kept = [put(greedy, 900_000, n) for n in range(4)]          # 4 × 1 MiB slabs: its half
        with pytest.raises(errors.QuotaExceededError,
                           match=r"namespace 'greedy' cannot grow the host pool by 1\.0 MiB for 878\.9 KiB: "
                                 r"it holds 4\.0 MiB of its 4\.0 MiB quota there.*--namespace-quota"):
            put(greedy, 900_000, 9)
        theirs = [put(other, 900_000, 7) for _ in range(4)]          # the other half is still there
        assert [int(greedy.get(i, 1).sum()) for i in kept] == [n * 900_000 for n in range(4)]
        assert all(int(other.get(i, 1).sum()) == 7 * 900_000 for i in theirs)
        assert ctl.status()["pools"][0]["quota"] == 4 << 20
    finally:
        greedy.close()
        other.close()
        assert ctl.stop() == 0


def test_a_device_pool_holds_a_share_of_free_memory_and_gives_empty_slabs_back_under_the_watermark():
    # Note [Giving memory back], the pool's policy over a host-backed tier standing in for a
    # GPU: the device's free memory is what the probe says (what another process leaves).
    from controller.pool import Pool
    # A 64 MiB device: free is what neither the pool's slabs nor other processes take (the
    # pool may read it at any moment: it keeps a probe for PROBE_TTL_S).
    others = [0]
    pool = Pool("GPU-test", 4 * MiB, 64 * MiB, 30.0, free_probe=lambda: 64 * MiB - pool.reserved - others[0],
                free_share=0.5, watermark=16 * MiB)
    try:
        regions = [pool.allocate("ns", 3 * MiB) for _ in range(8)]     # 8 slabs: 32 MiB
        assert pool.reserved == 32 * MiB
        with pytest.raises(errors.PoolExhaustedError, match=r"device has 32\.0 MiB free, of which with "
                                                             r"its own slabs it may hold 50%"):
            pool.allocate("ns", 3 * MiB)                               # 36 > 0.5 × (32 + 32)
        for region in regions[:5]:
            pool.free(region)                                          # 5 empty slabs
        others[0] = 26 * MiB                                           # a model took 26 MiB: 6 free
        given = pool.give_back(pool.probe_for_give_back())
        assert len(given) == 3 and pool.reserved == 20 * MiB           # 6 + 3 × 4 ≥ 16: enough
        assert pool.stats()["given_back"] == {"slabs": 3, "bytes": 12 * MiB}
        assert len(pool.slabs) == 5 and sum(s.allocator.empty for s in pool.slabs.values()) == 2
        for slab in given:
            slab.close()
        others[0] = 14 * MiB                                           # 30 MiB free
        assert pool.give_back(pool.probe_for_give_back()) == []        # over the watermark: nothing
    finally:
        pool.close()
