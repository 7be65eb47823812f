"""Slab backends. The host tier's slabs are memfd segments.

A slab is what gets shared with a function process: its file descriptor crosses the socket
once per process (SCM_RIGHTS) and the process maps it and keeps the mapping.

Note [Read-only descriptors]: each slab keeps two descriptors. The read-write one goes only
to processes that allocate in the slab; readers get one opened O_RDONLY through
/proc/self/fd, on which the kernel refuses a writable shared mapping. A consumer therefore
cannot change a sealed object, whatever it does with the descriptor.

Note [Slabs never change namespace]: a slab serves one namespace for its whole life. A
process keeps its mappings cached after the controller retires a slab, so a slab handed to
namespace B while A still maps it would show B's bytes to A. Retiring closes the
controller's descriptors; the kernel frees the memory when the last mapping goes.
"""

from __future__ import annotations

import itertools
import os
import time

from .allocator import RangeAllocator

PAGE = os.sysconf("SC_PAGE_SIZE")
_slab_ids = itertools.count(1)


class MemfdSlab:
    """A memfd segment, its two descriptors and the allocator of the regions inside it."""

    device = "host"

    def __init__(self, namespace: str, size: int, populate: bool = True):
        self.id = next(_slab_ids)
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
        except BaseException:
            os.close(self.fd_rw)
            raise
        self.allocator = RangeAllocator(size)
        self.empty_since: float | None = time.monotonic()
        self.retired = False

    def fd(self, writable: bool) -> int:
        return self.fd_rw if writable else self.fd_ro

    def close(self) -> None:
        """Drop the controller's descriptors; mappings in other processes stay valid."""
        if not self.retired:
            self.retired = True
            os.close(self.fd_ro)
            os.close(self.fd_rw)
