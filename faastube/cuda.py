"""CUDA through the driver API (``cuda.bindings.driver``), what both sides of the socket
need: GPUs by UUID, mapping virtual-memory-management (VMM) slabs imported from file
descriptors, and a function's own copies and fences. What only the controller does (creating
and exporting slabs, pinning host slabs, the links' copy queues) is in controller/gpu.py.
Nothing here runs on the request path except copies and pointer arithmetic.

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

from .errors import CudaError

try:                                            # the optional 'cuda' extra
    from cuda.bindings import driver as cu
except ImportError:                             # pragma: no cover - CPU installs
    cu = None

HOST = "host"
# Note [Host-backed stand-ins]: a controller run with --stand-in-gpus N also holds N tiers of
# host memory named "host:0" … that stand in for GPUs (a budget, eviction to the host tier,
# restore), so every pool policy runs on a machine without a GPU, in the tests and the CPU
# benchmarks. Their slabs are memfd segments like the host tier's; a function gets numpy
# arrays from them.
STAND_IN = "host:"


def in_host_memory(device: str) -> bool:
    """Whether ``device``'s slabs are host memory (the host tier or a stand-in)."""
    return device == HOST or device.startswith(STAND_IN)


def check(result):
    """cuda.bindings returns (CUresult, *values): the values, or CudaError naming the error."""
    err, *values = result
    if err != cu.CUresult.CUDA_SUCCESS:
        _e, name = cu.cuGetErrorName(err)
        _e, text = cu.cuGetErrorString(err)
        raise CudaError(f"CUDA: {name.decode() if name else err}: {text.decode() if text else ''}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


class _Issue:
    """Note [Issuing holds the GIL]: the copy queues' short, non-blocking driver calls
    (context push/pop, ``cuMemcpyAsync``, ``cuEventRecord``, ``cuStreamWaitEvent``) are made
    through ``ctypes.PyDLL``, which keeps the GIL, instead of ``cuda.bindings``, which
    releases and re-takes it around every call. Each release lets another thread that wants
    the GIL (a link's leader whose event just completed) in, and taking it back then waits
    for that thread: a 1 MB move issued next to a busy link lost several copies' time that way
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

    @staticmethod
    def check(code: int) -> None:
        """CudaError for a CUresult these calls (or a native caller) returned; nothing for 0."""
        if code:
            check((cu.CUresult(code),))

    def pop_context(self) -> None:
        self.check(self.pop(self._popped_ref))


_issue_calls: _Issue | None = None


def issue_calls() -> _Issue:
    """The copy calls that keep the GIL (Note [Issuing holds the GIL]), loaded once."""
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
        check(cu.cuInit(0))
        count = check(cu.cuDeviceGetCount())
        self.handles = [check(cu.cuDeviceGet(i)) for i in range(count)]
        get_uuid = getattr(cu, "cuDeviceGetUuid_v2", None) or cu.cuDeviceGetUuid
        self.uuids = [format_uuid(bytes(check(get_uuid(d)).bytes)) for d in self.handles]
        self.ordinals = {uuid: i for i, uuid in enumerate(self.uuids)}
        self._contexts: dict[int, object] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def current(self, ordinal: int):
        """Run the block with the device's primary context (the one CuPy and PyTorch use)
        current, then restore the caller's: a library call must never change which GPU the
        caller's CuPy or PyTorch code runs on."""
        ctx = self.context(ordinal)
        check(cu.cuCtxPushCurrent(ctx))
        try:
            yield ctx
        finally:
            cu.cuCtxPopCurrent()

    def in_use(self, uuid: str) -> bool:
        """Whether this process already runs on GPU ``uuid`` (its primary context is active),
        asked without making one."""
        ordinal = self.ordinals.get(uuid)
        if ordinal is None:
            return False
        _flags, active = check(cu.cuDevicePrimaryCtxGetState(self.handles[ordinal]))
        return bool(active)

    def context(self, ordinal: int):
        """The device's primary context, retained once per process."""
        with self._lock:
            ctx = self._contexts.get(ordinal)
            if ctx is None:
                ctx = self._contexts[ordinal] = check(cu.cuDevicePrimaryCtxRetain(self.handles[ordinal]))
        return ctx

    def ordinal(self, uuid: str) -> int:
        try:
            return self.ordinals[uuid]
        except KeyError:
            raise CudaError(f"GPU {uuid} is not visible to this process (it sees "
                            f"{', '.join(self.uuids) or 'no GPU'}; check CUDA_VISIBLE_DEVICES)") from None

    def name(self, ordinal: int) -> str:
        return check(cu.cuDeviceGetName(256, self.handles[ordinal])).split(b"\0", 1)[0].decode()

    def total_memory(self, ordinal: int) -> int:
        return int(check(cu.cuDeviceTotalMem(self.handles[ordinal])))

    def can_access_peer(self, ordinal: int, peer: int) -> bool:
        return ordinal == peer or bool(check(cu.cuDeviceCanAccessPeer(self.handles[ordinal], self.handles[peer])))

    def granularity(self, ordinal: int) -> int:
        return int(check(cu.cuMemGetAllocationGranularity(
            allocation_prop(ordinal), cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED)))


_devices: Devices | None = None
_devices_error: str | None = None
_devices_lock = threading.Lock()


def _forget_devices() -> None:
    """After fork: CUDA state does not survive it, so the child initialises its own."""
    global _devices, _devices_error, _devices_lock, _fences
    _devices, _devices_error, _devices_lock, _fences = None, None, threading.Lock(), None


os.register_at_fork(after_in_child=_forget_devices)


def devices() -> Devices:
    """This process's GPUs (initialised once per process), or CudaError saying why not."""
    global _devices, _devices_error
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


def allocation_prop(ordinal: int):
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

    The controller creates allocations (controller/gpu.py, ``create_slab``); a function
    imports a descriptor (:meth:`import_fd`). :meth:`close` unmaps and drops this process's reference; the memory
    lives on while another process maps it."""

    def __init__(self, handle, size: int, ordinal: int, access_ordinals, writable: bool):
        self.handle, self.size, self.ordinal = handle, size, ordinal
        self._closed = True             # until mapped: nothing for close() to undo
        with devices().current(ordinal):
            self._map(access_ordinals, writable)
        self._closed = False

    def _map(self, access_ordinals, writable: bool) -> None:
        size = self.size
        self.ptr = check(cu.cuMemAddressReserve(size, 0, 0, 0))
        try:
            check(cu.cuMemMap(self.ptr, size, 0, self.handle, 0))
            try:
                descs = _access(access_ordinals, writable)
                try:
                    check(cu.cuMemSetAccess(self.ptr, size, descs, len(descs)))
                    self.read_only = not writable
                except CudaError:
                    if writable:
                        raise
                    # Not every driver maps device memory read-only; readers then get a
                    # read-write mapping (``read_only`` says which), as docs/sdk.md warns.
                    descs = _access(access_ordinals, True)
                    check(cu.cuMemSetAccess(self.ptr, size, descs, len(descs)))
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
    def import_fd(cls, fd: int, size: int, uuid: str, writable: bool) -> "VmmMapping":
        """Map an exported allocation for this process's GPU ``uuid``; closes ``fd``."""
        devs = devices()
        try:
            ordinal = devs.ordinal(uuid)
            with devs.current(ordinal):
                handle = check(cu.cuMemImportFromShareableHandle(
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

    def forget(self) -> None:
        """After fork: the child inherited no CUDA state, so there is nothing to unmap."""
        self._closed = True

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
        calls = issue_calls()
        calls.check(calls.push(int(devices().context(ordinal))))
        try:
            if event is None:
                event = int(check(cu.cuEventCreate(cu.CUevent_flags.CU_EVENT_DISABLE_TIMING)))
            calls.check(calls.record(event, stream))
        finally:
            calls.pop_context()
        return ordinal, event

    def wait(self, fence) -> None:
        """Block (the GIL released) until the work before ``fence`` has finished; raises
        CudaError if it failed. The fence is spent either way."""
        ordinal, event = fence
        try:
            check(cu.cuEventSynchronize(event))
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
    calls = issue_calls()
    calls.check(calls.pointer_attribute(
        ctypes.byref(ordinal), int(cu.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL), address))
    return ordinal.value


def copy_on_stream(dst: int, src: int, nbytes: int, ordinal: int, stream: int) -> None:
    """Queue a copy of ``nbytes`` between device addresses on ``stream`` of GPU ``ordinal``:
    one driver call with the GIL held (Note [Issuing holds the GIL]), where a CuPy copy costs
    tens of µs of Python on top (docs/benchmarks.md)."""
    calls = issue_calls()
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
        check(cu.cuCtxSynchronize())
