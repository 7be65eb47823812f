"""Which chunks a link carries next: SLO-aware bandwidth sharing between transfers.

Note [Batches bound waiting]: a copy engine drains its queue in order (a 1 MB copy queued
behind a 1 GB one waits for all of it, however the big one is cut; docs/benchmarks.md),
so the engine gives each link only a *batch* of chunks at a time (the transfer engine: one
chunk per batch, two batches queued, controller/transfer.py) and asks this scheduler for the
next batch when one completes. A transfer that arrives is therefore
served from the next batch boundary on, never after a whole large transfer.

Note [Shares]: every batch, each active transfer earns credit in chunk slots:
- a transfer with an SLO earns what it needs to finish in time, ``remaining bytes /
  (deadline − now)`` as a share of the link's measured bandwidth (scaled down together
  when their needs exceed the link: overload);
- the bandwidth left over goes to the transfer with the tightest deadline; without any SLO
  transfer it is split evenly between the transfers (fair sharing).
Slots go one chunk at a time to the highest credit (ties: earlier deadline, then fewer bytes
left — a small transfer goes first — then earlier arrival), so shares hold over batches even
when they are fractions of a slot. A chunk
given to a link is never taken back.

Pure Python, no CUDA: tests drive it with :class:`SimulatedLink`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

_ids = itertools.count(1)


@dataclasses.dataclass(eq=False)
class Transfer:
    """A move of ``nbytes`` over one link, optionally due ``slo_s`` seconds after arrival."""
    nbytes: int
    arrival: float
    slo_s: float | None = None
    id: int = dataclasses.field(default_factory=lambda: next(_ids))
    sent: int = 0                 # bytes handed to the link so far
    done: int = 0                 # bytes the link has completed
    credit: float = 0.0
    finished_at: float | None = None
    payload: object = None        # what the executor needs to carry it (addresses)

    @property
    def deadline(self) -> float:
        return self.arrival + self.slo_s if self.slo_s is not None else math.inf

    @property
    def unsent(self) -> int:
        return self.nbytes - self.sent


@dataclasses.dataclass(frozen=True)
class Chunk:
    transfer: Transfer
    offset: int
    nbytes: int


class LinkScheduler:
    """The chunk scheduler of one link (one direction of one path)."""

    def __init__(self, bandwidth: float, chunk_bytes: int, batch_chunks: int):
        if bandwidth <= 0 or chunk_bytes <= 0 or batch_chunks <= 0:
            raise ValueError("bandwidth, chunk size and batch size must be positive")
        self.bandwidth = bandwidth            # bytes/s, measured for this link
        self.chunk_bytes = chunk_bytes
        self.batch_chunks = batch_chunks
        self.active: list[Transfer] = []

    def add(self, transfer: Transfer) -> None:
        self.active.append(transfer)

    def next_batch(self, now: float) -> list[Chunk]:
        """Up to ``batch_chunks`` chunks for the link to carry next (Note [Shares])."""
        waiting = [t for t in self.active if t.unsent > 0 and t.arrival <= now]
        if not waiting:
            return []
        self._earn(waiting, now)
        batch: list[Chunk] = []
        while len(batch) < self.batch_chunks and waiting:
            best = max(waiting, key=lambda t: (t.credit, -t.deadline, -t.unsent, -t.arrival, -t.id))
            size = min(self.chunk_bytes, best.unsent)
            batch.append(Chunk(best, best.sent, size))
            best.sent += size
            best.credit -= 1.0
            if best.unsent == 0:
                waiting.remove(best)
                best.credit = 0.0             # credit is for what is left to send
        return batch

    def completed(self, chunk: Chunk, now: float) -> None:
        """The link finished ``chunk`` at ``now``."""
        transfer = chunk.transfer
        transfer.done += chunk.nbytes
        if transfer.done >= transfer.nbytes:
            transfer.finished_at = now
            self.active.remove(transfer)

    def _earn(self, waiting: list[Transfer], now: float) -> None:
        slots = float(self.batch_chunks)
        with_slo = [t for t in waiting if t.slo_s is not None]
        needs = {t.id: (t.nbytes - t.done) / max(t.deadline - now, 1e-9) / self.bandwidth
                 for t in with_slo}
        total = sum(needs.values())
        scale = 1.0 / total if total > 1.0 else 1.0           # overload: scale down together
        for t in with_slo:
            t.credit += needs[t.id] * scale * slots
        spare = slots * max(0.0, 1.0 - total * scale)
        if with_slo:
            min(with_slo, key=lambda t: (t.deadline, t.arrival, t.id)).credit += spare
        else:
            for t in waiting:
                t.credit += spare / len(waiting)
        for t in waiting:                                      # no hoarding across batches
            t.credit = max(-slots, min(slots, t.credit))


class SimulatedLink:
    """A link that carries ``bandwidth`` bytes/s, one chunk after another, driven by a
    :class:`LinkScheduler`: for tests and for reasoning about policies without a GPU."""

    def __init__(self, scheduler: LinkScheduler):
        self.scheduler = scheduler
        self.now = 0.0
        self.carried: list[tuple[int, int, float]] = []        # (transfer id, offset, end time)

    def run(self, arrivals: list[Transfer], until: float = math.inf) -> None:
        """Carry every transfer in ``arrivals`` (each joins at its arrival time)."""
        pending = sorted(arrivals, key=lambda t: t.arrival)
        while pending or self.scheduler.active:
            while pending and pending[0].arrival <= self.now:
                self.scheduler.add(pending.pop(0))
            batch = self.scheduler.next_batch(self.now)
            if not batch:
                if not pending:
                    break
                self.now = pending[0].arrival                  # idle until the next arrival
                continue
            for chunk in batch:
                self.now += chunk.nbytes / self.scheduler.bandwidth
                self.carried.append((chunk.transfer.id, chunk.offset, self.now))
                self.scheduler.completed(chunk, self.now)
            if self.now >= until:
                break
