"""The object table: objects, their leases, scopes and TTLs, and the sessions that hold them.

Note [Leases pin memory]: every view of an object's bytes in a function process is covered
by a lease: the writer's view from ``create`` and each reader's view from ``get``. An object
leaves the table ("unlinked": deleted, consumed, expired, scope closed, aborted) as soon as
its reason arises, so nobody can get it any more, but its region goes back to the allocator
only when its last lease ends. The SDK ends a lease when the array (and every view of it)
is garbage-collected; the controller ends all of a process's leases when its socket closes.
Hence a freed object can never show another object's bytes.

Note [Consumers]: with ``consumers=N`` an object is unlinked once N reader leases have
*consumed* it: a lease consumes when the reader calls ``faastube.release`` or when its view
is garbage-collected. A reader that dies does not consume (another may retry the get).

Note [What a crash frees]: when a process's socket closes, the objects it created and did
not seal are unlinked ("aborted") and all its leases end without consuming. Sealed objects
stay: they were handed on. If the process is still alive (it closed or lost its connection
but may still hold views), its leases end only when it exits, which the controller learns
from a pidfd (Linux ≥ 5.3); where no pidfd can be had (the peer's pid is not visible in the
controller's PID namespace), they end at once.

Every method runs under ``self.lock``; Redis calls that can block are made outside it.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import os
import select
import secrets
import threading
import time

from faastube.cuda import HOST, in_host_memory
from faastube.errors import (InvalidArgumentError, InvalidStateError, NamespaceError, ObjectDeletedError,
                             ObjectExpiredError, ObjectLostError, ObjectNotFoundError, PoolExhaustedError,
                             QuotaExceededError, FaasTubeTimeoutError, UnknownObjectError)
from faastube.protocol import MAX_STATUS_NAMESPACES, SlabDescriptor

from .eviction import MOVE_WAIT_S, Evictor, Grow, Move
from .pool import CONTROLLER, Pool, Region

FORGOTTEN_CAP = 100_000    # local tombstones kept in memory (Redis keeps them longer)
RELEASES_PER_LOCK = 256    # releases applied per hold of the table's lock


@dataclasses.dataclass(eq=False)
class ObjectRecord:
    id: str
    namespace: str
    region: Region
    dtype: str
    shape: tuple
    consumers: int | None
    scope: str | None
    expires_at: float | None      # time.monotonic() deadline
    expiry_unix: float | None     # the same deadline as wall-clock time, for Redis and status
    created_unix: float
    creator: "Session"
    state: str = "pending"        # pending → sealed
    consumed: int = 0
    leases: int = 0
    unlinked: str | None = None   # why it left the table, once it has
    # Note [Queue-aware eviction] (controller/eviction.py): the device it was made on (its
    # region may have moved to the host tier since), the function that made it, when it was
    # sealed and last got, how many gets it had, and whether its bytes are being moved.
    home: str = HOST
    function: str | None = None
    sealed_at: float = 0.0
    used_at: float = 0.0
    gets: int = 0
    moving: bool = False


@dataclasses.dataclass(eq=False)
class Lease:
    id: int
    record: ObjectRecord
    writer: bool
    region: Region                # the bytes this lease pins (the object's, or its replica)
    counted: bool = False
    # Note [Copies for another device]: a get on another device than the object's leases a
    # copy (the replica) made for it; the replica is freed when the lease ends, or, if the
    # lease ends while the copy still runs, when the copy finishes.
    replica: bool = False
    copying: bool = False
    ended: bool = False
    restore: Move | None = None   # a get that brings an evicted object back (eviction.py)


@dataclasses.dataclass(frozen=True)
class Copy:
    """Bytes to move before a grant is answered (done by the transfer engine, unlocked)."""
    src: Region
    dst: Region


class WouldWait(Exception):
    """A get must wait: for a pending object's seal (``reason`` "seal"), or for a move between
    tiers to end ("move"). The
    server parks it (Note [Waiting gets own no thread], controller/server.py) and asks again
    when the table changes; after ``wait_s`` it answers ``expired``."""

    def __init__(self, object_id: str, reason: str, wait_s: float, expired: Exception):
        super().__init__(object_id)
        self.object_id, self.reason, self.wait_s, self.expired = object_id, reason, wait_s, expired


def _watches(session: Session, slab) -> bool:
    """Whether ``session`` watches ``slab`` (Note [Slabs mapped ahead]): its namespace's, of
    the tiers it asked for."""
    return (session.watch is not None and session.namespace == slab.namespace
            and (session.watch == "all" or not in_host_memory(slab.device)))


def _not_sealed(object_id: str, timeout: float) -> FaasTubeTimeoutError:
    return FaasTubeTimeoutError(f"object {object_id} was not sealed within {timeout:g} s: its producer "
                                f"is still writing it (or forgot to seal it); pass a longer timeout")


def _still_moving(object_id: str) -> FaasTubeTimeoutError:
    return FaasTubeTimeoutError(f"object {object_id} is still being moved between tiers after {MOVE_WAIT_S:g} s")


class _NoRoom(Exception):
    """A device tier had no room (lock held): evict, unlocked, and try again."""

    def __init__(self, pool: Pool, error: Exception, nbytes: int):
        self.pool, self.error, self.nbytes = pool, error, nbytes


class _Missing(Exception):
    """The object is not in the table: ``forgotten`` says why, else Redis must (unlocked)."""

    def __init__(self, forgotten):
        self.forgotten = forgotten


class _Waiting:
    """How long one request has waited for eviction to make room (Note [Queue-aware
    eviction]), counted in its pool."""

    def __init__(self):
        self.pool: Pool | None = None
        self.since = 0.0

    def start(self, pool: Pool, wait_s: float) -> float:
        """The deadline (the first call counts the wait)."""
        if self.pool is None:
            self.pool, self.since = pool, time.monotonic()
            pool.waits[0] += 1
            pool.waiting += 1           # restores ahead leave the pool's holes to it meanwhile
        return self.since + wait_s

    def done(self, failed: bool = False) -> None:
        if self.pool is not None:
            self.pool.waits[1] += time.monotonic() - self.since
            self.pool.waits[2] += failed
            self.pool.waiting -= 1
            self.pool = None


class Session:
    """One client connection: who it is and what it holds."""

    _ids = itertools.count(1)

    def __init__(self, pid: int, uid: int, gid: int, admin: bool):
        self.id = next(self._ids)
        self.pid, self.uid, self.gid = pid, uid, gid
        self.admin = admin
        self.namespace: str | None = None
        self.client: str | None = None
        self.function: str | None = None          # the function it last said it runs
        self.slabs_sent: dict[int, bool] = {}     # slab id → a writable descriptor was sent
        self.leases: dict[int, Lease] = {}
        self.pending: set[str] = set()            # objects created here, not sealed yet
        self.waiting_gets = 0                     # gets of this session waiting (parked)
        self.retired: list[int] = []              # retired slabs to tell the client about
        self.watch: str | None = None             # the slabs it is sent unasked: "gpu", "all" (Watch)
        self.closed = False
        self.pidfd = open_pidfd(pid)

    def exited(self) -> bool:
        """True once the peer process has exited (or when it cannot be watched)."""
        if self.pidfd is None:
            return True
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        return bool(poller.poll(0))

    def close_pidfd(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def open_pidfd(pid: int) -> int | None:
    if pid <= 0 or not hasattr(os, "pidfd_open"):
        return None
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


@dataclasses.dataclass(frozen=True)
class Grant:
    """What a create or get hands to the client: the object, its lease, slab descriptors."""
    record: ObjectRecord
    lease: Lease
    fds: list            # [(dup'ed fd, protocol.SlabDescriptor)], closed by the server
    copy: Copy | None = None


_GONE = {
    "deleted": (ObjectDeletedError, "object {id} was deleted"),
    "consumed": (ObjectDeletedError, "object {id} was freed after all its consumers released it"),
    "scope_closed": (ObjectDeletedError, "object {id} was freed when its scope was closed"),
    "aborted": (ObjectDeletedError, "object {id} was never sealed: its producer exited or "
                                    "failed before sealing it"),
    "expired": (ObjectExpiredError, "object {id} expired: its ttl ran out"),
    "lost": (ObjectLostError, "object {id} is lost: the controller that held its bytes "
                              "restarted or stopped; produce it again"),
}


def gone_error(object_id: str, reason: str) -> ObjectNotFoundError:
    cls, text = _GONE.get(reason, (UnknownObjectError, "object {id} is gone ({reason})"))
    return cls(text.format(id=object_id, reason=reason))


class ObjectTable:
    def __init__(self, pools: list[Pool], directory, eviction: str = "queue", evict_wait_s: float = 2.0,
                 move=None):
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        # Note [Waiting gets own no thread] (controller/waiting.py): object id → gets parked
        # on it; the ids of those sealed, unlinked or moved since the waiter last looked;
        # sessions that closed with gets parked.
        self.parked: dict[str, int] = {}
        self.settled: set[str] = set()
        self.closed_sessions: set = set()
        self.pools = {pool.device: pool for pool in pools}     # "host" and each GPU's UUID
        self.directory = directory
        self.objects: dict[str, ObjectRecord] = {}
        self.sessions: dict[int, Session] = {}
        self._orphans: list[Session] = []         # closed, but their process still lives
        self._forgotten: collections.OrderedDict[str, tuple[str, str]] = collections.OrderedDict()
        self._scopes: dict[tuple[str, str], set[str]] = {}
        self._expiries: list[tuple[float, str]] = []
        self._lease_ids = itertools.count(1)
        for pool in pools:
            pool.on_retire = self._slab_retired
            pool.on_create = self._slab_created
        # Called (lock held, so it must not take it) when a watching session has descriptors
        # or retired slabs to be sent: the server's push thread (Note [Slabs mapped ahead]).
        self.push_to = lambda session: None
        # Copies a region's bytes into another, unlocked (controller/transfer.py move_region).
        self.move = move
        self.evictor = Evictor(self, eviction, evict_wait_s)
        self.wake_reserver = lambda: None   # the controller's reserver, once it has one

    # -- sessions -------------------------------------------------------------------------

    def open_session(self, session: Session) -> None:
        with self.lock:
            self.sessions[session.id] = session

    def close_session(self, session: Session) -> None:
        """Note [What a crash frees]."""
        with self.lock:
            self.sessions.pop(session.id, None)
            session.closed = True
            for pool in self.pools.values():
                pool.writer_gone(session.id)
            if session.waiting_gets:
                self.closed_sessions.add(session)
            self.changed.notify_all()     # waiting gets of this session give up
            for object_id in list(session.pending):
                record = self.objects.get(object_id)
                if record is not None and record.state == "pending":
                    self._unlink(record, "aborted")
            session.pending.clear()
            if session.leases and not session.exited():
                self._orphans.append(session)
                return
            self._end_session_leases(session)

    def _end_session_leases(self, session: Session) -> None:
        for lease in list(session.leases.values()):
            self._end_lease(session, lease)
        session.close_pidfd()

    # -- lifecycle ------------------------------------------------------------------------

    def pool_for(self, device: str) -> Pool:
        pool = self.pools.get(device)
        if pool is None:
            raise InvalidArgumentError(
                f"device {device!r} is not one of this node's pools: {', '.join(self.pools)}"
                + ("" if len(self.pools) > 1 else " (the controller found no GPU, or runs with "
                                                   "--gpus none)"))
        return pool

    def create(self, session: Session, shape, dtype: str, nbytes: int, consumers, ttl, scope,
               device: str = HOST, spill: bool = False) -> Grant:
        """A pending object on ``device``; with ``spill`` (a put's, which writes wherever it is
        granted) on the host tier instead where the device tier is full and the new object
        would be the first to move off it (Note [Puts that rank last])."""
        self.directory.require()      # fail before the caller writes, not at seal
        pool = self.pool_for(device)
        waiting = _Waiting()
        grown = False
        try:
            while True:
                with self.lock:
                    try:
                        region = self._allocate(pool, session.namespace, nbytes, writer=session.id)
                    except _NoRoom as no_room:
                        region = (self.evictor.spill(pool, session, nbytes, may_grow=not grown)
                                  if spill else None)
                        if isinstance(region, Grow):            # host room first, off the lock
                            moves, region, grown = [region], None, True
                        elif region is None:
                            moves = self._room_for(no_room, session.namespace, waiting)
                    if region is not None:
                        waiting.done()
                        record = ObjectRecord(
                            id=secrets.token_hex(16), namespace=session.namespace, region=region,
                            dtype=dtype, shape=tuple(shape), consumers=None, scope=None, expires_at=None,
                            expiry_unix=None, created_unix=round(time.time(), 3), creator=session,
                            home=device, function=session.function)
                        self.objects[record.id] = record
                        session.pending.add(record.id)
                        self._set_lifetime(record, consumers, ttl, scope)
                        return self._grant(session, record, writer=True)
                self.evictor.run(moves)
        finally:
            self._end_wait(waiting)

    def _end_wait(self, waiting: _Waiting) -> None:
        """Count a wait for room that ended in an error (the others ended under the lock)."""
        if waiting.pool is not None:
            with self.lock:
                waiting.done()

    def _allocate(self, pool: Pool, namespace: str, nbytes: int, writer: int = CONTROLLER) -> Region:
        """A region in ``pool`` that ``writer`` may write, a session's id or the controller
        (Note [Slabs of one writer], controller/pool.py) (lock held); _NoRoom where
        eviction could make some."""
        try:
            return pool.allocate(namespace, nbytes, writer=writer)
        except (PoolExhaustedError, QuotaExceededError) as exc:
            if self.evictor.serves(pool):
                raise _NoRoom(pool, exc, nbytes) from None
            raise

    def _room_for(self, no_room: _NoRoom, namespace: str, waiting: _Waiting) -> list:
        """Moves that make room for the bytes asked (lock held; the caller runs them unlocked and
        tries again), or an empty list after waiting a little for moves already running; once
        ``--evict-wait`` has passed, or when nothing can move, the error that stopped it."""
        pool, error, nbytes = no_room.pool, no_room.error, no_room.nbytes
        deadline = waiting.start(pool, self.evictor.wait_s)
        moves = self.evictor.pick(pool, nbytes, namespace, own_only=isinstance(error, QuotaExceededError))
        if moves:
            return moves
        remaining = deadline - time.monotonic()
        if remaining > 0:       # moves of others may end, views be dropped: look again soon
            self.changed.wait(min(remaining, 0.05))
            return []
        waiting.done(failed=True)
        raise type(error)(f"{error} (eviction to the host tier could not make room within "
                          f"{self.evictor.wait_s:g} s, --evict-wait: the objects left there are in use "
                          f"or pending, or the host tier is full)")

    def _set_lifetime(self, record: ObjectRecord, consumers, ttl, scope) -> None:
        record.consumers, record.scope = consumers, scope
        if scope:
            self._scopes.setdefault((record.namespace, scope), set()).add(record.id)
        if ttl:
            record.expires_at = time.monotonic() + ttl
            record.expiry_unix = round(time.time() + ttl, 3)
            heapq.heappush(self._expiries, (record.expires_at, record.id))

    def seal(self, session: Session, object_id: str, drop_writer: bool,
             lifetime: tuple | None = None) -> ObjectRecord:
        """``lifetime``: (consumers, ttl, scope) for an object created without any (a spare,
        Note [Spare objects] in faastube/client.py)."""
        with self.lock:
            record = self._require(session, object_id)
            if record.state != "pending":
                raise InvalidStateError(f"object {object_id} is already sealed")
            if record.creator is not session:
                raise InvalidStateError(f"object {object_id} can only be sealed by the process "
                                        f"that created it")
            if lifetime is not None:
                if record.consumers is not None or record.scope or record.expires_at is not None:
                    raise InvalidStateError(f"object {object_id} got its consumers, ttl and scope "
                                            f"when it was created; a seal cannot change them")
                self._set_lifetime(record, *lifetime)
            record.state = "sealed"
            record.sealed_at = record.used_at = time.monotonic()
            record.function = session.function or record.function
            self.settle(record)
            if record.region.slab.device != record.home:     # a spilled put: off its tier already
                self.evictor.evicted[record.id] = record
            self.directory.publish(record)      # queued: Note [The local table answers first]
            session.pending.discard(object_id)
            if drop_writer:
                for lease in list(session.leases.values()):
                    if lease.writer and lease.record is record:
                        self._end_lease(session, lease)
            self.changed.notify_all()
        return record

    def get(self, session: Session, object_id: str, timeout: float,
            device: str | None = None, prefer: str | None = None) -> Grant:
        """Lease a sealed object; for a pending one (``timeout`` > 0) or one moving between
        tiers raise WouldWait: the server parks the get (Note [Waiting gets own no thread],
        controller/waiting.py). ``device``: where the caller wants it (default: where it was
        made, except that an object made on a GPU goes to ``prefer``, the caller's own GPU,
        or to the host for a caller without one); elsewhere means a copy (Note [Copies for
        another device]), and an evicted object asked for on its device is restored (Note
        [Queue-aware eviction])."""
        self.directory.require()
        waiting = _Waiting()
        try:
            while True:
                with self.lock:
                    try:
                        grant = self._get(session, object_id, timeout, device, prefer)
                    except _NoRoom as no_room:
                        moves = self._room_for(no_room, session.namespace, waiting)
                    except _Missing as missing:
                        forgotten = missing.forgotten
                        break
                    else:
                        waiting.done()
                        return grant
                self.evictor.run(moves)
        finally:
            self._end_wait(waiting)
        if forgotten is not None:
            self._check_namespace(session, forgotten[0], object_id)
            raise gone_error(object_id, forgotten[1])
        raise self._resolve_elsewhere(session, object_id)       # Redis: never under the lock

    def _get(self, session: Session, object_id: str, timeout: float,
             device: str | None, prefer: str | None) -> Grant:
        record = self.objects.get(object_id)
        if record is None:
            raise _Missing(self._forgotten.get(object_id))
        self._check_namespace(session, record.namespace, object_id)
        if record.state == "pending" and timeout > 0:
            raise WouldWait(object_id, "seal", timeout, _not_sealed(object_id, timeout))
        if record.moving and record.unlinked is None:       # a bounded copy: parked until it ends
            raise WouldWait(object_id, "move", MOVE_WAIT_S, _still_moving(object_id))
        if session.closed:
            raise InvalidStateError("the connection closed while waiting")
        if record.unlinked is not None:
            raise gone_error(object_id, record.unlinked)
        if record.state == "pending":
            raise _not_sealed(object_id, timeout)
        where = record.region.slab.device
        target = device or (prefer if record.home != HOST else None) or HOST
        if target == where:
            grant = self._grant(session, record, writer=False)
        else:
            region = self._allocate(self.pool_for(target), session.namespace, record.region.nbytes)
            if target == record.home and record.leases == 0:       # restore it there
                record.moving = True
                grant = self._grant(session, record, writer=False, region=region)
                grant.lease.restore = Move(record, record.region, region, "restore")
            else:
                grant = self._grant(session, record, writer=False, region=region, replica=True)
            grant.lease.copying = True
            grant = dataclasses.replace(grant, copy=Copy(record.region, region))
        record.used_at = time.monotonic()
        record.gets += 1
        return grant

    def copied(self, lease: Lease, ok: bool = True, seconds: float = 0.0) -> None:
        """The copy for ``lease`` has finished (or failed): a restore ends (Note
        [Queue-aware eviction]); a replica is freed if the lease ended meanwhile."""
        with self.lock:
            lease.copying = False
            if lease.restore is not None:
                move, lease.restore = lease.restore, None
                self.evictor.finish(move, ok, seconds)
            elif lease.ended and lease.replica:
                self.free_region(lease.region)

    def abandon(self, session: Session, grant: Grant) -> None:
        """Undo a grant the client never received (it failed after the table made it): end
        its lease without consuming, forget the descriptors it would have carried."""
        with self.lock:
            for _fd, descriptor in grant.fds:
                session.slabs_sent.pop(descriptor.slab, None)
            if grant.lease.id in session.leases:
                self._end_lease(session, grant.lease)

    def release(self, session: Session, releases) -> None:
        """Note [Consumers] and Note [Leases pin memory]. A long list is worked through
        RELEASES_PER_LOCK at a time, so other clients' requests go on in between."""
        for start in range(0, len(releases), RELEASES_PER_LOCK):
            with self.lock:
                for lease_id, kind in releases[start:start + RELEASES_PER_LOCK]:
                    lease = session.leases.get(lease_id)
                    if lease is None:
                        continue        # already ended, or not this session's: nothing to do
                    if kind != "abandon":
                        self._consume(lease)
                    if kind != "consume":
                        self._end_lease(session, lease)

    def delete(self, session: Session, object_id: str) -> None:
        with self.lock:
            self._unlink(self._require(session, object_id), "deleted")

    def close_scope(self, session: Session, scope: str) -> int:
        with self.lock:
            ids = self._scopes.pop((session.namespace, scope), set())
            for object_id in ids:
                self._unlink(self.objects[object_id], "scope_closed", scope_index=False)
            return len(ids)

    def housekeeping(self, now: float | None = None) -> None:
        """Expire objects whose TTL ran out and retire slabs that stayed empty."""
        now = time.monotonic() if now is None else now
        # The devices' free memory, asked of the driver before the lock is taken.
        free = {device: pool.probe_for_give_back() for device, pool in self.pools.items()}
        with self.lock:
            while self._expiries and self._expiries[0][0] <= now:
                _deadline, object_id = heapq.heappop(self._expiries)
                record = self.objects.get(object_id)
                if record is not None:
                    self._unlink(record, "expired")
            for session in [s for s in self._orphans if s.exited()]:
                self._orphans.remove(session)
                self._end_session_leases(session)
            retired, short = [], {}
            for device, pool in self.pools.items():
                retired += pool.retire_idle(now, close=False)
                given = pool.give_back(free[device])
                retired += given
                if free[device] is not None:
                    free[device] += sum(slab.size for slab in given)
                    if free[device] < pool.watermark and self.evictor.serves(pool):
                        short[device] = pool.watermark - free[device]
        for slab in retired:            # out of the lock: requests go on meanwhile
            slab.close()
        if short:
            # Not enough empty slabs to give back (Note [Giving memory back]): empty some,
            # growing the host tier first where it has no room for them.
            for _round in range(2):
                with self.lock:
                    moves = [move for device, need in short.items()
                             for move in self.evictor.pick_slabs(self.pools[device], need)]
                self.evictor.run(moves)
                if not moves or any(isinstance(move, Move) for move in moves):
                    break
            with self.lock:
                retired = [slab for device in short for slab in self.pools[device].give_back(free[device])]
            for slab in retired:
                slab.close()

    def shutdown(self) -> None:
        with self.lock:
            for record in list(self.objects.values()):
                self._unlink(record, "lost")
            for pool in self.pools.values():
                pool.close()

    # -- internals (lock held) ------------------------------------------------------------

    def _require(self, session: Session, object_id: str) -> ObjectRecord:
        record = self.objects.get(object_id)
        if record is None:
            forgotten = self._forgotten.get(object_id)
            if forgotten is not None:
                self._check_namespace(session, forgotten[0], object_id)
                raise gone_error(object_id, forgotten[1])
            raise UnknownObjectError(f"no object {object_id} on this node")
        self._check_namespace(session, record.namespace, object_id)
        return record

    @staticmethod
    def _check_namespace(session: Session, namespace: str, object_id: str) -> None:
        if namespace != session.namespace:
            raise NamespaceError(f"object {object_id} belongs to another namespace than "
                                 f"{session.namespace!r}")

    def _grant(self, session: Session, record: ObjectRecord, writer: bool,
               region: Region | None = None, replica: bool = False) -> Grant:
        lease = Lease(next(self._lease_ids), record, writer, region or record.region, replica=replica)
        session.leases[lease.id] = lease
        record.leases += 1
        fds = []
        slab = lease.region.slab
        if writer and not self.pools[slab.device].may_write(slab, session.id):
            raise AssertionError(f"slab {slab.id} is not session {session.id}'s to write")
        sent_writable = session.slabs_sent.get(slab.id)
        if sent_writable is None or (writer and not sent_writable):
            fds.append((os.dup(slab.fd(writer)), SlabDescriptor(slab.id, slab.size, writer, slab.device)))
            session.slabs_sent[slab.id] = writer or bool(sent_writable)
        return Grant(record, lease, fds)

    def _consume(self, lease: Lease) -> None:
        if lease.writer or lease.counted:
            return
        lease.counted = True
        record = lease.record
        record.consumed += 1
        if record.consumers and record.consumed >= record.consumers and record.unlinked is None:
            self._unlink(record, "consumed")

    def _end_lease(self, session: Session, lease: Lease) -> None:
        del session.leases[lease.id]
        lease.ended = True
        if lease.replica and not lease.copying:
            self.free_region(lease.region)
        record = lease.record
        record.leases -= 1
        if record.unlinked is not None and record.leases == 0 and not record.moving:
            self.free_region(record.region)

    def free_region(self, region: Region) -> None:
        self.pools[region.slab.device].free(region)
        if region.slab.device != HOST:
            # Room for a request waiting for some, else for a restore ahead (Note
            # [Queue-aware eviction]).
            self.changed.notify_all()
            self.evictor.wake()

    def _unlink(self, record: ObjectRecord, reason: str, scope_index: bool = True) -> None:
        """Take an object out of the table; its memory follows when its leases end."""
        if record.unlinked is not None:
            return
        record.unlinked = reason
        del self.objects[record.id]
        self.evictor.evicted.pop(record.id, None)
        record.creator.pending.discard(record.id)
        if scope_index and record.scope:
            ids = self._scopes.get((record.namespace, record.scope))
            if ids is not None:
                ids.discard(record.id)
                if not ids:
                    del self._scopes[(record.namespace, record.scope)]
        self._forgotten[record.id] = (record.namespace, reason)
        if len(self._forgotten) > FORGOTTEN_CAP:
            self._forgotten.popitem(last=False)
        if record.state == "sealed":      # pending objects never reached Redis
            self.directory.forget(record.id, reason)
        if record.leases == 0 and not record.moving:     # a move ends by freeing it
            self.free_region(record.region)
        self.settle(record)
        self.changed.notify_all()

    def settle(self, record: ObjectRecord) -> None:
        """(lock held) ``record`` was sealed, unlinked or ended a move: gets parked on it
        are asked again (Note [Waiting gets own no thread])."""
        if record.id in self.parked:
            self.settled.add(record.id)

    def holds_nothing(self, session: Session) -> bool:
        """Whether closing ``session``'s connection would lose it nothing: no lease, no object
        being written, no waiting get (Note [Bounded connections], controller/server.py)."""
        with self.lock:
            return not (session.leases or session.pending or session.waiting_gets or session.watch)

    def may_answer(self, object_id: str, session: Session) -> bool:
        """(lock held) Whether a get of ``object_id`` parked by ``session`` would not wait now."""
        record = self.objects.get(object_id)
        return (session.closed or record is None or record.unlinked is not None
                or (record.state != "pending" and not record.moving))

    def _slab_retired(self, slab) -> None:
        for session in self.sessions.values():
            if session.slabs_sent.pop(slab.id, None) is not None:
                session.retired.append(slab.id)
                if session.watch is not None:
                    self.push_to(session)

    # -- slabs mapped ahead (Note [Slabs mapped ahead], faastube/watcher.py) ----------------

    def watch(self, session: Session, tiers: str) -> None:
        """Make ``session`` a watcher of its namespace's slabs: what there is now goes at once."""
        with self.lock:
            session.watch = tiers
            self.push_to(session)

    def _slab_created(self, slab) -> None:
        for session in self.sessions.values():
            if _watches(session, slab) and not session.closed:
                self.push_to(session)

    def take_watched(self, session_id: int) -> tuple[list, list[int]] | None:
        """For a watching session: ([(dup'ed read-only fd, SlabDescriptor)] of its namespace's
        slabs (of its tiers) not yet sent to it, the retired slabs to tell it of); None if
        the session is gone. The caller sends them and closes the descriptors."""
        with self.lock:
            session = self.sessions.get(session_id)
            if session is None or session.closed or session.watch is None:
                return None
            fds = []
            for pool in self.pools.values():
                for slab in pool.slabs.values():
                    if _watches(session, slab) and slab.id not in session.slabs_sent:
                        fds.append((os.dup(slab.fd(False)), SlabDescriptor(slab.id, slab.size, False, slab.device)))
                        session.slabs_sent[slab.id] = False
            retired, session.retired = session.retired, []
            return fds, retired

    def take_retired(self, session: Session) -> list[int]:
        with self.lock:
            retired, session.retired = session.retired, []
            return retired

    # -- misses ---------------------------------------------------------------------------

    def _resolve_elsewhere(self, session: Session, object_id: str) -> ObjectNotFoundError:
        """Why an object that is not in the local table cannot be read (Redis decides)."""
        info = self.directory.lookup(object_id)
        if info is None:
            return UnknownObjectError(
                f"no object {object_id}: it never existed, or it was freed more than the "
                f"tombstone time ago")
        self._check_namespace(session, info.get("ns"), object_id)
        state = info.get("state")
        if state != "sealed":
            return gone_error(object_id, state)
        if info.get("node") != self.directory.node:
            return ObjectNotFoundError(
                f"object {object_id} is held by node {info.get('node')!r}; fetching objects from "
                f"another node is not supported yet: run the consumer on that node")
        if info.get("epoch") != self.directory.epoch:
            return gone_error(object_id, "lost")
        expiry = info.get("expiry")
        if expiry and float(expiry) <= time.time():
            return gone_error(object_id, "expired")
        return gone_error(object_id, "deleted")

    # -- status ---------------------------------------------------------------------------

    def status(self, session: Session) -> dict:
        with self.lock:
            namespaces: dict[str, dict] = {}

            def entry(ns):
                return namespaces.setdefault(ns, {
                    "slabs": 0, "reserved": 0, "used": 0, "objects": 0, "pending": 0,
                    "sealed": 0, "freeing": 0, "object_bytes": 0, "leases": 0, "clients": 0,
                    "waiting_gets": 0})

            for pool in self.pools.values():
                for slab in pool.slabs.values():
                    e = entry(slab.namespace)
                    e["slabs"] += 1
                    e["reserved"] += slab.size
                    e["used"] += slab.allocator.used
            for record in self.objects.values():
                e = entry(record.namespace)
                e["objects"] += 1
                e[record.state] += 1
                e["object_bytes"] += record.region.nbytes
            for other in [*self.sessions.values(), *self._orphans]:
                if other.namespace is not None:
                    e = entry(other.namespace)
                    e["clients"] += other.id in self.sessions
                    e["waiting_gets"] += other.waiting_gets
                    e["leases"] += len(other.leases)
                    e["freeing"] += sum(1 for lease in other.leases.values()
                                        if lease.record.unlinked is not None)
            if not session.admin:
                namespaces = {ns: v for ns, v in namespaces.items() if ns == session.namespace}
            omitted = max(0, len(namespaces) - MAX_STATUS_NAMESPACES)
            if omitted:         # the largest holders: the reply must fit one frame
                namespaces = dict(sorted(namespaces.items(), key=lambda item: -item[1]["reserved"])
                                  [:MAX_STATUS_NAMESPACES])
            evicted: dict[str, list[int]] = {}      # home device → [objects, bytes] on the host now
            for record in self.evictor.evicted.values():
                entry_ = evicted.setdefault(record.home, [0, 0])
                entry_[0] += 1
                entry_[1] += record.region.nbytes
            pools = [{**pool.stats(), "eviction": self.evictor.policy if self.evictor.serves(pool) else "none",
                      "evicted": dict(zip(("objects", "bytes"), evicted.get(pool.device, [0, 0])))}
                     for pool in self.pools.values()]
            if not session.admin:
                pools = [{k: pool[k] for k in ("device", "name", "limit", "slab_size")} for pool in pools]
            return {"pools": pools, "namespaces": namespaces, "namespaces_omitted": omitted or None,
                    "clients": len(self.sessions) if session.admin else None}

