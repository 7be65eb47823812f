"""Spare objects: the next put's create, made ahead.

Note [Spare objects]: a ``put`` is create + copy + seal, and the create is a round trip the
put waits for: on a node whose cores sleep between requests it costs more than the copy of
tens of MB (docs/benchmarks.md). A function usually puts the same shape again on every activation, so
once a process has put an (shape, dtype, device) twice, the client asks for a *spare* of
that signature right after the put, without waiting: a pending object created with no
consumers, ttl or scope. The next put of the signature takes the spare (its reply came in
long ago), writes it, and its seal (``lifetime``) gives it the put's consumers, ttl and
scope; meanwhile the next spare is on its way. ``empty`` without a ttl does the same: it
takes a spare and keeps the lifetime for the seal; until then the object has no scope, so
``close_scope`` deletes this process's unsealed ones of that scope itself, and one whose
array is collected unsealed is deleted (a ttl would only start at the seal, so ``empty``
with a ttl always creates). At most ``SPARE_COUNT`` signatures and ``spare_bytes`` bytes
(``FAASTUBE_SPARE_BYTES``, 0 turns spares off) are held per process; a thread frees a spare
unused for ``SPARE_IDLE_S``; all of them go when a create finds the pool exhausted (the
create is then tried again) and on ``close``, and the controller aborts them with the
process (Note [What a crash frees]). A forked child never takes its parent's spares.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time

import numpy as np

from . import protocol
from .connection import DEFAULT_REPLY_TIMEOUT_S, Connection, Pending
from .errors import FaasTubeError

SPARE_COUNT = 4               # signatures with a spare per process
SPARE_IDLE_S = 10.0           # a spare unused this long is freed


@dataclasses.dataclass(frozen=True)
class Signature:
    """What a spare fits: a put or ``empty`` of this shape, dtype and device."""
    shape: tuple
    dtype: str              # numpy's dtype.str (byte order included)
    device: str


@dataclasses.dataclass(frozen=True)
class Spare:
    """A create asked for ahead; its reply is read when the spare is taken or dropped."""
    create: Pending
    nbytes: int
    asked: float            # time.monotonic() when it was asked for


class Spares:
    """This process's spare objects (Note [Spare objects])."""

    def __init__(self, connection: Connection, limit_bytes: int):
        self.connection = connection
        self.limit_bytes = limit_bytes
        self.lock = threading.RLock()
        self._held: collections.OrderedDict[Signature, Spare] = collections.OrderedDict()
        self._put_before: collections.OrderedDict[Signature, bool] = collections.OrderedDict()
        self._reaper: threading.Thread | None = None

    def held(self) -> list[Spare]:
        """The spares held now, oldest first."""
        return list(self._held.values())

    def take(self, signature: Signature) -> protocol.Granted | None:
        """The create reply of this process's spare for ``signature``, or None (no spare, or
        its create failed: the caller creates as usual). Lock held."""
        spare = self._held.pop(signature, None)
        if spare is None:
            return None
        try:
            return self.connection.wait(spare.create, DEFAULT_REPLY_TIMEOUT_S)
        except FaasTubeError:
            return None

    def note_put(self, signature: Signature, nbytes: int) -> None:
        """A put (or ``empty``) of ``signature`` was made: ask for a spare of a signature put
        before. Lock held."""
        if 0 < nbytes <= self.limit_bytes:
            if signature in self._put_before:
                self._put_before.move_to_end(signature)
                self._ask(signature, nbytes)
            else:
                self._put_before[signature] = True
                if len(self._put_before) > 4 * SPARE_COUNT:
                    self._put_before.popitem(last=False)

    def _ask(self, signature: Signature, nbytes: int) -> None:
        if signature in self._held:
            return
        while self._held and (len(self._held) >= SPARE_COUNT or
                              sum(s.nbytes for s in self._held.values()) + nbytes > self.limit_bytes):
            self._drop(next(iter(self._held)))
        create = protocol.Create(signature.shape, protocol.dtype_name(np.dtype(signature.dtype)), nbytes,
                                 None, None, None, signature.device)
        pending = self.connection.send(create, connect=False)
        if pending is None:
            return
        self._held[signature] = Spare(pending, nbytes, time.monotonic())
        if self._reaper is None or not self._reaper.is_alive():
            self._reaper = threading.Thread(target=self._reap, name="faastube-spares", daemon=True)
            self._reaper.start()

    def _reap(self) -> None:
        """Free spares unused for SPARE_IDLE_S, so an idle process holds none for long."""
        while True:
            time.sleep(SPARE_IDLE_S / 4)
            with self.lock:
                now = time.monotonic()
                for signature, spare in list(self._held.items()):
                    if now - spare.asked > SPARE_IDLE_S:
                        self._drop(signature)
                if not self._held:
                    self._reaper = None
                    return

    def _drop(self, signature: Signature) -> None:
        """Free one spare: its writer lease ends unused and the pending object is deleted."""
        spare = self._held.pop(signature)
        try:
            granted = self.connection.wait(spare.create, DEFAULT_REPLY_TIMEOUT_S)
        except FaasTubeError:
            return                    # never created, or gone with its connection
        self.connection.releases.append((granted.lease, "abandon"))
        try:
            self.connection.send_only(protocol.Delete(granted.id))
        except FaasTubeError:
            pass

    def drop_all(self) -> None:
        """Free every spare of this process."""
        with self.lock:
            while self._held:
                self._drop(next(iter(self._held)))

    def forget(self) -> None:
        """After fork: the parent's spares are the parent's (Note [Spare objects])."""
        self.lock = threading.RLock()
        self._held.clear()
        self._put_before.clear()
        self._reaper = None
