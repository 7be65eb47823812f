"""Requests in, replies out. Handlers validate meaning (the protocol module validated form),
call the object table and return the typed reply (faastube/protocol.py); they never touch
the socket.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import math
import os
import time
from typing import TYPE_CHECKING

from faastube import __version__, protocol
from faastube.errors import InvalidArgumentError, InvalidStateError, NamespaceError

from .objects import Grant, ObjectTable, Session
from .transfer import TransferEngine

if TYPE_CHECKING:
    from .metrics import RequestStats
    from .reserver import Reserver


def load_secrets(path: str | None) -> dict[str, str]:
    """``{namespace: secret}`` from a JSON file; namespaces listed there must present it."""
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(f"cannot read the secrets file {path}: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in data.items()):
        raise InvalidArgumentError(f"the secrets file {path} must hold a JSON object "
                                   f'{{"namespace": "secret", ...}}')
    return data


@dataclasses.dataclass
class Answer:
    """A request's reply, the slab descriptors to pass with it (``(fd, SlabDescriptor)``; the
    server closes the fds once sent) and the slabs the client should forget."""
    reply: object
    passed: list = dataclasses.field(default_factory=list)
    retired: list = dataclasses.field(default_factory=list)


class Handlers:
    def __init__(self, table: ObjectTable, node: str, epoch: str, namespace_secrets: dict[str, str],
                 transfers: TransferEngine | None = None, stats: RequestStats | None = None,
                 reserver: Reserver | None = None):
        self.table = table
        self.reserver = reserver
        self.transfers = transfers
        self.stats = stats
        self.node = node
        self.epoch = epoch
        self.secrets = namespace_secrets
        self.directory = table.directory
        self.started = time.time()
        self._dispatch = {
            protocol.Hello: self.hello, protocol.Create: self.create, protocol.Seal: self.seal,
            protocol.Release: lambda s, r: protocol.Done(),
            protocol.Delete: self.delete, protocol.CloseScope: self.close_scope,
            protocol.Status: self.status, protocol.Ping: self.ping,
            protocol.Watch: self.watch,
        }

    def handle(self, session: Session, envelope: protocol.Envelope, retry: bool = False) -> Answer:
        """The answer to one request.

        Raises WouldWait (controller/objects.py) for a get that must wait: the server parks
        it and calls again with ``retry`` (Note [Waiting gets own no thread]); piggybacked
        releases and demand are applied by the first call only."""
        request = envelope.request
        if envelope.function is not None:
            session.function = envelope.function
        if envelope.releases and not retry:
            self.table.release(session, envelope.releases)
        if session.namespace is None and not isinstance(
                request, (protocol.Hello, protocol.Ping, protocol.Release, protocol.Status)):
            raise InvalidStateError(f"send 'hello' with your namespace before {request.op!r}")
        try:
            if isinstance(request, protocol.Get):
                answer = self.get(session, request)
            else:
                answer = self._dispatch[type(request)](session, request)
                if not isinstance(answer, Answer):
                    answer = Answer(answer)
        finally:
            # After the request: a hello that carries demand (queued before a reconnect)
            # has declared the namespace it belongs to by now.
            if envelope.demand and not retry and session.namespace is not None and self.reserver:
                self.reserver.record(session.namespace, envelope.demand)   # Note [Reservation ahead of demand]
        if session.retired:
            answer.retired = self.table.take_retired(session)
        return answer

    def hello(self, session: Session, request: protocol.Hello):
        if session.namespace is not None:
            raise InvalidStateError("this connection already declared its namespace "
                                    f"{session.namespace!r}; open a new one for another")
        expected = self.secrets.get(request.namespace)
        if expected is not None and not hmac.compare_digest(
                expected.encode(), (request.secret or "").encode()):
            raise NamespaceError(
                f"namespace {request.namespace!r} needs its secret: set FAASTUBE_SECRET to the "
                f"value in the controller's secrets file" if not request.secret else
                f"wrong secret for namespace {request.namespace!r}")
        session.namespace = request.namespace
        session.client = request.client
        return protocol.Welcome(self.node, self.epoch, session.pid)

    def create(self, session: Session, request: protocol.Create):
        dtype = protocol.check_dtype(request.dtype)
        expected = math.prod(request.shape) * dtype.itemsize
        if request.nbytes != expected:
            raise InvalidArgumentError(f"nbytes {request.nbytes} does not match shape "
                                       f"{list(request.shape)} of {dtype} ({expected} bytes)")
        grant = self.table.create(session, request.shape, request.dtype, request.nbytes,
                                  request.consumers, request.ttl, request.scope, request.device,
                                  spill=bool(request.spill))
        return self._grant_reply(grant)

    def seal(self, session: Session, request: protocol.Seal):
        if request.lifetime:
            lifetime = (request.consumers, request.ttl, request.scope)
        elif request.consumers is not None or request.ttl is not None or request.scope is not None:
            raise InvalidArgumentError("consumers, ttl and scope go with a seal only with lifetime: true")
        else:
            lifetime = None
        self.table.seal(session, request.id, request.drop_writer, lifetime)
        return protocol.Done()

    # Note [Where a get's time goes]: the server times every request from reading it to its
    # reply being ready (faastube_request_seconds); a get that copies also times the copy
    # alone, from the move's start to its landing (faastube_get_copy_seconds; "requests" in
    # the admin's status). So a function's get splits three ways: the copy; the
    # controller's control around it (grant, building the reply); and what neither timer
    # sees: the socket, the wake-ups at both ends, and the client's own work. `faastube
    # bench` reports the three per request of a workflow.
    def get(self, session: Session, request: protocol.Get):
        grant = self.table.get(session, request.id, request.timeout,   # ≤ 3600 s: protocol.Get
                               request.device, request.prefer)
        if grant.copy is not None:
            # The lease already pins both regions (Note [Copies for another device]).
            started = time.perf_counter()
            ok = False
            try:
                self.table.move(grant.copy.src, grant.copy.dst,
                                None if request.slo_ms is None else request.slo_ms / 1e3)
                ok = True
                if self.stats is not None:      # Note [Where a get's time goes]
                    self.stats.observe_copy(time.perf_counter() - started)
            except BaseException:
                self.table.abandon(session, grant)
                for fd, _descriptor in grant.fds:
                    os.close(fd)
                raise
            finally:
                # Ends a restore; frees the replica if the lease ended.
                self.table.copied(grant.lease, ok, time.perf_counter() - started)
        producer = grant.record.function
        if self.reserver is not None and producer and session.function and producer != session.function:
            self.reserver.learn(session.namespace, producer, session.function)  # Note [Queue-aware eviction]
        return self._grant_reply(grant)

    def delete(self, session: Session, request: protocol.Delete):
        self.table.delete(session, request.id)
        return protocol.Done()

    def close_scope(self, session: Session, request: protocol.CloseScope):
        return protocol.Freed(self.table.close_scope(session, request.scope))

    def status(self, session: Session, request: protocol.Status):
        if session.namespace is None and not session.admin:
            raise NamespaceError("status without 'hello' is for the controller's own user or "
                                 "root; declare your namespace to see it")
        held = self.table.status(session)
        admin = session.admin
        return protocol.StatusReport(
            self.node, self.epoch, held["pools"], held["namespaces"], held["clients"],
            requests=self.stats.summary() if self.stats is not None and admin else None,
            links=self.transfers.link_stats() if self.transfers is not None and admin else None,
            topology=self.transfers.topology_report() if self.transfers is not None and admin else None,
            demand=self.reserver.summary() if self.reserver is not None and admin else None,
            namespaces_omitted=held["namespaces_omitted"],
            controller={"version": __version__, "started": round(self.started, 3),
                        "uptime_s": round(time.time() - self.started, 1)},
            directory=self.directory.state(admin) if self.directory is not None else None)

    def watch(self, session: Session, request: protocol.Watch):
        self.table.watch(session, request.tiers)        # Note [Slabs mapped ahead]
        return protocol.Done()

    def ping(self, session: Session, request: protocol.Ping):
        return protocol.Pong(self.node, self.epoch)

    @staticmethod
    def _grant_reply(grant: Grant) -> Answer:
        record = grant.record
        region = grant.lease.region
        return Answer(protocol.Granted(record.id, grant.lease.id, region.slab.id, region.slab.device,
                                       region.offset, region.nbytes, record.dtype, record.shape),
                      grant.fds)

