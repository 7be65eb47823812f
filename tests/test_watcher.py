"""Slabs mapped ahead (Note [Slabs mapped ahead], faastube/watcher.py), through a real
controller and real clients: on this CPU machine the watcher maps host slabs
(``map_ahead="all"``), the same code path a GPU slab takes but for the mapping itself."""

import os

import numpy as np
import pytest

from faastube import protocol
from faastube.errors import ProtocolError

from .conftest import ControllerProcess, wait_for

MiB = 1 << 20


@pytest.fixture
def ctl(tmp_path, redis_server):
    # 1 MiB slabs, and an object of 900 KB fills one: each put makes a new slab. Empty slabs
    # are retired after 0.3 s, and connections that hold nothing are closed after 0.5 s idle.
    controller = ControllerProcess(tmp_path, redis_server.url, slab_size="1MiB", idle_release="0.3",
                                   idle_timeout="0.5").start()
    yield controller
    assert controller.stop() == 0, controller.log()


def put_new_slab(client, value: int) -> str:
    target, object_id, lifetime = client.create_for_put((900_000,), np.dtype("uint8"))
    target[:] = value
    del target
    client.seal(object_id, drop_writer=True, wait=True, lifetime=lifetime)
    return object_id


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_watching_process_maps_new_slabs_before_it_gets_from_them_and_drops_retired_ones(ctl):
    # The producer makes no spare objects ahead (Note [Spare objects]): one slab per put.
    consumer, producer = ctl.client(map_ahead="all"), ctl.client(map_ahead="none", spare_bytes=0)
    try:
        consumer.request(protocol.Ping())                  # connected: its watcher starts
        wait_for(lambda: consumer.watcher is not None and consumer.watcher.connection is not None
                 and consumer.watcher.connection.connected, message="the watcher's connection")
        ids = [put_new_slab(producer, value) for value in (1, 2, 3)]
        # Mapped without the consumer asking anything.
        wait_for(lambda: len(consumer.slabs) == 3, message="the three new slabs mapped ahead")
        mapped, fds = set(consumer.slabs), open_fds()
        for value, object_id in zip((1, 2, 3), ids):
            view = consumer.get(object_id, 1)
            assert view.shape == (900_000,) and int(view[0]) == value and int(view[-1]) == value
            del view
        # The gets' replies carried each slab's descriptor once more: closed unused, no new mapping.
        assert set(consumer.slabs) == mapped and open_fds() == fds
        for object_id in ids:
            producer.request(protocol.Delete(object_id))
        # Retired slabs reach the watcher with no request from the consumer; its watcher
        # connection holds nothing and stays open past the idle timeout.
        wait_for(lambda: len(consumer.slabs) == 0, timeout=15, message="the retired slabs dropped")
        assert consumer.watcher.alive
        later = put_new_slab(producer, 9)
        wait_for(lambda: len(consumer.slabs) == 1, message="a slab made after the idle timeout")
        assert int(consumer.get(later, 1)[0]) == 9
    finally:
        consumer.close()
        producer.close()
    wait_for(lambda: not consumer.watcher.alive, message="the watcher's end after close")


def test_gpu_slabs_only_start_no_watcher_where_this_process_has_no_gpu(ctl):
    client = ctl.client(map_ahead="gpu")              # the default
    try:
        client.request(protocol.Ping())
        wait_for(lambda: client.watcher is not None and not client.watcher.alive,
                 message="the watcher to find no GPU and end")
        assert client.watcher.connection is None       # it never connected
        assert ctl.status()["namespaces"]["test"]["clients"] == 1
    finally:
        client.close()


def test_watch_is_validated_and_needs_a_namespace():
    with pytest.raises(ProtocolError, match="'tiers' must be one of 'gpu', 'all'"):
        protocol.decode_request({"v": 1, "seq": 1, "op": "watch", "tiers": "host"})
    assert protocol.decode_request({"v": 1, "seq": 1, "op": "watch"}).request == protocol.Watch("gpu")


def test_after_a_controller_restart_a_new_watcher_maps_the_new_controllers_slabs(tmp_path, redis_server):
    first = ControllerProcess(tmp_path, redis_server.url, slab_size="1MiB").start()
    consumer = first.client(map_ahead="all")
    second = None
    try:
        consumer.request(protocol.Ping())
        old = wait_for(lambda: consumer.watcher, message="the first watcher")
        assert first.stop() == 0
        second = ControllerProcess(tmp_path, redis_server.url, slab_size="1MiB", node=first.node).start()
        consumer.request(protocol.Ping())                     # reconnects: a new epoch
        wait_for(lambda: consumer.watcher is not old and consumer.watcher.epoch == consumer.epoch,
                 message="a watcher of the new controller")
        wait_for(lambda: not old.alive, message="the old watcher's end")
        producer = second.client(map_ahead="none", spare_bytes=0)
        try:
            object_id = put_new_slab(producer, 5)
            wait_for(lambda: len(consumer.slabs) == 1, message="the new controller's slab mapped ahead")
            assert int(consumer.get(object_id, 1)[0]) == 5
        finally:
            producer.close()
    finally:
        consumer.close()
        if second is not None:
            assert second.stop() == 0


def test_a_watcher_that_never_reads_does_not_stop_another_watcher(ctl):
    # A raw connection asks 'watch' and never reads what it is sent (40 slabs' descriptors,
    # which its socket's buffer still takes): another process's watcher gets each slab as it
    # is made.
    import socket
    hostile = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hostile.connect(ctl.socket)
    for seq, request in ((1, protocol.Hello("test", None, "hostile")), (2, protocol.Watch("all"))):
        protocol.send_frame(hostile, protocol.request_message(seq, request))
    consumer, producer = ctl.client(map_ahead="all"), ctl.client(map_ahead="none", spare_bytes=0)
    try:
        consumer.request(protocol.Ping())
        kept = []
        for value in range(40):
            kept.append(put_new_slab(producer, value))          # each in a new slab, kept
            wait_for(lambda: len(consumer.slabs) == len(kept), message="the new slab mapped ahead")
            assert int(consumer.get(kept[-1], 1)[0]) == value
        for object_id in kept:
            producer.request(protocol.Delete(object_id))
    finally:
        hostile.close()
        consumer.close()
        producer.close()
