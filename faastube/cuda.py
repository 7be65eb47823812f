"""CUDA through the driver API (``cuda.bindings.driver``), for both sides of the socket:
GPUs by UUID, virtual-memory-management (VMM) slabs exported as file descriptors, their
mappings, pinned registration of host slabs, and copies. Nothing here runs on the request
path except the copy queues' ``issue``/``wait`` and pointer arithmetic.

Note [GPUs by UUID]: the controller and a function may see different ``CUDA_VISIBLE_DEVICES``,
so an ordinal means nothing across the socket. Every GPU is named by its UUID as nvidia-smi
prints it (``GPU-xxxxxxxx-…``); each side maps UUIDs to its own ordinals.

Note [Why VMM file descriptors]: a slab is ``cuMemCreate``'d with the POSIX file-descriptor
handle type and exported once. The descriptor reaches a function only over the controller
socket (SCM_RIGHTS), after the controller checked the caller's namespace, unlike a legacy
IPC handle, which any process that learns its 64 bytes can open. The driver reference-counts
the memory: a slab the controller releases stays valid in every process that still maps it
(gpu-facts.md). Readers map with read-only access where the driver allows it.

Import is cheap and safe without a GPU: :func:`devices` raises CudaError saying why CUDA
cannot be used.
"""

from __future__ import annotations

import contextlib
import os
import threading

from .errors import FaasTubeError

try:                                            # the optional 'cuda' extra
    from cuda.bindings import driver as cu
except ImportError:                             # pragma: no cover - CPU installs
    cu = None

HOST = "host"


class CudaError(FaasTubeError):
    """A CUDA driver call failed."""


def _check(result):
    """cuda.bindings returns (CUresult, *values): the values, or CudaError naming the call."""
    err, *values = result
    if err != cu.CUresult.CUDA_SUCCESS:
        _e, name = cu.cuGetErrorName(err)
        _e, text = cu.cuGetErrorString(err)
        raise CudaError(f"CUDA: {name.decode() if name else err}: {text.decode() if text else ''}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def raise_for(code: int) -> None:
    """CudaError for a CUresult a native caller returned (nothing for 0)."""
    if code:
        _check((cu.CUresult(code),))


class _Issue:
    """Note [Issuing holds the GIL]: the copy queues' short, non-blocking driver calls
    (context push/pop, ``cuMemcpyAsync``, ``cuEventRecord``, ``cuStreamWaitEvent``) are made
    through ``ctypes.PyDLL``, which keeps the GIL, instead of ``cuda.bindings``, which
    releases and re-takes it around every call. Each release lets another thread that wants
    the GIL (a link's leader whose event just completed) in, and taking it back then waits
    for that thread: a 1 MB move issued next to a busy link lost ~100 µs that way on an H200
    (docs/benchmarks.md). The calls take a few µs; ``cuEventSynchronize``, which blocks,
    still releases the GIL. The functions are the driver's stable exported ABI names."""

    def __init__(self):
        import ctypes
        lib = ctypes.PyDLL("libcuda.so.1")
        pointer, status = ctypes.c_void_p, ctypes.c_int
        self._popped = pointer()
        self._popped_ref = ctypes.byref(self._popped)
        for name, attr, argtypes in (
                ("cuCtxPushCurrent_v2", "push", [pointer]),
                ("cuCtxPopCurrent_v2", "pop", [ctypes.POINTER(pointer)]),
                ("cuMemcpyAsync", "memcpy", [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, pointer]),
                ("cuEventRecord", "record", [pointer, pointer]),
                ("cuStreamWaitEvent", "stream_wait", [pointer, pointer, ctypes.c_uint]),
                ("cuPointerGetAttribute", "pointer_attribute", [pointer, ctypes.c_int, ctypes.c_uint64])):
            function = getattr(lib, name)
            function.argtypes, function.restype = argtypes, status
            setattr(self, attr, function)

    check = staticmethod(raise_for)

    def pop_context(self) -> None:
        self.check(self.pop(self._popped_ref))


_issue_calls: _Issue | None = None


def _issue() -> _Issue:
    global _issue_calls
    if _issue_calls is None:
        _issue_calls = _Issue()
    return _issue_calls


def format_uuid(raw: bytes) -> str:
    h = raw.hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


class Devices:
    """This process's view of its GPUs: ordinal ↔ UUID, primary contexts, granularity."""

    def __init__(self):
        _check(cu.cuInit(0))
        count = _check(cu.cuDeviceGetCount())
        self.handles = [_check(cu.cuDeviceGet(i)) for i in range(count)]
        get_uuid = getattr(cu, "cuDeviceGetUuid_v2", None) or cu.cuDeviceGetUuid
        self.uuids = [format_uuid(bytes(_check(get_uuid(d)).bytes)) for d in self.handles]
        self.ordinals = {uuid: i for i, uuid in enumerate(self.uuids)}
        self._contexts: dict[int, object] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def current(self, ordinal: int):
        """Run the block with the device's primary context (the one CuPy and PyTorch use)
        current, then restore the caller's: a library call must never change which GPU the
        caller's CuPy or PyTorch code runs on."""
        ctx = self.context(ordinal)
        _check(cu.cuCtxPushCurrent(ctx))
        try:
            yield ctx
        finally:
            cu.cuCtxPopCurrent()

    def context(self, ordinal: int):
        """The device's primary context, retained once per process."""
        with self._lock:
            ctx = self._contexts.get(ordinal)
            if ctx is None:
                ctx = self._contexts[ordinal] = _check(cu.cuDevicePrimaryCtxRetain(self.handles[ordinal]))
        return ctx

    def ordinal(self, uuid: str) -> int:
        try:
            return self.ordinals[uuid]
        except KeyError:
            raise CudaError(f"GPU {uuid} is not visible to this process (it sees "
                            f"{', '.join(self.uuids) or 'no GPU'}; check CUDA_VISIBLE_DEVICES)") from None

    def name(self, ordinal: int) -> str:
        return _check(cu.cuDeviceGetName(256, self.handles[ordinal])).split(b"\0", 1)[0].decode()

    def total_memory(self, ordinal: int) -> int:
        return int(_check(cu.cuDeviceTotalMem(self.handles[ordinal])))

    def can_access_peer(self, ordinal: int, peer: int) -> bool:
        return ordinal == peer or bool(_check(cu.cuDeviceCanAccessPeer(self.handles[ordinal], self.handles[peer])))

    def granularity(self, ordinal: int) -> int:
        return int(_check(cu.cuMemGetAllocationGranularity(
            _allocation_prop(ordinal), cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED)))


_devices: Devices | None = None
_devices_error: str | None = None
_devices_lock = threading.Lock()
_devices_pid = 0


def devices() -> Devices:
    """This process's GPUs (initialised once per process), or CudaError saying why not."""
    global _devices, _devices_error, _devices_pid
    if _devices_pid != os.getpid():            # CUDA state does not survive fork
        _devices, _devices_error, _devices_pid = None, None, os.getpid()
    if _devices is None and _devices_error is None:
        with _devices_lock:
            if _devices is None and _devices_error is None:
                if cu is None:
                    _devices_error = ("CUDA support is not installed: pip install 'faastube[cuda]' "
                                      "(cuda-bindings, cupy)")
                else:
                    try:
                        found = Devices()
                        if not found.uuids:
                            raise CudaError("no GPU is visible")
                        _devices = found
                    except CudaError as exc:
                        _devices_error = str(exc)
    if _devices is None:
        raise CudaError(_devices_error)
    return _devices


def _allocation_prop(ordinal: int):
    prop = cu.CUmemAllocationProp()
    prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = ordinal
    prop.requestedHandleTypes = cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    return prop


def _access(ordinals, writable: bool):
    descs = []
    for ordinal in ordinals:
        desc = cu.CUmemAccessDesc()
        desc.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        desc.location.id = ordinal
        desc.flags = (cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE if writable
                      else cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READ)
        descs.append(desc)
    return descs


class VmmMapping:
    """A VMM allocation mapped into this process's address space, accessible from every GPU
    that can reach it (so the controller's copies run peer to peer, and a function's kernels
    may read a peer GPU's array as CuPy and PyTorch allow).

    The controller creates allocations (:meth:`create`); a function imports a descriptor
    (:meth:`import_fd`). :meth:`close` unmaps and drops this process's reference; the memory
    lives on while another process maps it."""

    def __init__(self, handle, size: int, ordinal: int, access_ordinals, writable: bool):
        self.handle, self.size, self.ordinal = handle, size, ordinal
        self._closed = True             # until mapped: nothing for close() to undo
        with devices().current(ordinal):
            self._map(access_ordinals, writable)
        self._closed = False

    def _map(self, access_ordinals, writable: bool) -> None:
        size = self.size
        self.ptr = _check(cu.cuMemAddressReserve(size, 0, 0, 0))
        try:
            _check(cu.cuMemMap(self.ptr, size, 0, self.handle, 0))
            try:
                descs = _access(access_ordinals, writable)
                try:
                    _check(cu.cuMemSetAccess(self.ptr, size, descs, len(descs)))
                    self.read_only = not writable
                except CudaError:
                    if writable:
                        raise
                    # Not every driver maps device memory read-only; readers then get a
                    # read-write mapping (``read_only`` says which), as docs/sdk.md warns.
                    descs = _access(access_ordinals, True)
                    _check(cu.cuMemSetAccess(self.ptr, size, descs, len(descs)))
                    self.read_only = False
            except BaseException:
                cu.cuMemUnmap(self.ptr, size)
                raise
        except BaseException:
            cu.cuMemAddressFree(self.ptr, size)
            raise

    @property
    def address(self) -> int:
        return int(self.ptr)

    @classmethod
    def create(cls, size: int, ordinal: int) -> tuple["VmmMapping", int]:
        """A new allocation on GPU ``ordinal``, mapped read-write for every GPU that can
        reach it, and a file descriptor exporting it (the caller owns the descriptor)."""
        devs = devices()
        with devs.current(ordinal):
            handle = _check(cu.cuMemCreate(size, _allocation_prop(ordinal), 0))
        try:
            fd = int(_check(cu.cuMemExportToShareableHandle(
                handle, cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0)))
            peers = [p for p in range(len(devs.uuids)) if devs.can_access_peer(p, ordinal)]
            try:
                return cls(handle, size, ordinal, peers, writable=True), fd
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            cu.cuMemRelease(handle)
            raise

    @classmethod
    def import_fd(cls, fd: int, size: int, uuid: str, writable: bool) -> "VmmMapping":
        """Map an exported allocation for this process's GPU ``uuid``; closes ``fd``."""
        devs = devices()
        try:
            ordinal = devs.ordinal(uuid)
            with devs.current(ordinal):
                handle = _check(cu.cuMemImportFromShareableHandle(
                    fd, cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR))
        finally:
            os.close(fd)
        # Every GPU that can reach this one gets access too: CuPy and PyTorch let a kernel on
        # one GPU read another GPU's array when peer access is possible, and a VMM mapping
        # grants access per device (cudaDeviceEnablePeerAccess does not cover it).
        peers = [p for p in range(len(devs.uuids)) if devs.can_access_peer(p, ordinal)]
        try:
            return cls(handle, size, ordinal, peers, writable)
        except BaseException:
            cu.cuMemRelease(handle)
            raise

    def close(self) -> None:
        if not self._closed and cu is not None:
            self._closed = True
            with devices().current(self.ordinal):
                cu.cuMemUnmap(self.ptr, self.size)
                cu.cuMemAddressFree(self.ptr, self.size)
                cu.cuMemRelease(self.handle)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def register_host(address: int, size: int) -> None:
    """Pin host memory in place (page-locked, visible to every GPU) for full-speed copies."""
    with devices().current(0):
        _check(cu.cuMemHostRegister(address, size, cu.CU_MEMHOSTREGISTER_PORTABLE))


def unregister_host(address: int) -> None:
    if cu is not None:
        with devices().current(0):
            cu.cuMemHostUnregister(address)


def new_stream(ordinal: int) -> tuple[int, int]:
    """A new non-blocking stream of GPU ``ordinal``'s primary context: (context, stream), as
    integers for driver calls. A link's copies run on it (here and faastube/pump.py); it
    lives as long as the process."""
    with devices().current(ordinal) as ctx:
        stream = _check(cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING))
    return int(ctx), int(stream)


class CopyQueue:
    """A stream of its own on GPU ``ordinal`` that carries copies in order; each ``issue``
    returns a token (an event recorded after its copies) for ``wait``. The transfer engine
    keeps a few batches queued on it so the copy engine never idles between them, and no
    more, so a newly arrived transfer waits behind little (controller/links.py)."""

    def __init__(self, ordinal: int):
        self.ordinal = ordinal
        self._free: list = []
        self._calls = _issue()
        self._context, self._stream = new_stream(ordinal)

    def issue(self, pieces):
        """Queue (destination, source, length) copies; returns their token (Note [Issuing
        holds the GIL])."""
        calls = self._calls
        calls.check(calls.push(self._context))
        try:
            for dst, src, nbytes in pieces:
                calls.check(calls.memcpy(dst, src, nbytes, self._stream))
            return self._token()
        finally:
            calls.pop_context()

    def _token(self):
        """An event recorded after everything queued on the stream so far (context current)."""
        event = self._free.pop() if self._free else _check(
            cu.cuEventCreate(cu.CUevent_flags.CU_EVENT_DISABLE_TIMING))
        self._calls.check(self._calls.record(int(event), self._stream))
        return event

    def wait(self, event) -> None:
        """Block (the GIL released) until the copies of ``event`` have arrived."""
        try:
            _check(cu.cuEventSynchronize(event))
        finally:
            self._free.append(event)


class RelayQueue(CopyQueue):
    """Copies that travel through a staging ring (a route of two hops, controller/topology.py):
    each piece goes into a slot of the ring on one stream, then on from the slot on a second
    stream. The streams order themselves with events (a slot is refilled only after it
    drained), so no thread waits between the two hops and the hops of consecutive pieces
    overlap. ``issue``/``wait`` as :class:`CopyQueue`; the token is recorded on the second
    stream.

    The ring is on GPU ``ordinal``, and both hops run on its streams (a route through a peer
    GPU), or, with ``source_ordinal``, in pinned host memory: the first hop then runs down
    from the source GPU on a stream of that GPU, the second up into GPU ``ordinal`` (a move
    between two GPUs that cannot reach each other's memory)."""

    def __init__(self, ordinal: int, slot_bytes: int, slots: int, source_ordinal: int | None = None):
        super().__init__(ordinal)
        devs = devices()
        self.slot_bytes, self.slots = slot_bytes, slots
        self._next = 0
        self._used = [False] * slots
        flags = cu.CUevent_flags.CU_EVENT_DISABLE_TIMING
        first_ordinal = ordinal if source_ordinal is None else source_ordinal
        with devs.current(first_ordinal) as first_context:
            if source_ordinal is None:
                granularity = devs.granularity(ordinal)
                size = -(-slot_bytes * slots // granularity) * granularity
                self.staging, fd = VmmMapping.create(size, ordinal)
                os.close(fd)
                self._staging = self.staging.address
            else:                     # made once per link, like the copy queues' streams
                self.staging = int(_check(cu.cuMemHostAlloc(slot_bytes * slots, cu.CU_MEMHOSTALLOC_PORTABLE)))
                self._staging = self.staging
            self.first = _check(cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING))
            self._filled = [int(_check(cu.cuEventCreate(flags))) for _ in range(slots)]
        with devs.current(ordinal):
            self._drained = [int(_check(cu.cuEventCreate(flags))) for _ in range(slots)]
        self._first = int(self.first)
        self._first_context = int(first_context)

    def issue(self, pieces):
        calls, check = self._calls, self._calls.check
        apart = self._first_context != self._context    # the hops run in two GPUs' contexts
        check(calls.push(self._context))
        try:
            for dst, src, nbytes in pieces:
                for offset in range(0, nbytes, self.slot_bytes):
                    length = min(self.slot_bytes, nbytes - offset)
                    slot = self._next
                    self._next = (slot + 1) % self.slots
                    staged = self._staging + slot * self.slot_bytes
                    if apart:
                        check(calls.push(self._first_context))
                    try:
                        if self._used[slot]:
                            check(calls.stream_wait(self._first, self._drained[slot], 0))
                        check(calls.memcpy(staged, src + offset, length, self._first))
                        check(calls.record(self._filled[slot], self._first))
                    finally:
                        if apart:
                            calls.pop_context()
                    check(calls.stream_wait(self._stream, self._filled[slot], 0))
                    check(calls.memcpy(dst + offset, staged, length, self._stream))
                    check(calls.record(self._drained[slot], self._stream))
                    self._used[slot] = True
            return self._token()
        finally:
            calls.pop_context()


class Fences:
    """Events recorded after a process's own copies, for another of its threads to wait on:
    how ``put`` seals once its copy has landed without waiting for it (Note [Put seals when
    its copy lands], faastube/client.py). Events are made once per GPU and reused."""

    def __init__(self):
        self._free: dict[int, list] = {}
        self._lock = threading.Lock()

    def record(self, ordinal: int, stream: int):
        """A fence after everything queued so far on ``stream`` of GPU ``ordinal`` (a
        CUstream of its primary context; 0 or 1 is the legacy default stream)."""
        with self._lock:
            free = self._free.setdefault(ordinal, [])
            event = free.pop() if free else None
        calls = _issue()
        calls.check(calls.push(int(devices().context(ordinal))))
        try:
            if event is None:
                event = int(_check(cu.cuEventCreate(cu.CUevent_flags.CU_EVENT_DISABLE_TIMING)))
            calls.check(calls.record(event, stream))
        finally:
            calls.pop_context()
        return ordinal, event

    def wait(self, fence) -> None:
        """Block (the GIL released) until the work before ``fence`` has finished; raises
        CudaError if it failed. The fence is spent either way."""
        ordinal, event = fence
        try:
            _check(cu.cuEventSynchronize(event))
        finally:
            with self._lock:
                self._free[ordinal].append(event)


_fences: Fences | None = None


def fences() -> Fences:
    global _fences
    if _fences is None:
        _fences = Fences()
    return _fences


def device_of_pointer(address: int) -> int:
    """The ordinal of the GPU whose memory ``address`` is in (a device pointer of this
    process); CudaError for a host or unknown address."""
    import ctypes
    devices()
    ordinal = ctypes.c_int(-1)
    calls = _issue()
    calls.check(calls.pointer_attribute(
        ctypes.byref(ordinal), int(cu.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL), address))
    return ordinal.value


def copy_on_stream(dst: int, src: int, nbytes: int, ordinal: int, stream: int) -> None:
    """Queue a copy of ``nbytes`` between device addresses on ``stream`` of GPU ``ordinal``:
    one driver call with the GIL held (Note [Issuing holds the GIL]), where a CuPy copy costs
    tens of µs of Python on top (docs/benchmarks.md)."""
    calls = _issue()
    calls.check(calls.push(int(devices().context(ordinal))))
    try:
        calls.check(calls.memcpy(dst, src, nbytes, stream))
    finally:
        calls.pop_context()


def synchronize(uuid: str) -> None:
    """Wait for all work this process queued on GPU ``uuid``, on every stream: what a
    producer must do before sealing (faastube.sdk.seal)."""
    devs = devices()
    with devs.current(devs.ordinal(uuid)):
        _check(cu.cuCtxSynchronize())
