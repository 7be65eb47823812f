"""One typed configuration, defaults in one place, read once from the environment.

Every environment variable FaaSTube reads is a field here: :class:`Config` for the
controller and the SDK, :class:`ShimConfig` for the action runtime. Each field says its
variable, how its text is read, and, for those a command takes as a flag, the flag and its
help: ``faastube controller``, ``status`` and ``shim`` build their flags from these fields
(faastube/cli.py). Flags override the environment, which overrides the defaults.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile

from .errors import InvalidArgumentError

#: Where the controller listens unless ``--socket`` or ``FAASTUBE_SOCKET`` says otherwise.
DEFAULT_SOCKET = "/run/faastube/controller.sock"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
#: PCIe links' chunk (NVLink links' are as many times larger as they are faster): Note [Chunk
#: size per link] in controller/transfer.py.
DEFAULT_CHUNK_BYTES = 4 << 20

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6,
          "mib": 1 << 20, "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40}


def parse_size(text: str | int) -> int:
    """``"64MiB"`` → 67108864. Accepts plain byte counts and k/m/g/t with or without ``iB``."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise InvalidArgumentError(
            f"cannot read {text!r} as a size: write a byte count or a number with a unit, e.g. 64MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_flag(text: str) -> bool:
    """``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/``off``, in any case."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("write 1 or 0 (true/false, yes/no, on/off)")


def parse_octal(text: str) -> int:
    """A file mode such as ``660``."""
    try:
        value = int(text, 8)
    except ValueError:
        raise ValueError("write an octal file mode such as 660") from None
    if not 0 <= value <= 0o777:
        raise ValueError("write an octal file mode from 000 to 777, such as 660")
    return value


def _whole_within(text: str, low: int, high: float, message: str) -> int:
    """A whole number from ``low`` to ``high``; else ValueError(``message``)."""
    value = int(text)
    if not low <= value <= high:
        raise ValueError(message)
    return value


def parse_count(text: str) -> int:
    """A whole number of at least 1."""
    return _whole_within(text, 1, math.inf, "write a whole number of at least 1")


def parse_whole(text: str) -> int:
    """A whole number of at least 0."""
    return _whole_within(text, 0, math.inf, "write a whole number of at least 0")


def parse_port(text: str) -> int:
    """A TCP port, 1 to 65535, or 0 for none."""
    return _whole_within(text, 0, 65535, "write a port from 1 to 65535 (0: off)")


def parse_serving_port(text: str) -> int:
    """A TCP port to serve on, 1 to 65535."""
    return _whole_within(text, 1, 65535, "write a port from 1 to 65535")


def _finite_amount(text: str, unit: str, example: str) -> float:
    """A finite number of ``unit``, at least 0 (NaN and infinity refused)."""
    value = float(text)
    if not 0 <= value < float("inf"):
        raise ValueError(f"write a number of {unit}, at least 0, e.g. {example}")
    return value


def parse_seconds(text: str) -> float:
    """A finite number of seconds, at least 0."""
    return _finite_amount(text, "seconds", "30 or 0.5")


def parse_positive_seconds(text: str) -> float:
    """A finite number of seconds above 0."""
    value = parse_seconds(text)
    if value == 0:
        raise ValueError("write a number of seconds above 0, e.g. 30 or 0.5")
    return value


def parse_microseconds(text: str) -> float:
    """A finite number of microseconds, at least 0."""
    return _finite_amount(text, "microseconds", "100")


def parse_positive_size(text: str) -> int:
    """A size (:func:`parse_size`) of at least one byte."""
    value = parse_size(text)
    if value < 1:
        raise ValueError("write a size of at least 1 byte, e.g. 64MiB")
    return value


#: The URL schemes redis-py reads (Note: the directory is Redis, controller/directory.py).
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def parse_redis_url(text: str) -> str:
    """A Redis URL: ``redis://host:port/db``, ``rediss://`` (TLS) or ``unix:///path``."""
    import urllib.parse
    text = text.strip()
    if not text.startswith(REDIS_SCHEMES):
        raise ValueError("write a Redis URL such as redis://127.0.0.1:6379/0 (or rediss://… for "
                         "TLS, unix:///path/to/redis.sock)")
    parsed = urllib.parse.urlsplit(text)
    try:
        parsed.port
    except ValueError:
        raise ValueError("the port in a Redis URL must be a number from 1 to 65535") from None
    if parsed.scheme != "unix" and not parsed.hostname:
        raise ValueError("a redis:// URL needs a host, e.g. redis://127.0.0.1:6379/0")
    if parsed.scheme == "unix" and not parsed.path:
        raise ValueError("a unix:// URL needs the socket's path, e.g. unix:///run/redis.sock")
    return text


def parse_fraction(text: str) -> float:
    """A share between 0 and 1, e.g. ``0.5``."""
    value = float(text)
    if not 0 <= value <= 1:
        raise ValueError("write a share between 0 and 1, e.g. 0.5")
    return value


def parse_gpus(text: str) -> str:
    if text not in ("auto", "none"):
        raise ValueError("write 'auto' (every GPU the controller sees) or 'none'")
    return text


def parse_eviction(text: str) -> str:
    if text not in ("queue", "lru", "off"):
        raise ValueError("write 'queue', 'lru' or 'off'")
    return text


def parse_map_ahead(text: str) -> str:
    if text not in ("gpu", "all", "none"):
        raise ValueError("write 'gpu' (GPU slabs), 'all' (host slabs too) or 'none'")
    return text


def parse_share(text: str) -> float:
    """``0.5`` or ``50%`` (a share of each GPU's memory) or a size such as ``40GiB``."""
    text = text.strip()
    if text.endswith("%"):
        value = float(text[:-1]) / 100
    else:
        try:
            value = float(text)
        except ValueError:
            return parse_size(text)
    if value <= 0 or (text.endswith("%") and value > 1):
        raise ValueError("write a share in (0, 1], a percentage up to 100%, or a size such as 40GiB")
    return value if value <= 1 else int(value)       # above 1: a byte count


def share_of(value: float | int, whole: int) -> int:
    """Bytes for a value :func:`parse_share` read: a share (a float up to 1) of ``whole``, or
    a byte count as it is."""
    return int(whole * value) if isinstance(value, float) else int(value)


def parse_slo_ms(text: str) -> float:
    """A copy SLO in milliseconds, e.g. ``50`` or ``0.5``."""
    from .protocol import MAX_SLO_MS, MIN_SLO_MS
    value = float(text)
    if not MIN_SLO_MS <= value <= MAX_SLO_MS:
        raise ValueError(f"write milliseconds between {MIN_SLO_MS} and {MAX_SLO_MS:.0f}")
    return value


def format_size(nbytes: int) -> str:
    """67108864 → ``"64.0 MiB"``."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _default_pool_limit() -> int:
    """A quarter of the machine's memory: the host tier must never starve the functions."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError):
        return 4 << 30


def default_namespace(environ) -> str:
    # OpenWhisk gives every activation its namespace; Kubernetes pods may get theirs through
    # the downward API. Outside a platform everything lands in "default".
    return environ.get("__OW_NAMESPACE") or environ.get("POD_NAMESPACE") or "default"


def default_native_dir(environ=None) -> str:
    """Where the controller's native pump is compiled to: the user's cache folder, else a
    folder of this user's in the temporary folder (controller/pump.py)."""
    environ = os.environ if environ is None else environ
    cache = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if os.path.isdir(os.path.dirname(cache)) and os.access(os.path.dirname(cache), os.W_OK):
        return os.path.join(cache, "faastube")
    return os.path.join(tempfile.gettempdir(), f"faastube-{os.getuid()}")


def setting(default=dataclasses.MISSING, *, env: str, parse=str, flag: str | None = None,
            help: str | None = None, shown: str | None = None, metavar: str | None = None,
            default_factory=dataclasses.MISSING):
    """A configuration field: the variable that sets it, how its text becomes a value
    (raising ValueError with the fix), and for a command-line setting its flag and help
    (``shown``: the default as the help states it, where its value says it badly)."""
    metadata = {"env": env, "parse": parse, "flag": flag, "help": help, "shown": shown, "metavar": metavar}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_default(field: dataclasses.Field):
    """A configuration field's default value."""
    return field.default if field.default is not dataclasses.MISSING else field.default_factory()


class _FromEnvironment:
    """``from_env`` and the field list shared by the configuration dataclasses."""

    @classmethod
    def from_env(cls, environ: dict | None = None, **overrides):
        """Defaults, then the fields' variables, then ``overrides`` (None means unset)."""
        environ = os.environ if environ is None else environ
        values = {}
        for field in dataclasses.fields(cls):
            variable, parse = field.metadata["env"], field.metadata["parse"]
            if environ.get(variable):
                try:
                    values[field.name] = parse(environ[variable])
                except ValueError as exc:
                    raise InvalidArgumentError(f"{variable}={environ[variable]!r} is not valid: {exc}") from exc
        values.update(cls._derived(environ, values))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def given(cls, name: str, environ: dict | None = None):
        """One setting as its variable gives it, or None where the variable is not set: for
        a process that needs only that one and must not fail on the others."""
        environ = os.environ if environ is None else environ
        field = next(f for f in dataclasses.fields(cls) if f.name == name)
        text = environ.get(field.metadata["env"])
        if not text:
            return None
        try:
            return field.metadata["parse"](text)
        except ValueError as exc:
            raise InvalidArgumentError(f"{field.metadata['env']}={text!r} is not valid: {exc}") from exc

    @classmethod
    def read(cls, name: str, environ: dict | None = None):
        """One setting from the environment, else its default (see :meth:`given`)."""
        value = cls.given(name, environ)
        if value is not None:
            return value
        return field_default(next(f for f in dataclasses.fields(cls) if f.name == name))

    @classmethod
    def _derived(cls, environ, values) -> dict:
        """Defaults that depend on other variables than the field's own."""
        return {}

    @classmethod
    def flags(cls) -> list[dataclasses.Field]:
        """The fields a command takes as flags."""
        return [f for f in dataclasses.fields(cls) if f.metadata.get("flag")]


def _spin_default() -> float:
    # 100 µs where there are ≥ 8 cores; none on smaller machines, where the spinning client
    # would take the core the controller needs to answer.
    return 100.0 if (os.cpu_count() or 1) >= 8 else 0.0


@dataclasses.dataclass
class Config(_FromEnvironment):
    """Every setting of the controller and the SDK."""

    socket: str = setting(DEFAULT_SOCKET, env="FAASTUBE_SOCKET", flag="--socket",
                          help="the controller's Unix socket")
    redis: str = setting(DEFAULT_REDIS, env="FAASTUBE_REDIS", parse=parse_redis_url, flag="--redis", help="Redis URL for metadata")
    node: str = setting(env="FAASTUBE_NODE", flag="--node", default_factory=lambda: os.uname().nodename,
                        help="this node's name in the directory", shown="the hostname")
    # The host tier of the pool (controller side).
    slab_size: int = setting(64 << 20, env="FAASTUBE_SLAB_SIZE", parse=parse_positive_size, flag="--slab-size",
                             help="bytes per host slab", shown="64MiB")
    pool_limit: int = setting(env="FAASTUBE_POOL_LIMIT", parse=parse_size, flag="--pool-limit",
                              default_factory=_default_pool_limit, shown="1/4 of RAM",
                              help="most bytes the host pool may hold, e.g. 8GiB")
    idle_release_s: float = setting(30.0, env="FAASTUBE_IDLE_RELEASE_S", parse=parse_seconds, flag="--idle-release",
                                    metavar="SECONDS", help="release a slab after it stayed empty this long")
    idle_minimum: int = setting(300 << 20, env="FAASTUBE_IDLE_MINIMUM", parse=parse_size, flag="--idle-minimum",
                                shown="300MiB", help="bytes of empty slabs each pool keeps however long "
                                                     "they stay empty (the most recently emptied)")
    reserve_share: float = setting(0.5, env="FAASTUBE_RESERVE_SHARE", parse=parse_fraction,
                                   flag="--reserve-share",
                                   help="most of a pool's limit kept free ahead of one namespace's "
                                        "demand (0: no room kept ahead)")
    demand_window_s: float = setting(60.0, env="FAASTUBE_DEMAND_WINDOW_S", parse=parse_positive_seconds,
                                     flag="--demand-window", metavar="SECONDS",
                                     help="how long room is kept for a function seen only once")
    tombstone_ttl_s: int = setting(3600, env="FAASTUBE_TOMBSTONE_TTL_S", parse=parse_count, flag="--tombstone-ttl",
                                   metavar="SECONDS", help="how long Redis remembers why an object is gone")
    # The GPU tier (controller side): one pool per GPU, CUDA VMM slabs (controller/gpu.py).
    gpus: str = setting("auto", env="FAASTUBE_GPUS", parse=parse_gpus, flag="--gpus",
                        help="'auto': a pool on every GPU the controller sees; 'none': host tier only")
    namespace_quota: float = setting(1.0, env="FAASTUBE_NAMESPACE_QUOTA", parse=parse_share,
                                     flag="--namespace-quota", shown="100%% (the pool's limit)",
                                     help="most of each pool one namespace may hold in slabs: a share "
                                          "of the pool's limit such as 50%%, or a size")
    gpu_slab_size: int = setting(256 << 20, env="FAASTUBE_GPU_SLAB_SIZE", parse=parse_positive_size,
                                 flag="--gpu-slab-size", help="bytes per GPU slab", shown="256MiB")
    gpu_pool_limit: float = setting(0.5, env="FAASTUBE_GPU_POOL_LIMIT", parse=parse_share,
                                    flag="--gpu-pool-limit", shown="50%%",
                                    help="most bytes each GPU pool may hold: a size, or a share of the "
                                         "GPU's memory such as 50%%")
    gpu_free_share: float = setting(0.5, env="FAASTUBE_GPU_FREE_SHARE", parse=parse_fraction,
                                    flag="--gpu-free-share",
                                    help="most of a GPU's free memory (with its own slabs) its pool may hold")
    gpu_watermark: float = setting(0.05, env="FAASTUBE_GPU_WATERMARK", parse=parse_share, flag="--gpu-watermark",
                                   shown="5%%", help="a GPU's pool gives empty slabs back when the GPU's free "
                                                     "memory falls below this: a size, or a share of its memory")
    eviction: str = setting("queue", env="FAASTUBE_EVICTION", parse=parse_eviction, flag="--eviction",
                            help="what a full GPU tier moves to the host tier first: 'queue' (the objects "
                                 "needed last), 'lru' (the least recently used) or 'off' (none: puts fail)")
    evict_wait_s: float = setting(2.0, env="FAASTUBE_EVICT_WAIT_S", parse=parse_seconds, flag="--evict-wait",
                                  metavar="SECONDS",
                                  help="how long a put to a full GPU tier waits for eviction before it fails")
    stand_in_gpus: int = setting(0, env="FAASTUBE_STAND_IN_GPUS", parse=parse_whole, flag="--stand-in-gpus",
                                 metavar="N", help="N tiers of host memory standing in for GPUs (host:0 …; "
                                                   "--gpu-slab-size, --gpu-pool-limit as a size): for "
                                                   "tests and benchmarks without a GPU; needs --gpus none")
    secrets_file: str | None = setting(None, env="FAASTUBE_SECRETS_FILE", flag="--secrets-file",
                                       help='JSON {"namespace": "secret"}', shown="none")
    socket_mode: int = setting(0o660, env="FAASTUBE_SOCKET_MODE", parse=parse_octal, flag="--socket-mode",
                               help="socket file mode, octal", shown="660")
    max_connections: int = setting(1024, env="FAASTUBE_MAX_CONNECTIONS", parse=parse_count, flag="--max-connections",
                                   metavar="N", help="connections served at once; more are refused with a "
                                                     "clear error (lowered to fit the open-files limit)")
    max_waiting_gets: int = setting(4096, env="FAASTUBE_MAX_WAITING_GETS", parse=parse_count,
                                    flag="--max-waiting-gets", metavar="N",
                                    help="gets waiting for a seal at once, all connections together")
    idle_timeout_s: float = setting(300.0, env="FAASTUBE_IDLE_TIMEOUT_S", parse=parse_seconds, flag="--idle-timeout",
                                    metavar="SECONDS",
                                    help="close a connection that sent nothing for this long and holds "
                                         "no views, objects being written or waiting gets (the SDK "
                                         "reconnects on its next call); 0: never")
    frame_timeout_s: float = setting(10.0, env="FAASTUBE_FRAME_TIMEOUT_S", parse=parse_positive_seconds, flag="--frame-timeout",
                                     metavar="SECONDS",
                                     help="a request frame must arrive whole within this of its first byte")
    metrics_port: int = setting(0, env="FAASTUBE_METRICS_PORT", parse=parse_port, flag="--metrics-port",
                                metavar="PORT", shown="off",
                                help="serve Prometheus metrics on PORT, all interfaces")
    # The transfer engine (controller side): the one place its link defaults are set.
    chunk_size: int = setting(DEFAULT_CHUNK_BYTES, env="FAASTUBE_CHUNK_SIZE", parse=parse_positive_size, flag="--chunk-size",
                              shown="4MiB", help="bytes per chunk on PCIe links; NVLink links use chunks "
                                                 "as many times larger as they are faster")
    native_pump: bool = setting(True, env="FAASTUBE_NATIVE_PUMP", parse=parse_flag,
                                help="0 issues direct links' copies from Python (controller/pump.py)")
    native_dir: str = setting(None, env="FAASTUBE_NATIVE_DIR",
                              help="where the native pump is compiled to and loaded from")
    cc: str = setting("cc", env="CC", help="the C compiler that builds the native pump")
    # The SDK (client side).
    namespace: str = setting("default", env="FAASTUBE_NAMESPACE",
                             help="the caller's namespace; else __OW_NAMESPACE, else POD_NAMESPACE")
    secret: str | None = setting(None, env="FAASTUBE_SECRET", help="the namespace's secret, if it has one")
    get_timeout_s: float = setting(30.0, env="FAASTUBE_GET_TIMEOUT_S", parse=parse_seconds,
                                   help="how long a get waits for a pending object")
    connect_timeout_s: float = setting(5.0, env="FAASTUBE_CONNECT_TIMEOUT_S", parse=parse_positive_seconds)
    slo_ms: float | None = setting(None, env="FAASTUBE_SLO_MS", parse=parse_slo_ms,
                                   help="the default copy SLO of gets (docs/sdk.md)")
    spare_bytes: int = setting(128 << 20, env="FAASTUBE_SPARE_BYTES", parse=parse_size,
                               help="put's spares per process (0: none; Note [Spare objects])")
    put_waits: bool = setting(True, env="FAASTUBE_PUT_WAITS", parse=parse_flag,
                              help="1: a GPU put returns after its copy landed; 0: at once, sealing "
                                   "when it lands (Note [Put seals when its copy lands])")
    # Note [Results have a lifetime] (faastube/sdk.py): what the runtime gives an
    # activation's objects that name no lifetime.
    result_consumers: int = setting(1, env="FAASTUBE_RESULT_CONSUMERS", parse=parse_whole,
                                    help="gets after which an activation's result is freed (0: not counted)")
    result_ttl_s: float = setting(600.0, env="FAASTUBE_RESULT_TTL_S", parse=parse_seconds,
                                  help="seconds after which an activation's result is freed if not "
                                       "consumed first (0: no ttl)")
    map_ahead: str = setting("gpu", env="FAASTUBE_MAP_AHEAD", parse=parse_map_ahead,
                             help="slabs a process maps as they are made, on a thread of its own: "
                                  "gpu, all or none (Note [Slabs mapped ahead])")
    reply_spin_us: float = setting(env="FAASTUBE_REPLY_SPIN_US", parse=parse_microseconds, default_factory=_spin_default,
                                   help="poll for a reply this long before sleeping in recv")

    @classmethod
    def _derived(cls, environ, values) -> dict:
        return {"namespace": values.get("namespace") or default_namespace(environ),
                "native_dir": values.get("native_dir") or default_native_dir(environ)}


def _true_text(text: str) -> bool:
    return text.lower() == "true"


@dataclasses.dataclass
class ShimConfig(_FromEnvironment):
    """The action runtime's settings (``faastube shim``, shim/): what OpenWhisk and Knative
    tell a container through its environment, and FaaSTube's own."""

    port: int = setting(8080, env="PORT", parse=parse_serving_port, flag="--port", help="port to serve")
    allow_concurrent: bool = setting(False, env="__OW_ALLOW_CONCURRENT", parse=_true_text,
                                     help="OpenWhisk: the action may run activations concurrently")
    concurrency: int = setting(8, env="FAASTUBE_CONCURRENCY", parse=parse_count,
                               help="activations at once, where concurrency is allowed")
    platform: str = setting("", env="FAASTUBE_PLATFORM", help="'knative' serves the Knative contract")
    service: str = setting("", env="K_SERVICE", help="Knative: the service (its presence means Knative)")
    pod_namespace: str = setting("", env="POD_NAMESPACE", help="Knative: the pod's namespace")
    function: str = setting("func.py:main", env="FAASTUBE_FUNCTION",
                            help="Knative: the function, /path/to/file.py:name")
    ce_source: str | None = setting(None, env="FAASTUBE_CE_SOURCE",
                                    help="Knative: the reply events' source (default /faastube/<service>)")
    ce_type: str = setting("dev.faastube.result", env="FAASTUBE_CE_TYPE",
                           help="Knative: the reply events' type")
    max_body: int = setting(256 << 20, env="FAASTUBE_MAX_BODY", parse=parse_size, shown="256MiB",
                            help="largest request body the runtime reads (413 above it)")
    request_timeout_s: float = setting(30.0, env="FAASTUBE_REQUEST_TIMEOUT_S", parse=parse_positive_seconds,
                                       help="seconds a request may take to arrive whole, from its first "
                                            "byte (408 after it): slow clients cannot hold a connection")
    log_marker: str = setting("", env="FAASTUBE_LOG_MARKER",
                              help="set by the shim for an action process whose logs it captures")

    @property
    def knative(self) -> bool:
        return bool(self.service) or self.platform.lower() == "knative"

    @property
    def activations_at_once(self) -> int:
        """One at a time, unless OpenWhisk allows concurrency or this is Knative."""
        return self.concurrency if self.allow_concurrent or self.knative else 1
