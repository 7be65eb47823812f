"""Seals that wait for a put's copy to land, on a thread of their own.

Note [Put seals when its copy lands]: with ``FAASTUBE_PUT_WAITS=0`` a GPU ``put`` queues its
copy and returns the ref at once; a thread of the client waits for the copy (an event
recorded after it, faastube.cuda.Fences) and then sends the seal, so only finished writes
are published (Note [Seal publishes finished writes], faastube/sdk.py) while the caller goes
on; a consumer's get that comes first waits for the seal. Seals go out in the order of the
puts, and ``delete``, ``close_scope``, ``close`` and exit flush first, so this process's own
later requests still find its puts sealed. The source array is kept alive until its copy
has landed, so its memory is not reused under the copy; later writes to it must be queued
on the same stream or wait for ``flush_puts``. A failed copy deletes its object, so a
consumer's get fails at once instead of timing out. Not the default: it returns the
producer sooner, but a get right behind the put then waits for the seal on a controller
thread, and the hand-off as a whole came out slower (docs/benchmarks.md).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading

from . import cuda, protocol
from .connection import DEFAULT_REPLY_TIMEOUT_S, Connection
from .errors import CudaError, FaasTubeError
from .leases import watch_exit

log = logging.getLogger("faastube")


@dataclasses.dataclass
class Landing:
    """A put whose copy may still be running."""
    fence: tuple                 # faastube.cuda.Fences.record's
    object_id: str
    lifetime: protocol.Lifetime | None
    keep: object                 # alive until the copy landed: the source array


class Sealer:
    """Sends each put's seal once its copy has landed, in put order."""

    def __init__(self, connection: Connection, seal):
        self.connection = connection
        self._seal = seal                  # (object id, lifetime): send the put's seal
        self._landing: collections.deque[Landing] = collections.deque()
        self._landed = threading.Condition(threading.Lock())
        self._sealing = 0                  # taken off the queue, seal not yet sent
        self._thread: threading.Thread | None = None

    def add(self, landing: Landing) -> None:
        with self._landed:
            self._landing.append(landing)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="faastube-sealer", daemon=True)
                self._thread.start()
                watch_exit(self)
            self._landed.notify_all()

    def _run(self) -> None:
        while True:
            with self._landed:
                while not self._landing:
                    self._landed.wait()
                landing = self._landing.popleft()
                self._sealing += 1
            try:
                try:
                    cuda.fences().wait(landing.fence)
                except CudaError as exc:
                    log.error("the copy of put object %s failed, so it is deleted: %s", landing.object_id, exc)
                    self.connection.send_only(protocol.Delete(landing.object_id))
                else:
                    self._seal(landing.object_id, landing.lifetime)
            except FaasTubeError as exc:    # the connection is gone: so is the pending object
                log.warning("put object %s could not be sealed: %s", landing.object_id, exc)
            finally:
                del landing
                with self._landed:
                    self._sealing -= 1
                    self._landed.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every put has landed and its seal was sent; False if ``timeout``
        seconds passed first."""
        with self._landed:
            return self._landed.wait_for(lambda: not self._landing and not self._sealing, timeout)

    def flush_at_exit(self) -> None:
        self.flush(DEFAULT_REPLY_TIMEOUT_S)

    def forget(self) -> None:
        """After fork: the parent's puts are the parent's to seal."""
        self._landing = collections.deque()
        self._landed = threading.Condition(threading.Lock())
        self._sealing = 0
        self._thread = None
