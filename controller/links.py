"""Link executors: one thread per link that asks the link's scheduler for a batch of chunks
(Note [Batches bound waiting], controller/scheduler.py), has its copier carry them, and
reports each move's wait and service time.

A copier moves (destination, source, length) pieces and returns once they have arrived:
:class:`HostCopier` copies host memory with ``memmove``; the CUDA copier (cuMemcpyAsync on
the link's stream, then a synchronise per batch) joins when the transfer engine routes its
moves through links (issue 5). Until then the engine copies each move whole
(controller/transfer.py).
"""

from __future__ import annotations

import ctypes
import dataclasses
import threading
import time

from .scheduler import DEFAULT_BATCH, DEFAULT_CHUNK, LinkScheduler, Transfer


class HostCopier:
    """Copies between host addresses (the CPU's memory bus is the link)."""

    @staticmethod
    def copy_batch(pieces) -> None:
        for dst, src, nbytes in pieces:
            ctypes.memmove(dst, src, nbytes)


@dataclasses.dataclass(eq=False)
class Move:
    """One move submitted to a link; ``done`` is set when its last byte has arrived."""
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
    """The executor of one link."""

    def __init__(self, name: str, copier, bandwidth: float, chunk_bytes: int = DEFAULT_CHUNK,
                 batch_chunks: int = DEFAULT_BATCH, clock=time.perf_counter):
        self.name = name
        self.copier = copier
        self.scheduler = LinkScheduler(bandwidth, chunk_bytes, batch_chunks)
        self._clock = clock
        self._changed = threading.Condition()
        self._closed = False
        self.bytes = 0
        self.moves = 0
        self.busy_s = 0.0
        self._thread = threading.Thread(target=self._run, name=f"link {name}", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Moves waiting or in flight on this link."""
        with self._changed:
            return len(self.scheduler.active)

    def submit(self, dst: int, src: int, nbytes: int, slo_s: float | None = None) -> Move:
        now = self._clock()
        move = Move(Transfer(nbytes, now, slo_s), dst, src, now)
        move.transfer.payload = move
        if nbytes == 0:
            move.transfer.finished_at = now
            move.done.set()
            return move
        with self._changed:
            if self._closed:
                raise RuntimeError(f"link {self.name} is closed")
            self.scheduler.add(move.transfer)
            self._changed.notify()
        return move

    def move(self, dst: int, src: int, nbytes: int, slo_s: float | None = None) -> Move:
        """Submit and wait; raises what the copier raised."""
        move = self.submit(dst, src, nbytes, slo_s)
        move.done.wait()
        if move.error is not None:
            raise move.error
        return move

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._closed and not self.scheduler.active:
                    self._changed.wait()
                if self._closed and not self.scheduler.active:
                    return
                started = self._clock()
                batch = self.scheduler.next_batch(started)
            for chunk in batch:
                move = chunk.transfer.payload
                if move.started is None:
                    move.started = started
            try:
                self.copier.copy_batch([(c.transfer.payload.dst + c.offset, c.transfer.payload.src + c.offset,
                                         c.nbytes) for c in batch])
                error = None
            except BaseException as exc:          # a failed copy fails its moves, not the link
                error = exc
            finished = self._clock()
            with self._changed:
                self.busy_s += finished - started
                for chunk in batch:
                    move = chunk.transfer.payload
                    if error is not None and move.error is None:
                        move.error = error
                        self.scheduler.active.remove(move.transfer)
                        move.done.set()
                    if move.error is not None:
                        continue
                    self.bytes += chunk.nbytes
                    self.scheduler.completed(chunk, finished)
                    if move.transfer.finished_at is not None:
                        self.moves += 1
                        move.done.set()
