"""Redis holds metadata only; outages fail clearly and recover; restarts report lost objects."""

import json
import signal

import numpy as np
import pytest
import redis

from faastube import errors
from faastube.local import LocalRedis, free_port

from .conftest import ControllerProcess, wait_for


def test_256_mib_of_objects_cost_redis_well_under_1_mib_and_no_payload(ft, controller, redis_server):
    r = redis.Redis.from_url(redis_server.url)
    before = r.info("memory")["used_memory"]
    rng = np.random.default_rng(3)
    arrays = [rng.integers(0, 256, 8 << 20, dtype=np.uint8) for _ in range(32)]  # 32 × 8 MiB
    refs = [ft.put(a) for a in arrays]
    wait_for(lambda: all(r.hget(f"faastube:obj:{ref['id']}", "state") == b"sealed" for ref in refs),
             message="the directory writes")
    after = r.info("memory")["used_memory"]
    assert after - before < 256 * 1024, f"Redis grew by {after - before} bytes"

    # Every value Redis holds is small metadata, and none contains a run of payload bytes.
    probes = [a[i:i + 32].tobytes() for a in arrays for i in (0, 4 << 20)]
    for key in r.scan_iter("faastube:*"):
        kind = r.type(key)
        values = (r.hvals(key) if kind == b"hash" else r.smembers(key) if kind == b"set"
                  else [r.get(key)])
        for value in values:
            assert len(value) < 256, f"{key!r} holds a {len(value)}-byte value"
            assert not any(probe in value for probe in probes)
    meta = r.hgetall(f"faastube:obj:{refs[0]['id']}")
    assert {k.decode() for k in meta} == {"node", "epoch", "device", "slab", "offset", "size",
                                          "dtype", "shape", "state", "ns", "consumers",
                                          "expiry", "scope", "created"}
    assert meta[b"state"] == b"sealed" and json.loads(meta[b"shape"]) == [8 << 20]
    assert meta[b"node"].decode() == controller.node


def test_an_object_freed_before_its_publish_is_written_once_as_its_tombstone(ft, controller, redis_server):
    # Note [Directory writes are coalesced]: a put and a delete within one batch window reach
    # Redis as one tombstone that still says what the object was and whose it was.
    r = redis.Redis.from_url(redis_server.url)
    adds_before = r.info("commandstats").get("cmdstat_sadd", {}).get("calls", 0)
    refs = []
    for _ in range(50):
        refs.append(ft.put(np.arange(10)))
        ft.delete(refs[-1])
    keys = [f"faastube:obj:{ref['id']}" for ref in refs]
    wait_for(lambda: all(r.hget(key, "state") == b"deleted" for key in keys), message="the tombstones")
    for key in keys:
        meta = r.hgetall(key)
        assert meta[b"ns"] == b"test" and meta[b"size"] == b"80" and meta[b"node"].decode() == controller.node
        assert 0 < r.ttl(key) <= 3600, "a tombstone expires"
    members = r.smembers(f"faastube:node:{controller.node}:objects")
    assert not {ref["id"].encode() for ref in refs} & members, "freed objects are not the node's"
    adds = r.info("commandstats").get("cmdstat_sadd", {}).get("calls", 0) - adds_before
    assert adds < 50, f"every one of 50 put-then-deleted objects was published on its own ({adds} SADDs)"


def test_coalesce_folds_a_publish_and_its_forget_and_keeps_the_rest_in_order():
    from controller.directory import coalesce
    fields = {"state": "sealed", "ns": "a"}
    batch = [("publish", "x", fields, None), ("publish", "y", fields, 99), ("forget", "x", "consumed"),
             ("forget", "z", "deleted"), ("publish", "y", {**fields, "device": "host"}, 99)]
    assert coalesce(batch) == [
        ("tombstone", "x", "consumed", {"state": "consumed", "ns": "a"}),
        ("publish", "y", {**fields, "device": "host"}, 99),
        ("forget", "z", "deleted")]
    assert coalesce([("forget", "z", "deleted")]) == [("forget", "z", "deleted")]


@pytest.fixture
def own_redis():
    server = LocalRedis(port=free_port()).start()
    yield server
    server.stop()


def test_redis_outage_fails_put_and_get_naming_the_url_then_recovers(tmp_path, own_redis, workers):
    import faastube
    ctl = ControllerProcess(tmp_path, own_redis.url).start()
    try:
        faastube.connect(socket=ctl.socket, namespace="test")
        ref = faastube.put(np.arange(10))
        own_redis.stop()

        def put_fails():
            # Within the heartbeat interval (0.5 s) the controller learns Redis is down;
            # a put sealed before that is queued and published when Redis is back.
            try:
                faastube.put(np.arange(10))
            except errors.RedisUnavailableError as exc:
                assert "is unreachable" in str(exc) and "FAASTUBE_REDIS" in str(exc)
                return own_redis.url in str(exc)
            return False
        wait_for(put_fails, timeout=5, message="put to report Redis down")

        def get_fails():
            try:
                faastube.get(ref)
            except errors.RedisUnavailableError as exc:
                return own_redis.url in str(exc)
            return False
        wait_for(get_fails, timeout=5, message="get to report Redis down")
        own_redis.start()
        wait_for(lambda: _works(faastube, ref), timeout=10, message="recovery after Redis is back")
        assert int(faastube.get(faastube.put(np.arange(10))).sum()) == 45
    finally:
        faastube.sdk._client.close()
        faastube.sdk._client = None
        assert ctl.stop() == 0, ctl.log()


def _works(faastube, ref) -> bool:
    try:
        return int(faastube.get(ref).sum()) == 45
    except errors.RedisUnavailableError:
        return False


def test_deletes_during_an_outage_reach_redis_when_it_is_back(tmp_path, own_redis):
    import faastube
    ctl = ControllerProcess(tmp_path, own_redis.url).start()
    try:
        faastube.connect(socket=ctl.socket, namespace="test")
        ref = faastube.put(np.arange(10))
        own_redis.stop()
        faastube.delete(ref)                     # local, queued for the directory
        own_redis.start()
        r = redis.Redis.from_url(own_redis.url)
        # The new Redis is empty; the tombstone is written once the controller sees it again.
        wait_for(lambda: r.hget(f"faastube:obj:{ref['id']}", "state") == b"deleted",
                 timeout=10, message="the queued tombstone")
    finally:
        faastube.sdk._client.close()
        faastube.sdk._client = None
        assert ctl.stop() == 0, ctl.log()


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_objects_of_a_restarted_controller_are_reported_lost(tmp_path, redis_server, how):
    import faastube
    ctl = ControllerProcess(tmp_path, redis_server.url).start()
    faastube.connect(socket=ctl.socket, namespace="test")
    ref = faastube.put(np.arange(100))
    view = faastube.get(ref)
    r = redis.Redis.from_url(redis_server.url)
    wait_for(lambda: r.hget(f"faastube:obj:{ref['id']}", "state") == b"sealed", message="publish")
    ctl.process.send_signal(how)
    ctl.process.wait(15)
    with pytest.raises(errors.ControllerUnavailableError):
        faastube.get(ref)
    restarted = ControllerProcess(tmp_path, redis_server.url)
    restarted.node = ctl.node                                   # same node, new epoch
    restarted.start()
    try:
        with pytest.raises(errors.ObjectLostError, match=f"object {ref['id']} is lost"):
            faastube.get(ref)
        assert int(view.sum()) == 4950          # a view taken before stays valid (memfd lives on)
        assert int(faastube.get(faastube.put(np.arange(4))).sum()) == 6
        assert r.hget(f"faastube:obj:{ref['id']}", "state") == b"lost"
    finally:
        del view
        faastube.sdk._client.close()
        faastube.sdk._client = None
        assert restarted.stop() == 0, restarted.log()
