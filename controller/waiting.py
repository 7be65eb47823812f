"""Gets that must wait, parked without a thread each.

Note [Waiting gets own no thread]: a get of a pending object (or of one moving between
tiers) cannot be answered yet, and its connection must keep serving the process's other
requests meanwhile. A thread per waiting get would let one client make the controller
start as many threads as it sends gets, until the process cannot start one more and dies.
So such a get is *parked*: an entry in this table, indexed by the object it waits for. The
object table marks an object *settled* when it is sealed, unlinked or ends a move
(``ObjectTable.parked`` / ``settled``), and a connection whose session closed drops its
entries. One thread wakes on the table's changes and on the nearest deadline, and hands
the entries that can be answered to a small pool of answer threads, which ask the table
again (a get may still have to wait: it is parked again) or answer the deadline's error.
Bounded: at most ``limit`` parked gets in all and MAX_PER_CONNECTION per connection; a get
over either limit is answered ControllerBusyError at once.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import heapq
import itertools
import logging
import threading
import time

from faastube.errors import ControllerBusyError

log = logging.getLogger("faastube.controller")

MAX_PER_CONNECTION = 256
ANSWER_THREADS = 8


@dataclasses.dataclass(eq=False)
class Parked:
    """One get waiting: what the server needs to answer it, and until when it may wait."""
    session: object
    object_id: str
    deadline: float
    expired: Exception            # the answer once the deadline has passed
    answer: object                # called (in an answer thread) with this entry
    context: tuple = ()           # the server's: connection, send lock, message, envelope


class ParkedGets:
    """The parked gets of one controller (Note [Waiting gets own no thread])."""

    def __init__(self, table, limit: int = 4096):
        self.table = table
        self.limit = limit
        self._by_object: dict[str, list[Parked]] = {}
        self._deadlines: list = []          # (deadline, n, entry), entries answered stay until popped
        self._count = 0
        self._order = itertools.count()
        self._stopping = False
        self._answers = concurrent.futures.ThreadPoolExecutor(ANSWER_THREADS, thread_name_prefix="answer")
        self._thread = threading.Thread(target=self._run, name="parked-gets", daemon=True)
        self._thread.start()

    @property
    def count(self) -> int:
        return self._count

    def park(self, entry: Parked) -> None:
        """Park ``entry``; ControllerBusyError where a limit is reached."""
        table = self.table
        with table.lock:
            if self._count >= self.limit:
                raise ControllerBusyError(
                    f"the controller has {self._count} gets waiting for objects, its limit "
                    f"(--max-waiting-gets); try again later")
            if entry.session.waiting_gets >= MAX_PER_CONNECTION:
                raise ControllerBusyError(
                    f"this connection has {entry.session.waiting_gets} gets waiting for objects, "
                    f"the most one connection may have; wait for some before sending more")
            entry.session.waiting_gets += 1
            self._count += 1
            self._by_object.setdefault(entry.object_id, []).append(entry)
            table.parked[entry.object_id] = table.parked.get(entry.object_id, 0) + 1
            heapq.heappush(self._deadlines, (entry.deadline, next(self._order), entry))
            if table.may_answer(entry.object_id, entry.session):   # it settled since the table's answer
                table.settled.add(entry.object_id)
            table.changed.notify_all()

    def stop(self) -> None:
        with self.table.lock:
            self._stopping = True
            self.table.changed.notify_all()
        self._thread.join(5)
        self._answers.shutdown(wait=False, cancel_futures=True)

    # -- the waiter thread ------------------------------------------------------------------

    def _run(self) -> None:
        table = self.table
        while True:
            with table.lock:
                while True:
                    if self._stopping:
                        return
                    ready = self._take_ready(time.monotonic())
                    if ready:
                        break
                    timeout = 1.0
                    if self._deadlines:
                        timeout = min(timeout, max(self._deadlines[0][0] - time.monotonic(), 0.001))
                    table.changed.wait(timeout)
            for entry in ready:
                try:
                    self._answers.submit(entry.answer, entry)
                except RuntimeError:            # shut down: the controller is stopping
                    return

    def _take_ready(self, now: float) -> list[Parked]:
        """(lock held) The entries that can be answered now, taken out of the table."""
        table = self.table
        ready = []
        if table.settled:
            for object_id in table.settled:
                ready += self._by_object.pop(object_id, ())
            table.settled.clear()
        if table.closed_sessions:
            closed, table.closed_sessions = table.closed_sessions, set()
            for object_id, entries in list(self._by_object.items()):
                kept = [e for e in entries if e.session not in closed]
                if len(kept) < len(entries):
                    self._forget(object_id, [e for e in entries if e.session in closed])
                    if kept:
                        self._by_object[object_id] = kept
                    else:
                        del self._by_object[object_id]
        while self._deadlines and self._deadlines[0][0] <= now:
            _deadline, _n, entry = heapq.heappop(self._deadlines)
            entries = self._by_object.get(entry.object_id)
            if entries and entry in entries:
                entries.remove(entry)
                if not entries:
                    del self._by_object[entry.object_id]
                ready.append(entry)
        # Entries answered early stay in the heap until their deadline; keep it small.
        if len(self._deadlines) > 4 * max(self._count, 256):
            live = {id(e) for es in self._by_object.values() for e in es}
            self._deadlines = [item for item in self._deadlines if id(item[2]) in live]
            heapq.heapify(self._deadlines)
        self._forget(None, ready)
        return ready

    def _forget(self, object_id, entries) -> None:
        table = self.table
        for entry in entries:
            entry.session.waiting_gets -= 1
            self._count -= 1
            left = table.parked.get(entry.object_id, 0) - 1
            if left > 0:
                table.parked[entry.object_id] = left
            else:
                table.parked.pop(entry.object_id, None)
