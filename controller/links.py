"""Link executors: each link asks its scheduler for batches of chunks (Note [Batches bound
waiting], controller/scheduler.py), has its copier carry them, and reports each move's wait
and service time.

A copier has ``issue(pieces) -> token`` (queue (destination, source, length) copies) and
``wait(token, spin_s=0)`` (block until they arrived; a copier that can spins up to ``spin_s``
first): :class:`HostCopier` copies host memory with
``memmove`` at issue; ``controller.gpu.CopyQueue`` queues ``cuMemcpyAsync`` on the link's own
stream and waits on an event; ``controller.pump.Pump`` hands them to a C thread that puts them
on the link's stream one at a time (Note [The native pump]) and also has ``move(dst, src,
nbytes)``, which an express move uses.

Note [Who drives a link]: no thread of the link's own. The threads that asked for moves take
turns driving it: one at a time (the leader) keeps up to ``depth`` batches queued on the
copier, waits for the oldest, accounts it and refills, until its own move is done; then the
next waiting thread whose move is not done leads. A move on an idle link therefore costs no
thread hand-off (its caller copies), and every queued chunk has a waiting thread to finish
it. ``depth`` ≥ 2 keeps the copy engine busy while the leader refills; small, so a newly
arrived move waits behind at most ``depth`` batches.

Note [Express moves]: a move no larger than one chunk does not wait for a batch boundary
and a leader's turn: its caller issues it at once, behind at most ``depth`` queued batches,
waits for its own token and accounts it. Waking a thread at a batch boundary, then again when
its chunk has landed, cost a 1 MB move several times its copy in Python hand-offs
(docs/benchmarks.md); the copy engine's queue is what it must wait for,
and that is bounded by ``depth``. One express move at a time per link: a stream of small
moves still goes through the scheduler and shares the link with a large one.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import threading
import time

from faastube.config import DEFAULT_CHUNK_BYTES

from .scheduler import LinkScheduler, Transfer

# A link's defaults, set here only (the chunk is a setting, --chunk-size, faastube/config.py):
DEFAULT_BATCH_CHUNKS = 1        # chunks per batch a link hands a copy queue driven from Python
DEFAULT_DEPTH = 2               # batches queued on the engine at once (Note [Batches bound waiting])
PUMP_BATCH_CHUNKS = 2           # a direct link's batches on a pump (Note [The native pump]) …
PUMP_DEPTH = 2                  # … and how many it keeps there
LAST_BATCH_SPIN_S = 0.002       # most a leader spins for the batch that ends its own move


class HostCopier:
    """Copies between host addresses (the CPU's memory bus is the link)."""

    @staticmethod
    def issue(pieces) -> None:
        for dst, src, nbytes in pieces:
            ctypes.memmove(dst, src, nbytes)

    @staticmethod
    def wait(token, spin_s: float = 0.0) -> None:
        pass


@dataclasses.dataclass(eq=False)
class Move:
    """One move on a link; ``done`` is set when its last byte has arrived (or it failed)."""
    transfer: Transfer
    dst: int
    src: int
    submitted: float
    started: float | None = None          # when its first chunk went to the copier
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    error: BaseException | None = None

    @property
    def wait_s(self) -> float:
        return (self.started or self.submitted) - self.submitted

    @property
    def service_s(self) -> float:
        return (self.transfer.finished_at or self.submitted) - (self.started or self.submitted)


class Link:
    """One direction of one path, e.g. host→GPU 0 over PCIe (Note [Who drives a link])."""

    def __init__(self, name: str, copier, bandwidth: float, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 batch_chunks: int = DEFAULT_BATCH_CHUNKS, depth: int = DEFAULT_DEPTH,
                 clock=time.perf_counter):
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self.name = name
        self.copier = copier
        self.scheduler = LinkScheduler(bandwidth, chunk_bytes, batch_chunks)
        self.depth = depth
        self._clock = clock
        self._changed = threading.Condition()
        self._issuing = threading.Lock()        # the leader and an express move share the copier
        self._leading = False
        self._express = False
        self._in_flight: collections.deque = collections.deque()   # (batch, issued at, token, error)
        self._last_finish = 0.0
        self.bytes = 0
        self.moves = 0
        self.busy_s = 0.0
        self.wait_s = 0.0                 # summed over finished moves
        self.service_s = 0.0

    @property
    def queued(self) -> int:
        """Moves waiting or in flight on this link."""
        with self._changed:
            return len(self.scheduler.active)

    def move(self, dst: int, src: int, nbytes: int, slo_s: float | None = None) -> Move:
        """Copy ``nbytes`` from ``src`` to ``dst``; returns once they arrived, raises what the
        copier raised."""
        now = self._clock()
        move = Move(Transfer(nbytes, now, slo_s), dst, src, now)
        move.transfer.payload = move
        if nbytes == 0:
            move.transfer.finished_at = now
            return move
        with self._changed:
            express = nbytes <= self.scheduler.chunk_bytes and not self._express
            self._express |= express
        if express:
            return self._move_express(move)
        with self._changed:
            self.scheduler.add(move.transfer)
            while not move.done.is_set() and self._leading:
                self._changed.wait()
            lead = not move.done.is_set()
            self._leading |= lead
        if lead:
            try:
                self._lead(move)
            finally:
                with self._changed:
                    self._leading = False
                    self._changed.notify_all()      # the next waiting move leads
        if move.error is not None:
            raise move.error
        return move

    def _move_express(self, move: Move) -> Move:
        """Note [Express moves]."""
        try:
            if hasattr(self.copier, "move"):      # a native pump queues it ahead and waits in one call
                move.started = self._clock()
                self.copier.move(move.dst, move.src, move.transfer.nbytes)
            else:
                with self._issuing:
                    move.started = self._clock()
                    token = self.copier.issue([(move.dst, move.src, move.transfer.nbytes)])
                self.copier.wait(token)
        except BaseException:
            with self._changed:
                self._express = False
            raise
        finished = self._clock()
        move.transfer.done = move.transfer.sent = move.transfer.nbytes
        move.transfer.finished_at = finished
        with self._changed:
            self._express = False
            self._count_busy(move.started, finished)
            self.bytes += move.transfer.nbytes
            self._count_finished(move)
        return move

    def _lead(self, mine: Move) -> None:
        self._refill()
        while not mine.done.is_set():
            if not self._in_flight:
                raise RuntimeError(f"link {self.name}: a move is unfinished with nothing in flight")
            batch, issued, token, error = self._in_flight.popleft()
            if error is None:
                try:
                    self.copier.wait(token, self._last_batch_spin(batch, mine))
                except BaseException as exc:
                    error = exc
            self._refill()              # the copy engine first, the bookkeeping after
            self._account(batch, issued, error)

    def _last_batch_spin(self, batch, mine: Move) -> float:
        """Note [The last batch is spun for]: while a leader waits for a batch with more
        queued behind it, the engine stays busy however late the leader wakes, so it sleeps;
        the batch that ends its own move has nothing behind it that matters to its caller,
        whose reply then waits for the leader's wake-up (tens of µs to a few hundred on a
        busy host). So the leader spins for that one, for about twice the batch's time on
        the link, at most LAST_BATCH_SPIN_S, and sleeps after that."""
        if not any(c.transfer is mine.transfer and c.offset + c.nbytes >= c.transfer.nbytes for c in batch):
            return 0.0
        return min(LAST_BATCH_SPIN_S, 2 * sum(c.nbytes for c in batch) / self.scheduler.bandwidth + 50e-6)

    def _refill(self) -> None:
        """Queue batches on the copier until ``depth`` are in flight or nothing is left."""
        fresh = []
        with self._changed:
            while len(self._in_flight) + len(fresh) < self.depth:
                batch = self.scheduler.next_batch(self._clock())
                if not batch:
                    break
                fresh.append(batch)
        for batch in fresh:
            pieces = [(c.transfer.payload.dst + c.offset, c.transfer.payload.src + c.offset, c.nbytes)
                      for c in batch]
            with self._issuing:
                issued = self._clock()
                for chunk in batch:
                    if chunk.transfer.payload.started is None:
                        chunk.transfer.payload.started = issued
                try:
                    token, error = self.copier.issue(pieces), None
                except BaseException as exc:          # a failed copy fails its moves, not the link
                    token, error = None, exc
            self._in_flight.append((batch, issued, token, error))

    def _account(self, batch, issued: float, error: BaseException | None) -> None:
        finished = self._clock()
        ended = False
        with self._changed:
            self._count_busy(issued, finished)
            for chunk in batch:
                move = chunk.transfer.payload
                if error is not None and move.error is None:
                    move.error = error
                    if move.transfer in self.scheduler.active:
                        self.scheduler.active.remove(move.transfer)
                    move.done.set()
                    ended = True
                if move.error is not None:
                    continue
                self.bytes += chunk.nbytes
                self.scheduler.completed(chunk, finished)
                if move.transfer.finished_at is not None:
                    self._count_finished(move)
                    ended = True
            if ended:               # waiters wait for their move or the lead: wake them only then
                self._changed.notify_all()

    def _count_busy(self, issued: float, finished: float) -> None:
        """Add the link's busy time up to ``finished`` of copies issued at ``issued`` (lock
        held): queued batches and an express move overlap, so count only what is new."""
        self.busy_s += max(0.0, finished - max(issued, self._last_finish))
        self._last_finish = max(self._last_finish, finished)

    def _count_finished(self, move: Move) -> None:
        """A move's last byte has arrived (lock held): count it and wake its caller."""
        self.moves += 1
        self.wait_s += move.wait_s
        self.service_s += move.service_s
        move.done.set()

    def stats(self) -> dict:
        with self._changed:
            pumped = hasattr(self.copier, "move")      # a native pump (controller/pump.py)
            return {"bytes": self.bytes, "transfers": self.moves, "busy_s": self.busy_s,
                    "queued": len(self.scheduler.active), "wait_s": self.wait_s,
                    "service_s": self.service_s, "bandwidth": self.scheduler.bandwidth,
                    "chunk_bytes": self.scheduler.chunk_bytes, "native_pump": pumped,
                    **({"pump": self.copier.stats()} if pumped else {})}
