"""Moving objects off a device tier to the host tier and back (the object table's evictor).

Note [Queue-aware eviction]: a device tier (a GPU's pool, or a stand-in, Note [Host-backed
stand-ins] in faastube/cuda.py) that has no room for a put, or whose GPU's free memory fell
under the watermark (Note [Giving memory back], controller/pool.py), moves sealed objects
to the host tier, where they keep their id, bytes and lifetime. Which ones: those that will
be needed last. The controller learns who gets what: requests name the function the caller
runs (protocol.Envelope.function), so a get tells it that objects the producer function puts
go to the getting function. The objects waiting for one consumer function form its queue,
oldest seal first (functions take their inputs in order); the one at rank r is expected in
about r × the consumer's pace (its activations' mean run time over their concurrency,
controller/demand.py). Eviction takes the objects expected furthest ahead first: before all,
those their consumer already got (no consumer is known to be left); objects whose consumer is
not known yet count their time since last use, so for them the order is least recently used
(``--eviction lru`` uses that order for every object). An object is never moved while a view
of it is held (a lease), nor while it is pending; objects whose lifetime ended (consumed,
deleted, expired) are freed, never moved.

A get of an evicted object on its device (by default, where the caller has that GPU)
restores it: the bytes come back to a new region of that device and the host copy is freed;
a caller on the host reads the host copy as it is. With ``--eviction queue``, the evicted
objects of an active consumer function's queue are restored ahead, front first, while the
device has room without evicting anything: the controller's restorer thread looks whenever
a region of a device tier is freed (a consumer's input deleted, say), so the copy runs while
the consumer works on what it has. While an object moves, gets of it wait
for the move (a bounded copy) and a delete frees it when the move ends.

A put that finds no room on a device tier (the pool full or its namespace at its quota)
evicts, first objects of its own namespace, and retries for up to ``--evict-wait`` seconds,
then fails with the error it met. The host tier has no tier below it: a put there fails at
once. Where the host tier has no room for an evicted object, the slab is made outside the
table's lock (a :class:`Grow`: pinning one takes milliseconds, which every request would wait
for under the lock), and the reserver keeps room on the host tier ahead for each namespace's
recent evictions (``Pool.note_eviction``).

Note [Puts that rank last]: a put (not an ``empty``, whose caller writes a GPU array it was
given) may be granted on the host tier when its device tier is full and its object would be
the first there to move off: :meth:`Evictor.spill`. Its ref still names the device; the
object is in the evicted index from its seal, so it is restored ahead or on its get like any
evicted object. Counted per device tier as ``spill`` moves (no copy by the controller).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

from faastube.cuda import HOST
from faastube.errors import PoolExhaustedError, QuotaExceededError

from .allocator import align_up
from .background import BackgroundThread

log = logging.getLogger("faastube.controller")

POLICIES = ("queue", "lru", "off")
RESTORE_AHEAD_BYTES = 1 << 30     # per restorer pass: restores ahead wait behind requests
MOVE_WAIT_S = 60.0                # longest a get waits for an object being moved
RESTORE_TICK_S = 0.1              # the restorer looks at least this often (frees wake it)


@dataclasses.dataclass(frozen=True)
class DemandView:
    """What eviction reads of demand (a snapshot the reserver publishes each tick, so the
    table never takes the demand tracker's lock): (namespace, producer) → the function that
    gets what it puts; (namespace, function) → its pace (seconds per input) and concurrency,
    for functions active within their window."""
    consumers: dict = dataclasses.field(default_factory=dict)
    pace: dict = dataclasses.field(default_factory=dict)
    active: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Grow:
    """A host slab to make for evictions, outside the table's lock (pinning a large slab
    takes milliseconds, which every request would wait for under it)."""
    pool: object
    namespace: str
    size: int


@dataclasses.dataclass
class Move:
    """One object's bytes going from ``src`` to ``dst`` (both regions held until it ends)."""
    record: object
    src: object
    dst: object
    kind: str                     # "evict" or "restore" (an ahead one: "ahead")
    # (a put written to the host tier at once counts as "spill": Note [Puts that rank last])


def expected_use(records, view: DemandView, now: float, policy: str) -> dict:
    """id(record) → how far ahead (seconds) each sealed live object is expected to be got:
    math.inf for one its consumer already got (Note [Queue-aware eviction])."""
    if policy == "lru":
        return {id(r): now - r.used_at for r in records}
    queues: dict[tuple, list] = {}
    out = {}
    for record in records:
        consumer = view.consumers.get((record.namespace, record.function)) if record.function else None
        if consumer is None:
            out[id(record)] = now - record.used_at
        elif record.gets:
            out[id(record)] = math.inf
        else:
            queues.setdefault((record.namespace, consumer), []).append(record)
    for key, queue in queues.items():
        pace = view.pace.get(key, 1.0)
        queue.sort(key=lambda r: r.sealed_at)
        for rank, record in enumerate(queue):
            out[id(record)] = rank * pace
    return out


class Evictor(BackgroundThread):
    """Picks, moves and restores objects for the object table (every method but
    :meth:`run` is called with the table's lock held); its thread restores ahead."""

    thread_name = "restorer"

    def __init__(self, table, policy: str = "queue", wait_s: float = 2.0):
        if policy not in POLICIES:
            raise ValueError(f"eviction policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        super().__init__()
        self.table = table
        self.evicted: dict[str, object] = {}       # object id → record, for objects on the host now
        self.policy = policy
        self.wait_s = wait_s
        self.view = DemandView()

    def serves(self, pool) -> bool:
        """Whether ``pool`` is a device tier this evictor may move objects off."""
        return self.policy != "off" and pool.device != HOST and HOST in self.table.pools

    def _sealed(self) -> list:
        return [r for r in self.table.objects.values() if r.state == "sealed"]

    def _expected_use(self) -> dict:
        return expected_use(self._sealed(), self.view, time.monotonic(), self.policy)

    def pick(self, pool, nbytes: int, namespace: str, own_only: bool) -> list[Move]:
        """Moves that free at least ``nbytes`` of ``pool`` (fewer if not that many can go):
        ``namespace``'s objects first, then, unless ``own_only`` (its quota is what is full),
        other namespaces', each in eviction order (Note [Queue-aware eviction]). Each gets a
        host region now; the caller runs them unlocked."""
        own, others = self._candidates(pool, namespace, own_only)
        use = self._expected_use()

        def order(records):
            return sorted(records, key=lambda r: (-use.get(id(r), 0.0), r.used_at))
        return self._claim(order(own) + order(others), nbytes)

    def _candidates(self, pool, namespace: str, own_only: bool) -> tuple[list, list]:
        """The objects that may move off ``pool`` now: ``namespace``'s, and (unless
        ``own_only``) the other namespaces'."""
        own, others = [], []
        for r in self.table.objects.values():
            if (r.state == "sealed" and r.leases == 0 and not r.moving
                    and r.region.slab.device == pool.device):
                if r.namespace == namespace:
                    own.append(r)
                elif not own_only:
                    others.append(r)
        return own, others

    def spill(self, pool, session, nbytes: int, may_grow: bool = True):
        """A host region for a put to ``pool`` (which has no room) from ``session``'s function,
        in a slab it may write (Note [Slabs of one writer], controller/pool.py), if the
        new object would be the first to move off ``pool`` (a :class:`Grow` first where the
        host tier has no room and ``may_grow``), else None (the put evicts as usual): Note
        [Puts that rank last].

        A put's object joins the back of its consumer's queue (Note [Queue-aware eviction]),
        so where every object that could make room for it is expected sooner, evicting one
        of them would only bring it back before the new one is needed: the put writes to the
        host tier at once, one copy instead of two, and its object is restored ahead like an
        evicted one. Only with ``--eviction queue`` and a known, active consumer."""
        namespace, function = session.namespace, session.function
        if self.policy != "queue" or not function:
            return None
        view = self.view
        consumer = view.consumers.get((namespace, function))
        if consumer is None or (namespace, consumer) not in view.active:
            return None
        own, others = self._candidates(pool, namespace, own_only=False)
        candidates = own or others
        if not candidates:
            return None
        use = self._expected_use()
        queued = sum(1 for r in self.table.objects.values()
                     if r.state == "sealed" and not r.gets and r.namespace == namespace and r.function
                     and view.consumers.get((namespace, r.function)) == consumer)
        if max(use.get(id(r), 0.0) for r in candidates) > queued * view.pace.get((namespace, consumer), 1.0):
            return None
        host = self.table.pools[HOST]
        try:
            region = host.allocate(namespace, nbytes, grow=False, writer=session.id)
        except (PoolExhaustedError, QuotaExceededError):
            size = host.growth_for(namespace, nbytes) if may_grow else None
            return None if size is None else Grow(host, namespace, size)
        pool.count_move("spill", nbytes, 0.0)
        host.note_eviction(namespace, nbytes, spill=True)       # room for the next one, made ahead
        self.table.wake_reserver()
        return region

    def pick_slabs(self, pool, nbytes: int) -> list[Move]:
        """Moves that empty whole slabs of at least ``nbytes`` (what gives memory back to the
        driver): slabs whose every object may move, the one whose soonest-needed object is
        needed latest first."""
        use = self._expected_use()
        by_slab: dict[int, list] = {}
        blocked = set()
        for record in self.table.objects.values():
            slab = record.region.slab
            if slab.device == pool.device:
                by_slab.setdefault(slab.id, []).append(record)
                if record.state != "sealed" or record.leases or record.moving:
                    blocked.add(slab.id)
        for slab_id, records in by_slab.items():
            # Bytes no live object accounts for: a replica, or a freed object still leased.
            if pool.slabs[slab_id].allocator.used != sum(align_up(max(r.region.nbytes, 1)) for r in records):
                blocked.add(slab_id)
        slabs = sorted((s for s in by_slab if s not in blocked),
                       key=lambda s: -min(use.get(id(r), 0.0) for r in by_slab[s]))
        chosen, freed = [], 0
        for slab_id in slabs:
            if freed >= nbytes:
                break
            chosen += by_slab[slab_id]
            freed += pool.slabs[slab_id].size
        return self._claim(chosen, math.inf)

    def _claim(self, records, nbytes: float) -> list:
        """Moves for ``records`` until ``nbytes`` are freed, each with its host region; where
        the host tier has no room, a :class:`Grow` (a slab made outside the lock) instead."""
        moves, freed = [], 0
        host = self.table.pools[HOST]
        for record in records:
            if freed >= nbytes:
                break
            try:
                dst = host.allocate(record.namespace, record.region.nbytes, grow=False)
            except PoolExhaustedError:
                size = host.growth_for(record.namespace, record.region.nbytes)
                if size is None:
                    log.warning("cannot evict %s of namespace %r: the host tier is at its limit or "
                                "the namespace at its quota there", record.id, record.namespace)
                elif not moves:
                    moves.append(Grow(host, record.namespace, size))
                break
            record.moving = True
            moves.append(Move(record, record.region, dst, "evict"))
            freed += record.region.nbytes
        return moves

    def restores_ahead(self) -> list[Move]:
        """Evicted objects of active consumers' queues, front first, restored while their
        device has room without evicting (at most RESTORE_AHEAD_BYTES per call)."""
        if self.policy != "queue" or not self.evicted:
            return []
        # Only the evicted objects are looked at (the restorer runs on every free): a
        # consumer takes its inputs oldest seal first, so seal order is its queue's order.
        view = self.view
        due = sorted((r for r in self.evicted.values()
                      if not r.moving and r.function and not r.gets
                      and (r.namespace, view.consumers.get((r.namespace, r.function))) in view.active),
                     key=lambda r: r.sealed_at)
        moves, total = [], 0
        for record in due:
            pool = self.table.pools.get(record.home)
            if pool is None or pool.waiting or total + record.region.nbytes > RESTORE_AHEAD_BYTES:
                break                   # a put or get waiting for room there comes first
            try:
                dst = pool.allocate(record.namespace, record.region.nbytes, grow=False)
            except (PoolExhaustedError, QuotaExceededError):
                break                   # no hole: the rest of the queue is further back
            record.moving = True
            moves.append(Move(record, record.region, dst, "ahead"))
            total += record.region.nbytes
        return moves

    # -- the restorer thread (woken when room is freed on a device tier) -----------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(RESTORE_TICK_S)
            self._wake.clear()
            try:
                with self.table.lock:
                    moves = self.restores_ahead()
                self.run(moves)
            except Exception:
                log.exception("restoring objects ahead of their gets failed")

    # -- running moves (unlocked) ---------------------------------------------------------

    def run(self, moves: list) -> None:
        """Copy each move's bytes (the table's lock not held) and end it under the lock;
        make each Grow's slab and add it."""
        for move in moves:
            if isinstance(move, Grow):
                self._grow(move)
                continue
            started = time.perf_counter()
            ok = True
            try:
                self.table.move(move.src, move.dst)
            except Exception as exc:
                ok = False
                log.warning("moving object %s (%s) failed: %s", move.record.id, move.kind, exc)
            with self.table.lock:
                self.finish(move, ok, time.perf_counter() - started)

    def _grow(self, grow: Grow) -> None:
        try:
            slab = grow.pool.make_slab(grow.namespace, grow.size)
        except Exception as exc:
            log.warning("could not grow the host tier by %d bytes for evictions: %s", grow.size, exc)
            return
        with self.table.lock:
            adopted = grow.pool.adopt(slab, path="request")
        if not adopted:
            slab.close()

    def finish(self, move: Move, ok: bool, seconds: float) -> None:
        """End a move (lock held): the object's region becomes ``dst`` and ``src`` is freed;
        if the copy failed, ``dst`` is freed and the object stays where it was; an object
        unlinked meanwhile frees both (no lease can have been granted while it moved)."""
        record = move.record
        record.moving = False
        self.table.settle(record)
        free = self.table.free_region
        if ok:
            record.region = move.dst
            free(move.src)
            if move.kind == "evict":
                if record.unlinked is None:
                    self.evicted[record.id] = record
            else:
                self.evicted.pop(record.id, None)
            pool = self.table.pools[move.src.slab.device if move.kind == "evict" else move.dst.slab.device]
            pool.count_move(move.kind, move.dst.nbytes, seconds)
            if move.kind == "evict":        # room for the next evictions, made ahead
                self.table.pools[HOST].note_eviction(record.namespace, move.dst.nbytes)
                self.table.wake_reserver()
        else:
            free(move.dst)
        if record.unlinked is not None and record.leases == 0:
            free(record.region)
        elif ok and record.unlinked is None:
            self.table.directory.publish(record)        # Redis says where its bytes are now
        self.table.changed.notify_all()
