"""An elastic pool of slabs for one device (the host tier, or one GPU), shared by all
namespaces.

The pool grows a slab at a time, up to its byte limit: ahead of demand, from the
controller's reserver (Note [Reservation ahead of demand], controller/demand.py), or on a
put's path when that found no room. It retires slabs that have been empty for
``idle_release_s``, except those that hold the room reserved for a namespace and, beyond
those, the most recently emptied up to ``idle_minimum`` bytes. Under pressure it retires
empty slabs of any namespace at once before it reports exhaustion. Slabs are per namespace (Note [Slabs never change
namespace] in controller/slabs.py); objects larger than a slab get a slab of their own.

Note [Giving memory back]: a GPU is shared with the models of the functions that run on it.
A GPU pool never grows past ``--gpu-free-share`` of the memory the driver reports free plus
its own slabs, so memory other processes took is not counted as the pool's; and when the
free memory falls under ``--gpu-watermark`` (a model loading), housekeeping retires empty
slabs, the longest empty first, reserved room and the idle minimum included, until it would
be over the watermark again: within a housekeeping tick (0.1 s). The driver frees a slab's
memory once no process maps it: a function drops its mapping when its next reply names the
slab retired. If that is not enough, housekeeping moves objects to the host tier until whole
slabs are empty, and retires them (Note [Queue-aware eviction], controller/eviction.py).

Note [Slabs of one writer]: a process that writes a host object is sent its slab's
read-write descriptor, and a descriptor covers the whole slab. Were a slab shared by writers,
any member of the namespace could change another's sealed objects through its own mapping.
So on the host tier (``per_writer``) a slab serves one writer: a slab grown ahead of demand is
unclaimed until its first object, and then belongs to the connection that wrote it
(``slab.writer``, the session's id) or to the controller (CONTROLLER: evictions, copies
between tiers and replicas, which no client writes); a writer's slab takes no new object once
its connection has closed (GONE: the process may still map it read-write) and is retired when
empty. A slab never changes writer, as it never changes namespace. The cost is memory: each
writing connection holds at least one slab of its own. GPU tiers share slabs between writers:
a reader imports the whole allocation and chooses its own access (docs/security.md), so
slabs of one's own would not stop a member of the namespace there.

Not thread-safe by itself: the object table's lock guards every call.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass

from faastube.config import format_size, share_of
from faastube.errors import CudaError, PoolExhaustedError, QuotaExceededError

from .allocator import align_up
from .demand import fit
from .slabs import PAGE, MemfdSlab


EVICTED_ROOM_OBJECTS = 16     # recent evictions per namespace the host tier keeps room for
EVICTED_ROOM_S = 60.0         # … until none came for this long
PROBE_TTL_S = 0.02            # how long a GPU's free-memory figure is used for the cap
CONTROLLER = 0                # slab.writer of the controller's own slabs (session ids start at 1)
GONE = -1                     # slab.writer of a slab whose writer's connection closed


@dataclass(frozen=True)
class Region:
    slab: MemfdSlab
    offset: int
    nbytes: int


class Pool:
    def __init__(self, device: str, slab_size: int, limit: int, idle_release_s: float,
                 slab_factory=MemfdSlab, on_retire=lambda slab: None, on_create=lambda slab: None,
                 alignment: int = PAGE,
                 name: str | None = None, limit_setting: str = "--pool-limit / FAASTUBE_POOL_LIMIT",
                 idle_minimum: int = 0, reserve_share: float = 0.0, quota: float = 1.0,
                 free_probe=None, free_share: float = 1.0, watermark: int = 0,
                 per_writer: bool = False):
        self.device = device            # "host" or a GPU's UUID
        self.name = name or device      # for people: "host", "GPU 0 (NVIDIA H100 …)"
        self.on_retire = on_retire      # told of every retired slab (the object table tells its holders)
        self.on_create = on_create      # told of every new slab (Note [Slabs mapped ahead])
        self.limit_setting = limit_setting
        self.alignment = alignment      # slab sizes are multiples of it (GPU: VMM granularity)
        self.slab_size = align_up(slab_size, alignment)
        self.limit = limit
        self.idle_release_s = idle_release_s
        self.idle_minimum = idle_minimum
        self.reserve_share = reserve_share      # most of the limit kept free ahead of one namespace
        # Most bytes of slabs one namespace may hold: a share (≤ 1) of the limit, or a size.
        self.quota = share_of(quota, limit)
        # The device's free memory (None: not probed, the host tier), the most of it with its
        # own slabs the pool may hold, and the watermark (Note [Giving memory back]).
        self.free_probe = free_probe
        self.free_share = free_share
        self.watermark = watermark
        self.per_writer = per_writer            # Note [Slabs of one writer]
        self.device_free: int | None = None
        self._probed: tuple[float, int, int] | None = None   # (when, free memory, reserved then)
        self.given_back = [0, 0]                # slabs, bytes
        self._slab_factory = slab_factory
        self.slabs: dict[int, MemfdSlab] = {}
        self.reserved = 0        # bytes of all live slabs
        self.slabs_created = 0
        self.slabs_retired = 0
        # Namespace → the object sizes to keep room for (Note [Reservation ahead of demand])
        # (set by the reserver), and growth by path: [slabs, bytes].
        self.wanted: dict[str, list[int]] = {}
        # Namespace → the sizes of the objects recently evicted to this (host) tier: room for
        # as many is kept free ahead too, so an eviction finds its room made (Note
        # [Queue-aware eviction]); with when the last came (they are forgotten after
        # EVICTED_ROOM_S).
        self.evicted_recently: dict[str, collections.deque] = {}
        self.evicted_at: dict[str, float] = {}
        self.grown = {"ahead": [0, 0], "request": [0, 0]}
        # Objects moved off this tier and back (Note [Queue-aware eviction]): [objects, bytes,
        # seconds] by kind, and puts that waited for eviction: [puts, seconds, failed].
        self.moves = {"evict": [0, 0, 0.0], "restore": [0, 0, 0.0], "ahead": [0, 0, 0.0],
                      "spill": [0, 0, 0.0]}     # spill: puts granted on the host tier instead
        self.waits = [0, 0.0, 0]
        self.waiting = 0            # requests waiting for room now

    def allocate(self, namespace: str, nbytes: int, grow: bool = True, writer: int = CONTROLLER) -> Region:
        """A region for ``nbytes`` in one of ``namespace``'s slabs that ``writer`` may write
        (Note [Slabs of one writer]), growing the pool if needed (unless ``grow`` is False:
        then PoolExhaustedError)."""
        need = align_up(max(nbytes, 1))
        best = None
        for slab in self.slabs.values():
            if (slab.namespace == namespace and slab.allocator.largest_free >= need
                    and self.may_write(slab, writer)):
                # Its own slabs before unclaimed ones (room kept for anyone), then best fit.
                rank = (slab.writer is None, slab.allocator.largest_free)
                if best is None or rank < best_rank:
                    best, best_rank = slab, rank
        if best is None:
            if not grow:
                raise PoolExhaustedError(f"no room for {format_size(nbytes)} in the {self.name} "
                                         f"pool's slabs of namespace {namespace!r}")
            best = self._grow(namespace, nbytes)
            self.grown["request"][0] += 1
            self.grown["request"][1] += best.size
        offset = best.allocator.allocate(nbytes)
        assert offset is not None, "largest_free promised a fitting hole"
        if self.per_writer and best.writer is None:
            best.writer = writer
        best.empty_since = None
        return Region(best, offset, nbytes)

    def may_write(self, slab, writer: int) -> bool:
        """Whether ``writer`` (a session's id, or CONTROLLER) may be given room in ``slab``."""
        return not self.per_writer or slab.writer is None or slab.writer == writer != GONE

    def writer_gone(self, writer: int) -> None:
        """``writer``'s connection closed: its slabs take no new object (Note [Slabs of one
        writer]) and are retired once empty."""
        if self.per_writer:
            for slab in self.slabs.values():
                if slab.writer == writer:
                    slab.writer = GONE

    def free(self, region: Region) -> None:
        slab = region.slab
        slab.allocator.free(region.offset, region.nbytes)
        if slab.allocator.empty:
            slab.empty_since = time.monotonic()

    def retire_idle(self, now: float | None = None, idle_s: float | None = None,
                    close: bool = True, force: bool = False) -> list[MemfdSlab]:
        """Retire slabs empty for at least ``idle_s`` (default: the pool's idle time), but
        not those that hold reserved room nor, beyond them, the most recently emptied up to
        the idle minimum, unless ``force`` (a put that needs the memory). With
        ``close=False`` the caller closes them (outside its lock: unmapping and unpinning a
        large slab takes milliseconds)."""
        now = time.monotonic() if now is None else now
        idle_s = self.idle_release_s if idle_s is None else idle_s
        candidates = [s for s in self.slabs.values()
                      if s.empty_since is not None and (now - s.empty_since >= idle_s or s.writer == GONE)]
        if not force and candidates:
            kept = self.reserving()
            kept_bytes = 0
            for slab in sorted(candidates, key=lambda s: s.empty_since, reverse=True):
                if slab.id not in kept and slab.writer != GONE and kept_bytes + slab.size <= self.idle_minimum:
                    kept.add(slab.id)
                    kept_bytes += slab.size
            candidates = [s for s in candidates if s.id not in kept]
        for slab in candidates:
            self._retire(slab, close)
        return candidates

    # -- room ahead of demand (Note [Reservation ahead of demand]) ------------------------

    def note_eviction(self, namespace: str, nbytes: int, spill: bool = False) -> None:
        """An object of ``namespace`` was evicted to this tier (or, ``spill``, put here by its
        producer: Note [Puts that rank last]): keep room for the next ones, in the slabs the
        controller writes or, for a spill, in those its writers may (Note [Slabs of one
        writer])."""
        self.evicted_recently.setdefault(namespace, collections.deque(maxlen=EVICTED_ROOM_OBJECTS)).append(
            (nbytes, spill))
        self.evicted_at[namespace] = time.monotonic()

    def _wanted(self, namespace: str) -> tuple[list[int], list[int]]:
        """The sizes to keep room for: (by demand and recent spills, for recent evictions)."""
        demand, evicted = list(self.wanted.get(namespace, [])), []
        if namespace in self.evicted_at:
            if time.monotonic() - self.evicted_at[namespace] > EVICTED_ROOM_S:
                del self.evicted_at[namespace], self.evicted_recently[namespace]
            else:
                for nbytes, spill in self.evicted_recently[namespace]:
                    (demand if spill else evicted).append(nbytes)
        return demand, evicted

    def _kept_for(self) -> set[str]:
        """The namespaces room is kept ahead for: by demand, or for recent evictions."""
        return {*self.wanted, *self.evicted_at}

    def _slab_size_for(self, nbytes: int) -> int:
        """The size of the slab the pool grows by to hold ``nbytes``."""
        return max(self.slab_size, align_up(nbytes, self.alignment))

    def _fit(self, namespace: str) -> tuple[list[MemfdSlab], list[int], list[int]]:
        """(the namespace's slabs' holes' owners, the holes the wanted room takes, the sizes
        that fit in none). With slabs per writer the room for evictions is looked for in the
        controller's slabs and the room by demand in the writers' (Note [Slabs of one
        writer]), unclaimed slabs serving either."""
        demand, evicted = self._wanted(namespace)
        holes, owners = [], []
        for slab in self.slabs.values():
            if slab.namespace == namespace and slab.writer != GONE:
                for hole in slab.allocator.holes:
                    holes.append(hole)
                    owners.append(slab)
        if not self.per_writer:
            used, missing, _left = fit(holes, demand + evicted, align_up)
            return owners, used, missing
        used, missing = set(), []
        for sizes, takes in ((evicted, lambda slab: slab.writer in (None, CONTROLLER)),
                             (demand, lambda slab: slab.writer != CONTROLLER)):
            index = [i for i, slab in enumerate(owners) if takes(slab)]
            taken, lacking, left = fit([holes[i] for i in index], sizes, align_up)
            for i, size in zip(index, left):
                holes[i] = size         # what the first pass took of an unclaimed slab is gone
            used.update(index[i] for i in taken)
            missing += lacking
        return owners, sorted(used), missing

    def reserving(self) -> set[int]:
        """The ids of the slabs whose free room is reserved for a namespace."""
        kept = set()
        for namespace in self._kept_for():
            owners, used, _missing = self._fit(namespace)
            kept.update(owners[i].id for i in used)
        return kept

    def next_ahead(self) -> tuple[str, int] | None:
        """(namespace, slab size) of the next slab to grow ahead of demand, or None: every
        wanted size fits, or growing would pass the limit or the namespace's reserve share."""
        cap = None                      # probed once, and only if some room is missing
        for namespace in self._kept_for():
            _owners, _used, missing = self._fit(namespace)
            if not missing:
                continue
            size = self._slab_size_for(max(missing))
            free = sum(s.size - s.allocator.used for s in self.slabs.values() if s.namespace == namespace)
            cap = self.cap() if cap is None else cap
            if (self.reserved + size <= cap and free + size <= self.reserve_share * self.limit
                    and self.held_by(namespace) + size <= self.quota):
                return namespace, size
        return None

    def make_slab(self, namespace: str, size: int) -> MemfdSlab:
        """A new slab, not yet in the pool (made outside the table's lock: it takes long)."""
        return self._slab_factory(namespace, size)

    def adopt(self, slab: MemfdSlab, path: str = "ahead") -> bool:
        """Take in a slab grown outside the table's lock (ahead of demand, or for a request
        on its ``path``); False (the caller closes it) if the pool has no room for it any more."""
        if self.reserved + slab.size > self.cap():
            return False
        self.slabs[slab.id] = slab
        self.on_create(slab)
        self.reserved += slab.size
        self.slabs_created += 1
        self.grown[path][0] += 1
        self.grown[path][1] += slab.size
        return True

    def close(self) -> list[MemfdSlab]:
        slabs = list(self.slabs.values())
        for slab in slabs:
            self._retire(slab)
        return slabs

    def cap(self) -> int:
        """The most bytes of slabs the pool may hold now: its limit, and where the device's
        free memory is probed, ``free_share`` of that memory with the pool's own slabs."""
        if self.free_probe is None:
            return self.limit
        now = time.monotonic()
        if self._probed is None or now - self._probed[0] > PROBE_TTL_S:
            # Asked of the driver at most every PROBE_TTL_S: this runs under the table's lock,
            # on every allocation that finds no room and every reserver step.
            self._probed = (now, self.free_probe(), self.reserved)
        _at, free, reserved_then = self._probed
        self.device_free = free - (self.reserved - reserved_then)     # our own growth since
        return min(self.limit, int(self.free_share * (self.reserved + self.device_free)))

    def probe_for_give_back(self) -> int | None:
        """The device's free memory, where the pool watches a watermark, else None: asked for
        outside the table's lock, for :meth:`give_back`."""
        return self.free_probe() if self.free_probe is not None and self.watermark else None

    def give_back(self, free: int | None) -> list[MemfdSlab]:
        """When the device's free memory (``free``, from :meth:`probe_for_give_back`) is under
        the watermark (another process, a model loading, takes it), retire empty slabs,
        longest empty first and reserved room too, until it would be over again (Note [Giving
        memory back]); returns them unclosed for the caller to close outside the lock."""
        if free is None:
            return []
        self.device_free = free
        self._probed = (time.monotonic(), free, self.reserved)
        retired = []
        for slab in sorted((s for s in self.slabs.values() if s.empty_since is not None),
                           key=lambda s: s.empty_since):
            if free >= self.watermark:
                break
            self._retire(slab, close=False)
            free += slab.size
            retired.append(slab)
            self.given_back[0] += 1
            self.given_back[1] += slab.size
        return retired

    def count_move(self, kind: str, nbytes: int, seconds: float) -> None:
        entry = self.moves[kind]
        entry[0] += 1
        entry[1] += nbytes
        entry[2] += seconds

    def growth_for(self, namespace: str, nbytes: int) -> int | None:
        """The size of the slab that would give ``nbytes`` room to ``namespace``, or None if
        the pool's cap or the namespace's quota leaves no room for it."""
        size = self._slab_size_for(nbytes)
        if self.reserved + size > self.cap() or (self.quota < self.limit and self.held_by(namespace) + size > self.quota):
            return None
        return size

    def held_by(self, namespace: str) -> int:
        """Bytes of slabs ``namespace`` holds in this pool."""
        return sum(s.size for s in self.slabs.values() if s.namespace == namespace)

    def _grow(self, namespace: str, nbytes: int) -> MemfdSlab:
        size = self._slab_size_for(nbytes)
        if self.quota < self.limit and self.held_by(namespace) + size > self.quota:
            for slab in [s for s in self.slabs.values() if s.namespace == namespace and s.allocator.empty]:
                self._retire(slab)          # its own empty slabs (room kept ahead) go first
            held = self.held_by(namespace)
            if held + size > self.quota:
                raise QuotaExceededError(
                    f"namespace {namespace!r} cannot grow the {self.name} pool by {format_size(size)} "
                    f"for {format_size(nbytes)}: it holds {format_size(held)} of its "
                    f"{format_size(self.quota)} quota there; delete objects it no longer needs, give "
                    f"them a ttl or consumers, or raise the quota (--namespace-quota / "
                    f"FAASTUBE_NAMESPACE_QUOTA)")
        cap = self.cap()
        if self.reserved + size > cap:
            # Elastic: empty slabs of any namespace go first, whatever their idle time, reserved
            # or not: a put that needs the memory comes before room kept for later ones.
            self.retire_idle(idle_s=0.0, force=True)
            cap = self.cap()
        if self.reserved + size > cap:
            if cap < self.limit:
                raise PoolExhaustedError(
                    f"the {self.name} pool cannot hold {format_size(nbytes)} for namespace "
                    f"{namespace!r}: it holds {format_size(self.reserved)} and the device has "
                    f"{format_size(self.device_free)} free, of which with its own slabs it may hold "
                    f"{self.free_share:.0%} (--gpu-free-share / FAASTUBE_GPU_FREE_SHARE): other "
                    f"processes use the rest; delete objects you no longer need or free GPU memory")
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
        self.on_create(slab)
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
                "slabs": len(self.slabs), "reserved": self.reserved, "used": used, "quota": self.quota,
                "slabs_created": self.slabs_created, "slabs_retired": self.slabs_retired,
                "ahead_wanted": {ns: sum(map(sum, self._wanted(ns))) for ns in self._kept_for()},
                "writers": len({s.writer for s in self.slabs.values() if s.writer not in (None, CONTROLLER, GONE)}),
                "idle_minimum": self.idle_minimum, "device_free": self.device_free,
                "watermark": self.watermark, "given_back": {"slabs": self.given_back[0],
                                                            "bytes": self.given_back[1]},
                "grown": {path: {"slabs": n, "bytes": b} for path, (n, b) in self.grown.items()},
                "moves": {kind: {"objects": n, "bytes": b, "seconds": round(t, 6)}
                          for kind, (n, b, t) in self.moves.items()},
                "waits": {"requests": self.waits[0], "seconds": round(self.waits[1], 6),
                          "failed": self.waits[2]}}
