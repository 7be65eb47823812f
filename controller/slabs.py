"""Slab backends: the host tier's slabs are memfd segments (pinned in place when the node
has GPUs), a GPU's slabs are CUDA VMM allocations exported as file descriptors
(faastube/cuda.py, Note [Why VMM file descriptors]).

A slab is what gets shared with a function process: its file descriptor crosses the socket
once per process (SCM_RIGHTS) and the process maps it and keeps the mapping.

Note [Read-only descriptors]: each slab keeps two descriptors. The read-write one goes only
to processes that allocate in the slab; readers get one opened O_RDONLY through
/proc/self/fd, on which the kernel refuses a writable shared mapping; the memfd's inode is
then made mode 0400, so a reader cannot open the descriptor again read-write through its own
/proc/self/fd either (unless it runs as the controller's user or as root: docs/security.md).
A consumer of another user therefore cannot change a sealed host object, whatever it does
with the descriptor.

Note [Slabs never change namespace]: a slab serves one namespace for its whole life. A
process keeps its mappings cached after the controller retires a slab, so a slab handed to
namespace B while A still maps it would show B's bytes to A. Retiring closes the
controller's descriptors; the kernel frees the memory when the last mapping goes.
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import os
import time

from faastube import cuda

from . import gpu

from .allocator import RangeAllocator

PAGE = os.sysconf("SC_PAGE_SIZE")
_slab_ids = itertools.count(1)


class MemfdSlab:
    """A memfd segment, its two descriptors and the allocator of the regions inside it."""

    def __init__(self, namespace: str, size: int, populate: bool = True, pin: bool = False,
                 mapped: bool = False, device: str = cuda.HOST):
        self.id = next(_slab_ids)
        self.device = device            # the host tier, or a stand-in (Note [Host-backed stand-ins])
        self.namespace = namespace
        self.size = size
        self.fd_rw = os.memfd_create(f"faastube-{self.id}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd_rw, size)
            if populate:
                # Commit the pages now, off the request path: a put then costs a memcpy,
                # not a page fault per 4 KiB, and running out of memory fails here, clearly,
                # instead of as SIGBUS inside a function.
                os.posix_fallocate(self.fd_rw, 0, size)
            self.fd_ro = os.open(f"/proc/self/fd/{self.fd_rw}", os.O_RDONLY | os.O_CLOEXEC)
            # A memfd's inode is mode 0777: a reader could open its descriptor again through
            # /proc/self/fd read-write. Owner read-only now (descriptors already open keep
            # their access): only the controller's user and root could (docs/security.md).
            os.fchmod(self.fd_rw, 0o400)
        except BaseException:
            os.close(self.fd_rw)
            raise
        self.allocator = RangeAllocator(size)
        self.empty_since: float | None = time.monotonic()
        self.retired = False
        self.writer: int | None = None      # Note [Slabs of one writer] (controller/pool.py)
        self.pinned = pin
        # With GPUs, the controller maps the slab and pins it once (cuMemHostRegister), so
        # host↔GPU copies run at PCIe speed straight from it, with no staging copy. With
        # stand-ins it maps it to copy between tiers.
        self.address = 0
        self._map = None
        if pin or mapped:
            try:
                self._map = mmap.mmap(self.fd_rw, size, flags=mmap.MAP_SHARED)
                self.address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
                if pin:
                    gpu.register_host(self.address, size)
            except BaseException:
                self.address = 0
                self.close()
                raise

    def fd(self, writable: bool) -> int:
        return self.fd_rw if writable else self.fd_ro

    def close(self) -> None:
        """Drop the controller's descriptors; mappings in other processes stay valid."""
        if not self.retired:
            self.retired = True
            if self.address and self.pinned:
                gpu.unregister_host(self.address)
            if self._map is not None:
                try:
                    self._map.close()
                except BufferError:     # a ctypes view still points into it: let GC unmap
                    pass
            os.close(self.fd_ro)
            os.close(self.fd_rw)


class CudaSlab:
    """A VMM allocation on one GPU: the controller's own mapping (for its copies), one
    exported descriptor (readers map it read-only, Note [Why VMM file descriptors]), and the
    allocator of the regions inside it."""

    def __init__(self, namespace: str, size: int, ordinal: int, uuid: str):
        self.id = next(_slab_ids)
        self.namespace = namespace
        self.size = size
        self.device = uuid
        self.ordinal = ordinal
        self.mapping, self._fd = gpu.create_slab(size, ordinal)
        self.address = self.mapping.address
        self.allocator = RangeAllocator(size)
        self.empty_since: float | None = time.monotonic()
        self.retired = False
        self.writer: int | None = None      # GPU tiers share slabs between writers (controller/pool.py)

    def fd(self, writable: bool) -> int:
        return self._fd

    def close(self) -> None:
        """Drop the controller's mapping and descriptor; the driver keeps the memory for
        every process that still maps it."""
        if not self.retired:
            self.retired = True
            self.mapping.close()
            os.close(self._fd)
