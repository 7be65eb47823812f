"""What functions call: ``put``, ``get``, ``empty`` + ``seal``, ``delete``, ``release``.

All calls go through one lazily created :class:`~faastube.client.Client` per process,
configured from ``FAASTUBE_*`` variables (see faastube.config). A process that never calls
these never connects, so plain functions work without a controller.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading

import numpy as np

from . import protocol
from .client import Client
from .config import Config
from .errors import InvalidArgumentError, NotAnArrayError
from .refs import check_dtype, make_ref, parse_ref

_client: Client | None = None
_client_lock = threading.Lock()
_scope: contextvars.ContextVar[str | None] = contextvars.ContextVar("faastube_scope", default=None)


@contextlib.contextmanager
def activation(scope: str | None):
    """Within this block, objects put or created without a ``scope`` get ``scope``; if the
    block raises, the scope is closed (what the failed activation allocated is freed)."""
    token = _scope.set(scope)
    try:
        yield
    except BaseException:
        if scope and _client is not None:
            try:
                close_scope(scope)
            except Exception:
                pass          # the controller may be the reason we failed
        raise
    finally:
        _scope.reset(token)


def client() -> Client:
    """This process's connection to the node controller (created on first use)."""
    global _client
    if _client is None:
        with _client_lock:
            if _client is None:
                _client = Client(Config.from_env())
    return _client


def connect(**settings) -> Client:
    """Replace this process's client, e.g. ``connect(socket="/tmp/c.sock", namespace="ns1")``.

    Settings are :class:`~faastube.config.Config` fields; unset ones come from the environment.
    """
    global _client
    with _client_lock:
        if _client is not None:
            _client.close()
        _client = Client(Config.from_env(**settings))
    return _client


def _check_lifetime(consumers, ttl) -> None:
    if consumers is not None and (isinstance(consumers, bool) or not isinstance(consumers, int)
                                  or consumers < 1):
        raise InvalidArgumentError(f"consumers must be a positive integer or None, got {consumers!r}")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl <= 0):
        raise InvalidArgumentError(f"ttl must be a positive number of seconds or None, got {ttl!r}")


def put(array, consumers: int | None = None, ttl: float | None = None,
        scope: str | None = None) -> dict:
    """Store ``array`` in the pool and return its ref (a small JSON-serialisable dict).

    The bytes are copied once into the pool; a non-contiguous array becomes contiguous in the
    same copy. To avoid even that copy, build the result with :func:`empty` and :func:`seal`.
    The object is freed after ``consumers`` gets have been released, after ``ttl`` seconds,
    when ``scope`` is closed, or by :func:`delete`, whichever comes first.
    """
    if not isinstance(array, np.ndarray):
        raise NotAnArrayError(
            f"faastube.put needs a numpy array, got {type(array).__name__}; convert it with "
            f"numpy.asarray(...) first")
    dtype = check_dtype(array.dtype)
    _check_lifetime(consumers, ttl)
    conn = client()
    target, object_id, _lease = conn.create(array.shape, dtype, consumers, ttl,
                                            scope or _scope.get(), track=False)
    np.copyto(target, array, casting="no")
    del target   # Note [Leases pin memory]: drop the writer's view before its lease ends
    conn.seal(object_id, drop_writer=True)
    return make_ref(object_id, array.shape, dtype)


def empty(shape, dtype="float32", consumers: int | None = None, ttl: float | None = None,
          scope: str | None = None) -> np.ndarray:
    """A writable, uninitialised array backed by the pool: write the result into it, then
    :func:`seal` it. No copy is made at any point (the zero-copy put)."""
    if isinstance(shape, int):
        shape = (shape,)
    try:
        shape = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"shape must be an int or a sequence of ints, got {shape!r}") from None
    if any(d < 0 for d in shape):
        raise InvalidArgumentError(f"shape must not have negative dimensions, got {shape}")
    _check_lifetime(consumers, ttl)
    array, _object_id, _lease = client().create(shape, check_dtype(dtype), consumers, ttl,
                                                scope or _scope.get())
    return array


def ref_of(array) -> dict:
    """The ref of an array from :func:`empty`, before or after sealing.

    A consumer may ``get`` it before the producer seals: the get waits for the seal."""
    flat, object_id = client().writer_of(array)
    return make_ref(object_id, array.shape, flat.dtype)


def seal(array) -> dict:
    """Make an array from :func:`empty` immutable and visible to ``get``; returns its ref.

    The array (and the views of it that go through it) turn read-only in this process."""
    conn = client()
    flat, object_id = conn.writer_of(array)
    conn.seal(object_id)
    array.flags.writeable = False
    flat.flags.writeable = False
    return make_ref(object_id, array.shape, flat.dtype)


def get(ref, timeout: float | None = None) -> np.ndarray:
    """A read-only, zero-copy view of the object ``ref`` names.

    Waits up to ``timeout`` seconds (default ``FAASTUBE_GET_TIMEOUT_S``) if the object is not
    sealed yet. The memory stays valid as long as the array, or any view of it, is alive.
    """
    object_id, _shape, _dtype = parse_ref(ref)
    conn = client()
    if timeout is None:
        timeout = conn.config.get_timeout_s
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
        raise InvalidArgumentError(f"timeout must be a non-negative number of seconds, got {timeout!r}")
    return conn.get(object_id, float(timeout))


def release(array) -> None:
    """Tell the controller this consumer is done with a got array (counts toward
    ``consumers``). The view stays valid until the array is collected."""
    client().release(array)


def delete(ref) -> None:
    """Free the object now. Views already got stay valid; new gets fail."""
    object_id, _shape, _dtype = parse_ref(ref)
    client().request(protocol.Delete(object_id))


def close_scope(scope: str) -> int:
    """Free every object created with ``scope=scope`` in this namespace; returns how many."""
    if not isinstance(scope, str) or not scope:
        raise InvalidArgumentError(f"scope must be a non-empty string, got {scope!r}")
    return client().request(protocol.CloseScope(scope))["freed"]
