"""What functions call: ``put``, ``get``, ``empty`` + ``seal``, ``delete``, ``release``.

All calls go through one lazily created :class:`~faastube.client.Client` per process,
configured from ``FAASTUBE_*`` variables (see faastube.config). A process that never calls
these never connects, so plain functions work without a controller.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import threading
import time

import numpy as np

from . import cuda, protocol, views
from .client import Client
from .config import Config
from .connection import CURRENT_FUNCTION
from .errors import InvalidArgumentError, NotAnArrayError
from .protocol import check_dtype
from .refs import make_ref, parse_ref

_client: Client | None = None
_client_lock = threading.Lock()
_scope: contextvars.ContextVar[str | None] = contextvars.ContextVar("faastube_scope", default=None)
_event: contextvars.ContextVar[dict | None] = contextvars.ContextVar("faastube_event", default=None)
_activity: contextvars.ContextVar["_Activity | None"] = contextvars.ContextVar("faastube_activity", default=None)
# (consumers, ttl) for objects made in an activation that name neither, set by the runtime
# from FAASTUBE_RESULT_CONSUMERS / FAASTUBE_RESULT_TTL_S (Note [Results have a lifetime]).
_result_lifetime: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("faastube_result_lifetime",
                                                                                default=None)


class _Activity:
    """What one activation put, per device: the demand the controller reserves ahead of
    (Note [Reservation ahead of demand], controller/demand.py)."""
    __slots__ = ("function", "started", "sizes")

    def __init__(self, function: str):
        self.function, self.started, self.sizes = function, time.monotonic(), {}

    def put(self, device: str, nbytes: int) -> None:
        sizes = self.sizes.setdefault(device, [])
        if len(sizes) < protocol.MAX_ACTIVITY_OBJECTS:
            sizes.append(nbytes)
        elif nbytes > min(sizes):                   # keep the largest ones
            sizes[sizes.index(min(sizes))] = nbytes

    def ended(self) -> protocol.Activity:
        return protocol.Activity(self.function, min(time.monotonic() - self.started, 86400.0),
                                 {device: tuple(sizes) for device, sizes in self.sizes.items()})


@contextlib.contextmanager
def activation(scope: str | None, function: str | None = None, lifetime: tuple | None = None):
    """Within this block, objects put or created without a ``scope`` get ``scope``; if the
    block raises, the scope is closed (what the failed activation allocated is freed).
    ``function`` (the action's name): what it put is reported to the controller when the
    block ends, so the pool keeps room ready for its next activations, and the requests
    inside the block name it, so the controller learns which function gets what another put
    (Note [Queue-aware eviction]). ``lifetime``: (consumers, ttl) given to objects made in
    the block that name neither (Note [Results have a lifetime])."""
    lifetime_token = _result_lifetime.set(lifetime)
    token = _scope.set(scope)
    name = function if isinstance(function, str) and function.isprintable() else None
    activity = _Activity(name[:protocol.MAX_NAME]) if name else None
    activity_token = _activity.set(activity)
    function_token = CURRENT_FUNCTION.set(activity.function) if activity else None
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
        _result_lifetime.reset(lifetime_token)
        _activity.reset(activity_token)
        if function_token is not None:
            CURRENT_FUNCTION.reset(function_token)
        if activity is not None and _client is not None:
            _client.report(activity.ended())


@contextlib.contextmanager
def handling_event(attributes: dict | None):
    """Within this block, :func:`event` returns ``attributes`` (the runtime sets it around
    a Knative request, shim/launcher.py)."""
    token = _event.set(attributes)
    try:
        yield
    finally:
        _event.reset(token)


def event() -> dict | None:
    """The attributes of the CloudEvent this function was called with on Knative (``id``,
    ``source``, ``type``, ``specversion``, ``time``, ``datacontenttype``, … and extensions such
    as ``traceparent``), as a new dict; None outside a call, on OpenWhisk, and for a request
    that was not a CloudEvent. The runtime's reply event carries the extensions on."""
    attributes = _event.get()
    return None if attributes is None else dict(attributes)


def _note(device: str, nbytes: int) -> None:
    """Count an object put or made by ``empty`` in the activation's demand."""
    activity = _activity.get()
    if activity is not None:
        activity.put(device, nbytes)


def _noted(ref: dict) -> dict:
    _note(ref["device"], ref["nbytes"])
    return ref


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


def result_lifetime(config: Config | None = None) -> tuple | None:
    """Note [Results have a lifetime]: the (consumers, ttl) the runtime gives what an
    activation makes without naming a lifetime. A result crosses to the next step of a
    sequence as a ref, and that step gets it once: by default, the object is freed once one
    get of it has been released (FAASTUBE_RESULT_CONSUMERS=1), or after
    FAASTUBE_RESULT_TTL_S (600 s) if nobody gets it. 0 turns either off; both 0: results live
    until deleted, as any put outside an activation. Per action: the action's environment
    (OpenWhisk: /init's env, e.g. ``wsk action update A -p``; Knative: the Service's env). A
    function that hands one object to several consumers names ``consumers`` itself."""
    config = config or Config.from_env()
    consumers = config.result_consumers or None
    ttl = config.result_ttl_s or None
    return None if consumers is None and ttl is None else (consumers, ttl)


def _lifetime(consumers, ttl) -> tuple:
    """``(consumers, ttl)`` checked, or the activation's result lifetime where both are None
    (Note [Results have a lifetime])."""
    if consumers is not None and (isinstance(consumers, bool) or not isinstance(consumers, int)
                                  or consumers < 1):
        raise InvalidArgumentError(f"consumers must be a positive integer or None, got {consumers!r}")
    if ttl is not None and not protocol.valid_ttl(ttl):
        raise InvalidArgumentError(f"ttl must be a number of seconds above 0 and at most "
                                   f"{protocol.MAX_TTL_S} ({protocol.MAX_TTL_S // 86400} days), or None, "
                                   f"got {ttl!r}")
    if consumers is None and ttl is None:
        default = _result_lifetime.get()
        if default is not None:
            return default
    return consumers, ttl


def put(array, consumers: int | None = None, ttl: float | None = None,
        scope: str | None = None, device=None) -> dict:
    """Store ``array`` in the pool and return its ref (a small JSON-serialisable dict).

    A numpy array goes to the host tier; a CuPy array or CUDA torch tensor to the pool of
    its own GPU, copied there device to device. ``device`` (see :func:`device_of`) names
    another tier: "cpu" for a GPU array (one copy to the host), a stand-in tier for a numpy
    array. The bytes are copied once; a non-contiguous array becomes contiguous in the same
    copy. Where its GPU's tier is full and the new object would be the first to be moved off
    it, a GPU array's put writes it to the host tier at once (Note [Puts that rank last],
    controller/eviction.py); its ref and a get of it work the same. To avoid even that copy, build the result with
    :func:`empty` and :func:`seal`. A GPU put copies on the stream the array's data is valid
    on and returns once the copy has landed; with ``FAASTUBE_PUT_WAITS=0`` it returns at
    once and seals when the copy has landed (see :func:`flush_puts`). The object is freed
    after ``consumers`` gets have been released, after ``ttl`` seconds, when ``scope`` is
    closed, or by :func:`delete`, whichever comes first.
    """
    consumers, ttl = _lifetime(consumers, ttl)
    scope = scope or _scope.get()
    interface = views.cuda_interface(array)
    if interface is not None:
        return _put_gpu(array, interface, consumers, ttl, scope,
                        None if device is None else device_of(device))
    if not isinstance(array, np.ndarray):
        raise NotAnArrayError(
            f"faastube.put needs a numpy array, a CuPy array or a CUDA torch tensor, got "
            f"{type(array).__name__}; convert it with numpy.asarray(...) first")
    target_device = device_of(device)
    if not cuda.in_host_memory(target_device):
        raise InvalidArgumentError(
            f"a numpy array is put on the host tier (or a stand-in), not on {target_device}: "
            f"put cupy.asarray(array) to store it on a GPU")
    dtype = check_dtype(array.dtype)
    conn = client()
    target, object_id, lifetime = conn.create_for_put(array.shape, dtype, consumers, ttl, scope,
                                                      target_device)
    np.copyto(target, array, casting="no")
    del target   # Note [Leases pin memory]: drop the writer's view before its lease ends
    conn.seal(object_id, drop_writer=True, wait=False, lifetime=lifetime)   # Note [Seal without waiting]
    return _noted(make_ref(object_id, array.shape, dtype, target_device))


def _put_gpu(array, interface: dict, consumers, ttl, scope, to: str | None) -> dict:
    """Note [Put copies with one driver call]: a contiguous GPU array is copied into its
    object with one ``cuMemcpyAsync`` on the stream its data is valid on, found from its
    ``__cuda_array_interface__``. Going through CuPy (``asarray``, ``copyto``) cost more Python
    per put than a mid-size copy (docs/benchmarks.md); a put that waits for its copy gets back the part the
    copy does not cover. The stream: faastube.views.stream_of. A strided array goes through
    CuPy, which makes it contiguous in the same copy. ``to``: the tier asked for (None: the
    array's GPU; "host": one copy to the host tier). A target that is a numpy array is host
    memory (asked for, or Note [Puts that rank last]): the same one call copies there."""
    shape = tuple(int(d) for d in interface["shape"])
    dtype = check_dtype(np.dtype(interface["typestr"]))
    address = int(interface["data"][0])
    nbytes = math.prod(shape) * dtype.itemsize
    conn = client()
    if nbytes == 0 or not views.is_c_contiguous(interface, shape, dtype.itemsize):
        return _put_gpu_through_cupy(array, conn, consumers, ttl, scope, to)
    ordinal = views.device_of_array(array, address)
    device = _put_target(cuda.devices().uuids[ordinal], to)
    stream = views.stream_of(array, interface, ordinal)
    target, object_id, lifetime = conn.create_for_put(shape, dtype, consumers, ttl, scope, device)
    cuda.copy_on_stream(target.ctypes.data if isinstance(target, np.ndarray) else target,
                        address, nbytes, ordinal, stream)
    _seal_put(conn, object_id, lifetime, array, ordinal, stream)
    return _noted(make_ref(object_id, shape, dtype, device))


def _put_target(own: str, to: str | None) -> str:
    """Where a GPU array on GPU ``own`` is put: its own GPU, or the host tier if asked."""
    if to is None or to == own or to == cuda.HOST:
        return to or own
    raise InvalidArgumentError(f"a GPU array is put on its own GPU ({own}) or on the host "
                               f"(device='cpu'), not on {to}")


def _put_gpu_through_cupy(array, conn, consumers, ttl, scope, to: str | None) -> dict:
    import cupy
    source = cupy.asarray(array)      # a view, no copy (a torch tensor through its interface)
    dtype = check_dtype(source.dtype)
    ordinal = source.device.id
    device = _put_target(cuda.devices().uuids[ordinal], to)
    target, object_id, lifetime = conn.create_for_put(source.shape, dtype, consumers, ttl, scope, device)
    with source.device:
        stream = cupy.cuda.get_current_stream()
        if isinstance(target, np.ndarray):           # host memory (see _put_gpu)
            source.get(stream=stream, out=target)
        else:
            view = views.gpu_array_at(target, source.nbytes, source.shape, dtype, ordinal)
            cupy.copyto(view, source, casting="no")
            del view
    _seal_put(conn, object_id, lifetime, (array, source), ordinal, stream.ptr)
    return _noted(make_ref(object_id, source.shape, dtype, device))


def _seal_put(conn, object_id: str, lifetime, keep, ordinal: int, stream: int) -> None:
    """Seal a put's object once its copy, queued on ``stream`` of GPU ``ordinal``, has landed."""
    if conn.config.put_waits:
        cuda.synchronize(cuda.devices().uuids[ordinal])      # Note [Seal publishes finished writes]
        conn.seal(object_id, drop_writer=True, wait=False, lifetime=lifetime)   # Note [Seal without waiting]
    else:                             # Note [Put seals when its copy lands]
        conn.seal_when_landed(cuda.fences().record(ordinal, stream), object_id, lifetime, keep)


def flush_puts(timeout: float | None = None) -> bool:
    """Wait until every ``put`` of this process has landed in the pool and been sealed; False
    if ``timeout`` seconds passed first. Only with ``FAASTUBE_PUT_WAITS=0`` does a GPU
    ``put`` return before its copy has landed (Note [Put seals when its copy lands],
    faastube/landing.py): then call this before writing to a put's source from another stream
    or from the host. Exit, ``close``, ``delete`` and ``close_scope`` flush on their own."""
    if _client is None:
        return True
    return _client.flush_puts(timeout)


def device_of(device) -> str:
    """``"host"`` or a GPU's UUID for a ``device`` argument: None, "cpu" or "host" → the host
    tier; "cuda" → this process's current GPU (CuPy's); "cuda:N" or N → its GPU N; a UUID
    ("GPU-…") as it is."""
    if device is None or device in ("cpu", "host"):
        return cuda.HOST
    if isinstance(device, str) and (device.startswith("GPU-") or device.startswith(cuda.STAND_IN)):
        return device             # a UUID, or a stand-in tier (Note [Host-backed stand-ins])
    if device == "cuda":
        cuda.devices()                # says why not, where this process has no usable GPU
        try:
            import cupy
        except ImportError:
            raise cuda.CudaError("CuPy is not installed: pip install 'faastube[cuda]'") from None
        ordinal = cupy.cuda.Device().id
    elif isinstance(device, int) and not isinstance(device, bool):
        ordinal = device
    elif isinstance(device, str) and device.startswith("cuda:") and device[5:].isdigit():
        ordinal = int(device[5:])
    else:
        raise InvalidArgumentError(f"device must be 'cpu', 'cuda', 'cuda:N', a GPU number or a "
                                   f"GPU UUID, got {device!r}")
    uuids = cuda.devices().uuids
    if not 0 <= ordinal < len(uuids):
        raise InvalidArgumentError(f"this process sees {len(uuids)} GPU(s); there is no GPU {ordinal}")
    return uuids[ordinal]


def _current_gpu() -> str | None:
    """The UUID of this process's current GPU, or None where it has no usable GPU."""
    try:
        return device_of("cuda")
    except cuda.CudaError:
        return None


def empty(shape, dtype="float32", consumers: int | None = None, ttl: float | None = None,
          scope: str | None = None, device=None):
    """A writable, uninitialised array backed by the pool: write the result into it, then
    :func:`seal` it. No copy is made at any point (the zero-copy put). ``device`` (see
    :func:`device_of`): None for a numpy array on the host tier, "cuda" or "cuda:N" for a
    CuPy array on that GPU (``torch.from_dlpack`` gives PyTorch the same memory)."""
    if isinstance(shape, int):
        shape = (shape,)
    try:
        shape = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"shape must be an int or a sequence of ints, got {shape!r}") from None
    if any(d < 0 for d in shape):
        raise InvalidArgumentError(f"shape must not have negative dimensions, got {shape}")
    consumers, ttl = _lifetime(consumers, ttl)
    dtype, target = check_dtype(dtype), device_of(device)
    array, object_id, _lease = client().create(shape, dtype, consumers, ttl, scope or _scope.get(),
                                               device=target)
    _note(target, math.prod(shape) * dtype.itemsize)
    return array


def _dtype_of(array) -> np.dtype:
    if isinstance(array, np.ndarray):
        return array.dtype
    import cupy
    return cupy.asarray(array).dtype


def ref_of(array) -> dict:
    """The ref of an array from :func:`empty`, before or after sealing.

    A consumer may ``get`` it before the producer seals: the get waits for the seal."""
    _flat, object_id, device = client().writer_of(array)
    return make_ref(object_id, array.shape, _dtype_of(array), device)


def seal(array) -> dict:
    """Make an array from :func:`empty` immutable and visible to ``get``; returns its ref.

    Note [Seal publishes finished writes]: for a GPU array, seal first waits for every
    kernel and copy this process queued on that GPU, on any stream (CuPy's, PyTorch's), so a
    consumer can never read a half-written tensor. A host array (and the views of it that go
    through it) turns read-only in this process. Like :func:`put`, it does not wait for the
    controller's reply (Note [Seal without waiting], faastube/client.py)."""
    conn = client()
    flat, object_id, device = conn.writer_of(array, sealing=True)
    if not cuda.in_host_memory(device):
        cuda.synchronize(device)
    conn.seal(object_id, wait=False)
    if flat is not None:
        array.flags.writeable = False
        flat.flags.writeable = False
    return make_ref(object_id, array.shape, _dtype_of(array), device)


def get(ref, timeout: float | None = None, device=None, slo_ms: float | None = None):
    """A read-only, zero-copy view of the object ``ref`` names.

    Where it comes (``device``, see :func:`device_of`): by default a host object as a numpy
    array, a GPU object as a CuPy array on this process's current GPU (a process without a
    GPU gets it as numpy). An object elsewhere than asked is copied there by the controller
    (NVLink between GPUs, pinned PCIe to and from the host) and that copy is the view.

    Waits up to ``timeout`` seconds (default ``FAASTUBE_GET_TIMEOUT_S``) if the object is not
    sealed yet. The memory stays valid as long as the array, or any view of it, is alive.

    ``slo_ms`` (default ``FAASTUBE_SLO_MS``, else none): how long the copy, if one is needed,
    may take; the controller gives it the link bandwidth that needs, and spare bandwidth
    to the tightest SLO, ahead of copies without one (docs/sdk.md, "Copy SLOs").
    """
    object_id, shape, dtype = parse_ref(ref)
    conn = client()
    if timeout is None:
        timeout = conn.config.get_timeout_s
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
        raise InvalidArgumentError(f"timeout must be a non-negative number of seconds, got {timeout!r}")
    if slo_ms is None:
        slo_ms = conn.config.slo_ms
    elif (isinstance(slo_ms, bool) or not isinstance(slo_ms, (int, float))
          or not protocol.MIN_SLO_MS <= slo_ms <= protocol.MAX_SLO_MS):
        raise InvalidArgumentError(f"slo_ms must be a number of milliseconds between "
                                   f"{protocol.MIN_SLO_MS} and {protocol.MAX_SLO_MS:.0f}, got {slo_ms!r}")
    target = prefer = None
    made_on = ref.get("device", cuda.HOST)
    if device is not None:
        target = device_of(device)
    elif not cuda.in_host_memory(made_on):
        prefer = _current_gpu()
    # Where the controller will put it (controller/objects.py, Table._get): elsewhere is a copy.
    comes_to = target or (prefer if not cuda.in_host_memory(made_on) else None) or cuda.HOST
    return conn.get(object_id, float(timeout), target, prefer,
                    None if slo_ms is None else float(slo_ms),
                    copy_bytes=math.prod(shape) * dtype.itemsize if comes_to != made_on else 0)


def release(array) -> None:
    """Tell the controller this consumer is done with a got array (counts toward
    ``consumers``). The view stays valid until the array is collected."""
    client().release(array)


def delete(ref) -> None:
    """Free the object now. Views already got stay valid; new gets fail."""
    object_id, _shape, _dtype = parse_ref(ref)
    conn = client()
    conn.flush_puts()       # this process's own puts are sealed first, as they were put
    conn.request(protocol.Delete(object_id))


def close_scope(scope: str) -> int:
    """Free every object created with ``scope=scope`` in this namespace; returns how many."""
    if not isinstance(scope, str) or not scope:
        raise InvalidArgumentError(f"scope must be a non-empty string, got {scope!r}")
    conn = client()
    conn.flush_puts()       # a put still landing gets its scope before the scope closes
    freed = conn.delete_unsealed(scope)                  # Note [Spare objects]
    return freed + conn.request(protocol.CloseScope(scope)).freed
