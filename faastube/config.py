"""One typed configuration, defaults in one place, read once from ``FAASTUBE_*`` variables.

Both the controller and the SDK read their settings here. Command-line flags of
``faastube controller`` override the environment, which overrides the defaults.
"""

from __future__ import annotations

import dataclasses
import os
import re

from .errors import InvalidArgumentError

#: Where the controller listens unless ``--socket`` or ``FAASTUBE_SOCKET`` says otherwise.
DEFAULT_SOCKET = "/run/faastube/controller.sock"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"

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


def parse_gpus(text: str) -> str:
    if text not in ("auto", "none"):
        raise ValueError("write 'auto' (every GPU the controller sees) or 'none'")
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


@dataclasses.dataclass
class Config:
    """Every setting of the controller and the SDK. Field docs name the variable that sets it."""

    socket: str = DEFAULT_SOCKET            # FAASTUBE_SOCKET: the controller's Unix socket
    redis: str = DEFAULT_REDIS              # FAASTUBE_REDIS: Redis URL (metadata only)
    node: str = dataclasses.field(default_factory=lambda: os.uname().nodename)  # FAASTUBE_NODE
    # Host tier of the pool (controller side).
    slab_size: int = 64 << 20               # FAASTUBE_SLAB_SIZE: bytes per memfd slab
    pool_limit: int = dataclasses.field(default_factory=_default_pool_limit)  # FAASTUBE_POOL_LIMIT
    idle_release_s: float = 30.0            # FAASTUBE_IDLE_RELEASE_S: empty slab kept this long
    tombstone_ttl_s: int = 3600             # FAASTUBE_TOMBSTONE_TTL_S: deleted/lost ids remembered
    # GPU tier (controller side): one pool per GPU, CUDA VMM slabs (faastube/cuda.py).
    gpus: str = "auto"                      # FAASTUBE_GPUS: "auto" (every GPU it sees) or "none"
    gpu_slab_size: int = 256 << 20          # FAASTUBE_GPU_SLAB_SIZE: bytes per GPU slab
    gpu_pool_limit: float = 0.5             # FAASTUBE_GPU_POOL_LIMIT: bytes per GPU, or a fraction ≤ 1 of its memory
    secrets_file: str | None = None         # FAASTUBE_SECRETS_FILE: JSON {namespace: secret}
    socket_mode: int = 0o660                # FAASTUBE_SOCKET_MODE (octal)
    metrics_port: int = 0                   # FAASTUBE_METRICS_PORT: Prometheus /metrics (0: off)
    chunk_size: int = 4 << 20               # FAASTUBE_CHUNK_SIZE: PCIe links' chunk (controller/transfer.py)
    native_pump: bool = True                # FAASTUBE_NATIVE_PUMP: 0 issues direct links' copies from Python
    # Client (SDK) side.
    namespace: str = "default"              # FAASTUBE_NAMESPACE, else __OW_NAMESPACE, POD_NAMESPACE
    secret: str | None = None               # FAASTUBE_SECRET: the namespace's secret, if any
    get_timeout_s: float = 30.0             # FAASTUBE_GET_TIMEOUT_S: wait for a pending object
    connect_timeout_s: float = 5.0          # FAASTUBE_CONNECT_TIMEOUT_S
    slo_ms: float | None = None             # FAASTUBE_SLO_MS: default copy SLO of gets (docs/sdk.md)
    spare_bytes: int = 128 << 20            # FAASTUBE_SPARE_BYTES: put's spares per process (0: none)
    # FAASTUBE_PUT_WAITS: 1 (default) a GPU put returns after its copy has landed; 0 at once,
    # sealing when it lands (Note [Put seals when its copy lands], faastube/client.py).
    put_waits: bool = True
    # FAASTUBE_REPLY_SPIN_US: poll for a reply this long before sleeping in recv (default:
    # 100 where there are ≥ 8 cores; none on smaller machines, where the spinning client
    # would take the core the controller needs to answer).
    reply_spin_us: float = dataclasses.field(default_factory=lambda: 100.0 if (os.cpu_count() or 1) >= 8 else 0.0)

    _ENV = {
        "socket": ("FAASTUBE_SOCKET", str),
        "redis": ("FAASTUBE_REDIS", str),
        "node": ("FAASTUBE_NODE", str),
        "slab_size": ("FAASTUBE_SLAB_SIZE", parse_size),
        "pool_limit": ("FAASTUBE_POOL_LIMIT", parse_size),
        "idle_release_s": ("FAASTUBE_IDLE_RELEASE_S", float),
        "tombstone_ttl_s": ("FAASTUBE_TOMBSTONE_TTL_S", int),
        "gpus": ("FAASTUBE_GPUS", parse_gpus),
        "gpu_slab_size": ("FAASTUBE_GPU_SLAB_SIZE", parse_size),
        "gpu_pool_limit": ("FAASTUBE_GPU_POOL_LIMIT", parse_share),
        "secrets_file": ("FAASTUBE_SECRETS_FILE", str),
        "socket_mode": ("FAASTUBE_SOCKET_MODE", lambda v: int(v, 8)),
        "metrics_port": ("FAASTUBE_METRICS_PORT", int),
        "chunk_size": ("FAASTUBE_CHUNK_SIZE", parse_size),
        "native_pump": ("FAASTUBE_NATIVE_PUMP", parse_flag),
        "namespace": ("FAASTUBE_NAMESPACE", str),
        "secret": ("FAASTUBE_SECRET", str),
        "get_timeout_s": ("FAASTUBE_GET_TIMEOUT_S", float),
        "connect_timeout_s": ("FAASTUBE_CONNECT_TIMEOUT_S", float),
        "slo_ms": ("FAASTUBE_SLO_MS", parse_slo_ms),
        "spare_bytes": ("FAASTUBE_SPARE_BYTES", parse_size),
        "put_waits": ("FAASTUBE_PUT_WAITS", parse_flag),
        "reply_spin_us": ("FAASTUBE_REPLY_SPIN_US", float),
    }

    @classmethod
    def from_env(cls, environ: dict | None = None, **overrides) -> "Config":
        """Defaults, then ``FAASTUBE_*`` variables, then ``overrides`` (None means unset)."""
        environ = os.environ if environ is None else environ
        values = {}
        for field, (variable, convert) in cls._ENV.items():
            if environ.get(variable):
                try:
                    values[field] = convert(environ[variable])
                except ValueError as exc:
                    raise InvalidArgumentError(f"{variable}={environ[variable]!r} is not valid: {exc}") from exc
        values.setdefault("namespace", default_namespace(environ))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
