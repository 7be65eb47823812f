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
                ("cuLaunchKernel", "launch", [pointer] + [ctypes.c_uint] * 7 + [pointer, pointer, pointer])):
            function = getattr(lib, name)
            function.argtypes, function.restype = argtypes, status
            setattr(self, attr, function)

    @staticmethod
    def check(code: int) -> None:
        if code:
            _check((cu.CUresult(code),))

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

    def reads_host_pointers(self, ordinal: int) -> bool:
        """Whether kernels on the GPU can use a registered host buffer's own address (Note
        [Copies beside the queue])."""
        return bool(_check(cu.cuDeviceGetAttribute(
            cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM,
            self.handles[ordinal])))

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
    """Pin host memory in place (page-locked, visible to every GPU) for full-speed copies,
    and map it into the GPUs' address space, so kernels can read and write it (Note [Copies
    beside the queue])."""
    with devices().current(0):
        _check(cu.cuMemHostRegister(address, size, cu.CU_MEMHOSTREGISTER_PORTABLE | cu.CU_MEMHOSTREGISTER_DEVICEMAP))


def unregister_host(address: int) -> None:
    if cu is not None:
        with devices().current(0):
            cu.cuMemHostUnregister(address)


# Note [Copies beside the queue]: a copy engine drains its queue in order (gpu-facts.md), so a
# small move issued while a link's chunks are queued waits for them, up to ``depth`` chunks
# (~0.15 ms on PCIe). A kernel whose threads load and store the bytes themselves does not go
# through that queue: its loads of pinned host memory (mapped at registration) or of a peer
# GPU's memory travel the same wire beside the copy engine's. The link uses it for an express
# move while the copy engine is busy (controller/links.py, Note [Express moves]). The kernel
# is written in PTX, so the driver compiles it for whatever GPU it finds: no compiler and no
# NVRTC are needed at run time. Each thread copies 16-byte vectors (grid-stride), then the
# tail bytes; the launch uses enough blocks to have the whole of a small move in flight.
_COPY_PTX = r"""
.version 7.0
.target sm_70
.address_size 64

.visible .entry faastube_copy(
	.param .u64 dst,
	.param .u64 src,
	.param .u64 vectors,
	.param .u64 nbytes
)
{
	.reg .pred 	%p<3>;
	.reg .b16 	%rs<2>;
	.reg .b32 	%r<9>;
	.reg .b64 	%rd<16>;

	ld.param.u64 	%rd1, [dst];
	ld.param.u64 	%rd2, [src];
	ld.param.u64 	%rd3, [vectors];
	ld.param.u64 	%rd4, [nbytes];
	cvta.to.global.u64 	%rd1, %rd1;
	cvta.to.global.u64 	%rd2, %rd2;
	mov.u32 	%r1, %ctaid.x;
	mov.u32 	%r2, %ntid.x;
	mov.u32 	%r3, %tid.x;
	mov.u32 	%r4, %nctaid.x;
	mul.wide.u32 	%rd5, %r1, %r2;
	cvt.u64.u32 	%rd6, %r3;
	add.s64 	%rd5, %rd5, %rd6;
	mul.wide.u32 	%rd7, %r4, %r2;
	mov.u64 	%rd8, %rd5;
VECTORS:
	setp.ge.u64 	%p1, %rd8, %rd3;
	@%p1 bra 	TAIL;
	shl.b64 	%rd9, %rd8, 4;
	add.s64 	%rd10, %rd2, %rd9;
	add.s64 	%rd11, %rd1, %rd9;
	ld.global.v4.u32 	{%r5, %r6, %r7, %r8}, [%rd10];
	st.global.v4.u32 	[%rd11], {%r5, %r6, %r7, %r8};
	add.s64 	%rd8, %rd8, %rd7;
	bra.uni 	VECTORS;
TAIL:
	shl.b64 	%rd12, %rd3, 4;
	add.s64 	%rd12, %rd12, %rd5;
BYTES:
	setp.ge.u64 	%p2, %rd12, %rd4;
	@%p2 bra 	DONE;
	add.s64 	%rd13, %rd2, %rd12;
	add.s64 	%rd14, %rd1, %rd12;
	ld.global.u8 	%rs1, [%rd13];
	st.global.u8 	[%rd14], %rs1;
	add.s64 	%rd12, %rd12, %rd7;
	bra.uni 	BYTES;
DONE:
	ret;
}
"""
_COPY_THREADS = 256
_copy_kernels: dict[int, tuple[int, int]] = {}
_copy_kernels_lock = threading.Lock()


def _copy_kernel(ordinal: int) -> tuple[int, int]:
    """The copy kernel loaded into GPU ``ordinal``'s primary context (once per process), and
    the most blocks a launch uses (four per multiprocessor)."""
    with _copy_kernels_lock:
        if ordinal not in _copy_kernels:
            devs = devices()
            with devs.current(ordinal):
                module = _check(cu.cuModuleLoadData(_COPY_PTX.encode() + b"\0"))
                function = _check(cu.cuModuleGetFunction(module, b"faastube_copy"))
            processors = _check(cu.cuDeviceGetAttribute(
                cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, devs.handles[ordinal]))
            _copy_kernels[ordinal] = (int(function), 4 * int(processors))
        return _copy_kernels[ordinal]


class CopyQueue:
    """A stream of its own on GPU ``ordinal`` that carries copies in order; each ``issue``
    returns a token (an event recorded after its copies) for ``wait``. The transfer engine
    keeps a few batches queued on it so the copy engine never idles between them, and no
    more, so a newly arrived transfer waits behind little (controller/links.py)."""

    def __init__(self, ordinal: int):
        self.ordinal = ordinal
        self._free: list = []
        self._calls = _issue()
        with devices().current(ordinal) as ctx:
            self.stream = _check(cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING))
        self._context, self._stream = int(ctx), int(self.stream)
        self._beside = None                     # issue_beside's stream and kernel, made on first use
        self._kernel = None
        self._kernel_args = (ctypes.c_uint64 * 4)()
        self._kernel_params = (ctypes.c_void_p * 4)(
            *(ctypes.addressof(self._kernel_args) + 8 * i for i in range(4)))

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

    def prepare_beside(self) -> None:
        """Make ``issue_beside``'s stream and load its kernel now, off the request path (the
        first load costs milliseconds)."""
        if self._beside is None:
            self._kernel = _copy_kernel(self.ordinal)
            with devices().current(self.ordinal):
                self._beside = int(_check(cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING)))

    def issue_beside(self, pieces):
        """Queue (destination, source, length) copies as a copy kernel on a second stream of
        this GPU (Note [Copies beside the queue]); returns their token for ``wait``. Pieces
        whose addresses are not 16-byte aligned go to the copy engine on that stream. One
        caller at a time (the link's express move)."""
        calls = self._calls
        if self._beside is None:
            self.prepare_beside()
        function, max_blocks = self._kernel
        args, params = self._kernel_args, self._kernel_params
        calls.check(calls.push(self._context))
        try:
            for dst, src, nbytes in pieces:
                if (dst | src) & 15:
                    calls.check(calls.memcpy(dst, src, nbytes, self._beside))
                    continue
                vectors = nbytes >> 4
                blocks = max(1, min(max_blocks, -(-vectors // _COPY_THREADS)))
                args[0], args[1], args[2], args[3] = dst, src, vectors, nbytes
                calls.check(calls.launch(function, blocks, 1, 1, _COPY_THREADS, 1, 1, 0,
                                         self._beside, params, None))
            event = self._free.pop() if self._free else _check(
                cu.cuEventCreate(cu.CUevent_flags.CU_EVENT_DISABLE_TIMING))
            calls.check(calls.record(int(event), self._beside))
            return event
        finally:
            calls.pop_context()


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
            self._filled = [int(_check(cu.cuEventCreate(flags))) for _ in range(slots)]
            self._drained = [int(_check(cu.cuEventCreate(flags))) for _ in range(slots)]
        self._first = int(self.first)

    def issue(self, pieces):
        calls, check = self._calls, self._calls.check
        check(calls.push(self._context))
        try:
            for dst, src, nbytes in pieces:
                for offset in range(0, nbytes, self.slot_bytes):
                    length = min(self.slot_bytes, nbytes - offset)
                    slot = self._next
                    self._next = (slot + 1) % self.slots
                    staged = self.staging.address + slot * self.slot_bytes
                    if self._used[slot]:
                        check(calls.stream_wait(self._first, self._drained[slot], 0))
                    check(calls.memcpy(staged, src + offset, length, self._first))
                    check(calls.record(self._filled[slot], self._first))
                    check(calls.stream_wait(self._stream, self._filled[slot], 0))
                    check(calls.memcpy(dst + offset, staged, length, self._stream))
                    check(calls.record(self._drained[slot], self._stream))
                    self._used[slot] = True
            return self._token()
        finally:
            calls.pop_context()


def synchronize(uuid: str) -> None:
    """Wait for all work this process queued on GPU ``uuid``, on every stream: what a
    producer must do before sealing (faastube.sdk.seal)."""
    devs = devices()
    with devs.current(devs.ordinal(uuid)):
        _check(cu.cuCtxSynchronize())
