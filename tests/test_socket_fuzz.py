"""Garbage on the controller socket gets error replies; the controller keeps serving."""

import socket
import struct

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faastube import errors, protocol


def raw_connection(controller) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(controller.socket)
    return sock


def replies_until_close(sock) -> list[dict]:
    sock.shutdown(socket.SHUT_WR)
    reader = protocol.FrameReader(sock)
    out = []
    while (message := reader.read()) is not None:
        out.append(message)
    return out


def assert_still_serving(ft):
    assert int(ft.get(ft.put(np.arange(5))).sum()) == 10


def test_a_frame_that_is_not_msgpack_gets_an_error_and_the_stream_continues(controller):
    sock = raw_connection(controller)
    body = b"\xc1\xc1\xc1"
    sock.sendall(struct.pack(">I", len(body)) + body)
    sock.sendall(protocol.pack({"v": 1, "seq": 7, "op": "ping"}))
    replies = replies_until_close(sock)
    assert replies[0]["ok"] is False and replies[0]["error"] == "ProtocolError"
    assert "not valid msgpack" in replies[0]["message"] and replies[0]["seq"] is None
    assert replies[1]["ok"] is True and replies[1]["seq"] == 7 and replies[1]["node"] == controller.node
    sock.close()


def test_an_oversized_frame_gets_an_error_and_the_connection_closes(controller, ft):
    sock = raw_connection(controller)
    sock.sendall(struct.pack(">I", 1 << 31) + b"x" * 100)
    replies = replies_until_close(sock)
    assert len(replies) == 1 and replies[0]["error"] == "FrameTooLarge"     # a ProtocolError
    assert isinstance(errors.from_wire(replies[0]["error"], ""), errors.ProtocolError)
    assert "exceeds the 1048576-byte limit" in replies[0]["message"]
    sock.close()
    assert_still_serving(ft)


def test_invalid_requests_get_precise_errors_with_their_seq(controller):
    sock = raw_connection(controller)
    sock.sendall(protocol.pack({"v": 1, "seq": 1, "op": "get", "id": 5}))
    sock.sendall(protocol.pack({"v": 9, "seq": 2, "op": "ping"}))
    sock.sendall(protocol.pack({"v": 1, "seq": 3, "op": "create", "shape": [2], "dtype": "U8",
                                "nbytes": 64}))
    replies = replies_until_close(sock)
    assert [r["seq"] for r in replies] == [1, 2, 3]
    assert "field 'id' must be a non-empty printable string" in replies[0]["message"]
    assert "protocol version 9 is not supported" in replies[1]["message"]
    assert replies[2]["error"] == "InvalidStateError"   # no hello yet
    sock.close()


def test_client_sent_file_descriptors_are_ignored(controller):
    import array
    import os
    sock = raw_connection(controller)
    r, w = os.pipe()
    sock.sendmsg([protocol.pack({"v": 1, "seq": 1, "op": "ping"})],
                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w]))])
    assert replies_until_close(sock)[0]["ok"] is True
    os.close(r)
    os.close(w)
    sock.close()


frames = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda body: struct.pack(">I", len(body)) + body, st.binary(max_size=200)),
    st.builds(lambda m: protocol.pack(m), st.dictionaries(
        st.sampled_from(["v", "seq", "op", "id", "shape", "dtype", "nbytes", "timeout",
                         "releases", "namespace", "scope", "consumers", "ttl"]),
        st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(),
                  st.text(max_size=20), st.lists(st.integers(-5, 5), max_size=4),
                  st.sampled_from(["hello", "get", "create", "seal", "delete", "status",
                                   "release", "close_scope", "ping"])),
        max_size=8)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=st.lists(frames, min_size=1, max_size=6))
def test_random_bytes_never_break_the_controller(controller, chunks):
    sock = raw_connection(controller)
    try:
        sock.sendall(b"".join(chunks))
        for reply in replies_until_close(sock):
            assert reply["v"] == 1 and isinstance(reply["ok"], bool)
            if not reply["ok"]:
                assert reply["error"] and reply["message"]
    finally:
        sock.close()
    ping = raw_connection(controller)
    ping.sendall(protocol.pack({"v": 1, "seq": 1, "op": "ping"}))
    assert replies_until_close(ping)[0]["ok"] is True
    ping.close()


def test_after_the_fuzzing_real_clients_still_work(controller, ft):
    sock = raw_connection(controller)
    sock.sendall(msgpack.packb({"junk": True}) * 10)
    sock.close()
    assert_still_serving(ft)
