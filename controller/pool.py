"""An elastic pool of slabs for one device (the host tier, or one GPU), shared by all
namespaces.

The pool grows a slab at a time on demand, up to its byte limit, and retires slabs that have
been empty for ``idle_release_s``. Under pressure it retires empty slabs of any namespace at
once before it reports exhaustion. Slabs are per namespace (Note [Slabs never change
namespace] in controller/slabs.py); objects larger than a slab get a slab of their own.

Not thread-safe by itself: the object table's lock guards every call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from faastube.config import format_size
from faastube.errors import CudaError, PoolExhaustedError

from .allocator import align_up
from .slabs import PAGE, MemfdSlab


@dataclass(frozen=True)
class Region:
    slab: MemfdSlab
    offset: int
    nbytes: int


class Pool:
    def __init__(self, device: str, slab_size: int, limit: int, idle_release_s: float,
                 slab_factory=MemfdSlab, on_retire=lambda slab: None, alignment: int = PAGE,
                 name: str | None = None, limit_setting: str = "--pool-limit / FAASTUBE_POOL_LIMIT"):
        self.device = device            # "host" or a GPU's UUID
        self.name = name or device      # for people: "host", "GPU 0 (NVIDIA H100 …)"
        self.on_retire = on_retire      # told of every retired slab (the object table tells its holders)
        self.limit_setting = limit_setting
        self.alignment = alignment      # slab sizes are multiples of it (GPU: VMM granularity)
        self.slab_size = align_up(slab_size, alignment)
        self.limit = limit
        self.idle_release_s = idle_release_s
        self._slab_factory = slab_factory
        self.slabs: dict[int, MemfdSlab] = {}
        self.reserved = 0        # bytes of all live slabs
        self.slabs_created = 0
        self.slabs_retired = 0

    def allocate(self, namespace: str, nbytes: int) -> Region:
        """A region for ``nbytes`` in one of ``namespace``'s slabs, growing the pool if needed."""
        best = None
        for slab in self.slabs.values():
            if slab.namespace == namespace and slab.allocator.largest_free >= align_up(max(nbytes, 1)):
                if best is None or slab.allocator.largest_free < best.allocator.largest_free:
                    best = slab
        if best is None:
            best = self._grow(namespace, nbytes)
        offset = best.allocator.allocate(nbytes)
        assert offset is not None, "largest_free promised a fitting hole"
        best.empty_since = None
        return Region(best, offset, nbytes)

    def free(self, region: Region) -> None:
        slab = region.slab
        slab.allocator.free(region.offset, region.nbytes)
        if slab.allocator.empty:
            slab.empty_since = time.monotonic()

    def retire_idle(self, now: float | None = None, idle_s: float | None = None,
                    close: bool = True) -> list[MemfdSlab]:
        """Retire slabs empty for at least ``idle_s`` (default: the pool's idle time). With
        ``close=False`` the caller closes them (outside its lock: unmapping and unpinning a
        large slab takes milliseconds)."""
        now = time.monotonic() if now is None else now
        idle_s = self.idle_release_s if idle_s is None else idle_s
        retired = [s for s in self.slabs.values()
                   if s.empty_since is not None and now - s.empty_since >= idle_s]
        for slab in retired:
            self._retire(slab, close)
        return retired

    def close(self) -> list[MemfdSlab]:
        slabs = list(self.slabs.values())
        for slab in slabs:
            self._retire(slab)
        return slabs

    def _grow(self, namespace: str, nbytes: int) -> MemfdSlab:
        size = max(self.slab_size, align_up(nbytes, self.alignment))
        if self.reserved + size > self.limit:
            # Elastic: empty slabs of any namespace go first, whatever their idle time.
            self.retire_idle(idle_s=0.0)
        if self.reserved + size > self.limit:
            raise PoolExhaustedError(
                f"the {self.name} pool cannot hold {format_size(nbytes)} for namespace "
                f"{namespace!r}: {format_size(self.reserved)} of its {format_size(self.limit)} "
                f"limit is in slabs in use; delete objects you no longer need, give them a ttl "
                f"or consumers, or raise the limit ({self.limit_setting})")
        try:
            slab = self._slab_factory(namespace, size)
        except (OSError, CudaError) as exc:
            raise PoolExhaustedError(
                f"the {self.name} pool could not create a {format_size(size)} slab: {exc}") from None
        self.slabs[slab.id] = slab
        self.reserved += size
        self.slabs_created += 1
        return slab

    def _retire(self, slab: MemfdSlab, close: bool = True) -> None:
        del self.slabs[slab.id]
        self.reserved -= slab.size
        self.slabs_retired += 1
        if close:
            slab.close()
        self.on_retire(slab)

    def stats(self) -> dict:
        used = sum(s.allocator.used for s in self.slabs.values())
        return {"device": self.device, "name": self.name, "limit": self.limit, "slab_size": self.slab_size,
                "slabs": len(self.slabs), "reserved": self.reserved, "used": used,
                "slabs_created": self.slabs_created, "slabs_retired": self.slabs_retired}
