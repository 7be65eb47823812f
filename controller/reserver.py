"""The thread that keeps room free ahead of demand (Note [Reservation ahead of demand],
controller/demand.py): it learns demand from the activations the handlers pass it, tells each
pool what to keep room for, and grows the pools one slab at a time, making each slab outside
the object table's lock so requests go on meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time

from faastube.config import format_size
from faastube.errors import CudaError

from .background import BackgroundThread
from .demand import DemandTracker

log = logging.getLogger("faastube.controller")

TICK_S = 0.1          # how often wanted room is recomputed when no activation wakes it
SETTLE_S = 0.01       # after an activation wakes it: the rest of the burst is folded into one step
RETRY_S = 5.0         # after a slab could not be made: the memory is not there for now


class Reserver(BackgroundThread):
    thread_name = "reserver"

    def __init__(self, table, default_window_s: float, clock=time.monotonic):
        super().__init__()
        self.table = table
        self.tracker = DemandTracker(default_window_s)
        self._clock = clock
        self._lock = threading.Lock()          # the tracker's; never held with the table's
        self.failures = 0
        self._retry_at = 0.0

    def record(self, namespace: str, activities) -> None:
        """Activations that ended in a process of ``namespace`` (a request carried them)."""
        with self._lock:
            now = self._clock()
            self.tracker.record(namespace, activities, now, devices=self.table.pools)
            if self._evicting():       # a consumer's pace and activity count at once (Note [Puts that rank last])
                self.table.evictor.view = self.tracker.view(now)
        self._wake.set()

    def _evicting(self) -> bool:
        evictor = self.table.evictor
        return any(evictor.serves(pool) for pool in self.table.pools.values())

    def learn(self, namespace: str, producer: str, consumer: str) -> None:
        """A get told who consumes what (Note [Queue-aware eviction])."""
        with self._lock:
            if self.tracker.learn(namespace, producer, consumer):
                self.table.evictor.view = self.tracker.view(self._clock())   # at once, not next tick

    def summary(self) -> list[dict]:
        with self._lock:
            return self.tracker.summary(self._clock())

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                grew = self.step()
            except Exception:
                log.exception("reserving room ahead of demand failed")
                grew = False
            if not grew:
                # A workflow's stages report within milliseconds of each other; one step for
                # the burst costs the cores the functions run on a fifth of one per report.
                if self._wake.wait(TICK_S):
                    self._stop.wait(SETTLE_S)
                self._wake.clear()

    def step(self) -> bool:
        """Tell every pool what to keep room for and grow one slab where room is missing;
        whether a slab was grown (then the next step follows at once)."""
        now = self._clock()
        pools = self.table.pools
        evictor = self.table.evictor
        with self._lock:
            wanted = self.tracker.wanted(now)
            if self._evicting():
                # Published whole: the table reads it under its own lock (Note [Queue-aware
                # eviction]); without a device tier to evict from, nobody does.
                evictor.view = self.tracker.view(now)
        with self.table.lock:
            for device, pool in pools.items():
                pool.wanted = {ns: sizes for (ns, dev), sizes in wanted.items() if dev == device}
            if now < self._retry_at:
                return False
            for pool in pools.values():
                ahead = pool.next_ahead()
                if ahead is not None:
                    break
            else:
                return False
        namespace, size = ahead
        try:
            slab = pool.make_slab(namespace, size)          # the slow part, outside the lock
        except (OSError, CudaError) as exc:
            self.failures += 1
            self._retry_at = self._clock() + RETRY_S
            log.warning("could not grow the %s pool by %s ahead of demand: %s", pool.name,
                        format_size(size), exc)
            return False
        with self.table.lock:
            adopted = pool.adopt(slab)
        if not adopted:
            slab.close()
        return adopted
