"""Hostile and careless input (issue 20): what one client sends cannot break the controller
for the others, and what cannot be stored is refused at the edge with a clear error."""

import math
import os

import numpy as np
import pytest
import redis

from faastube import errors, protocol

from .conftest import ControllerProcess, wait_for


@pytest.mark.parametrize("ttl", [1e16, math.inf, math.nan, protocol.MAX_TTL_S + 1])
def test_a_ttl_redis_cannot_store_is_refused_by_the_sdk_and_by_the_controller(ft, controller, ttl):
    with pytest.raises(errors.InvalidArgumentError, match=r"ttl must be a number of seconds above 0 and "
                                                          r"at most 31622400 \(366 days\)"):
        ft.put(np.zeros(4), ttl=ttl)
    # The same value sent past the SDK: the controller refuses it before anything is stored.
    with pytest.raises(errors.ProtocolError, match=r"field 'ttl' must be a number of seconds above 0"):
        ft.client().request(protocol.Create((4,), "float64", 32, None, ttl, None))
    ref = ft.put(np.ones(4), ttl=protocol.MAX_TTL_S)            # the longest one allowed works
    assert int(ft.get(ref).sum()) == 4


def test_one_write_redis_refuses_is_dropped_and_the_writes_after_it_still_arrive(redis_server):
    from controller.directory import Directory, object_key
    directory = Directory(redis_server.url, f"hostile-{os.getpid()}", "e1", 60)
    client = redis.Redis.from_url(redis_server.url)
    try:
        fields = {"node": directory.node, "state": "sealed"}
        directory._enqueue(("publish", "bad" * 8, fields, 10**20))    # an expiry Redis refuses
        directory._enqueue(("publish", "good" * 8, fields, None))
        assert directory.flush(timeout_s=10)
        assert client.hget(object_key("good" * 8), "state") == b"sealed"
        assert directory.dropped == 1 and directory.healthy
    finally:
        directory.close()


def test_a_second_controller_with_a_live_controllers_node_name_refuses_to_start(tmp_path, redis_server):
    first = ControllerProcess(tmp_path / "a", redis_server.url).start()
    client = first.client()
    try:
        target, object_id, lifetime = client.create_for_put((8,), np.dtype("uint8"))
        target[...] = 7
        del target
        client.seal(object_id, drop_writer=True, lifetime=lifetime)
        second = ControllerProcess(tmp_path / "b", redis_server.url, node=first.node)
        with pytest.raises(errors.FaasTubeError, match=r"is served by another controller \(pid \d+.*another --node"):
            second.start(timeout_s=30)
        assert f"node {first.node!r} is served by another controller" in second.log()
        # The live one's objects are untouched, in the table and in Redis.
        assert int(client.get(object_id, 1).sum()) == 56
        state = redis.Redis.from_url(redis_server.url).hget(f"faastube:obj:{object_id}", "state")
        assert state == b"sealed"
    finally:
        client.close()
        assert first.stop() == 0


def test_a_node_name_whose_controller_died_is_taken_over(tmp_path, redis_server):
    import signal
    first = ControllerProcess(tmp_path / "a", redis_server.url).start()
    first.process.send_signal(signal.SIGKILL)
    first.process.wait()
    second = ControllerProcess(tmp_path / "b", redis_server.url, node=first.node).start(timeout_s=30)
    try:
        wait_for(lambda: second.status()["node"] == first.node, message="the new controller serving")
    finally:
        assert second.stop() == 0


def test_a_cleanly_stopped_controllers_node_name_is_free_at_once(tmp_path, redis_server):
    first = ControllerProcess(tmp_path / "a", redis_server.url).start()
    assert first.stop() == 0
    assert not redis.Redis.from_url(redis_server.url).exists(f"faastube:node:{first.node}")
    second = ControllerProcess(tmp_path / "b", redis_server.url, node=first.node).start()
    assert second.stop() == 0


def test_a_status_with_more_namespaces_than_it_lists_still_fits_one_frame(redis_server):
    from controller.directory import Directory
    from controller.objects import ObjectTable, Session
    from controller.pool import Pool
    directory = Directory(redis_server.url, f"hostile-status-{os.getpid()}", "e1", 60)
    table = ObjectTable([Pool("host", 1 << 20, 1 << 30, 30.0)], directory)
    try:
        for n in range(protocol.MAX_STATUS_NAMESPACES + 150):
            session = Session(0, 0, 0, admin=False)         # pid 0: no pidfd to hold
            session.namespace = f"namespace-with-a-long-name-{n:05d}-" + "x" * 200
            table.open_session(session)
        admin = Session(0, 0, 0, admin=True)
        held = table.status(admin)
        assert len(held["namespaces"]) == protocol.MAX_STATUS_NAMESPACES
        assert held["namespaces_omitted"] == 150
        report = protocol.StatusReport("n", "e", held["pools"], held["namespaces"], 0,
                                       namespaces_omitted=held["namespaces_omitted"])
        assert len(protocol.pack(protocol.reply_message(1, report))) < protocol.MAX_FRAME
        from faastube.cli import render_status
        assert render_status(report.as_dict()).endswith(
            "(and 150 more namespaces: the 1000 that reserve the most are listed)")
    finally:
        table.shutdown()
        directory.close()


def test_too_many_releases_in_one_frame_are_refused_and_a_long_list_is_applied_whole(ft, controller):
    with pytest.raises(errors.ProtocolError, match=r"at most 8192 \[lease, kind\] pairs"):
        protocol.decode_request({"v": 1, "seq": 1, "op": "ping",
                                 "releases": [[n, "drop"] for n in range(protocol.MAX_RELEASES + 1)]})
    ref = ft.put(np.arange(10))
    views = [ft.get(ref) for _ in range(600)]          # 600 leases: more than one lock hold's worth
    assert controller.leases() >= 600
    del views
    import gc
    gc.collect()
    ft.client().request(protocol.Ping())               # the releases ride on it
    wait_for(lambda: controller.leases() == 0, message="every lease to end")
    assert int(ft.get(ref).sum()) == 45


def test_after_a_controller_restart_the_next_call_reconnects_instead_of_failing(tmp_path, redis_server):
    import faastube
    first = ControllerProcess(tmp_path, redis_server.url).start()
    faastube.connect(socket=first.socket, namespace="test")
    try:
        ref = faastube.put(np.arange(10))
        assert first.stop() == 0
        second = ControllerProcess(tmp_path, redis_server.url, node=first.node).start()   # same socket
        try:
            # The warm process's socket is dead: its next call goes out on a new connection.
            fresh = faastube.put(np.arange(4))
            assert int(faastube.get(fresh).sum()) == 6
            with pytest.raises(errors.ObjectLostError, match=f"object {ref['id']} is lost"):
                faastube.get(ref)
        finally:
            faastube.sdk._client.close()
            faastube.sdk._client = None
            assert second.stop() == 0
    finally:
        if faastube.sdk._client is not None:
            faastube.sdk._client.close()
            faastube.sdk._client = None
