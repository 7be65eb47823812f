"""A link's copy pump in C (controller/native/pump.c), for the transfer engine's direct links.

Note [The native pump]: a small move on a busy link waits for whatever is queued on the copy
engine ahead of it, and the engine drains its queue in order. With Python keeping two chunks
queued, a 1 MB move during 1 GB moves took many times its time alone: up to two chunks of
queue, plus threads taking turns on the GIL to issue and to notice completions. The pump
takes both out of Python. A C thread per link holds the link's pieces (cut to at most ``piece_bytes``) and
puts each on the engine only when the one running is about to end: at its predicted end
(from a rate the pump learns from the engine) less a lead, which grows when the engine ran
dry with work waiting and shrinks while it did not. So the engine holds the running piece
and, briefly, the next. A small move queued "express" goes on at once, behind what the
engine holds; while express moves have come in the last ``recent`` seconds, normal pieces go
on ``split`` bytes at a time, so what an express move waits behind is short. Otherwise
pieces go on whole, so a large move keeps the engine's rate (every copy costs the engine a
few µs besides its bytes). The thread spins (yielding) while its link has work and sleeps
when idle; an idle engine takes the first piece from the caller's own thread. Callers wait
in C with the GIL released. docs/benchmarks.md ("The native pump") has what it measured:
the small move's p50 during large moves fell; its p99 did not (the tail is the host waking
threads).

The library is compiled at first use with the system's C compiler (``$CC``, else ``cc``) into
``$FAASTUBE_NATIVE_DIR`` (else the user's cache folder; faastube/config.py), named by its source's hash; where
that cannot be done, :func:`library` raises PumpUnavailable saying why, and the transfer
engine keeps its links in Python (controller/transfer.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import threading

from faastube.config import Config, default_native_dir
from faastube.errors import PumpError, PumpUnavailable

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native", "pump.c")
DEFAULT_LEAD_S = 8e-6           # a piece goes on this long before the running one ends
DEFAULT_OVERHEAD_S = 3e-6       # the engine's cost per piece, beside its bytes (H200, PCIe)
DEFAULT_SPLIT_BYTES = 1 << 20   # normal pieces' size while express moves are about
DEFAULT_RECENT_S = 0.020
EXPRESS_SPIN_S = 0.005          # an express move's caller spins this long before sleeping
_BUSY, _BAD, _CLOSED = -1, -2, -3


_library = None
_library_error: str | None = None
_library_lock = threading.Lock()


def _check_trusted(path: str) -> None:
    """Note [Only our own library]: the controller loads code from this folder, so it must
    belong to this user (or root, as in the controller image) and be writable by nobody
    else; otherwise anyone could plant a library under the name it will load (the names are
    predictable), e.g. in a shared temporary folder."""
    info = os.stat(path)
    if info.st_uid not in (os.getuid(), 0) or info.st_mode & 0o022:
        raise PumpUnavailable(f"{path} belongs to uid {info.st_uid} or is writable by others "
                              f"(mode {info.st_mode & 0o777:o}): not loading a pump library from it; "
                              f"set FAASTUBE_NATIVE_DIR to a folder of this user's")


def build(directory: str | None = None) -> str:
    """Compile the pump (once per source version and machine) and return the library's path."""
    with open(SOURCE, "rb") as f:
        source = f.read()
    tag = hashlib.sha256(source + platform.machine().encode()).hexdigest()[:16]
    directory = directory or Config.read("native_dir") or default_native_dir()
    path = os.path.join(directory, f"faastube-pump-{tag}.so")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    _check_trusted(directory)
    if os.path.exists(path):
        _check_trusted(path)
        return path
    compiler = Config.read("cc")
    partial = f"{path}.{os.getpid()}.tmp"
    try:
        done = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-pthread", "-o", partial, SOURCE, "-ldl"],
                              capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PumpUnavailable(f"cannot compile {SOURCE} with {compiler!r}: {exc}") from None
    if done.returncode != 0:
        raise PumpUnavailable(f"{compiler} could not compile {SOURCE}:\n{done.stderr.strip()}")
    os.replace(partial, path)          # atomic: a concurrent builder's copy is as good
    return path


def library():
    """The loaded pump library (built on first use), or PumpUnavailable saying why not."""
    global _library, _library_error
    with _library_lock:
        if _library is None and _library_error is None:
            try:
                _library = _Library(build())
            except (PumpUnavailable, OSError) as exc:
                _library_error = str(exc)
        if _library is None:
            raise PumpUnavailable(_library_error)
        return _library


class _Library:
    """The two views of one shared library: calls that take a µs keep the GIL (a release
    lets a busy thread in, and taking it back waits for that thread: Note [Issuing holds
    the GIL], faastube/cuda.py); calls that wait release it."""

    def __init__(self, path: str):
        keep, release = ctypes.PyDLL(path), ctypes.CDLL(path)
        p, u64, i64, i32 = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int64, ctypes.c_int
        for lib, name, argtypes, restype in (
                (keep, "pump_load_cuda", [], i32),
                (keep, "pump_create", [i32, p, p, ctypes.c_double, ctypes.c_double, i64, i64, u64, u64, i64], p),
                (keep, "pump_issue", [p, ctypes.POINTER(u64), i32, i32], i32),
                (keep, "pump_stats", [p, ctypes.POINTER(ctypes.c_double)], None),
                (release, "pump_wait", [p, i32, i64], i32),
                (release, "pump_close", [p], None)):
            function = getattr(lib, name)
            function.argtypes, function.restype = argtypes, restype
            setattr(self, name[len("pump_"):], function)
        self.cuda_loaded = False


class Pump:
    """One link's pump (Note [The native pump]): ``issue(pieces) -> token`` and
    ``wait(token)`` as the copy queues in controller/gpu.py, and ``move(dst, src, nbytes)``,
    a small move queued ahead of everything not yet on the engine, waited for in the same
    call. :meth:`on_gpu` makes one that drives a GPU's copy engine; ``Pump()`` one whose
    engine is a host thread copying at ``host_rate`` bytes/s (as fast as it can if None)."""

    def __init__(self, bandwidth: float = 10e9, *, host_rate: float | None = None,
                 lead_s: float = DEFAULT_LEAD_S, overhead_s: float = DEFAULT_OVERHEAD_S,
                 piece_bytes: int = 0, split_bytes: int = DEFAULT_SPLIT_BYTES,
                 recent_s: float = DEFAULT_RECENT_S,
                 _gpu: tuple[int, int, int] | None = None):
        if bandwidth <= 0 or (host_rate is not None and host_rate <= 0):
            raise ValueError("a pump's rates must be positive")
        if min(lead_s, overhead_s, piece_bytes, split_bytes, recent_s) < 0:
            raise ValueError("a pump's lead, overhead, piece, split and recent must not be negative")
        self._lib = library()
        self.ordinal, context, stream = _gpu or (None, 0, 0)
        self._handle = self._lib.create(int(_gpu is not None), context, stream, float(bandwidth),
                                        float(host_rate or 0), int(lead_s * 1e9), int(overhead_s * 1e9),
                                        int(piece_bytes), int(split_bytes), int(recent_s * 1e9))
        if not self._handle:
            raise PumpError("could not make a pump (out of memory, or the GPU refused its events)")
        self._closed = False

    @classmethod
    def on_gpu(cls, ordinal: int, bandwidth: float, **policy) -> "Pump":
        """A pump on a new stream of GPU ``ordinal``'s primary context."""
        from . import gpu
        lib = library()
        with _library_lock:
            if not lib.cuda_loaded:
                if lib.load_cuda() != 0:
                    raise PumpUnavailable("the pump could not load libcuda.so.1's copy and event calls")
                lib.cuda_loaded = True
        context, stream = gpu.new_stream(ordinal)
        return cls(bandwidth, _gpu=(ordinal, context, stream), **policy)

    def issue(self, pieces, express: bool = False) -> int:
        """Queue (destination, source, length) copies; returns their token."""
        flat = [int(value) for piece in pieces for value in piece]
        if not flat or len(flat) % 3:
            raise ValueError("a pump takes (destination, source, length) pieces, at least one")
        token = self._lib.issue(self._handle, (ctypes.c_uint64 * len(flat))(*flat), len(flat) // 3, int(express))
        if token == _BUSY:
            raise PumpError("the link's pump has no room for more moves (256 in flight at most)")
        if token == _CLOSED:
            raise PumpError("the link's pump is closed")
        if token < 0:
            raise PumpError(f"the pump refused {len(flat) // 3} pieces")
        return token

    def wait(self, token: int, spin_s: float = 0.0) -> None:
        """Block (the GIL released) until the token's copies have arrived; raises what failed."""
        self._raise(self._lib.wait(self._handle, token, int(spin_s * 1e9)))

    def move(self, dst: int, src: int, nbytes: int) -> None:
        """Copy a small move ahead of the queued pieces and wait for it (spinning first:
        its wait is a piece's time or two)."""
        self.wait(self.issue([(dst, src, nbytes)], express=True), EXPRESS_SPIN_S)

    def stats(self) -> dict:
        """Pieces put on the engine (of them split, and express), bytes landed, the rate it
        learnt (bytes/s), express pieces' summed seconds queued in the pump and from going
        on the engine to being seen done, how often the engine ran dry with work waiting,
        and the lead it has settled on (seconds)."""
        out = (ctypes.c_double * 9)()
        self._lib.stats(self._handle, out)
        return {"pieces": int(out[0]), "split_pieces": int(out[1]), "express_pieces": int(out[2]),
                "bytes": int(out[3]), "learnt_bandwidth": out[4], "express_queued_s": out[5],
                "express_copy_s": out[6], "idles": int(out[7]), "lead_s": out[8]}

    def _raise(self, code: int) -> None:
        if code == 0:
            return
        if code == _BAD:
            raise PumpError("unknown or spent pump token")
        if code == _BUSY:
            raise PumpError("the link's pump had no room for part of the move")
        from . import gpu
        gpu.raise_for(code)

    def close(self) -> None:
        """Stop after what is queued has landed; later moves raise PumpError."""
        if not self._closed:
            self._closed = True
            self._lib.close(self._handle)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
