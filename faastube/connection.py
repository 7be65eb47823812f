"""The SDK's connection to the node controller (the part redis-py's ``Connection`` plays): one
Unix socket shared by every thread of the process, ``hello``, framing, matching replies to
requests, the slab descriptors replies carry, and the releases that ride on requests. It
knows the shape of messages, not what the objects in them are (faastube/client.py).

Note [Pipelined requests]: threads send requests whenever they like (a send lock keeps
frames whole) and replies may come back in any order (a get that waits for a seal is
answered later). Whichever waiting thread finds no reader becomes the reader: it reads
frames and files each reply under its ``seq`` until its own arrives, then hands over.
One thread alone therefore reads its own reply directly, with no thread hop.
"""

from __future__ import annotations

import collections
import contextvars
import dataclasses
import logging
import os
import select
import socket
import threading
import time

from . import protocol
from .config import Config
from .errors import ControllerUnavailableError, FaasTubeError, from_wire

log = logging.getLogger("faastube")

READ_TICK_S = 0.25            # how often a waiting reader re-checks its deadline
REPLY_MARGIN_S = 10.0         # a controller slower than this past a request's own wait is hung
DEFAULT_REPLY_TIMEOUT_S = 60.0
# Note [A get that copies spins longer]: a reply that carries a copy comes after the copy,
# later than the reply spin covers, and a reader asleep by then pays its wake-up on top. So
# where the reply spin is on, a get that the controller will copy spins longer too: for the
# copy at a slow link's rate, at most COPY_SPIN_MAX_S (a 64 MB host→GPU get: 1.2 ms of copy).
COPY_SPIN_BYTES_PER_S = 20e9
COPY_SPIN_MAX_S = 0.002

#: The function this thread runs (faastube.sdk.activation sets it): requests carry it when it
#: changed since the last one sent (Note [Queue-aware eviction], controller/eviction.py).
CURRENT_FUNCTION: contextvars.ContextVar[str | None] = contextvars.ContextVar("faastube_function",
                                                                              default=None)


@dataclasses.dataclass(frozen=True)
class Pending:
    """A request sent whose reply is read later (:meth:`Connection.wait`)."""
    request: object
    seq: int
    generation: int         # the connection it went out on: replies never cross connections


class Connection:
    """The process's connection to the controller; connects on the first request.

    ``slabs`` (faastube/views.py ``SlabMappings``) takes the descriptors replies carry
    (``attach``), the slabs they retire (``retire``), and is emptied when the controller's
    epoch changes (``clear``). ``anonymous`` skips ``hello``: for tools (status, ping) run by
    the controller's own user or root, which the controller recognises by SO_PEERCRED."""

    def __init__(self, config: Config, slabs, anonymous: bool = False):
        self.config = config
        self.slabs = slabs
        self.anonymous = anonymous
        self.node: str | None = None
        self.epoch: str | None = None
        #: (lease, "consume" | "drop" | "abandon") to travel on the next request (Note
        #: [Releases ride along], faastube/leases.py).
        self.releases: collections.deque = collections.deque()
        #: protocol.Activity of activations that ended, to travel the same way (Note
        #: [Reservation ahead of demand], controller/demand.py).
        self.demand: collections.deque = collections.deque()
        #: Called after each new connection's hello (the client starts its slab watcher).
        self.on_connected = None
        #: Which passed slabs to map (the slab watcher's choice; None: all): the others'
        #: descriptors are closed unused.
        self.accept_slab = None
        self.reset()

    def reset(self) -> None:
        """Forget the socket without closing it: at start, and in a forked child, whose
        parent's socket is the parent's to speak on (the child opens its own when needed)."""
        self._send_lock = threading.Lock()
        self._state = threading.Condition(threading.Lock())
        self._sock: socket.socket | None = None
        self._reader: protocol.FrameReader | None = None
        self._generation = 0
        self._reading = False
        self._replies: dict[int, dict] = {}
        self._abandoned: set[int] = set()
        self._unawaited: set[int] = set()   # Note [Seal without waiting], faastube/client.py
        self._parting: dict | None = None   # an error the controller sent before closing
        self._closed_idle = -1              # the generation the controller closed as idle
        self._seq = 0
        self._function_sent: str | None = None
        self.releases.clear()               # a parent's leases are not the child's to end
        self.demand.clear()

    @property
    def connected(self) -> bool:
        return self._sock is not None

    @property
    def has_piggyback(self) -> bool:
        """Whether releases or demand wait for a request to ride on."""
        return bool(self.releases or self.demand)

    def request(self, request, wait_s: float = 0.0, copy_bytes: int = 0):
        """Send one request (plus queued releases) and return its typed reply
        (protocol.REPLIES), or raise its error. ``wait_s``: how long the controller itself
        may wait before answering (a get's timeout); ``copy_bytes``: what it will copy
        first (Note [A get that copies spins longer])."""
        return self.wait(self.send(request), wait_s + REPLY_MARGIN_S if wait_s else DEFAULT_REPLY_TIMEOUT_S,
                         copy_bytes)

    def send(self, request, connect: bool = True) -> Pending | None:
        """Send a request whose reply :meth:`wait` reads later; None if not connected and
        ``connect`` is False."""
        with self._send_lock:
            fresh = self._sock is None
            if fresh:
                if not connect:
                    return None
                self._connect()
            try:
                return Pending(request, self._send(request), self._generation)
            except ControllerUnavailableError:
                if fresh or not connect:
                    raise
                # The socket failed before the request went out (the controller restarted
                # since the last one): nothing reached a controller, so send it once more,
                # on a new connection, whatever it is.
                self._connect()
                return Pending(request, self._send(request), self._generation)

    def send_only(self, request) -> None:
        """Send a request whose reply nobody waits for (Note [Seal without waiting]); a
        failure is logged when its reply comes."""
        with self._send_lock:
            if self._sock is None:
                self._connect()
            seq = self._seq + 1                          # the seq _send is about to use
            with self._state:
                self._unawaited.add(seq)
            try:
                self._send(request)
            except BaseException:
                with self._state:
                    self._unawaited.discard(seq)
                raise

    def wait(self, pending: Pending, timeout: float = DEFAULT_REPLY_TIMEOUT_S, copy_bytes: int = 0):
        """The typed reply of a sent request, or its error."""
        spin_s = reply_spin_s(self.config.reply_spin_us, copy_bytes)
        try:
            message = self._wait(pending.seq, pending.generation, timeout, spin_s)
        except ControllerUnavailableError:
            if self._closed_idle != pending.generation:
                raise
            # The controller closed the connection as idle (Note [Bounded connections],
            # controller/server.py) after making sure it had read nothing more: the request
            # never reached it, so it goes once more on a new connection.
            pending = self.send(pending.request)
            message = self._wait(pending.seq, pending.generation, timeout, spin_s)
        return protocol.decode_reply(type(pending.request), message)

    def peek(self, pending: Pending):
        """The typed reply of a sent request if it has been read already (it stays there for
        :meth:`wait`), else None; an error reply is None too."""
        with self._state:
            message = self._replies.get(pending.seq) if pending.generation == self._generation else None
        if message is None or not message.get("ok"):
            return None
        return protocol.decode_reply(type(pending.request), message)

    def close(self) -> None:
        self._disconnect()

    def follow(self, after_frame=None) -> None:
        """Read what the controller sends unasked (Note [Slabs mapped ahead],
        faastube/watcher.py) until the connection closes: the descriptors are attached and
        the retired slabs dropped, as a reply's are, then ``after_frame()`` is called. For a
        connection nothing else reads."""
        while True:
            with self._state:
                if self._sock is None:
                    return
                sock, reader, generation = self._sock, self._reader, self._generation
            self._read_one(sock, reader, generation, 0.0)
            with self._state:
                got = self._replies.pop(None, None)
                self._parting = None
            if got is not None and after_frame is not None:
                after_frame()

    # -- the socket -----------------------------------------------------------------------

    def _connect(self) -> None:
        """Open the socket and say hello (send lock held: nobody else can be waiting)."""
        path = self.config.socket
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.config.connect_timeout_s)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise ControllerUnavailableError(
                f"no controller at {path} ({exc.strerror or exc}): start `faastube controller` "
                f"or set FAASTUBE_SOCKET to its socket") from None
        # Blocking socket with kernel timeouts: Python's own timeouts cost a poll() per call.
        # A receive wakes at least every READ_TICK_S so a reader can check its deadline.
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, protocol.timeval(READ_TICK_S))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, protocol.timeval(DEFAULT_REPLY_TIMEOUT_S))
        with self._state:
            self._sock, self._reader = sock, protocol.FrameReader(sock, accept_fds=True)
            self._generation += 1
            self._parting = None
        self._function_sent = None          # a new connection is a new session
        if self.anonymous:
            return
        hello = protocol.Hello(self.config.namespace, self.config.secret, f"pid {os.getpid()}")
        welcome = protocol.decode_reply(protocol.Hello, self._wait(
            self._send(hello), self._generation, DEFAULT_REPLY_TIMEOUT_S))
        if welcome.epoch != self.epoch or self._generation > 1:
            # Slab ids belong to one controller epoch; and a new session of the same one is
            # never told of the slabs retired that the old one mapped (a writer's slabs
            # are retired once it is gone: Note [Slabs of one writer], controller/pool.py).
            # Views in use keep their mappings; the rest are mapped again as replies need.
            self.slabs.clear()
        self.node, self.epoch = welcome.node, welcome.epoch
        if self.on_connected is not None:
            self.on_connected()

    def _disconnect(self, generation: int | None = None) -> None:
        with self._state:
            if self._sock is None or (generation is not None and generation != self._generation):
                return
            self._sock.close()
            self._reader.close_fds()
            self._sock = self._reader = None
            self._replies.clear()
            self._abandoned.clear()
            self._unawaited.clear()
            self._state.notify_all()

    def _send(self, request) -> int:
        """Frame and send a request (send lock held); returns its seq."""
        releases, demand = [], []
        while self.releases and len(releases) < protocol.MAX_RELEASES:
            releases.append(self.releases.popleft())
        while self.demand and len(demand) < protocol.MAX_ACTIVITIES:
            demand.append(self.demand.popleft())
        function = CURRENT_FUNCTION.get()
        if function == self._function_sent:
            function = None
        elif function is not None:
            self._function_sent = function
        self._seq += 1
        try:
            protocol.send_frame(self._sock, protocol.request_message(self._seq, request, releases, demand,
                                                                     function))
        except OSError as exc:
            parting = self._parting_frame()
            self._disconnect()
            if parting is not None:
                _checked(parting)          # e.g. ControllerBusyError: refused at its limit
            raise self._lost(f"failed: {exc}") from None
        return self._seq

    def _parting_frame(self) -> dict | None:
        """An error frame the controller sent before closing, if one is there to read."""
        try:
            self._sock.setblocking(False)
            reply = self._reader.read()
        except (OSError, FaasTubeError):
            return None
        if reply is not None and reply.get("seq") is None and not reply.get("ok") and not reply.get("idle"):
            return reply
        return None

    # -- replies (Note [Pipelined requests]) ----------------------------------------------

    def _wait(self, seq: int, generation: int, timeout: float, spin_s: float | None = None) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            with self._state:
                while True:
                    if generation != self._generation or self._sock is None:
                        if self._parting is not None and not self._parting.get("idle"):
                            _checked(self._parting)        # e.g. ControllerBusyError at its limit
                        raise self._lost("closed the connection (did it stop or restart?)")
                    if seq in self._replies:
                        return _checked(self._replies.pop(seq))
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self._abandoned.add(seq)
                        raise self._lost("did not answer in time")
                    if not self._reading:
                        self._reading = True
                        sock, reader = self._sock, self._reader
                        break
                    self._state.wait(remaining)
            try:
                self._read_one(sock, reader, generation, spin_s)
            finally:
                with self._state:
                    self._reading = False
                    self._state.notify_all()

    def _read_one(self, sock, reader, generation: int, spin_s: float | None = None) -> None:
        """Read one reply frame (as the current reader) and file it under its seq."""
        if spin_s is None:
            spin_s = self.config.reply_spin_us / 1e6
        if spin_s > 0 and not reader.has_frame():
            # Poll before sleeping in recv: a thread that sleeps pays the wake-up (an idle
            # core's, or a VM's halted vCPU's) when the reply lands.
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            until = time.perf_counter() + spin_s
            while not poller.poll(0) and time.perf_counter() < until:
                pass
        try:
            reply = reader.read()
        except (BlockingIOError, TimeoutError):
            return            # a read tick passed; a partial frame stays buffered; re-check
        except OSError:
            reply = None
        if reply is None:
            self._disconnect(generation)
            return
        if "fds" in reply:
            reply = self._attach(reply, reader)
        if "retired" in reply:
            self.slabs.retire(reply["retired"])
        with self._state:
            seq = reply.get("seq")
            if seq in self._abandoned:
                self._abandoned.discard(seq)
                if reply.get("ok") and "lease" in reply:
                    self.releases.append((reply["lease"], "abandon"))
            elif seq in self._unawaited:
                self._unawaited.discard(seq)
                if not reply.get("ok"):
                    log.warning("a request the SDK did not wait for failed: %s: %s",
                                reply.get("error"), reply.get("message"))
            elif seq is None and not reply.get("ok"):
                self._parting = reply       # why the controller is closing this connection
                if reply.get("idle"):
                    self._closed_idle = generation
            else:
                self._replies[seq] = reply

    def _attach(self, reply: dict, reader: protocol.FrameReader) -> dict:
        """Hand the reply's descriptors to the slab cache; a reply whose slab cannot be
        mapped here becomes that error (and its lease is given back unused)."""
        descriptors = protocol.descriptors_of(reply)
        for descriptor, fd in zip(descriptors, reader.take_fds(len(descriptors))):
            if self.accept_slab is not None and not self.accept_slab(descriptor):
                os.close(fd)
                continue
            try:
                self.slabs.attach(descriptor, fd)
            except FaasTubeError as exc:      # e.g. the GPU is not visible to this process
                if "lease" in reply:
                    self.releases.append((reply["lease"], "abandon"))
                reply = {"seq": reply.get("seq"), "ok": False, "error": type(exc).__name__,
                         "message": str(exc)}
        return reply

    def _lost(self, what: str) -> ControllerUnavailableError:
        return ControllerUnavailableError(
            f"the controller at {self.config.socket} {what}; check that `faastube controller` "
            f"is running")


def reply_spin_s(reply_spin_us: float, copy_bytes: int = 0) -> float:
    """How long a reader polls for a reply before sleeping: the reply spin, and for a reply
    behind a copy of ``copy_bytes`` that much longer (Note [A get that copies spins longer])."""
    spin_s = reply_spin_us / 1e6
    if spin_s > 0 and copy_bytes > 0:
        spin_s += min(COPY_SPIN_MAX_S, copy_bytes / COPY_SPIN_BYTES_PER_S)
    return spin_s


def _checked(reply: dict) -> dict:
    if not reply.get("ok"):
        raise from_wire(reply.get("error", "FaasTubeError"), reply.get("message", "unknown error"))
    return reply
