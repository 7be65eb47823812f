"""Sub-allocation of objects inside one slab: aligned best fit, free space coalesced.

Note [Region ownership]: a region [offset, offset + size) of a slab belongs to exactly one
object from ``allocate`` until ``free``. The object table calls ``free`` only once the
object is unlinked *and* its last lease has ended (Note [Leases pin memory] in
controller/objects.py), so a region is never handed out while any process still has a view
of the bytes that were there.
"""

from __future__ import annotations

import bisect

ALIGNMENT = 256   # every object starts on a 256-byte boundary (what CUDA kernels and SIMD want)


def align_up(value: int, alignment: int = ALIGNMENT) -> int:
    return (value + alignment - 1) // alignment * alignment


class RangeAllocator:
    """Free list of a fixed-size range, kept sorted by offset.

    Best fit keeps large holes for large objects; coalescing on free merges a freed region
    with free neighbours, so freeing everything always gives back one whole range.
    """

    def __init__(self, size: int):
        self.size = size
        self._offsets: list[int] = [0]     # free block starts, sorted
        self._sizes: list[int] = [size]    # matching block sizes
        self.used = 0

    def allocate(self, nbytes: int) -> int | None:
        """The offset of a new aligned region of ``align_up(nbytes)`` bytes, or None if no hole fits."""
        need = align_up(max(nbytes, 1))
        best = None
        for index, block in enumerate(self._sizes):
            if block >= need and (best is None or block < self._sizes[best]):
                best = index
                if block == need:
                    break
        if best is None:
            return None
        offset = self._offsets[best]
        if self._sizes[best] == need:
            del self._offsets[best], self._sizes[best]
        else:
            self._offsets[best] += need
            self._sizes[best] -= need
        self.used += need
        return offset

    def free(self, offset: int, nbytes: int) -> None:
        """Give back a region from ``allocate`` (same ``nbytes``), merging with free neighbours."""
        size = align_up(max(nbytes, 1))
        index = bisect.bisect_left(self._offsets, offset)
        if index < len(self._offsets) and self._offsets[index] < offset + size or (
                index > 0 and self._offsets[index - 1] + self._sizes[index - 1] > offset):
            raise ValueError(f"double free or overlap at offset {offset} ({size} bytes)")
        merge_left = index > 0 and self._offsets[index - 1] + self._sizes[index - 1] == offset
        merge_right = index < len(self._offsets) and self._offsets[index] == offset + size
        if merge_left and merge_right:
            self._sizes[index - 1] += size + self._sizes[index]
            del self._offsets[index], self._sizes[index]
        elif merge_left:
            self._sizes[index - 1] += size
        elif merge_right:
            self._offsets[index] = offset
            self._sizes[index] += size
        else:
            self._offsets.insert(index, offset)
            self._sizes.insert(index, size)
        self.used -= size

    @property
    def holes(self) -> list[int]:
        """The sizes of the free blocks."""
        return list(self._sizes)

    @property
    def largest_free(self) -> int:
        return max(self._sizes, default=0)

    @property
    def free_blocks(self) -> int:
        return len(self._offsets)

    @property
    def empty(self) -> bool:
        return self.used == 0
