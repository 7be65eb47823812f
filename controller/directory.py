"""The object directory in Redis: metadata and keys only, never payload bytes.

Key schema (also in docs/architecture.md):

    faastube:obj:<id>            hash   node, epoch, device, slab, offset, size, dtype, shape
                                        (JSON), state, ns, consumers, expiry, scope, created
    faastube:node:<node>         hash   epoch, pid, socket, started; expires 10 s after the
                                        controller's last heartbeat
    faastube:node:<node>:objects set    ids of the objects this node holds

``state`` is ``sealed`` while the bytes live; afterwards the key is a tombstone that says why
they are gone (``deleted``, ``consumed``, ``scope_closed``, ``expired``, ``lost``) and expires
after ``tombstone_ttl_s``. Pending objects (created, not sealed) live only in the local table:
only processes on this node can wait for them.

Note [The local table answers first]: the controller's in-memory table is the authority for
the objects whose bytes it holds; Redis is consulted on a miss (to say why an object is not
here). Writes (an object sealed, an object freed) go through one FIFO that a writer thread
drains into Redis in pipelined batches, so a seal costs no Redis round trip on the request
path (Note [Directory writes are coalesced]). A failed write, or a failed heartbeat (every 0.5 s), marks Redis down: from then
on creating and getting objects fail with RedisUnavailableError naming the URL (see
``require``), until a ping succeeds again. Writes queued meanwhile stay queued, in order, and
land when Redis is back: nothing is lost. The price: an object sealed in the instant before
the outage is noticed is published late; a controller that crashes inside that instant
leaves the object "unknown" rather than "lost" (its bytes are gone either way).

Note [Directory writes are coalesced]: the writer waits ``WRITE_DELAY_S`` after the first
write of a batch before it sends the batch, and an object published and freed within one
batch is written once, as its tombstone (its fields, the state saying why it went, the
tombstone's expiry): on a workflow whose hand-offs live for milliseconds, most objects never
cost Redis more than that one write, where each used to cost two pipelines of three commands.
On the 2-core VM the writer thread's CPU per traffic request fell from 1.5 ms to 0.3–0.5 ms
(docs/benchmarks.md). The delay is the most a sealed object reaches Redis late (for this
node's own gets it does not matter: they are answered from the local table, and the table
keeps why a recently freed object went).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
import urllib.parse

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from faastube.errors import InvalidArgumentError, RedisUnavailableError

log = logging.getLogger("faastube.controller")

PREFIX = "faastube:"
LIVE_STATES = ("sealed",)
NODE_TTL_S = 10
WRITE_DELAY_S = 0.02     # batch window of the directory writer


def redact(url: str) -> str:
    """The URL with any password replaced, fit for error messages and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return url


def object_key(object_id: str) -> str:
    return f"{PREFIX}obj:{object_id}"


def coalesce(batch: list[tuple]) -> list[tuple]:
    """The writes of ``batch`` with each object published and freed in it folded into one
    ``("tombstone", id, reason, fields)`` (Note [Directory writes are coalesced]). Writes of
    different objects are independent, so their order between objects may change; one
    object's stay in order."""
    out: dict[str, tuple] = {}
    extra: list[tuple] = []
    for op in batch:
        earlier = out.get(op[1])
        if op[0] == "forget" and earlier is not None and earlier[0] == "publish":
            out[op[1]] = ("tombstone", op[1], op[2], {**earlier[2], "state": op[2]})
        elif earlier is not None and op[0] == "publish" and earlier[0] == "publish":
            out[op[1]] = op                  # moved again before Redis heard: the last place wins
        elif earlier is not None:
            extra.append(op)                 # anything else after a write: kept, in its order
        else:
            out[op[1]] = op
    return list(out.values()) + extra


class Directory:
    def __init__(self, url: str, node: str, epoch: str, tombstone_ttl_s: int):
        self.url = url
        self.node = node
        self.epoch = epoch
        self.tombstone_ttl_s = tombstone_ttl_s
        self._redis = redis.Redis.from_url(
            url, socket_timeout=2.0, socket_connect_timeout=2.0, decode_responses=True,
            retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self._node_key = f"{PREFIX}node:{node}"
        self._node_objects = f"{PREFIX}node:{node}:objects"
        self.healthy = True
        self._queue: collections.deque[tuple] = collections.deque()   # ("hset"/"forget", …)
        self._queue_changed = threading.Condition()
        self._writing = False
        self._stopped = False
        self.dropped = 0            # writes Redis refused (each logged)
        self.redis_version: str | None = None   # from INFO, read when Redis comes up
        self.last_ok: float | None = None      # time.time() of the last heartbeat Redis took
        self._lock = threading.Lock()          # one sweep or heartbeat at a time
        self._writer = threading.Thread(target=self._write_loop, name="directory-writer", daemon=True)
        self._writer.start()

    # -- errors ---------------------------------------------------------------------------

    def _unavailable(self, exc: Exception) -> RedisUnavailableError:
        self.healthy = False
        return RedisUnavailableError(
            f"Redis at {redact(self.url)} is unreachable ({exc}); the controller needs it to "
            f"publish and resolve objects: start redis-server there or point FAASTUBE_REDIS / "
            f"--redis at a running one")

    def _call(self, fn):
        try:
            result = fn()
        except redis.RedisError as exc:
            raise self._unavailable(exc) from None
        self.healthy = True
        return result

    def require(self) -> None:
        """Raise RedisUnavailableError while Redis is known to be down (one ping to re-check)."""
        if not self.healthy:
            self._call(self._redis.ping)

    # -- objects --------------------------------------------------------------------------

    def publish(self, record) -> None:
        """Queue a sealed object's metadata for Redis (Note [The local table answers first])."""
        fields = {
            "node": self.node, "epoch": self.epoch, "device": record.region.slab.device,
            "slab": record.region.slab.id, "offset": record.region.offset,
            "size": record.region.nbytes, "dtype": record.dtype,
            "shape": json.dumps(list(record.shape)), "state": "sealed",
            "ns": record.namespace, "consumers": record.consumers or "",
            "expiry": record.expiry_unix or "", "scope": record.scope or "",
            "created": record.created_unix,
        }
        # Keep an expiring object's key as a tombstone for a while after its TTL, so a late
        # get says "expired" rather than "unknown".
        expire_at = int(record.expiry_unix) + self.tombstone_ttl_s if record.expiry_unix else None
        self._enqueue(("publish", record.id, fields, expire_at))

    def forget(self, object_id: str, reason: str) -> None:
        """Queue turning the object's key into a tombstone saying ``reason``."""
        self._enqueue(("forget", object_id, reason))

    def _enqueue(self, op: tuple) -> None:
        with self._queue_changed:
            self._queue.append(op)
            self._queue_changed.notify()

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every queued write has reached Redis; False if it did not in time."""
        deadline = time.monotonic() + timeout_s
        with self._queue_changed:
            while self._queue or self._writing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._queue_changed.notify()
                self._queue_changed.wait(min(remaining, 0.05))
        return True

    def _write_loop(self) -> None:
        while True:
            with self._queue_changed:
                while not self._queue and not self._stopped:
                    self._queue_changed.wait()
                if self._stopped and not self._queue:
                    return
            if not self._stopped:
                time.sleep(WRITE_DELAY_S)   # let the reply that queued this go out first
            with self._queue_changed:
                batch = [self._queue.popleft() for _ in range(min(500, len(self._queue)))]
                self._writing = True
            try:
                try:
                    self._write(batch)
                except redis.ResponseError:
                    # Redis refused a command (not a lost connection): write them one at a
                    # time, so the one it refuses is dropped and logged, and the rest go on.
                    self._write_each(batch)
                self.healthy = True
                retry = False
            except redis.RedisError as exc:
                if self.healthy:
                    log.warning("%s", self._unavailable(exc))
                self.healthy = False
                retry = True
            with self._queue_changed:
                if retry:
                    self._queue.extendleft(reversed(batch))
                self._writing = False
                self._queue_changed.notify_all()
                if retry and not self._stopped:
                    self._queue_changed.wait(0.25)     # the heartbeat will find Redis back

    def _write(self, batch) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for op in coalesce(batch):
            key = object_key(op[1])
            if op[0] == "publish":
                pipe.hset(key, mapping=op[2])
                pipe.sadd(self._node_objects, op[1])
                if op[3]:
                    pipe.expireat(key, op[3])
            else:
                if op[0] == "tombstone":
                    pipe.hset(key, mapping=op[3])
                else:
                    pipe.hset(key, "state", op[2])
                pipe.expire(key, self.tombstone_ttl_s)
                if op[0] == "forget":        # a tombstone's publish never reached the node's set
                    pipe.srem(self._node_objects, op[1])
        pipe.execute()

    def _write_each(self, batch) -> None:
        for op in batch:
            try:
                self._write([op])
            except redis.ResponseError as exc:
                log.warning("Redis refused the metadata of object %s (%s), dropped: %s", op[1], op[0], exc)
                self.dropped += 1

    def lookup(self, object_id: str) -> dict | None:
        return self._call(lambda: self._redis.hgetall(object_key(object_id))) or None

    # -- node -----------------------------------------------------------------------------

    def heartbeat(self, socket_path: str) -> None:
        """Refresh this node's key; marks Redis up or down (and wakes the writer when up)."""
        with self._lock:
            try:
                pipe = self._redis.pipeline(transaction=False)
                pipe.hset(self._node_key, mapping={"epoch": self.epoch, "pid": os.getpid(),
                                                   "socket": socket_path})
                pipe.expire(self._node_key, NODE_TTL_S)
                pipe.execute()
                if self.redis_version is None or not self.healthy:     # first contact, or back up
                    self.redis_version = str(self._redis.info("server").get("redis_version", "?"))
            except redis.RedisError as exc:
                if self.healthy:
                    log.warning("%s", self._unavailable(exc))
                self.healthy = False
                return
        self.healthy = True
        self.last_ok = time.time()
        with self._queue_changed:
            self._queue_changed.notify_all()

    def state(self, admin: bool) -> dict:
        """What ``status`` says of the directory: Redis up or down (as the last heartbeat,
        every 0.5 s, found it), its version, and the writes waiting or refused; the URL
        (without its password) for the controller's own user."""
        state = {"state": "up" if self.healthy else "down", "redis_version": self.redis_version,
                 "last_ok_s_ago": None if self.last_ok is None else round(time.time() - self.last_ok, 1),
                 "queued": len(self._queue), "dropped": self.dropped}
        if admin:
            state["url"] = redact(self.url)
        return state

    def check_node_free(self, watch_s: float = 1.2) -> None:
        """Raise InvalidArgumentError if another controller serves this node name: its key
        exists and its heartbeat renews it within ``watch_s`` (more than two heartbeats). A
        key nobody renews is a dead controller's, and this one takes the name over. Redis
        down: nothing to check yet (the sweep of old epochs checks again, later)."""
        try:
            first = self._redis.hgetall(self._node_key)
            if not first:
                return
            ttl_before = self._redis.pttl(self._node_key)
            time.sleep(watch_s)
            again = self._redis.hgetall(self._node_key)
            ttl_after = self._redis.pttl(self._node_key)
        except redis.RedisError:
            return
        renewed = again and (ttl_after > ttl_before - watch_s * 1000 + 200 or again != first)
        if renewed:
            raise InvalidArgumentError(
                f"node {self.node!r} is served by another controller (pid {again.get('pid')}, socket "
                f"{again.get('socket')}, epoch {again.get('epoch')}): stop it first, or start this one "
                f"with another --node / FAASTUBE_NODE")

    def mark_node_objects_lost(self, only_other_epochs: bool) -> int:
        """Tombstone as ``lost`` the objects this node held (at start: those of earlier epochs)."""
        def sweep():
            lost = 0
            for object_id in self._redis.smembers(self._node_objects):
                key = object_key(object_id)
                epoch, state = self._redis.hmget(key, "epoch", "state")
                if only_other_epochs and epoch == self.epoch:
                    continue
                if state in LIVE_STATES:
                    pipe = self._redis.pipeline(transaction=False)
                    pipe.hset(key, "state", "lost")
                    pipe.expire(key, self.tombstone_ttl_s)
                    pipe.execute()
                    lost += 1
                self._redis.srem(self._node_objects, object_id)
            return lost
        with self._lock:
            return self._call(sweep)

    def release_node(self) -> None:
        """At a clean stop: drop this node's heartbeat key if it is still ours, so the next
        controller for the name starts without watching it (check_node_free)."""
        try:
            if self._redis.hget(self._node_key, "epoch") == self.epoch:
                self._redis.delete(self._node_key)
        except redis.RedisError as exc:
            log.warning("could not release node %r in Redis: %s", self.node, exc)

    def close(self) -> None:
        with self._queue_changed:
            self._stopped = True
            self._queue_changed.notify_all()
        self._writer.join(5)
        self._redis.close()
