"""The controller socket protocol, shared by the controller and the SDK.

Framing: every message is a 4-byte big-endian length followed by that many bytes of msgpack
encoding one map. A request is ``{"v": PROTOCOL_VERSION, "op": <name>, "seq": <int>, ...}``;
its reply is ``{"v": ..., "seq": <same>, "ok": true, ...}`` or ``{"ok": false, "error":
<FaasTubeError subclass name>, "message": <text>}``. Slab file descriptors ride on a reply as
``SCM_RIGHTS`` ancillary data; the reply's ``"fds"`` list says which slab each one maps.

Any request may carry ``"releases": [[lease, "consume"|"drop"|"abandon"], ...]`` so that leases ended
by the garbage collector travel on the next request instead of costing a round trip each.

Requests are frozen dataclasses (:data:`REQUESTS`); :func:`decode_request` validates a map
into one of them or raises :class:`ProtocolError` with the field at fault. Handlers never see
a raw map and never touch the socket.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import os
import socket
import struct

import msgpack

from .errors import FrameTooLarge, ProtocolError

PROTOCOL_VERSION = 1
MAX_FRAME = 1 << 20          # a control message is small; anything bigger is a broken peer
MAX_FDS_PER_REPLY = 8
_HEADER = struct.Struct(">I")
MAX_NAME = 256               # namespaces, scopes, object ids
MIN_SLO_MS, MAX_SLO_MS = 0.01, 3_600_000.0    # a get's copy SLO: 10 µs to an hour


# One Packer for the process: packb() builds a new one per call. Packer.pack runs in C
# without releasing the GIL, so threads can share it.
_packer = msgpack.Packer(use_bin_type=True)


def pack(message: dict) -> bytes:
    """One frame: length prefix + msgpack body."""
    body = _packer.pack(message)
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"message of {len(body)} bytes exceeds the {MAX_FRAME}-byte frame limit")
    return _HEADER.pack(len(body)) + body


def unpack_body(body: bytes) -> dict:
    """Decode one frame body into a map, or raise ProtocolError saying what is wrong."""
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"frame is not valid msgpack: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"frame must hold a msgpack map, got {type(message).__name__}")
    return message


def send_frame(sock: socket.socket, message: dict, fds: list[int] = ()) -> None:
    """Send one frame; file descriptors go with its first byte."""
    data = memoryview(pack(message))
    if fds:
        sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        data = data[sent:]
    if data:
        sock.sendall(data)


class FrameReader:
    """Reads whole frames from a stream socket, and collects passed file descriptors.

    Descriptors are queued in arrival order; a reply says how many it carries (its ``fds``
    list), and the reader of that reply takes that many from the queue (:meth:`take_fds`).
    This holds even when replies are pipelined: the sender writes frames whole and in order,
    and a frame's descriptors travel with its first byte, so they arrive before its end.
    A receive timeout leaves a partial frame buffered; the next read continues it.
    """

    _CHUNK = 1 << 16
    _FD_SPACE = socket.CMSG_SPACE(MAX_FDS_PER_REPLY * array.array("i").itemsize)

    def __init__(self, sock: socket.socket, accept_fds: bool = False):
        self._sock = sock
        self._buffer = bytearray()
        self._chunk = memoryview(bytearray(self._CHUNK))   # reused: no allocation per recv
        self._accept_fds = accept_fds
        self._fds: collections.deque[int] = collections.deque()

    def read(self) -> dict | None:
        """The next frame; ``None`` once the peer has closed (a partial frame before the
        close is dropped: nobody is left to answer).

        Raises FrameTooLarge for an oversized length prefix (the stream cannot be resynced,
        so the caller closes it) and ProtocolError for a body that is not a msgpack map (the
        stream is still in step, so the caller may answer and continue).
        """
        while len(self._buffer) < _HEADER.size:
            if not self._fill():
                return None
        (length,) = _HEADER.unpack_from(self._buffer)
        if length > MAX_FRAME:
            raise FrameTooLarge(f"frame of {length} bytes exceeds the {MAX_FRAME}-byte limit")
        while len(self._buffer) < _HEADER.size + length:
            if not self._fill():
                return None
        body = bytes(self._buffer[_HEADER.size:_HEADER.size + length])
        del self._buffer[:_HEADER.size + length]
        return unpack_body(body)

    def has_frame(self) -> bool:
        """Whether a whole frame is buffered already (read() will not block)."""
        return (len(self._buffer) >= _HEADER.size and
                len(self._buffer) >= _HEADER.size + _HEADER.unpack_from(self._buffer)[0])

    def take_fds(self, count: int) -> list[int]:
        return [self._fds.popleft() for _ in range(min(count, len(self._fds)))]

    def close_fds(self) -> None:
        while self._fds:
            os.close(self._fds.popleft())

    def _fill(self) -> bool:
        if self._accept_fds:
            count, ancillary, _flags, _addr = self._sock.recvmsg_into([self._chunk], self._FD_SPACE)
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
                    self._fds.extend(fds)
        else:
            count = self._sock.recv_into(self._chunk)
        self._buffer += self._chunk[:count]
        return count > 0


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket (``SO_PEERCRED``)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)


# --- Requests ---------------------------------------------------------------------------

def _name(value, field):
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME or not value.isprintable():
        raise ProtocolError(f"field {field!r} must be a non-empty printable string of at most "
                            f"{MAX_NAME} characters")
    return value


def _optional_name(value, field):
    return None if value is None else _name(value, field)


def _number(value, field, minimum=0.0, maximum=float("inf")):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not minimum <= value <= maximum:
        raise ProtocolError(f"field {field!r} must be a number between {minimum} and {maximum}")
    return value


def _optional_positive(value, field):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ProtocolError(f"field {field!r} must be a positive number or absent")
    return value


def _optional_count(value, field):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1 << 31:
        raise ProtocolError(f"field {field!r} must be a positive integer or absent")
    return value


def _shape(value, field):
    if not isinstance(value, (list, tuple)) or len(value) > 32 or any(
            isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in value):
        raise ProtocolError(f"field {field!r} must be a list of at most 32 non-negative integers")
    return tuple(value)


def _dtype(value, field):
    # The controller stores the dtype string verbatim; the SDK validates dtypes before
    # sending (faastube.refs) and rebuilds arrays only from dtypes it accepts.
    if not isinstance(value, str) or not 0 < len(value) <= 32:
        raise ProtocolError(f"field {field!r} must be a dtype string such as 'float32'")
    return value


def _nbytes(value, field):
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 50:
        raise ProtocolError(f"field {field!r} must be a non-negative integer byte count")
    return value


def _optional_secret(value, field):
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 4096:
        raise ProtocolError(f"field {field!r} must be a string of at most 4096 characters")
    return value


@dataclasses.dataclass(frozen=True)
class Hello:
    """Declare the caller's namespace (and its secret, where one is configured)."""
    op = "hello"
    namespace: str
    secret: str | None = None
    client: str | None = None
    _fields = {"namespace": _name, "secret": _optional_secret, "client": _optional_name}


@dataclasses.dataclass(frozen=True)
class Create:
    """Allocate a pending, writable object (``empty``; ``put`` is create + copy + seal)."""
    op = "create"
    shape: tuple
    dtype: str
    nbytes: int
    consumers: int | None = None
    ttl: float | None = None
    scope: str | None = None
    device: str = "host"        # "host" or a GPU's UUID (Note [GPUs by UUID], faastube/cuda.py)
    _fields = {"shape": _shape, "dtype": _dtype, "nbytes": _nbytes, "consumers": _optional_count,
               "ttl": _optional_positive, "scope": _optional_name, "device": _name}


@dataclasses.dataclass(frozen=True)
class Seal:
    """Make a pending object immutable and visible; optionally end the writer's lease.

    With ``lifetime``, the seal gives the object its ``consumers``, ``ttl`` and ``scope``
    (absent: none), for an object created without any: a spare (Note [Spare objects],
    faastube/client.py)."""
    op = "seal"
    id: str
    drop_writer: bool = False
    lifetime: bool = False
    consumers: int | None = None
    ttl: float | None = None
    scope: str | None = None
    _fields = {"id": _name, "drop_writer": lambda v, f: bool(v), "lifetime": lambda v, f: bool(v),
               "consumers": _optional_count, "ttl": _optional_positive, "scope": _optional_name}


@dataclasses.dataclass(frozen=True)
class Get:
    """Lease a read-only view of an object, waiting up to ``timeout`` while it is pending.

    ``device``: where the caller wants it ("host" or a GPU's UUID); absent: where it is,
    except that an object on a GPU comes to ``prefer`` (the caller's current GPU), or to
    the host for a caller without a GPU.

    ``slo_ms``: when a copy is needed, the time it should take at most; the transfer engine
    gives it the bandwidth that needs (controller/scheduler.py, Note [Shares])."""
    op = "get"
    id: str
    timeout: float = 0.0
    device: str | None = None
    prefer: str | None = None
    slo_ms: float | None = None
    _fields = {"id": _name, "timeout": lambda v, f: _number(v, f, 0.0, 3600.0),
               "device": _optional_name, "prefer": _optional_name,
               "slo_ms": lambda v, f: _number(v, f, MIN_SLO_MS, MAX_SLO_MS)}


@dataclasses.dataclass(frozen=True)
class Release:
    """Only carries piggybacked releases; answered once they are applied."""
    op = "release"
    _fields = {}


@dataclasses.dataclass(frozen=True)
class Delete:
    """Free an object now (its memory is reused once no lease holds it)."""
    op = "delete"
    id: str
    _fields = {"id": _name}


@dataclasses.dataclass(frozen=True)
class CloseScope:
    """Free every object created in a scope (an activation, a workflow run)."""
    op = "close_scope"
    scope: str
    _fields = {"scope": _name}


@dataclasses.dataclass(frozen=True)
class Status:
    """Pools, slabs, objects and bytes per namespace."""
    op = "status"
    _fields = {}


@dataclasses.dataclass(frozen=True)
class Ping:
    """A control round trip; answers the node and the controller's epoch."""
    op = "ping"
    _fields = {}


REQUESTS = {cls.op: cls for cls in (Hello, Create, Seal, Get, Release, Delete, CloseScope, Status, Ping)}
# consume: counts toward consumers, view kept; drop: the view is gone (consumed, lease ends);
# abandon: the client never used the grant (lease ends, nothing consumed).
RELEASE_KINDS = ("consume", "drop", "abandon")
_ENVELOPE_KEYS = {"v", "seq", "op", "releases"}
# Per request type, computed once: (field names in order, required ones, allowed keys).
_LAYOUT = {
    cls: (tuple(f.name for f in dataclasses.fields(cls)),
          frozenset(f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING),
          frozenset(cls._fields) | _ENVELOPE_KEYS)
    for cls in REQUESTS.values()
}


@dataclasses.dataclass(frozen=True)
class Envelope:
    """What every request carries besides its own fields."""
    seq: int
    request: object
    releases: tuple = ()


def decode_request(message: dict) -> Envelope:
    """Validate a decoded frame into an Envelope, or raise ProtocolError naming the problem."""
    version = message.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r} is not supported; this controller "
                            f"speaks version {PROTOCOL_VERSION}: upgrade the faastube SDK")
    seq = message.get("seq")
    if isinstance(seq, bool) or not isinstance(seq, int):
        raise ProtocolError("field 'seq' must be an integer")
    op = message.get("op")
    cls = REQUESTS.get(op) if isinstance(op, str) else None
    if cls is None:
        raise ProtocolError(f"unknown op {op!r}; known ops: {', '.join(sorted(REQUESTS))}")
    names, required, allowed = _LAYOUT[cls]
    fields = {}
    for name, check in cls._fields.items():
        if name in message:
            fields[name] = check(message[name], name)
        elif name in required:
            raise ProtocolError(f"op {op!r} needs field {name!r}")
    if len(message) > len(allowed) or not allowed.issuperset(message):
        unknown = set(message) - allowed
        raise ProtocolError(f"op {op!r} has unknown fields: {', '.join(sorted(map(str, unknown)))}")
    releases = _releases(message["releases"]) if "releases" in message else ()
    return Envelope(seq=seq, request=cls(**fields), releases=releases)


def _releases(value) -> tuple:
    if not isinstance(value, (list, tuple)) or len(value) > 100_000:
        raise ProtocolError("field 'releases' must be a list of [lease, kind] pairs")
    out = []
    for item in value:
        if (not isinstance(item, (list, tuple)) or len(item) != 2 or isinstance(item[0], bool)
                or not isinstance(item[0], int) or item[1] not in RELEASE_KINDS):
            raise ProtocolError("each release must be [lease id, 'consume', 'drop' or 'abandon']")
        out.append((item[0], item[1]))
    return tuple(out)


def request_message(seq: int, request, releases=()) -> dict:
    """The map for a request dataclass (the SDK side of decode_request)."""
    message = {"v": PROTOCOL_VERSION, "seq": seq, "op": request.op}
    for name in _LAYOUT[type(request)][0]:
        value = getattr(request, name)
        if value is not None:
            message[name] = list(value) if isinstance(value, tuple) else value
    if releases:
        message["releases"] = [list(r) for r in releases]
    return message
