"""The SDK's connection to the node controller, and the one place where an object becomes an
array view and back.

Note [One mapping per slab]: a slab's descriptor arrives once per process (on the first
reply that needs it) and is mapped at once: read-only always, read-write too if the
descriptor allows it (Note [Read-only descriptors] in controller/slabs.py). Later gets are
one round trip plus pointer arithmetic. Mappings of retired slabs are dropped from the cache;
views still using one keep it alive, and the kernel unmaps it with the last view.

Note [GPU views]: a GPU slab's descriptor is imported and mapped once per process too
(faastube/cuda.py), read-only for readers. A GPU object becomes a CuPy array over the mapping
(``cupy.cuda.UnownedMemory``) whose owner is a small holder object: every view, slice, and
DLPack export (``torch.from_dlpack``) of the array keeps the holder alive, so its finalizer
ends the lease exactly when the last of them is gone; the holder keeps the mapping alive,
so a slab the controller retires stays mapped while a view uses it. Arrays are found again
(seal, release) by their device address.

Note [Seal without waiting]: ``put`` and ``seal`` send the seal and return the ref without
waiting for the reply, saving a round trip per hand-off. The controller answers a connection's requests in
order, so this process's later requests see the object sealed, and another process's get
that arrives first waits for the seal. ``put`` made the object itself a moment earlier, so
the seal can only fail if the controller died or the object was freed meanwhile (its scope
closed, its ttl ran out); such a failure is logged, and a consumer's get says precisely
what happened to the object. A second seal of the same array is refused at once, here.

Note [Put seals when its copy lands]: with ``FAASTUBE_PUT_WAITS=0`` a GPU ``put`` queues its
copy and returns the ref at once; a thread of the client waits for the copy (an event
recorded after it, faastube.cuda.Fences) and then sends the seal, so only finished writes
are published (Note [Seal publishes finished writes], faastube/sdk.py) while the caller goes
on; a consumer's get that comes first waits for the seal. Seals go out in the order of the
puts, and ``delete``, ``close_scope``, ``close`` and exit flush first, so this process's own
later requests still find its puts sealed. The source array is kept alive until its copy
has landed, so its memory is not reused under the copy; later writes to it must be queued
on the same stream or wait for ``flush_puts``. A failed copy deletes its object, so a
consumer's get fails at once instead of timing out. Not the default: it returns the
producer ~0.15 ms sooner, but a get right behind the put then waits for the seal on a
controller thread, and the 64 MB hand-off was slower in 7 of 8 paired rounds on an H200
(docs/benchmarks.md).

Note [Spare objects]: a ``put`` is create + copy + seal, and the create is a round trip the
put waits for: on a node whose cores sleep between requests it costs 0.2–0.4 ms, more than
the copy of tens of MB. A function usually puts the same shape again on every activation, so
once a process has put an (shape, dtype, device) twice, the client asks for a *spare* of
that signature right after the put, without waiting: a pending object created with no
consumers, ttl or scope. The next put of the signature takes the spare (its reply came in
long ago), writes it, and its seal (``lifetime``) gives it the put's consumers, ttl and
scope; meanwhile the next spare is on its way. ``empty`` without a ttl does the same: it
takes a spare and keeps the lifetime for the seal; until then the object has no scope, so
``close_scope`` deletes this process's unsealed ones of that scope itself, and one whose
array is collected unsealed is deleted (a ttl would only start at the seal, so ``empty``
with a ttl always creates). At most ``SPARE_COUNT`` signatures and ``spare_bytes`` bytes
(``FAASTUBE_SPARE_BYTES``, 0 turns spares off) are held per process; a thread frees a spare
unused for ``SPARE_IDLE_S``; all of them go when a create finds the pool exhausted (the
create is then tried again) and on ``close``, and the controller aborts them with the
process (Note [What a crash frees]). A forked child never takes its parent's spares.

Note [A finished process has consumed]: at a normal exit the client counts every array it
still holds from ``get`` as consumed (Note [Consumers] in controller/objects.py); a process
that dies of an unhandled exception or a signal consumes nothing, so a retry can get it.

Note [Releases ride along]: an array's lease ends when the array and every view of it are
garbage-collected. The finalizer must not do I/O (it may run inside another request, on any
thread), so it only queues the lease; queued leases travel on the next request, or a
background thread sends them after a short delay if no request comes.
"""

from __future__ import annotations

import atexit
import collections
import logging
import math
import mmap
import os
import select
import socket
import struct
import sys
import threading
import time
import weakref

import numpy as np

from . import cuda, protocol
from .config import Config
from .errors import (ControllerUnavailableError, FaasTubeError, InvalidStateError,
                     NotAnArrayError, ObjectNotFoundError, PoolExhaustedError, from_wire)
from .refs import dtype_name

log = logging.getLogger("faastube")

RELEASE_DELAY_S = 0.002       # let queued releases ride on the next request first
SPARE_COUNT = 4               # signatures with a spare per process (Note [Spare objects])
SPARE_IDLE_S = 10.0           # a spare unused this long is freed
READ_TICK_S = 0.25            # how often a waiting reader re-checks its deadline
REPLY_MARGIN_S = 10.0         # a controller slower than this past a request's own wait is hung
DEFAULT_REPLY_TIMEOUT_S = 60.0


class SlabMapping:
    """A slab mapped into this process: always readable, writable if the controller allowed."""

    def __init__(self, size: int):
        self.size = size
        self.readable: mmap.mmap | None = None
        self.writable: mmap.mmap | None = None

    def attach(self, fd: int, writable: bool) -> None:
        try:
            if self.readable is None:
                self.readable = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                          prot=mmap.PROT_READ)
            if writable and self.writable is None:
                self.writable = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                          prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)


class GpuSlabMapping:
    """A GPU slab mapped into this process (Note [GPU views]): read-only, and read-write too
    if the controller sent a writer's descriptor."""

    def __init__(self, size: int, device: str):
        self.size = size
        self.device = device
        self.readable: cuda.VmmMapping | None = None
        self.writable: cuda.VmmMapping | None = None

    def attach(self, fd: int, writable: bool) -> None:
        if writable:
            if self.writable is None:
                self.writable = cuda.VmmMapping.import_fd(fd, self.size, self.device, writable=True)
                return
        elif self.readable is None:
            self.readable = cuda.VmmMapping.import_fd(fd, self.size, self.device, writable=False)
            return
        os.close(fd)


class _GpuLease:
    """The owner of a GPU object's memory in this process (Note [GPU views])."""
    __slots__ = ("mapping", "__weakref__")

    def __init__(self, mapping):
        self.mapping = mapping


def cuda_interface(array) -> dict | None:
    """The ``__cuda_array_interface__`` of a CuPy array, a CUDA torch tensor or any other
    GPU array that has one, else None."""
    if isinstance(array, np.ndarray) or not hasattr(type(array), "__cuda_array_interface__"):
        return None
    try:
        return array.__cuda_array_interface__
    except Exception:           # a CPU torch tensor, or one that requires grad
        return None


def cuda_address(array) -> int | None:
    """The device address of a GPU array (:func:`cuda_interface`), else None."""
    interface = cuda_interface(array)
    return None if interface is None else int(interface["data"][0])


class Client:
    """A connection to the controller, shared by every thread of the process.

    Note [Pipelined requests]: threads send requests whenever they like (a send lock keeps
    frames whole) and replies may come back in any order (a get that waits for a seal is
    answered later). Whichever waiting thread finds no reader becomes the reader: it reads
    frames and files each reply under its ``seq`` until its own arrives, then hands over.
    One thread alone therefore reads its own reply directly, with no thread hop.
    """

    def __init__(self, config: Config | None = None, anonymous: bool = False):
        """``anonymous`` skips ``hello``: for tools (status, ping) run by the controller's
        own user or root, which the controller recognises by SO_PEERCRED."""
        self.config = config or Config.from_env()
        self._anonymous = anonymous
        self._pid = os.getpid()
        self._init_connection_state()
        self._slabs: dict[int, SlabMapping] = {}
        self._writers: dict[int, tuple[str, int]] = {}   # id(flat array) → (object id, lease)
        self._sealed: set[str] = set()     # sealed here while a writer array lives: a 2nd seal says so
        self._readers: dict[int, int] = {}               # id(flat array) → lease
        self._lifetimes: dict[str, tuple] = {}   # unsealed empty() from a spare → its lifetime
        self._orphans: collections.deque = collections.deque()   # ... whose array went unsealed
        self._gpu_views: dict[int, tuple] = {}           # lease → (object id, start, end, writable, GPU)
        self._releases: collections.deque = collections.deque()
        self._release_wanted = threading.Event()
        self._flusher: threading.Thread | None = None
        self._init_landing_state()
        self.node: str | None = None
        self.epoch: str | None = None

    def _init_connection_state(self) -> None:
        self._send_lock = threading.Lock()
        self._state = threading.Condition(threading.Lock())
        self._sock: socket.socket | None = None
        self._reader: protocol.FrameReader | None = None
        self._generation = 0          # bumped per connection; replies never cross them
        self._reading = False
        self._replies: dict[int, dict] = {}
        self._abandoned: set[int] = set()
        self._unawaited: set[int] = set()   # Note [Seal without waiting]
        self._seq = 0
        # Note [Spare objects]: signature → (seq of its create, generation, bytes, time
        # asked); signatures put before (the first put of a signature makes no spare).
        self._spares: collections.OrderedDict = collections.OrderedDict()
        self._put_before: collections.OrderedDict = collections.OrderedDict()
        self._spare_lock = threading.RLock()
        self._reaper: threading.Thread | None = None

    # -- connection -----------------------------------------------------------------------

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
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(READ_TICK_S))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(DEFAULT_REPLY_TIMEOUT_S))
        with self._state:
            self._sock, self._reader = sock, protocol.FrameReader(sock, accept_fds=True)
            self._generation += 1
        if self._anonymous:
            return
        seq = self._send(protocol.Hello(self.config.namespace, self.config.secret,
                                        f"pid {os.getpid()}"))
        hello = self._wait(seq, self._generation, DEFAULT_REPLY_TIMEOUT_S)
        if hello["epoch"] != self.epoch:
            self._slabs.clear()   # slab ids belong to one controller epoch
        self.node, self.epoch = hello["node"], hello["epoch"]

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

    def _init_landing_state(self) -> None:
        # Note [Put seals when its copy lands]: (fence, object id, lifetime, what to keep
        # alive) per put whose copy may still be running, in put order.
        self._landing: collections.deque = collections.deque()
        self._landed = threading.Condition(threading.Lock())
        self._sealing = 0                  # taken off the queue, seal not yet sent
        self._sealer: threading.Thread | None = None

    def _after_fork(self) -> None:
        # The child shares the parent's socket; it must never speak on it. The controller
        # keeps the parent's leases; the child's copies of them are not its to release.
        self._pid = os.getpid()
        self._init_connection_state()
        self._releases.clear()
        self._writers.clear()
        self._sealed.clear()
        self._readers.clear()
        self._lifetimes.clear()
        self._orphans.clear()
        self._gpu_views.clear()
        self._slabs.clear()             # CUDA mappings do not survive fork
        self._flusher = None
        self._init_landing_state()      # the parent's puts are the parent's to seal

    def close(self) -> None:
        """Free the spares, send any queued releases, then close. Leases of arrays still
        alive stay with the controller until this process exits (Note [What a crash frees])."""
        if self._sock is not None and os.getpid() == self._pid:
            self.flush_puts()
            self.drop_spares()
        if self._releases and self._sock is not None and os.getpid() == self._pid:
            try:
                self.request(protocol.Release())
            except FaasTubeError:
                pass
        self._disconnect()

    # -- requests (Note [Pipelined requests]) ---------------------------------------------

    def request(self, request, wait_s: float = 0.0) -> dict:
        """Send one request (plus queued releases) and return its reply, or raise its error."""
        if os.getpid() != self._pid:
            self._after_fork()
        with self._send_lock:
            if self._sock is None:
                self._connect()
            generation = self._generation
            seq = self._send(request)
        timeout = wait_s + REPLY_MARGIN_S if wait_s else DEFAULT_REPLY_TIMEOUT_S
        return self._wait(seq, generation, timeout)

    def send_only(self, request) -> None:
        """Send a request whose reply nobody waits for (Note [Seal without waiting])."""
        if os.getpid() != self._pid:
            self._after_fork()
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

    def _send(self, request) -> int:
        """Frame and send a request (send lock held); returns its seq."""
        releases = []
        while self._releases:
            releases.append(self._releases.popleft())
        self._seq += 1
        try:
            protocol.send_frame(self._sock, protocol.request_message(self._seq, request, releases))
        except OSError as exc:
            self._disconnect()
            raise self._lost(f"failed: {exc}") from None
        return self._seq

    def _wait(self, seq: int, generation: int, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            with self._state:
                while True:
                    if generation != self._generation or self._sock is None:
                        raise self._lost("closed the connection (did it stop or restart?)")
                    if seq in self._replies:
                        return self._check(self._replies.pop(seq))
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
                self._read_one(sock, reader, generation, deadline)
            finally:
                with self._state:
                    self._reading = False
                    self._state.notify_all()

    def _read_one(self, sock, reader, generation: int, deadline: float) -> None:
        """Read one reply frame (as the current reader) and file it under its seq."""
        if self.config.reply_spin_us > 0 and not reader.has_frame():
            # Poll before sleeping in recv: a thread that sleeps pays the wake-up (an idle
            # core's, or a VM's halted vCPU's) when the reply lands.
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            until = time.perf_counter() + self.config.reply_spin_us / 1e6
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
        count = len(reply.get("fds", ()))
        for info, fd in zip(reply.get("fds", ()), reader.take_fds(count)):
            device = info.get("device", cuda.HOST)
            mapping = self._slabs.get(info["slab"])
            if mapping is None:
                mapping = self._slabs[info["slab"]] = (
                    SlabMapping(info["size"]) if device == cuda.HOST else GpuSlabMapping(info["size"], device))
            try:
                mapping.attach(fd, info["writable"])
            except FaasTubeError as exc:      # e.g. the GPU is not visible to this process
                if "lease" in reply:
                    self._releases.append((reply["lease"], "abandon"))
                reply = {"seq": reply.get("seq"), "ok": False, "error": type(exc).__name__,
                         "message": str(exc)}
        for slab_id in reply.get("retired", ()):
            self._slabs.pop(slab_id, None)
        with self._state:
            seq = reply.get("seq")
            if seq in self._abandoned:
                self._abandoned.discard(seq)
                if reply.get("ok") and "lease" in reply:
                    self._releases.append((reply["lease"], "abandon"))
            elif seq in self._unawaited:
                self._unawaited.discard(seq)
                if not reply.get("ok"):
                    log.warning("a request the SDK did not wait for failed: %s: %s",
                                reply.get("error"), reply.get("message"))
            else:
                self._replies[seq] = reply

    def _lost(self, what: str) -> ControllerUnavailableError:
        return ControllerUnavailableError(
            f"the controller at {self.config.socket} {what}; check that `faastube controller` "
            f"is running")

    @staticmethod
    def _check(reply: dict) -> dict:
        if not reply.get("ok"):
            raise from_wire(reply.get("error", "FaasTubeError"), reply.get("message", "unknown error"))
        return reply

    # -- objects --------------------------------------------------------------------------

    def create(self, shape, dtype: np.dtype, consumers=None, ttl=None, scope=None,
               device: str = cuda.HOST):
        """A writable array for a new pending object (``empty``): (array, object id, writer
        lease) — numpy on the host tier, CuPy on a GPU (``device``: a GPU's UUID). The
        writer's lease ends when the array is collected; ``seal(array)`` finds it again.
        Without a ``ttl`` it may take a spare (Note [Spare objects]); the seal then gives
        the object its consumers and scope. ``put`` uses :meth:`create_for_put`."""
        shape = tuple(int(d) for d in shape)
        reply, lifetime = self._create(shape, dtype, consumers, ttl, scope, device, spare=ttl is None)
        if lifetime is not None:
            self._lifetimes[reply["id"]] = lifetime
        if reply.get("device", cuda.HOST) != cuda.HOST:
            return self._gpu_view(reply, True).reshape(shape), reply["id"], reply["lease"]
        flat = self._view(reply, writable=True)
        self._writers[id(flat)] = (reply["id"], reply["lease"])
        weakref.finalize(flat, self._writer_gone, id(flat), reply["lease"]).atexit = False
        return flat.reshape(shape), reply["id"], reply["lease"]

    def create_for_put(self, shape, dtype: np.dtype, consumers=None, ttl=None, scope=None,
                       device: str = cuda.HOST):
        """Where ``put`` writes a new object, then seals it with ``drop_writer``: (target,
        object id, lifetime). The target is a writable numpy array on the host tier, the
        object's device address (an int) on a GPU. ``lifetime`` is None when the object
        already has the put's consumers, ttl and scope, else what the seal must give it (Note
        [Spare objects])."""
        shape = tuple(int(d) for d in shape)
        reply, lifetime = self._create(shape, dtype, consumers, ttl, scope, device, spare=True)
        if reply.get("device", cuda.HOST) != cuda.HOST:
            return self._slabs[reply["slab"]].writable.address + reply["offset"], reply["id"], lifetime
        return self._view(reply, writable=True).reshape(shape), reply["id"], lifetime

    def _create(self, shape: tuple, dtype: np.dtype, consumers, ttl, scope, device: str,
                spare: bool) -> tuple[dict, tuple | None]:
        """A new pending object's create reply and the lifetime its seal must give it: that
        of a spare taken (Note [Spare objects]), or None for one created with its lifetime."""
        if os.getpid() != self._pid:
            self._after_fork()                 # the parent's spares are not this process's
        key = (shape, dtype.str, device)
        nbytes = math.prod(shape) * dtype.itemsize
        reply = None
        if spare:
            with self._spare_lock:
                reply = self._take_spare(key)
        lifetime = (consumers, ttl, scope)
        if reply is None:
            create = protocol.Create(shape, dtype_name(dtype), nbytes, consumers, ttl, scope, device)
            try:
                reply = self.request(create)
            except PoolExhaustedError:
                if not self._spares:
                    raise
                self.drop_spares()
                reply = self.request(create)
            lifetime = None
        if spare:
            with self._spare_lock:
                self._note_put(key, nbytes)
        return reply, lifetime

    def _note_put(self, key, nbytes: int) -> None:
        """Ask for a spare of a signature put before (spare lock held)."""
        if 0 < nbytes <= self.config.spare_bytes:
            if key in self._put_before:
                self._put_before.move_to_end(key)
                self._ask_spare(key, nbytes)
            else:
                self._put_before[key] = True
                if len(self._put_before) > 4 * SPARE_COUNT:
                    self._put_before.popitem(last=False)

    def _take_spare(self, key) -> dict | None:
        """The create reply of this process's spare for ``key``, or None (no spare, or its
        create failed: the caller creates as usual). Spare lock held."""
        spare = self._spares.pop(key, None)
        if spare is None:
            return None
        seq, generation, _nbytes, _asked = spare
        try:
            return self._wait(seq, generation, DEFAULT_REPLY_TIMEOUT_S)
        except FaasTubeError:
            return None

    def _ask_spare(self, key, nbytes: int) -> None:
        if key in self._spares:
            return
        while self._spares and (len(self._spares) >= SPARE_COUNT or
                                sum(s[2] for s in self._spares.values()) + nbytes > self.config.spare_bytes):
            self._drop_spare(next(iter(self._spares)))
        shape, dtype, device = key
        with self._send_lock:
            if self._sock is None:
                return
            generation = self._generation
            seq = self._send(protocol.Create(shape, dtype_name(np.dtype(dtype)), nbytes, None, None,
                                             None, device))
        self._spares[key] = (seq, generation, nbytes, time.monotonic())
        if self._reaper is None or not self._reaper.is_alive():
            self._reaper = threading.Thread(target=self._reap_spares, name="faastube-spares", daemon=True)
            self._reaper.start()

    def _reap_spares(self) -> None:
        """Free spares unused for SPARE_IDLE_S, so an idle process holds none for long."""
        while True:
            time.sleep(SPARE_IDLE_S / 4)
            if os.getpid() != self._pid:
                return
            with self._spare_lock:
                now = time.monotonic()
                for key, (_seq, _generation, _nbytes, asked) in list(self._spares.items()):
                    if now - asked > SPARE_IDLE_S:
                        self._drop_spare(key)
                if not self._spares:
                    self._reaper = None
                    return

    def _drop_spare(self, key) -> None:
        """Free one spare: its writer lease ends unused and the pending object is deleted."""
        seq, generation, _nbytes, _asked = self._spares.pop(key)
        try:
            reply = self._wait(seq, generation, DEFAULT_REPLY_TIMEOUT_S)
        except FaasTubeError:
            return                    # never created, or gone with its connection
        self._releases.append((reply["lease"], "abandon"))
        try:
            self.send_only(protocol.Delete(reply["id"]))
        except FaasTubeError:
            pass

    def drop_spares(self) -> None:
        """Free every spare of this process (Note [Spare objects])."""
        with self._spare_lock:
            while self._spares:
                self._drop_spare(next(iter(self._spares)))

    def _gpu_view(self, reply: dict, writable: bool):
        """A CuPy array over a GPU object (Note [GPU views])."""
        import cupy
        slab = self._slabs[reply["slab"]]
        # A process that wrote in a slab reads through its read-write mapping: the controller
        # sends each slab's descriptor once, the writer's when it is a writer first.
        mapping = slab.writable if writable else slab.readable or slab.writable
        start = mapping.address + reply["offset"]
        holder = _GpuLease(mapping)
        memory = cupy.cuda.UnownedMemory(start, max(reply["nbytes"], 1), holder, device_id=mapping.ordinal)
        dtype = np.dtype(reply["dtype"])
        array = cupy.ndarray((math.prod(reply["shape"]),), dtype=dtype,
                             memptr=cupy.cuda.MemoryPointer(memory, 0))
        lease = reply["lease"]
        self._gpu_views[lease] = (reply["id"], start, start + reply["nbytes"], writable, reply["device"])
        weakref.finalize(holder, self._gpu_view_gone, lease).atexit = False
        if not writable and not self._readers:
            _watch_exit(self)
        return array

    def _gpu_view_gone(self, lease: int) -> None:
        view = self._gpu_views.pop(lease, None)
        if view is not None:
            self._sealed.discard(view[0])
            if view[3]:
                self._forget_lifetime(view[0])
            self._lease_gone(lease)

    def _gpu_lookup(self, array, writable: bool) -> tuple[int, str, str] | None:
        """(lease, object id, GPU) of the tracked GPU object ``array`` (or a view) lies in."""
        address = cuda_address(array)
        if address is None:
            return None
        for lease, (object_id, start, end, is_writer, device) in list(self._gpu_views.items()):
            if is_writer == writable and start <= address < max(end, start + 1):
                return lease, object_id, device
        return None

    def seal(self, object_id: str, drop_writer: bool = False, wait: bool = True,
             lifetime: tuple | None = None) -> None:
        """Seal an object; ``wait=False``: Note [Seal without waiting]; ``lifetime``:
        (consumers, ttl, scope) for a spare (Note [Spare objects])."""
        if not drop_writer:
            self._sealed.add(object_id)
        if lifetime is None:
            lifetime = self._lifetimes.pop(object_id, None)    # an empty() that took a spare
        request = (protocol.Seal(object_id, drop_writer) if lifetime is None else
                   protocol.Seal(object_id, drop_writer, True, *lifetime))
        if wait:
            self.request(request)
        else:
            self.send_only(request)

    def seal_when_landed(self, fence, object_id: str, lifetime: tuple | None, keep) -> None:
        """Seal a put's object once the copy before ``fence`` has landed (Note [Put seals when
        its copy lands]); ``keep``: what must stay alive until then (the source array)."""
        with self._landed:
            self._landing.append((fence, object_id, lifetime, keep))
            if self._sealer is None or not self._sealer.is_alive():
                self._sealer = threading.Thread(target=self._seal_landed, name="faastube-sealer",
                                                daemon=True)
                self._sealer.start()
                _watch_exit(self)
            self._landed.notify_all()

    def _seal_landed(self) -> None:
        while True:
            with self._landed:
                while not self._landing:
                    self._landed.wait()
                fence, object_id, lifetime, keep = self._landing.popleft()
                self._sealing += 1
            try:
                try:
                    cuda.fences().wait(fence)
                except cuda.CudaError as exc:
                    log.error("the copy of put object %s failed, so it is deleted: %s", object_id, exc)
                    self.send_only(protocol.Delete(object_id))
                else:
                    self.seal(object_id, drop_writer=True, wait=False, lifetime=lifetime)
            except FaasTubeError as exc:    # the connection is gone: so is the pending object
                log.warning("put object %s could not be sealed: %s", object_id, exc)
            finally:
                del keep
                with self._landed:
                    self._sealing -= 1
                    self._landed.notify_all()

    def flush_puts(self, timeout: float | None = None) -> bool:
        """Wait until every put of this process has landed and its seal was sent (Note [Put
        seals when its copy lands]); False if ``timeout`` seconds passed first."""
        if os.getpid() != self._pid:
            return True
        with self._landed:
            return self._landed.wait_for(lambda: not self._landing and not self._sealing, timeout)

    def delete_unsealed(self, scope: str) -> int:
        """Delete what this process made with ``empty`` for ``scope`` from spares and has not
        sealed: such an object gets its scope only at its seal, so closing the scope must
        free it here (Note [Spare objects]). Returns how many were deleted."""
        deleted = 0
        for object_id, lifetime in list(self._lifetimes.items()):
            if lifetime[2] == scope and self._lifetimes.pop(object_id, None) is not None:
                try:
                    self.request(protocol.Delete(object_id))
                    deleted += 1
                except ObjectNotFoundError:
                    pass
        return deleted

    def writer_of(self, array, sealing: bool = False) -> tuple[np.ndarray | None, str, str]:
        """(flat base, object id, device) of an array returned by ``create`` (or a view of
        it); a GPU array has no flat base here (None). ``sealing``: refuse one sealed already."""
        found = self._gpu_lookup(array, writable=True)
        if found is not None:
            flat, object_id, device = None, found[1], found[2]
        else:
            flat = self._tracked(array, self._writers)
            if flat is None:
                raise InvalidStateError("this array was not returned by faastube.empty in this process "
                                        "(or it was sealed already): only pool-backed arrays can be sealed")
            object_id, device = self._writers[id(flat)][0], cuda.HOST
        if sealing and object_id in self._sealed:
            raise InvalidStateError(f"object {object_id} is already sealed (a sealed object is immutable)")
        return flat, object_id, device

    @staticmethod
    def _tracked(array, table: dict) -> np.ndarray | None:
        """The flat base of a tracked array: the array itself or its base (numpy collapses
        view chains to the first array that is not a view of another array)."""
        if cuda_address(array) is not None:
            return None
        if not isinstance(array, np.ndarray):
            raise NotAnArrayError(f"expected an array from faastube, got {type(array).__name__}")
        for candidate in (array, array.base):
            if isinstance(candidate, np.ndarray) and id(candidate) in table:
                return candidate
        return None

    def get(self, object_id: str, timeout: float, device: str | None = None,
            prefer: str | None = None, slo_ms: float | None = None):
        """A read-only view: numpy for a host object, CuPy for a GPU one (protocol.Get says
        where the object comes to)."""
        reply = self.request(protocol.Get(object_id, timeout, device, prefer, slo_ms), wait_s=timeout)
        if reply.get("device", cuda.HOST) != cuda.HOST:
            return self._gpu_view(reply, writable=False).reshape(tuple(reply["shape"]))
        flat = self._view(reply, writable=False)
        if not self._readers:
            _watch_exit(self)
        self._readers[id(flat)] = reply["lease"]
        weakref.finalize(flat, self._reader_gone, id(flat), reply["lease"]).atexit = False
        return flat.reshape(reply["shape"])

    def _view(self, reply: dict, writable: bool) -> np.ndarray:
        mapping = self._slabs[reply["slab"]]
        buffer = mapping.writable if writable else mapping.readable
        dtype = np.dtype(reply["dtype"])
        return np.frombuffer(buffer, dtype=dtype, count=math.prod(reply["shape"]), offset=reply["offset"])

    def release(self, array) -> None:
        """Count a got array as consumed now (Note [Consumers] in controller/objects.py).

        Its memory stays pinned until the array is collected, so the view stays valid."""
        found = self._gpu_lookup(array, writable=False)
        if found is not None:
            lease = found[0]
        else:
            flat = self._tracked(array, self._readers)
            if flat is None:
                raise InvalidStateError("this array was not returned by faastube.get in this process")
            lease = self._readers[id(flat)]
        self._releases.append((lease, "consume"))
        self.request(protocol.Release())

    # -- garbage collection (Note [Releases ride along]) ----------------------------------

    def _lease_gone(self, lease: int) -> None:
        if os.getpid() == self._pid:
            self._releases.append((lease, "drop"))
            self._wake_flusher()

    def _writer_gone(self, key: int, lease: int) -> None:
        writer = self._writers.pop(key, None)
        if writer is not None:
            self._sealed.discard(writer[0])
            self._forget_lifetime(writer[0])
        self._lease_gone(lease)

    def _forget_lifetime(self, object_id: str) -> None:
        """An ``empty`` array is gone (finalizer: no I/O here). If it took a spare and was
        never sealed, the object has no scope to free it, and nobody can seal it now: the
        release flusher deletes it (Note [Spare objects])."""
        if self._lifetimes.pop(object_id, None) is not None:
            self._orphans.append(object_id)

    def _reader_gone(self, key: int, lease: int) -> None:
        self._readers.pop(key, None)
        self._lease_gone(lease)

    def _wake_flusher(self) -> None:
        if self._flusher is None or not self._flusher.is_alive():
            self._flusher = threading.Thread(target=self._flush_releases, name="faastube-releases",
                                             daemon=True)
            self._flusher.start()
        self._release_wanted.set()

    def _flush_releases(self) -> None:
        while True:
            self._release_wanted.wait()
            self._release_wanted.clear()
            time.sleep(RELEASE_DELAY_S)
            if os.getpid() != self._pid:
                return
            if self._releases and self._sock is not None:
                try:
                    self.request(protocol.Release())
                except Exception:
                    pass   # a lost connection ends every lease of this process anyway
            while self._orphans and self._sock is not None:
                try:                # Note [Spare objects]: nothing can seal these any more
                    self.send_only(protocol.Delete(self._orphans.popleft()))
                except Exception:
                    pass


# -- process exit (Note [A finished process has consumed]) --------------------------------

_exit_clients: "weakref.WeakSet[Client]" = weakref.WeakSet()
_failed = False


def _timeval(seconds: float) -> bytes:
    return struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))


def _watch_exit(client: Client) -> None:
    if not _exit_clients:
        atexit.register(_consume_at_exit)
        previous = sys.excepthook

        def excepthook(*exc_info):
            global _failed
            _failed = True
            previous(*exc_info)
        sys.excepthook = excepthook
    _exit_clients.add(client)


def _consume_at_exit() -> None:
    for client in list(_exit_clients):
        client.flush_puts(DEFAULT_REPLY_TIMEOUT_S)   # a put's seal is sent even after a failure
    if _failed:
        return
    for client in list(_exit_clients):
        if (client._readers or client._gpu_views or client._releases) and client._sock is not None \
                and os.getpid() == client._pid:
            client._releases.extend((lease, "consume") for lease in list(client._readers.values()))
            client._releases.extend((lease, "consume") for lease, view in list(client._gpu_views.items())
                                    if not view[3])
            try:
                client.request(protocol.Release())
            except FaasTubeError:
                pass
