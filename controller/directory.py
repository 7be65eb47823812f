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
here) and written when an object is sealed (one pipelined write) and when it is freed.
Sealing is synchronous, so a put fails clearly while Redis is unreachable; tombstones are
written by a background queue that retries until Redis is back. Creating and getting refuse
to start while Redis is known to be unreachable (see ``require``), so put and get fail and
recover together.
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

from faastube.errors import RedisUnavailableError

log = logging.getLogger("faastube.controller")

PREFIX = "faastube:"
LIVE_STATES = ("sealed",)
NODE_TTL_S = 10


def redact(url: str) -> str:
    """The URL with any password replaced, fit for error messages and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return url


def object_key(object_id: str) -> str:
    return f"{PREFIX}obj:{object_id}"


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
        self._forget_queue: collections.deque[tuple[str, str]] = collections.deque()
        self._lock = threading.Lock()

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
        """Write a sealed object's metadata; synchronous, raises when Redis is down."""
        fields = {
            "node": self.node, "epoch": self.epoch, "device": record.region.slab.device,
            "slab": record.region.slab.id, "offset": record.region.offset,
            "size": record.region.nbytes, "dtype": record.dtype,
            "shape": json.dumps(list(record.shape)), "state": "sealed",
            "ns": record.namespace, "consumers": record.consumers or "",
            "expiry": record.expiry_unix or "", "scope": record.scope or "",
            "created": record.created_unix,
        }
        key = object_key(record.id)

        def write():
            pipe = self._redis.pipeline(transaction=False)
            pipe.hset(key, mapping=fields)
            pipe.sadd(self._node_objects, record.id)
            if record.expiry_unix:
                # Keep the key as a tombstone for a while after the TTL, so a late get says
                # "expired" rather than "unknown".
                pipe.expireat(key, int(record.expiry_unix) + self.tombstone_ttl_s)
            pipe.execute()
        self._call(write)

    def forget(self, object_id: str, reason: str) -> None:
        """Turn the object's key into a tombstone saying ``reason``; queued, never blocks."""
        self._forget_queue.append((object_id, reason))

    def lookup(self, object_id: str) -> dict | None:
        return self._call(lambda: self._redis.hgetall(object_key(object_id))) or None

    # -- node -----------------------------------------------------------------------------

    def heartbeat(self, socket_path: str) -> None:
        """Refresh this node's key and flush queued tombstones; marks Redis up or down."""
        with self._lock:
            try:
                pipe = self._redis.pipeline(transaction=False)
                pipe.hset(self._node_key, mapping={"epoch": self.epoch, "pid": os.getpid(),
                                                   "socket": socket_path})
                pipe.expire(self._node_key, NODE_TTL_S)
                pipe.execute()
                self.healthy = True
                self._flush_forgets()
            except redis.RedisError as exc:
                if self.healthy:
                    log.warning("%s", self._unavailable(exc))
                self.healthy = False

    def _flush_forgets(self) -> None:
        while self._forget_queue:
            batch = [self._forget_queue.popleft() for _ in range(min(500, len(self._forget_queue)))]
            try:
                pipe = self._redis.pipeline(transaction=False)
                for object_id, reason in batch:
                    key = object_key(object_id)
                    pipe.hset(key, "state", reason)
                    pipe.expire(key, self.tombstone_ttl_s)
                    pipe.srem(self._node_objects, object_id)
                pipe.execute()
            except redis.RedisError:
                self._forget_queue.extendleft(reversed(batch))
                raise

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
            self._flush_forgets_quietly()
            return self._call(sweep)

    def _flush_forgets_quietly(self) -> None:
        try:
            self._flush_forgets()
        except redis.RedisError:
            pass

    def close(self) -> None:
        self._redis.close()
