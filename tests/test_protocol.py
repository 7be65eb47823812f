"""The wire protocol: framing, request validation, and the exact messages it answers with."""

import os
import socket
import struct

import msgpack
import pytest

from faastube import protocol
from faastube.errors import FrameTooLarge, ProtocolError


def roundtrip(message):
    a, b = socket.socketpair()
    try:
        protocol.send_frame(a, message)
        return protocol.FrameReader(b).read()
    finally:
        a.close()
        b.close()


def test_frames_roundtrip_and_are_length_prefixed():
    message = {"v": 1, "seq": 3, "op": "ping"}
    frame = protocol.pack(message)
    assert struct.unpack(">I", frame[:4])[0] == len(frame) - 4
    assert msgpack.unpackb(frame[4:]) == message
    assert roundtrip(message) == message


def test_file_descriptors_travel_with_their_frame_in_order():
    a, b = socket.socketpair()
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:
        protocol.send_frame(a, {"n": 1, "fds": [{}]}, [w1])
        protocol.send_frame(a, {"n": 2, "fds": []})
        protocol.send_frame(a, {"n": 3, "fds": [{}]}, [w2])
        reader = protocol.FrameReader(b, accept_fds=True)
        got = {}
        for _ in range(3):
            message = reader.read()
            got[message["n"]] = reader.take_fds(len(message["fds"]))
        assert [len(got[n]) for n in (1, 2, 3)] == [1, 0, 1]
        os.write(got[1][0], b"one")
        os.write(got[3][0], b"three")
        assert os.read(r1, 3) == b"one" and os.read(r2, 5) == b"three"
    finally:
        for fd in (r1, w1, r2, w2, *got.get(1, []), *got.get(3, [])):
            os.close(fd)
        a.close()
        b.close()


def test_reader_reassembles_frames_split_across_reads():
    a, b = socket.socketpair()
    frames = protocol.pack({"n": 1}) + protocol.pack({"n": 2})
    for i in range(len(frames)):
        a.send(frames[i:i + 1])
    reader = protocol.FrameReader(b)
    assert reader.read() == {"n": 1}
    assert reader.read() == {"n": 2}
    a.close()
    assert reader.read() is None
    b.close()


def test_reader_says_whether_a_whole_frame_is_buffered():
    a, b = socket.socketpair()
    frames = protocol.pack({"n": 1}) + protocol.pack({"n": 2})
    a.send(frames[:3])
    reader = protocol.FrameReader(b)
    reader._fill()
    assert not reader.has_frame()                        # not even the length prefix yet
    a.send(frames[3:])
    while len(reader._buffer) < len(frames):
        reader._fill()
    assert reader.has_frame()
    assert reader.read() == {"n": 1}
    assert reader.has_frame() and reader.read() == {"n": 2}
    assert not reader.has_frame()
    a.close()
    b.close()


def test_oversized_length_prefix_is_refused():
    a, b = socket.socketpair()
    a.send(struct.pack(">I", protocol.MAX_FRAME + 1))
    with pytest.raises(FrameTooLarge, match="exceeds"):
        protocol.FrameReader(b).read()
    a.close()
    b.close()


def test_body_that_is_not_a_map_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="must hold a msgpack map, got list"):
        protocol.unpack_body(msgpack.packb([1, 2]))
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        protocol.unpack_body(b"\xc1")


@pytest.mark.parametrize("message, error", [
    ({"seq": 1, "op": "ping"}, "protocol version None is not supported"),
    ({"v": 1, "op": "ping"}, "field 'seq' must be an integer"),
    ({"v": 1, "seq": 1, "op": "fly"}, "unknown op 'fly'; known ops: close_scope, create"),
    ({"v": 1, "seq": 1, "op": "get"}, "op 'get' needs field 'id'"),
    ({"v": 1, "seq": 1, "op": "get", "id": ""}, "field 'id' must be a non-empty printable string"),
    ({"v": 1, "seq": 1, "op": "get", "id": "x", "timeout": -1}, "field 'timeout' must be a number"),
    ({"v": 1, "seq": 1, "op": "get", "id": "x", "extra": 1}, "op 'get' has unknown fields: extra"),
    ({"v": 1, "seq": 1, "op": "get", "id": "x", "slo_ms": 0}, "field 'slo_ms' must be a number between 0.01"),
    ({"v": 1, "seq": 1, "op": "get", "id": "x", "slo_ms": "5"}, "field 'slo_ms' must be a number"),
    ({"v": 1, "seq": 1, "op": "create", "shape": [-1], "dtype": "f4", "nbytes": 0},
     "field 'shape' must be a list of at most 32 non-negative integers"),
    ({"v": 1, "seq": 1, "op": "create", "shape": [1], "dtype": "f4", "nbytes": 4, "consumers": 0},
     "field 'consumers' must be a positive integer or absent"),
    ({"v": 1, "seq": 1, "op": "ping", "releases": [[1, "keep"]]},
     "each release must be [lease id, 'consume', 'drop' or 'abandon']"),
])
def test_malformed_requests_are_refused_with_a_precise_message(message, error):
    with pytest.raises(ProtocolError, match=error.replace("[", r"\[").replace("(", r"\(")):
        protocol.decode_request(message)


def test_requests_roundtrip_through_their_map():
    request = protocol.Create((2, 3), "float32", 24, consumers=2, ttl=1.5, scope="run-1")
    message = protocol.request_message(9, request, [(4, "drop")])
    envelope = protocol.decode_request(msgpack.unpackb(msgpack.packb(message)))
    assert envelope == protocol.Envelope(seq=9, request=request, releases=((4, "drop"),))
