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
import ctypes
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
        with self._lock:
            ctx = self._contexts.get(ordinal)
            if ctx is None:
                ctx = self._contexts[ordinal] = _check(cu.cuDevicePrimaryCtxRetain(self.handles[ordinal]))
        _check(cu.cuCtxPushCurrent(ctx))
        try:
            yield ctx
        finally:
            cu.cuCtxPopCurrent()

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
        # Portable: pinned for every GPU's context; device-mapped: express copy kernels
        # (Note [Express moves]) read and write it at its own address (unified addressing).
        _check(cu.cuMemHostRegister(address, size, cu.CU_MEMHOSTREGISTER_PORTABLE
                                    | cu.CU_MEMHOSTREGISTER_DEVICEMAP))


def unregister_host(address: int) -> None:
    if cu is not None:
        with devices().current(0):
            cu.cuMemHostUnregister(address)


# Note [Express moves] (controller/links.py): a copy done by the GPU's cores, not its copy
# engines, so it does not queue behind the copies a link has queued. Hand-written PTX, so no
# compiler is needed at run time (the driver compiles it for the GPU when it is loaded):
# 16-byte loads and stores over a grid-stride loop, then thread 0 copies the tail bytes.
# Every address must be reachable from the GPU (device memory, peers' VMM mappings, pinned
# host memory under unified addressing) and both ends 16-byte aligned.
_COPY_PTX = b"""
.version 6.0
.target sm_60
.address_size 64

.visible .entry faastube_copy(.param .u64 dst, .param .u64 src, .param .u64 n)
{
    .reg .pred %p;
    .reg .b16 %byte;
    .reg .b32 %blk, %nthr, %thr, %nblk, %v0, %v1, %v2, %v3;
    .reg .b64 %to, %from, %size, %vecs, %i, %stride, %off, %ld, %st;

    ld.param.u64 %to, [dst];
    ld.param.u64 %from, [src];
    ld.param.u64 %size, [n];
    shr.u64 %vecs, %size, 4;
    mov.u32 %blk, %ctaid.x;
    mov.u32 %nthr, %ntid.x;
    mov.u32 %thr, %tid.x;
    mov.u32 %nblk, %nctaid.x;
    cvt.u64.u32 %i, %thr;
    mad.wide.u32 %i, %blk, %nthr, %i;
    mul.wide.u32 %stride, %nblk, %nthr;
VECTOR:
    setp.ge.u64 %p, %i, %vecs;
    @%p bra TAIL;
    shl.b64 %off, %i, 4;
    add.u64 %ld, %from, %off;
    add.u64 %st, %to, %off;
    ld.global.v4.u32 {%v0, %v1, %v2, %v3}, [%ld];
    st.global.v4.u32 [%st], {%v0, %v1, %v2, %v3};
    add.u64 %i, %i, %stride;
    bra VECTOR;
TAIL:
    setp.ne.u32 %p, %blk, 0;
    @%p bra DONE;
    setp.ne.u32 %p, %thr, 0;
    @%p bra DONE;
    shl.b64 %i, %vecs, 4;
BYTE:
    setp.ge.u64 %p, %i, %size;
    @%p bra DONE;
    add.u64 %ld, %from, %i;
    add.u64 %st, %to, %i;
    ld.global.u8 %byte, [%ld];
    st.global.u8 [%st], %byte;
    add.u64 %i, %i, 1;
    bra BYTE;
DONE:
    ret;
}
"""
_COPY_THREADS = 256


class CopyQueue:
    """A stream of its own on GPU ``ordinal`` that carries copies in order; each ``issue``
    returns a token (an event recorded after its copies) for ``wait``. The transfer engine
    keeps a few batches queued on it so the copy engine never idles between them, and no
    more, so a newly arrived transfer waits behind little (controller/links.py).

    ``express`` runs copies as a kernel on a second, high-priority stream (Note [Express
    moves]); the same ``wait`` waits for them."""

    def __init__(self, ordinal: int):
        self.ordinal = ordinal
        self._free: list = []
        with devices().current(ordinal):
            self.stream = _check(cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING))
            _least, greatest = _check(cu.cuCtxGetStreamPriorityRange())
            self.express_stream = _check(cu.cuStreamCreateWithPriority(
                cu.CUstream_flags.CU_STREAM_NON_BLOCKING, greatest))
            module = _check(cu.cuModuleLoadData(_COPY_PTX))
            self._kernel = _check(cu.cuModuleGetFunction(module, b"faastube_copy"))
            self._blocks = int(_check(cu.cuDeviceGetAttribute(
                cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, devices().handles[ordinal])))

    def express(self, pieces):
        """Run (destination, source, length) copies on the GPU's cores; their token, or None
        when a piece is not 16-byte aligned (the caller then queues it)."""
        if any((dst | src) & 15 for dst, src, _n in pieces):
            return None
        with devices().current(self.ordinal):
            for dst, src, nbytes in pieces:
                blocks = max(1, min(self._blocks, -(-nbytes // (16 * _COPY_THREADS))))
                _check(cu.cuLaunchKernel(
                    self._kernel, blocks, 1, 1, _COPY_THREADS, 1, 1, 0, self.express_stream,
                    ((dst, src, nbytes), (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64)), 0))
            return self._token(self.express_stream)

    def issue(self, pieces):
        """Queue (destination, source, length) copies; returns their token."""
        with devices().current(self.ordinal):
            for dst, src, nbytes in pieces:
                _check(cu.cuMemcpyAsync(dst, src, nbytes, self.stream))
            return self._token(self.stream)

    def _token(self, stream):
        """An event recorded after everything queued on ``stream`` so far (current context)."""
        event = self._free.pop() if self._free else _check(
            cu.cuEventCreate(cu.CUevent_flags.CU_EVENT_DISABLE_TIMING))
        _check(cu.cuEventRecord(event, stream))
        return event

    def wait(self, event) -> None:
        """Block (the GIL released) until the copies of ``event`` have arrived."""
        try:
            _check(cu.cuEventSynchronize(event))
        finally:
            self._free.append(event)


class RelayQueue(CopyQueue):
    """Copies that travel through another GPU (a multi-path route, controller/topology.py):
    each piece goes into a slot of a staging ring on GPU ``ordinal`` on one stream, then on
    from the slot on a second stream. The streams order themselves with events (a slot is
    refilled only after it drained), so no thread waits between the two hops and the hops of
    consecutive pieces overlap. ``issue``/``wait`` as :class:`CopyQueue`; the token is
    recorded on the second stream."""

    def __init__(self, ordinal: int, slot_bytes: int, slots: int):
        super().__init__(ordinal)
        devs = devices()
        granularity = devs.granularity(ordinal)
        size = -(-slot_bytes * slots // granularity) * granularity
        self.staging, fd = VmmMapping.create(size, ordinal)
        os.close(fd)
        self.slot_bytes, self.slots = slot_bytes, slots
        self._next = 0
        self._used = [False] * slots
        flags = cu.CUevent_flags.CU_EVENT_DISABLE_TIMING
        with devs.current(ordinal):
            self.first = _check(cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING))
            self._filled = [_check(cu.cuEventCreate(flags)) for _ in range(slots)]
            self._drained = [_check(cu.cuEventCreate(flags)) for _ in range(slots)]

    def issue(self, pieces):
        with devices().current(self.ordinal):
            for dst, src, nbytes in pieces:
                for offset in range(0, nbytes, self.slot_bytes):
                    length = min(self.slot_bytes, nbytes - offset)
                    slot = self._next
                    self._next = (slot + 1) % self.slots
                    staged = self.staging.address + slot * self.slot_bytes
                    if self._used[slot]:
                        _check(cu.cuStreamWaitEvent(self.first, self._drained[slot], 0))
                    _check(cu.cuMemcpyAsync(staged, src + offset, length, self.first))
                    _check(cu.cuEventRecord(self._filled[slot], self.first))
                    _check(cu.cuStreamWaitEvent(self.stream, self._filled[slot], 0))
                    _check(cu.cuMemcpyAsync(dst + offset, staged, length, self.stream))
                    _check(cu.cuEventRecord(self._drained[slot], self.stream))
                    self._used[slot] = True
            return self._token(self.stream)


def synchronize(uuid: str) -> None:
    """Wait for all work this process queued on GPU ``uuid``, on every stream: what a
    producer must do before sealing (faastube.sdk.seal)."""
    devs = devices()
    with devs.current(devs.ordinal(uuid)):
        _check(cu.cuCtxSynchronize())
