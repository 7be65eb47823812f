"""The controller socket protocol, shared by the controller and the SDK.

Framing: every message is a 4-byte big-endian length followed by that many bytes of msgpack
encoding one map. A request is ``{"v": PROTOCOL_VERSION, "op": <name>, "seq": <int>, ...}``;
its reply is ``{"v": ..., "seq": <same>, "ok": true, ...}`` or ``{"ok": false, "error":
<FaasTubeError subclass name>, "message": <text>}``. Slab file descriptors ride on a reply as
``SCM_RIGHTS`` ancillary data; the reply's ``"fds"`` list says which slab each one maps.

Any request may carry ``"releases": [[lease, "consume"|"drop"|"abandon"], ...]`` so that leases ended
by the garbage collector travel on the next request instead of costing a round trip each, and
``"demand": [[function, seconds, {device: [object bytes, ...]}], ...]``: the activations of
functions that ended in the caller's process, how long each ran and what it put
(:class:`Activity`; Note [Reservation ahead of demand] in controller/demand.py), and
``"function": <name>``, the function the caller runs, sent when it changes: the controller
learns from it which function gets what another put (Note [Queue-aware eviction] in
controller/eviction.py).

Requests are frozen dataclasses (:data:`REQUESTS`); :func:`decode_request` validates a map
into one of them or raises :class:`ProtocolError` with the field at fault. Handlers never see
a raw map and never touch the socket. Replies are frozen dataclasses too (:data:`REPLIES`,
one type per request type): the controller's handlers return them, :func:`reply_message`
makes the map, and the SDK reads the map back with :func:`decode_reply`. The dtypes both
sides accept are decided here (:func:`check_dtype`).
"""

from __future__ import annotations

import array
import collections
import dataclasses
import os
import socket
import struct

import msgpack
import numpy as np

from .errors import FaasTubeError, FrameTooLarge, ProtocolError, UnsupportedDtypeError, to_wire

PROTOCOL_VERSION = 1
MAX_FRAME = 1 << 20          # a control message is small; anything bigger is a broken peer
MAX_FDS_PER_REPLY = 8
_HEADER = struct.Struct(">I")
MAX_NAME = 256               # namespaces, scopes, object ids
MAX_TTL_S = 366 * 86400      # a ttl of at most a year (and a day): a finite expiry Redis stores
MIN_SLO_MS, MAX_SLO_MS = 0.01, 3_600_000.0    # a get's copy SLO: 10 µs to an hour
_NUMERIC_KINDS = "biufc"     # the dtypes stored: bool, signed and unsigned ints, floats, complex


def check_dtype(dtype) -> np.dtype:
    """The numpy dtype for ``dtype`` if FaaSTube can store it, else UnsupportedDtypeError."""
    try:
        resolved = np.dtype(dtype)
    except TypeError as exc:
        raise UnsupportedDtypeError(f"{dtype!r} is not a dtype: {exc}") from None
    if resolved.kind not in _NUMERIC_KINDS or resolved.fields is not None or resolved.subdtype:
        raise UnsupportedDtypeError(
            f"dtype {resolved} is not supported: FaaSTube stores numeric arrays only "
            f"(bool, int, uint, float, complex); convert it, e.g. with .astype('float32')")
    return resolved


def dtype_name(dtype: np.dtype) -> str:
    """A dtype string that round-trips through np.dtype, with explicit byte order if non-native."""
    return dtype.name if dtype.isnative or dtype.itemsize == 1 else dtype.str


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

    @property
    def partial(self) -> bool:
        """Whether part of a frame is buffered (a read timed out in the middle of it)."""
        return bool(self._buffer)

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


def timeval(seconds: float) -> bytes:
    """A ``struct timeval`` for SO_RCVTIMEO / SO_SNDTIMEO (kernel timeouts: Python's own cost
    a poll() per call)."""
    return struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))


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


def valid_ttl(value) -> bool:
    """A ttl: seconds, finite, at most MAX_TTL_S (what Redis can store as an expiry, with room)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value <= MAX_TTL_S


def _optional_ttl(value, field):
    if value is None:
        return None
    if not valid_ttl(value):
        raise ProtocolError(f"field {field!r} must be a number of seconds above 0 and at most "
                            f"{MAX_TTL_S} ({MAX_TTL_S // 86400} days), or absent")
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
    # The controller stores the dtype string verbatim once create has passed it through
    # check_dtype; the SDK checks dtypes before sending and rebuilds arrays only from them.
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
    spill: bool | None = None   # a put's: may start on the host tier (Note [Puts that rank last])
    _fields = {"shape": _shape, "dtype": _dtype, "nbytes": _nbytes, "consumers": _optional_count,
               "ttl": _optional_ttl, "scope": _optional_name, "device": _name,
               "spill": lambda v, f: bool(v)}


@dataclasses.dataclass(frozen=True)
class Lifetime:
    """When an object is freed: once ``consumers`` gets were released, ``ttl`` seconds after
    its seal, or when ``scope`` closes, whichever comes first (None: not that way)."""
    consumers: int | None = None
    ttl: float | None = None
    scope: str | None = None


@dataclasses.dataclass(frozen=True)
class Seal:
    """Make a pending object immutable and visible; optionally end the writer's lease.

    With ``lifetime``, the seal gives the object its ``consumers``, ``ttl`` and ``scope``
    (absent: none), for an object created without any: a spare (Note [Spare objects],
    faastube/spares.py)."""
    op = "seal"
    id: str
    drop_writer: bool = False
    lifetime: bool = False
    consumers: int | None = None
    ttl: float | None = None
    scope: str | None = None
    _fields = {"id": _name, "drop_writer": lambda v, f: bool(v), "lifetime": lambda v, f: bool(v),
               "consumers": _optional_count, "ttl": _optional_ttl, "scope": _optional_name}

    @classmethod
    def giving(cls, object_id: str, drop_writer: bool, lifetime: Lifetime | None) -> "Seal":
        """A seal that gives the object ``lifetime`` (None: the one it was created with)."""
        if lifetime is None:
            return cls(object_id, drop_writer)
        return cls(object_id, drop_writer, True, lifetime.consumers, lifetime.ttl, lifetime.scope)


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


def _tiers(value, field):
    if value not in WATCH_TIERS:
        raise ProtocolError(f"field {field!r} must be one of {', '.join(map(repr, WATCH_TIERS))}")
    return value


WATCH_TIERS = ("gpu", "all")


@dataclasses.dataclass(frozen=True)
class Watch:
    """Make this connection the process's slab watcher (Note [Slabs mapped ahead],
    faastube/watcher.py): after the reply, the controller sends on it, unasked, the
    descriptors of its namespace's slabs (``tiers``: GPU slabs only, or all), those there now
    and each new one, and the slabs it retires."""
    op = "watch"
    tiers: str = "gpu"
    _fields = {"tiers": _tiers}


REQUESTS = {cls.op: cls for cls in (Hello, Create, Seal, Get, Release, Delete, CloseScope, Status, Ping, Watch)}
# consume: counts toward consumers, view kept; drop: the view is gone (consumed, lease ends);
# abandon: the client never used the grant (lease ends, nothing consumed).
RELEASE_KINDS = ("consume", "drop", "abandon")
_ENVELOPE_KEYS = {"v", "seq", "op", "releases", "demand", "function"}
MAX_ACTIVITIES = 1000           # per request
MAX_RELEASES = 8192             # per request: the SDK sends more on the next ones
MAX_STATUS_NAMESPACES = 1000    # listed in a status reply
MAX_ACTIVITY_DEVICES = 16
MAX_ACTIVITY_OBJECTS = 64       # object sizes reported per device and activation
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
    demand: tuple = ()          # Activity, one per activation that ended
    function: str | None = None     # the function the caller runs now, when it changed


@dataclasses.dataclass(frozen=True)
class Activity:
    """One activation of ``function`` that ended: it ran ``seconds`` and put objects of these
    sizes per device (``{"host" or a GPU's UUID: (bytes, ...)}``; at most
    MAX_ACTIVITY_OBJECTS per device, the largest)."""
    function: str
    seconds: float
    sizes: dict

    def as_list(self) -> list:
        return [self.function, self.seconds, {device: list(sizes) for device, sizes in self.sizes.items()}]


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
    demand = _demand(message["demand"]) if "demand" in message else ()
    function = _name(message["function"], "function") if "function" in message else None
    return Envelope(seq=seq, request=cls(**fields), releases=releases, demand=demand, function=function)


def _demand(value) -> tuple:
    if not isinstance(value, (list, tuple)) or len(value) > MAX_ACTIVITIES:
        raise ProtocolError(f"field 'demand' must be a list of at most {MAX_ACTIVITIES} "
                            f"[function, seconds, {{device: [bytes, ...]}}] entries")
    out = []
    for item in value:
        if not isinstance(item, (list, tuple)) or len(item) != 3:
            raise ProtocolError("each 'demand' entry must be [function, seconds, {device: [bytes, ...]}]")
        function, seconds, sizes = item
        _name(function, "demand function")
        _number(seconds, "demand seconds", 0.0, 86400.0)
        if not isinstance(sizes, dict) or len(sizes) > MAX_ACTIVITY_DEVICES:
            raise ProtocolError(f"a 'demand' entry's sizes must map at most {MAX_ACTIVITY_DEVICES} "
                                f"devices to lists of byte counts")
        checked = {}
        for device, counts in sizes.items():
            _name(device, "demand device")
            if not isinstance(counts, (list, tuple)) or len(counts) > MAX_ACTIVITY_OBJECTS:
                raise ProtocolError(f"a 'demand' entry lists at most {MAX_ACTIVITY_OBJECTS} sizes per device")
            checked[device] = tuple(_nbytes(n, "demand bytes") for n in counts)
        out.append(Activity(function, float(seconds), checked))
    return tuple(out)


def _releases(value) -> tuple:
    if not isinstance(value, (list, tuple)) or len(value) > MAX_RELEASES:
        raise ProtocolError(f"field 'releases' must be a list of at most {MAX_RELEASES} [lease, kind] pairs")
    out = []
    for item in value:
        if (not isinstance(item, (list, tuple)) or len(item) != 2 or isinstance(item[0], bool)
                or not isinstance(item[0], int) or item[1] not in RELEASE_KINDS):
            raise ProtocolError("each release must be [lease id, 'consume', 'drop' or 'abandon']")
        out.append((item[0], item[1]))
    return tuple(out)


def _with_fields(message: dict, value_object, names) -> dict:
    """``message`` with the set fields of a request or reply dataclass (tuples as lists)."""
    for name in names:
        value = getattr(value_object, name)
        if value is not None:
            message[name] = list(value) if isinstance(value, tuple) else value
    return message


def request_message(seq: int, request, releases=(), demand=(), function: str | None = None) -> dict:
    """The map for a request dataclass (the SDK side of decode_request); ``demand``:
    Activity entries; ``function``: the caller's function, when it changed."""
    message = _with_fields({"v": PROTOCOL_VERSION, "seq": seq, "op": request.op}, request,
                           _LAYOUT[type(request)][0])
    if releases:
        message["releases"] = [list(r) for r in releases]
    if demand:
        message["demand"] = [activity.as_list() for activity in demand]
    if function:
        message["function"] = function
    return message


# --- Replies ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SlabDescriptor:
    """A slab file descriptor a reply carries (``SCM_RIGHTS``, in the order of its ``fds``)."""
    slab: int
    size: int
    writable: bool
    device: str = "host"


@dataclasses.dataclass(frozen=True)
class Welcome:
    """``hello``'s reply: the node, the controller's epoch, the caller's pid as it sees it."""
    node: str
    epoch: str
    pid: int


@dataclasses.dataclass(frozen=True)
class Granted:
    """``create``'s and ``get``'s reply: the object, its lease, and where its bytes are (a
    slab of ``device``, at ``offset``); for a get on another device, those of its copy."""
    id: str
    lease: int
    slab: int
    device: str
    offset: int
    nbytes: int
    dtype: str
    shape: tuple


@dataclasses.dataclass(frozen=True)
class Done:
    """The reply of ``seal``, ``release`` and ``delete``: it was done."""


@dataclasses.dataclass(frozen=True)
class Freed:
    """``close_scope``'s reply: how many objects the scope held."""
    freed: int


@dataclasses.dataclass(frozen=True)
class Pong:
    """``ping``'s reply."""
    node: str
    epoch: str


@dataclasses.dataclass(frozen=True)
class StatusReport:
    """``status``'s reply: per pool and per namespace what is held (the caller's namespace
    only, unless the caller is the controller's own user or root); for those, also the
    number of connections, the request counters, the links, the topology and each
    function's demand. The sections
    are JSON-like maps, as ``faastube status --json`` prints them (docs/operations.md)."""
    node: str
    epoch: str
    pools: list
    namespaces: dict
    clients: int | None = None
    requests: dict | None = None
    links: dict | None = None
    topology: dict | None = None
    demand: list | None = None      # per function: Note [Reservation ahead of demand]
    # Namespaces left out of ``namespaces`` (it lists at most MAX_STATUS_NAMESPACES, those
    # holding the most), so the reply always fits a frame.
    namespaces_omitted: int | None = None
    # The controller's version, start and uptime; the directory's state (Redis up or down,
    # its version: controller/directory.py Directory.state).
    controller: dict | None = None
    directory: dict | None = None

    def as_dict(self) -> dict:
        """The report as one JSON-like map, without the admin's sections it lacks."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None or f.name == "clients"}


#: The reply type of each request type.
REPLIES = {Hello: Welcome, Create: Granted, Seal: Done, Get: Granted, Release: Done, Delete: Done,
           CloseScope: Freed, Status: StatusReport, Ping: Pong, Watch: Done}
# Per reply type, computed once: its field names, and per field: whether the reply must have
# it, the default if not, whether it arrives as a list and is kept as a tuple.
_REPLY_LAYOUT = {
    cls: (tuple(f.name for f in dataclasses.fields(cls)),
          tuple((f.name, f.default is dataclasses.MISSING, None if f.default is dataclasses.MISSING
                 else f.default, f.type == "tuple") for f in dataclasses.fields(cls)))
    for cls in set(REPLIES.values()) | {SlabDescriptor}
}


def reply_message(seq: int | None, reply, descriptors=(), retired=()) -> dict:
    """The map for a reply dataclass (the controller side of :func:`decode_reply`):
    ``descriptors`` say which slab each passed descriptor maps, ``retired`` lists slabs the
    client should drop from its cache."""
    message = _with_fields({"v": PROTOCOL_VERSION, "seq": seq, "ok": True}, reply,
                           _REPLY_LAYOUT[type(reply)][0])
    if descriptors:
        message["fds"] = [dataclasses.asdict(d) for d in descriptors]
    if retired:
        message["retired"] = list(retired)
    return message


def error_message(seq: int | None, exc: FaasTubeError) -> dict:
    """The map of a failed request's reply: the error's class name and message."""
    return {"v": PROTOCOL_VERSION, "seq": seq, "ok": False, **to_wire(exc)}


def _fill(cls, message: dict):
    try:
        return cls(*[(tuple(message[name]) if as_tuple else message[name]) if required
                     else message.get(name, default)
                     for name, required, default, as_tuple in _REPLY_LAYOUT[cls][1]])
    except (KeyError, TypeError):
        missing = sorted(name for name, required, _d, _t in _REPLY_LAYOUT[cls][1]
                         if required and name not in message)
        raise ProtocolError(f"the controller's {cls.__name__} reply is not one this SDK reads "
                            f"(missing: {', '.join(missing) or 'nothing'}): is the controller "
                            f"another version?") from None


def decode_reply(request_type, message: dict):
    """The typed reply to a request of ``request_type`` from a successful reply's map."""
    return _fill(REPLIES[request_type], message)


def descriptors_of(message: dict) -> list[SlabDescriptor]:
    """The slab descriptors a reply's map says it carries, in order."""
    return [_fill(SlabDescriptor, info) for info in message.get("fds", ())]
