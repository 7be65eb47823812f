"""The controller's own CUDA work, beside what both sides share (faastube/cuda.py): creating
and exporting GPU slabs, pinning host slabs, and the copy queues the transfer engine's links
issue on (controller/links.py, controller/transfer.py).
"""

from __future__ import annotations

import os

from faastube.cuda import VmmMapping, allocation_prop, check, cu, devices, issue_calls


def create_slab(size: int, ordinal: int) -> tuple[VmmMapping, int]:
    """A new VMM allocation on GPU ``ordinal``, mapped read-write for every GPU that can
    reach it, and a file descriptor exporting it (Note [Why VMM file descriptors],
    faastube/cuda.py; the caller owns the descriptor)."""
    devs = devices()
    with devs.current(ordinal):
        handle = check(cu.cuMemCreate(size, allocation_prop(ordinal), 0))
    try:
        fd = int(check(cu.cuMemExportToShareableHandle(
            handle, cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0)))
        peers = [p for p in range(len(devs.uuids)) if devs.can_access_peer(p, ordinal)]
        try:
            return VmmMapping(handle, size, ordinal, peers, writable=True), fd
        except BaseException:
            os.close(fd)
            raise
    except BaseException:
        cu.cuMemRelease(handle)
        raise


def free_memory(ordinal: int) -> int:
    """Bytes of GPU ``ordinal``'s memory free now, every process's use counted (the driver's
    ``cuMemGetInfo``, the figure NVML reports as free)."""
    with devices().current(ordinal):
        free, _total = check(cu.cuMemGetInfo())
    return int(free)


def raise_for(code: int) -> None:
    """CudaError for a CUresult a native caller returned (nothing for 0)."""
    issue_calls().check(code)


def register_host(address: int, size: int) -> None:
    """Pin host memory in place (page-locked, visible to every GPU) for full-speed copies."""
    with devices().current(0):
        check(cu.cuMemHostRegister(address, size, cu.CU_MEMHOSTREGISTER_PORTABLE))


def unregister_host(address: int) -> None:
    if cu is not None:
        with devices().current(0):
            cu.cuMemHostUnregister(address)


def new_stream(ordinal: int) -> tuple[int, int]:
    """A new non-blocking stream of GPU ``ordinal``'s primary context: (context, stream), as
    integers for driver calls. A link's copies run on it (here and controller/pump.py); it
    lives as long as the process."""
    with devices().current(ordinal) as ctx:
        stream = check(cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING))
    return int(ctx), int(stream)


class CopyQueue:
    """A stream of its own on GPU ``ordinal`` that carries copies in order; each ``issue``
    returns a token (an event recorded after its copies) for ``wait``. The transfer engine
    keeps a few batches queued on it so the copy engine never idles between them, and no
    more, so a newly arrived transfer waits behind little (controller/links.py)."""

    def __init__(self, ordinal: int):
        self.ordinal = ordinal
        self._free: list = []
        self._calls = issue_calls()
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
        event = self._free.pop() if self._free else check(
            cu.cuEventCreate(cu.CUevent_flags.CU_EVENT_DISABLE_TIMING))
        self._calls.check(self._calls.record(int(event), self._stream))
        return event

    def wait(self, event, spin_s: float = 0.0) -> None:
        """Block (the GIL released) until the copies of ``event`` have arrived. (``spin_s``
        is the driver's to decide: a primary context spins or yields by its own rule.)"""
        try:
            check(cu.cuEventSynchronize(event))
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
                self.staging, fd = create_slab(size, ordinal)
                os.close(fd)
                self._staging = self.staging.address
            else:                     # made once per link, like the copy queues' streams
                self.staging = int(check(cu.cuMemHostAlloc(slot_bytes * slots, cu.CU_MEMHOSTALLOC_PORTABLE)))
                self._staging = self.staging
            self.first = check(cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING))
            self._filled = [int(check(cu.cuEventCreate(flags))) for _ in range(slots)]
        with devs.current(ordinal):
            self._drained = [int(check(cu.cuEventCreate(flags))) for _ in range(slots)]
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
