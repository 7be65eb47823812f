"""Hostile and careless input (issue 20): what one client sends cannot break the controller
for the others, and what cannot be stored is refused at the edge with a clear error."""

import json
import math
import os
import time

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


# -- Note [Bounded connections] and Note [Waiting gets own no thread] (controller/server.py,
#    controller/waiting.py): what a client can make the controller spend is bounded.

def raw_connection(ctl, namespace: str | None = "test"):
    """A socket to the controller that said hello, and its reader (or the refusal it got)."""
    import socket
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(ctl.socket)
    reader = protocol.FrameReader(sock, accept_fds=True)
    if namespace is not None:
        try:
            protocol.send_frame(sock, protocol.request_message(1, protocol.Hello(namespace, None, "raw")))
        except BrokenPipeError:
            pass                     # refused before the hello went out: the refusal is there to read
        reply = reader.read()
        if not reply["ok"]:
            sock.close()
            return reply
    return sock, reader


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("Threads:")).split()[1])


@pytest.fixture
def limited(tmp_path, redis_server, request):
    import faastube
    ctl = ControllerProcess(tmp_path, redis_server.url, **request.param).start()
    faastube.connect(socket=ctl.socket, namespace="test", spare_bytes=0)
    yield ctl
    faastube.sdk._client.close()
    faastube.sdk._client = None
    assert ctl.stop() == 0, ctl.log()


@pytest.mark.parametrize("limited", [{"max_connections": "8"}], indirect=True)
def test_connections_over_the_limit_are_refused_clearly_and_the_others_keep_working(limited):
    import faastube
    ref = faastube.put(np.arange(100))                  # the SDK's connection: 1 of 8
    raws = [raw_connection(limited) for _ in range(7)]
    assert all(isinstance(r, tuple) for r in raws)
    with pytest.raises(errors.ControllerBusyError, match=r"serves 8 connections, its limit \(--max-connections\)"):
        limited.client(spare_bytes=0).request(protocol.Ping())
    assert int(faastube.get(ref).sum()) == 4950          # the ones served are not disturbed
    for sock, _reader in raws:
        sock.close()
    wait_for(lambda: isinstance(raw_connection(limited), tuple), message="a connection served again")
    assert "refused a connection (1 so far): the controller serves 8 connections" in limited.log()
    from faastube.cli import render_status
    status = limited.status()
    assert status["requests"]["connections"]["refused"] == {"connections": 1}
    assert "; refused at a limit: connections 1" in render_status(status)


@pytest.mark.parametrize("limited", [{}], indirect=True)
def test_running_out_of_file_descriptors_refuses_the_connection_and_the_controller_goes_on(limited):
    import resource

    import faastube
    ref = faastube.put(np.arange(100))
    pid = limited.process.pid
    before = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (96, before[1]))      # lowered under it, as by an admin
    raws, refusals = [], []
    try:
        for _ in range(120):
            outcome = raw_connection(limited)
            (raws if isinstance(outcome, tuple) else refusals).append(outcome)
        assert refusals and raws
        assert {r["error"] for r in refusals} == {"ControllerBusyError"}
        assert any("out of file descriptors" in r["message"] for r in refusals)
        assert limited.process.poll() is None
        assert int(faastube.get(ref).sum()) == 4950
    finally:
        for sock, _reader in raws:
            sock.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, before)
    wait_for(lambda: isinstance(raw_connection(limited), tuple), message="a connection served again")
    assert limited.status()["requests"]["connections"]["refused"]["descriptors"] >= 1


@pytest.mark.parametrize("limited", [{"max_waiting_gets": "600"}], indirect=True)
def test_waiting_gets_take_no_thread_each_are_bounded_and_are_all_answered_at_the_seal(limited):
    producer = limited.client(spare_bytes=0)
    array, object_id, _lease = producer.create((1000,), np.dtype("uint8"))
    array[...] = 7
    threads = threads_of(limited.process.pid)
    get = protocol.Get(object_id, timeout=60.0)

    def send_gets(sock, count):
        for seq in range(2, 2 + count):
            protocol.send_frame(sock, protocol.request_message(seq, get))

    def replies(reader, count):
        out = []
        for _ in range(count):
            reply = reader.read()
            reader.close_fds()
            out.append(reply)
        return out

    one, reader_one = raw_connection(limited)
    send_gets(one, 257)                       # one more than a connection may park
    (refused,) = replies(reader_one, 1)
    assert refused["error"] == "ControllerBusyError" and "the most one connection may have" in refused["message"]
    others = [raw_connection(limited) for _ in range(2)]
    for sock, _reader in others:
        send_gets(sock, 256)                  # 768 in all, 600 may wait
    wait_for(lambda: limited.status()["namespaces"]["test"]["waiting_gets"] == 600, message="600 parked")
    # Every get read (the rest refused), so none comes after the seal:
    wait_for(lambda: limited.status()["requests"]["ops"]["get"]["error"] == 1 + 168, message="168 refused")
    # A thread per connection and the answer threads, not one per get: 600 would be 600.
    assert threads_of(limited.process.pid) <= threads + 3 + 8 + 2
    producer.seal(object_id, wait=True)
    del array
    answered = replies(reader_one, 256)
    for _sock, reader in others:
        answered += replies(reader, 256)
    refused_total = [r for r in answered if not r["ok"]]
    assert len(answered) - len(refused_total) == 600
    assert {r["error"] for r in refused_total} == {"ControllerBusyError"}
    assert len(refused_total) == 168 and all("--max-waiting-gets" in r["message"] for r in refused_total)
    assert limited.process.poll() is None
    assert limited.status()["namespaces"]["test"]["waiting_gets"] == 0
    assert limited.status()["requests"]["connections"]["refused"] == {"waiting_gets": 169}
    for sock, _reader in [(one, None)] + others:
        sock.close()
    producer.close()


@pytest.mark.parametrize("limited", [{"max_waiting_gets": "600"}], indirect=True)
def test_a_parked_get_times_out_with_the_same_error_and_a_closed_connection_drops_its_gets(limited):
    producer = limited.client(spare_bytes=0)
    _array, object_id, _lease = producer.create((10,), np.dtype("uint8"))
    consumer = limited.client(spare_bytes=0)
    started = time.monotonic()
    with pytest.raises(errors.FaasTubeTimeoutError, match=f"object {object_id} was not sealed within 0.3 s"):
        consumer.request(protocol.Get(object_id, timeout=0.3), wait_s=0.3)
    assert 0.3 <= time.monotonic() - started < 3
    sock, _reader = raw_connection(limited)
    for seq in range(2, 102):
        protocol.send_frame(sock, protocol.request_message(seq, protocol.Get(object_id, timeout=60.0)))
    wait_for(lambda: limited.status()["namespaces"]["test"]["waiting_gets"] == 100, message="100 parked")
    sock.close()
    wait_for(lambda: limited.status()["namespaces"]["test"]["waiting_gets"] == 0, message="dropped")
    consumer.close()
    producer.close()


@pytest.mark.parametrize("limited", [{"idle_timeout": "1"}], indirect=True)
def test_an_idle_connection_that_holds_nothing_is_closed_and_the_sdk_reconnects_unseen(limited):
    import gc

    import faastube

    def test_clients():
        return limited.status()["namespaces"]["test"]["clients"]
    ref = faastube.put(np.arange(10))
    view = faastube.get(ref)
    time.sleep(2.5)                           # idle, but it holds a view: kept
    assert test_clients() == 1
    del view
    gc.collect()
    faastube.client().request(protocol.Ping())            # the release rides on it
    wait_for(lambda: test_clients() == 0, timeout=10, message="the idle connection closed")
    assert int(faastube.get(ref).sum()) == 45              # a new connection, unseen by the caller
    assert test_clients() == 1


@pytest.mark.parametrize("limited", [{"frame_timeout": "1"}], indirect=True)
def test_a_frame_that_trickles_in_is_cut_off_and_the_others_are_served(limited):
    import faastube
    import struct
    sock, reader = raw_connection(limited, namespace=None)
    sock.sendall(struct.pack(">I", 100) + b"\x81" * 10)   # 10 of 100 bytes, then nothing
    started = time.monotonic()
    ref = faastube.put(np.arange(10))
    assert int(faastube.get(ref).sum()) == 45
    reply = reader.read()
    assert reply["error"] == "ProtocolError" and "took more than 1 s to arrive (--frame-timeout)" in reply["message"]
    assert reader.read() is None and time.monotonic() - started < 5
    sock.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a reader as another user")
def test_a_reader_of_another_user_cannot_reopen_its_read_only_slab_descriptor_writable(ft, controller, tmp_path):
    import subprocess
    ref = ft.put(np.full(1000, 3, np.uint8))
    sock, reader = raw_connection(controller)
    protocol.send_frame(sock, protocol.request_message(2, protocol.Get(ref["id"], timeout=10.0)))   # put seals without waiting
    reply = reader.read()
    assert reply["ok"], reply
    (fd,) = reader.take_fds(1)
    try:
        # The reader, as user nobody, holds the descriptor it was sent and tries to open it
        # again read-write (and to map it writable) through its own /proc/self/fd.
        probe = (f"import mmap, os\n"
                 f"try:\n    os.open('/proc/self/fd/{fd}', os.O_RDWR)\n    print('reopened')\n"
                 f"except PermissionError:\n    print('refused')\n"
                 f"try:\n    mmap.mmap({fd}, 4096, flags=mmap.MAP_SHARED, prot=mmap.PROT_WRITE)\n    print('mapped')\n"
                 f"except PermissionError:\n    print('refused')\n")
        out = subprocess.run(["/usr/bin/python3", "-c", probe], pass_fds=[fd], capture_output=True, text=True,
                             user=65534, timeout=30, cwd="/")
        assert out.stdout.split() == ["refused", "refused"], out
    finally:
        os.close(fd)
        protocol.send_frame(sock, protocol.request_message(3, protocol.Ping(), releases=[(reply["lease"], "drop")]))
        assert reader.read()["ok"]
        sock.close()
    assert int(ft.get(ref).sum()) == 3000


def test_a_member_of_the_namespace_cannot_change_another_writers_object_through_its_own_mapping(ft, worker_env):
    # Note [Slabs of one writer] (controller/pool.py): a writer is sent the read-write
    # descriptor of its own slabs only, so scribbling over every writable mapping it holds
    # leaves another process's object of the same namespace as it was.
    victim = worker_env.start("function.py", "held-put", 100_000, 5)
    theirs = worker_env.read_json(victim)
    ft.put(np.arange(1000))                                     # this process writes too
    assert ft.get(theirs["ref"]).sum() > 0                      # and reads theirs
    slabs = ft.client().slabs
    writable = [slabs[i].writable for i in slabs if slabs[i].writable is not None]
    assert writable
    for mapping in writable:
        mapping[:] = b"\xff" * len(mapping)
    assert worker_env.run("function.py", "get", json.dumps(theirs["ref"]))["sha"] == theirs["sha"]
    victim.stdin.close()
    assert victim.wait(timeout=30) == 0


def test_a_read_only_view_refuses_dlpack_instead_of_crashing_the_process_on_a_write(ft, controller):
    torch = pytest.importorskip("torch", reason="PyTorch is the DLPack consumer that crashed")
    ref = ft.put(np.arange(16, dtype=np.float32))
    view = ft.get(ref)
    with pytest.raises(BufferError, match=r"a FaaSTube view is read-only .*numpy\.array\(view\)"):
        torch.from_dlpack(view)
    with pytest.raises(ValueError, match="read-only"):
        view[0] = 1                                   # numpy says so as well
    copy = torch.from_dlpack(np.array(view))          # a copy exports and takes writes
    copy[0] = 100
    doubled = torch.from_dlpack(view * 2)             # so does an array computed from it
    assert float(doubled[3]) == 6.0 and float(copy[0]) == 100.0
    del view
    assert ft.get(ref)[0] == 0.0                      # the object is unchanged


def test_a_thread_that_cannot_start_refuses_that_connection_and_the_controller_serves_on(ft, controller):
    # No thread to be had (root ignores RLIMIT_NPROC, so the controller's address space is
    # capped instead: a new thread's stack cannot be mapped). Note [Bounded connections].
    import resource
    ref = ft.put(np.arange(100))
    pid = controller.process.pid
    with open(f"/proc/{pid}/status") as status:
        size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize"))
    clients, refused = [], []
    resource.prlimit(pid, resource.RLIMIT_AS, (size + (24 << 20), resource.RLIM_INFINITY))
    try:
        for _ in range(8):
            client = controller.client()
            try:
                client.request(protocol.Ping())
                clients.append(client)
            except errors.ControllerBusyError as exc:
                refused.append(str(exc))
                client.close()
    finally:
        resource.prlimit(pid, resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert refused, "every connection got a thread under the cap"
    assert all("cannot serve another connection now (can't start new thread)" in why for why in refused)
    assert controller.process.poll() is None
    assert controller.status()["requests"]["connections"]["refused"] == {"threads": len(refused)}
    fresh = controller.client()
    try:
        fresh.request(protocol.Ping())                 # threads to be had again: served
    finally:
        fresh.close()
    for client in clients:
        client.request(protocol.Ping())                # those it took still served
        client.close()
    assert int(ft.get(ref).sum()) == 4950
