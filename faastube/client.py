"""The SDK's client: what ``put``, ``get``, ``empty``, ``seal`` and ``release`` ask of the
controller, over one :class:`~faastube.connection.Connection` per process. Each concern has
its own module; this one puts them together:

- faastube/connection.py — the socket, framing, reply matching, passed descriptors;
- faastube/views.py — slab mappings, and pool memory as numpy and CuPy arrays;
- faastube/leases.py — which arrays hold which leases, their release, and exit;
- faastube/spares.py — creates made ahead for repeated puts (Note [Spare objects]);
- faastube/landing.py — seals sent once a put's copy has landed.

Note [Seal without waiting]: ``put`` and ``seal`` send the seal and return the ref without
waiting for the reply, saving a round trip per hand-off. The controller answers a
connection's requests in order, so this process's later requests see the object sealed, and
another process's get that arrives first waits for the seal. ``put`` made the object itself
a moment earlier, so the seal can only fail if the controller died or the object was freed
meanwhile (its scope closed, its ttl ran out); such a failure is logged, and a consumer's
get says precisely what happened to the object. A second seal of the same array is refused
at once, here.

Note [After fork]: a forked child shares its parent's socket and inherits its parent's
tables; it must never speak on that socket nor end its parent's leases. One
``os.register_at_fork`` hook gives every client of the child fresh state at once: no
connection (the child opens its own on its first request), no views, spares or landing
puts, and slab mappings dropped without unmapping (CUDA mappings do not survive fork).
"""

from __future__ import annotations

import math
import os
import weakref

import numpy as np

from . import protocol, views
from .config import Config
from .connection import Connection
from .cuda import HOST, in_host_memory
from .errors import FaasTubeError, InvalidStateError, ObjectNotFoundError, PoolExhaustedError
from .landing import Landing, Sealer
from .leases import Leases
from .spares import Signature, Spares
from .watcher import SlabWatcher


class Client:
    """This process's client of the controller, shared by all its threads."""

    def __init__(self, config: Config | None = None, anonymous: bool = False):
        """``anonymous`` skips ``hello``: for tools (status, ping) run by the controller's
        own user or root, which the controller recognises by SO_PEERCRED."""
        self.config = config or Config.from_env()
        self.slabs = views.SlabMappings()
        self.connection = Connection(self.config, self.slabs, anonymous)
        self.leases = Leases(self.connection)
        self.spares = Spares(self.connection, self.config.spare_bytes)
        self.sealer = Sealer(self.connection, self._seal_landed)
        self.watcher: SlabWatcher | None = None
        if not anonymous and self.config.map_ahead != "none":
            self.connection.on_connected = self._start_watcher
        _clients.add(self)

    def _start_watcher(self) -> None:
        """(connection made) Note [Slabs mapped ahead]: one watcher per connection's life."""
        watcher = self.watcher
        if watcher is not None and watcher.alive and watcher.epoch == self.connection.epoch:
            return
        if watcher is not None:
            watcher.close()                 # a restarted controller's slabs are new ones
        self.watcher = SlabWatcher(self.config, self.slabs, self.connection.epoch).start()

    @property
    def node(self) -> str | None:
        """The controller's node, once connected."""
        return self.connection.node

    @property
    def epoch(self) -> str | None:
        return self.connection.epoch

    def _after_fork(self) -> None:
        """Note [After fork]."""
        self.connection.reset()
        if self.watcher is not None:
            self.watcher.forget()
            self.watcher = None
        self.slabs.forget()
        self.leases.forget()
        self.spares.forget()
        self.sealer.forget()

    def close(self) -> None:
        """Free the spares, send any queued releases, then close. Leases of arrays still
        alive stay with the controller until this process exits (Note [What a crash frees])."""
        if self.connection.connected:
            self.flush_puts()
            self.drop_spares()
        if self.connection.has_piggyback and self.connection.connected:
            try:
                self.request(protocol.Release())
            except FaasTubeError:
                pass
        if self.watcher is not None:
            self.watcher.close()
        self.connection.close()

    def request(self, request, wait_s: float = 0.0, copy_bytes: int = 0):
        """Send one request and return its typed reply (Connection.request)."""
        return self.connection.request(request, wait_s, copy_bytes)

    def send_only(self, request) -> None:
        """Send a request whose reply nobody waits for (Note [Seal without waiting])."""
        self.connection.send_only(request)

    def report(self, activity: protocol.Activity) -> None:
        """An activation ended: its demand rides on the next request, or goes within a few ms
        (Note [Reservation ahead of demand], controller/demand.py)."""
        self.connection.demand.append(activity)
        self.leases.wake()

    def drop_spares(self) -> None:
        """Free every spare of this process (Note [Spare objects])."""
        self.spares.drop_all()

    # -- making objects -------------------------------------------------------------------

    def create(self, shape, dtype: np.dtype, consumers=None, ttl=None, scope=None, device: str = HOST):
        """A writable array for a new pending object (``empty``): (array, object id, writer
        lease) — numpy on the host tier, CuPy on a GPU (``device``: a GPU's UUID). The
        writer's lease ends when the array is collected; ``seal(array)`` finds it again.
        Without a ``ttl`` it may take a spare (Note [Spare objects]); the seal then gives
        the object its consumers and scope. ``put`` uses :meth:`create_for_put`."""
        shape = tuple(int(d) for d in shape)
        grant, lifetime = self._create(shape, dtype, protocol.Lifetime(consumers, ttl, scope), device,
                                       spare=ttl is None)
        if lifetime is not None:
            self.leases.lifetimes[grant.id] = lifetime
        if not in_host_memory(grant.device):
            array, owner, start = views.gpu_view(self.slabs, grant, writable=True)
            self.leases.track_gpu(owner, grant, writable=True, start=start)
            return array.reshape(shape), grant.id, grant.lease
        flat = views.host_view(self.slabs, grant, writable=True)
        self.leases.track_host(flat, grant, writable=True)
        return flat.reshape(shape), grant.id, grant.lease

    def create_for_put(self, shape, dtype: np.dtype, consumers=None, ttl=None, scope=None,
                       device: str = HOST):
        """Where ``put`` writes a new object, then seals it with ``drop_writer``: (target,
        object id, lifetime). The target is a writable numpy array on the host tier, the
        object's device address (an int) on a GPU. A put to a GPU may be granted on the host
        tier (Note [Puts that rank last], controller/eviction.py): then the target is a numpy
        array too. ``lifetime`` is None when the object
        already has the put's consumers, ttl and scope, else what the seal must give it (Note
        [Spare objects])."""
        shape = tuple(int(d) for d in shape)
        grant, lifetime = self._create(shape, dtype, protocol.Lifetime(consumers, ttl, scope), device,
                                       spare=True, spill=device != HOST)
        if not in_host_memory(grant.device):
            return views.gpu_address(self.slabs, grant), grant.id, lifetime
        return views.host_view(self.slabs, grant, writable=True).reshape(shape), grant.id, lifetime

    def _create(self, shape: tuple, dtype: np.dtype, lifetime: protocol.Lifetime, device: str,
                spare: bool, spill: bool = False) -> tuple[protocol.Granted, protocol.Lifetime | None]:
        """A new pending object's grant and the lifetime its seal must give it: that of a
        spare taken (Note [Spare objects]), or None for one created with its lifetime."""
        signature = Signature(shape, dtype.str, device)
        nbytes = math.prod(shape) * dtype.itemsize
        grant = None
        if spare:
            with self.spares.lock:
                grant = self.spares.take(signature)
        if grant is None:
            create = protocol.Create(shape, protocol.dtype_name(dtype), nbytes, lifetime.consumers,
                                     lifetime.ttl, lifetime.scope, device, spill or None)
            try:
                grant = self.request(create)
            except PoolExhaustedError:
                if not self.spares.held():
                    raise
                self.drop_spares()
                grant = self.request(create)
            lifetime = None
        if spare:
            with self.spares.lock:
                self.spares.note_put(signature, nbytes)
        return grant, lifetime

    def seal(self, object_id: str, drop_writer: bool = False, wait: bool = True,
             lifetime: protocol.Lifetime | None = None) -> None:
        """Seal an object; ``wait=False``: Note [Seal without waiting]; ``lifetime``: what a
        spare's seal gives it (Note [Spare objects]; by default the one ``create`` kept)."""
        if not drop_writer:
            self.leases.sealed.add(object_id)
        if lifetime is None:
            lifetime = self.leases.lifetimes.pop(object_id, None)    # an empty() that took a spare
        request = protocol.Seal.giving(object_id, drop_writer, lifetime)
        if wait:
            self.request(request)
        else:
            self.send_only(request)

    def seal_when_landed(self, fence, object_id: str, lifetime: protocol.Lifetime | None, keep) -> None:
        """Seal a put's object once the copy before ``fence`` has landed (Note [Put seals when
        its copy lands]); ``keep``: what must stay alive until then (the source array)."""
        self.sealer.add(Landing(fence, object_id, lifetime, keep))

    def _seal_landed(self, object_id: str, lifetime: protocol.Lifetime | None) -> None:
        self.seal(object_id, drop_writer=True, wait=False, lifetime=lifetime)

    def flush_puts(self, timeout: float | None = None) -> bool:
        """Wait until every put of this process has landed and its seal was sent (Note [Put
        seals when its copy lands]); False if ``timeout`` seconds passed first."""
        return self.sealer.flush(timeout)

    def delete_unsealed(self, scope: str) -> int:
        """Delete what this process made with ``empty`` for ``scope`` from spares and has not
        sealed: such an object gets its scope only at its seal, so closing the scope must
        free it here (Note [Spare objects]). Returns how many were deleted."""
        deleted = 0
        for object_id, lifetime in list(self.leases.lifetimes.items()):
            if lifetime.scope == scope and self.leases.lifetimes.pop(object_id, None) is not None:
                try:
                    self.request(protocol.Delete(object_id))
                    deleted += 1
                except ObjectNotFoundError:
                    pass
        return deleted

    def writer_of(self, array, sealing: bool = False) -> tuple[np.ndarray | None, str, str]:
        """(flat base, object id, device) of an array returned by ``create`` (or a view of
        it); a GPU array has no flat base here (None). ``sealing``: refuse one sealed already."""
        found = self.leases.find(array, writable=True)
        if found is None:
            raise InvalidStateError("this array was not returned by faastube.empty in this process "
                                    "(or it was sealed already): only pool-backed arrays can be sealed")
        view, flat = found
        if sealing and view.object_id in self.leases.sealed:
            raise InvalidStateError(f"object {view.object_id} is already sealed (a sealed object is immutable)")
        return flat, view.object_id, view.device

    # -- reading objects ------------------------------------------------------------------

    def get(self, object_id: str, timeout: float, device: str | None = None,
            prefer: str | None = None, slo_ms: float | None = None, copy_bytes: int = 0):
        """A read-only view: numpy for a host object, CuPy for a GPU one (protocol.Get says
        where the object comes to). ``copy_bytes``: what the controller is expected to copy
        for it (Note [A get that copies spins longer], faastube/connection.py)."""
        grant = self.request(protocol.Get(object_id, timeout, device, prefer, slo_ms), wait_s=timeout,
                             copy_bytes=copy_bytes)
        if not in_host_memory(grant.device):
            array, owner, start = views.gpu_view(self.slabs, grant, writable=False)
            self.leases.track_gpu(owner, grant, writable=False, start=start)
            return array.reshape(grant.shape)
        flat = views.host_view(self.slabs, grant, writable=False)
        self.leases.track_host(flat, grant, writable=False)
        return flat.reshape(grant.shape)

    def release(self, array) -> None:
        """Count a got array as consumed now (Note [Consumers] in controller/objects.py).

        Its memory stays pinned until the array is collected, so the view stays valid."""
        found = self.leases.find(array, writable=False)
        if found is None:
            raise InvalidStateError("this array was not returned by faastube.get in this process")
        self.connection.releases.append((found[0].lease, "consume"))
        self.request(protocol.Release())


_clients: "weakref.WeakSet[Client]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for client in list(_clients):
        client._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
