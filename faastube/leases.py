"""Which arrays of this process hold which leases, and how those leases end: when the arrays
are collected, when a consumer releases one, and at exit.

Note [Releases ride along]: an array's lease ends when the array and every view of it are
garbage-collected. The finalizer must not do I/O (it may run inside another request, on any
thread), so it only queues the lease; queued leases travel on the next request, or a
background thread sends them after a short delay if no request comes.

Note [A finished process has consumed]: at a normal exit the client counts every array it
still holds from ``get`` as consumed (Note [Consumers] in controller/objects.py); a process
that dies of an unhandled exception or a signal consumes nothing, so a retry can get it.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import sys
import threading
import time
import weakref

import numpy as np

from . import cuda, protocol
from .errors import FaasTubeError, NotAnArrayError
from .views import cuda_address

RELEASE_DELAY_S = 0.002       # let queued releases ride on the next request first


@dataclasses.dataclass
class TrackedView:
    """An array this process got from the pool (``get``) or writes (``empty``/``create``)."""
    object_id: str
    lease: int
    writable: bool
    device: str = cuda.HOST
    start: int = 0          # a GPU view's device addresses: it is found again by them
    end: int = 0


class Leases:
    """The views this process holds, keyed by the flat host array's ``id`` or, for a GPU
    view, by its lease; finalizers end a view's lease only while it is still tracked here, so
    a forked child (whose tables start empty, faastube/client.py) never ends its parent's.

    ``lifetimes`` and ``orphans`` serve Note [Spare objects] (faastube/spares.py): an
    ``empty`` array made from a spare keeps the lifetime its seal must give it; one collected
    unsealed is deleted by the release thread, since nothing can seal it any more."""

    def __init__(self, connection):
        self.connection = connection
        self.host: dict[int, TrackedView] = {}
        self.gpu: dict[int, TrackedView] = {}
        self.sealed: set[str] = set()      # sealed here while a writer lives: a 2nd seal says so
        self.lifetimes: dict[str, protocol.Lifetime] = {}
        self.orphans: collections.deque = collections.deque()
        self._release_wanted = threading.Event()
        self._flusher: threading.Thread | None = None

    # -- tracking -------------------------------------------------------------------------

    def track_host(self, flat: np.ndarray, grant: protocol.Granted, writable: bool) -> None:
        key = id(flat)
        self.host[key] = TrackedView(grant.id, grant.lease, writable)
        weakref.finalize(flat, self._gone, self.host, key).atexit = False
        if not writable:
            watch_exit(self)

    def track_gpu(self, owner, grant: protocol.Granted, writable: bool, start: int) -> None:
        self.gpu[grant.lease] = TrackedView(grant.id, grant.lease, writable, grant.device,
                                            start, start + grant.nbytes)
        weakref.finalize(owner, self._gone, self.gpu, grant.lease).atexit = False
        if not writable:
            watch_exit(self)

    def find(self, array, writable: bool) -> tuple[TrackedView, np.ndarray | None] | None:
        """The tracked view ``array`` (or a view of it) belongs to, and its flat host array
        (None for a GPU array); None if it is not one of this process's."""
        address = cuda_address(array)
        if address is not None:
            for view in list(self.gpu.values()):
                if view.writable == writable and view.start <= address < max(view.end, view.start + 1):
                    return view, None
            return None
        if not isinstance(array, np.ndarray):
            raise NotAnArrayError(f"expected an array from faastube, got {type(array).__name__}")
        # numpy collapses view chains to the first array that is not a view of another array
        for candidate in (array, array.base):
            if isinstance(candidate, np.ndarray):
                view = self.host.get(id(candidate))
                if view is not None and view.writable == writable:
                    return view, candidate
        return None

    def readers(self) -> list[int]:
        """The leases of every array this process got and still holds."""
        return [v.lease for table in (self.host, self.gpu) for v in list(table.values()) if not v.writable]

    def forget(self) -> None:
        """After fork: the parent's views are the parent's (their leases are its)."""
        for table in (self.host, self.gpu):
            table.clear()
        self.sealed.clear()
        self.lifetimes.clear()
        self.orphans.clear()
        self._release_wanted = threading.Event()
        self._flusher = None

    # -- ending leases (Note [Releases ride along]) ---------------------------------------

    def _gone(self, table: dict, key: int) -> None:
        """A view was collected (a finalizer: no I/O here)."""
        view = table.pop(key, None)
        if view is None:
            return
        if view.writable:
            self.sealed.discard(view.object_id)
            if self.lifetimes.pop(view.object_id, None) is not None:
                self.orphans.append(view.object_id)     # Note [Spare objects]
        self.connection.releases.append((view.lease, "drop"))
        self.wake()

    def wake(self) -> None:
        """Have what waits to ride on a request sent soon, if no request takes it first."""
        if self._flusher is None or not self._flusher.is_alive():
            self._flusher = threading.Thread(target=self._flush, name="faastube-releases", daemon=True)
            self._flusher.start()
        self._release_wanted.set()

    def _flush(self) -> None:
        connection = self.connection
        while True:
            self._release_wanted.wait()
            self._release_wanted.clear()
            time.sleep(RELEASE_DELAY_S)
            if connection.has_piggyback and connection.connected:
                try:
                    connection.request(protocol.Release())
                except Exception:
                    pass   # a lost connection ends every lease of this process anyway
            while self.orphans and connection.connected:
                try:                # Note [Spare objects]: nothing can seal these any more
                    connection.send_only(protocol.Delete(self.orphans.popleft()))
                except Exception:
                    pass

    def consume_at_exit(self) -> None:
        """Count every got array still held as consumed (Note [A finished process has consumed])."""
        connection = self.connection
        readers = self.readers()
        if (readers or connection.releases) and connection.connected:
            connection.releases.extend((lease, "consume") for lease in readers)
            try:
                connection.request(protocol.Release())
            except FaasTubeError:
                pass


# -- process exit (Note [A finished process has consumed]) --------------------------------

_watched: weakref.WeakSet = weakref.WeakSet()
_failed = False


def watch_exit(watcher) -> None:
    """At exit, call ``watcher.flush_at_exit()`` where it has one (a put's seal is sent even
    after a failure), then ``watcher.consume_at_exit()`` where it has one, unless the process
    dies of an unhandled exception."""
    if not _watched:
        atexit.register(_consume_at_exit)
        previous = sys.excepthook

        def excepthook(*exc_info):
            global _failed
            _failed = True
            previous(*exc_info)
        sys.excepthook = excepthook
    _watched.add(watcher)


def _consume_at_exit() -> None:
    for watcher in list(_watched):
        if hasattr(watcher, "flush_at_exit"):
            watcher.flush_at_exit()
    if _failed:
        return
    for watcher in list(_watched):
        if hasattr(watcher, "consume_at_exit"):
            watcher.consume_at_exit()
