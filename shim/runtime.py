"""The runtime's state, shared by both protocols: the one action this container runs, how
many activations may run at once, its logs, and how an action is started (the same steps
for an OpenWhisk ``/init`` and a Knative function loaded at start).
"""

from __future__ import annotations

import json
import os
import sys
import threading

from faastube.config import ShimConfig

from .executor import ActionExited, ActionPool, ActionProcess

SENTINEL = b"XXX_THE_END_OF_A_WHISK_ACTIVATION_XXX\n"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def go_json(value) -> str:
    """``value`` as the stock Go proxy writes a non-string init env value (``json.Marshal`` of
    what ``json.Unmarshal`` made of it): compact, object keys sorted, ``<``, ``>`` and ``&``
    escaped, and U+2028/U+2029 too (as Go's encoder does for JavaScript), a whole number written
    without a fraction (Go holds every JSON number as a float64). Exponent forms of very large
    or small numbers may still differ."""
    def whole(v):
        if isinstance(v, float) and v.is_integer() and abs(v) < 1e21:
            return int(v)
        if isinstance(v, dict):
            return {k: whole(x) for k, x in v.items()}
        if isinstance(v, list):
            return [whole(x) for x in v]
        return v
    text = json.dumps(whole(value), separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    for char, escape in _GO_ESCAPES:
        text = text.replace(char, escape)
    return text


# What Go's json.Marshal escapes that json.dumps(ensure_ascii=False) writes as it is.
_GO_ESCAPES = (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
               ("\u2028", "\\u2028"), ("\u2029", "\\u2029"))


def action_environment(init_env: dict) -> dict:
    """The container's environment (PATH, LD_LIBRARY_PATH, CUDA_*, NVIDIA_*, FAASTUBE_* …)
    plus the init env. Unlike the stock proxy, nothing of the container's is dropped."""
    env = dict(os.environ)
    env.update({str(k): v if isinstance(v, str) else go_json(v) for k, v in init_env.items()})
    shim_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (shim_root, env.get("PYTHONPATH")) if p)
    return env


class Runtime:
    """The one action this container runs, and how many activations may run at once."""

    def __init__(self, settings: ShimConfig, sentinel: bytes = SENTINEL):
        self.settings = settings
        self.concurrency = settings.activations_at_once
        self.sentinel = sentinel            # OpenWhisk cuts logs per activation; Knative not
        self.pool: ActionPool | None = None
        self.initialized = False
        self.gone = False                   # the action process exited: no action any more
        # Note [A crashed process is replaced]: with several processes (OpenWhisk's concurrent
        # mode) and on Knative, a process that exits fails only its own activation; the next
        # one starts a new process. One serial OpenWhisk process keeps the stock proxy's rule
        # (the action is gone). Replacing stops once a new process cannot start either.
        self.replaces_crashed = settings.knative or self.concurrency > 1
        self.load_error: str | None = None  # Knative: why the function did not load
        self.init_lock = threading.Lock()      # /init runs once, never twice at a time
        self._log_lock = threading.Lock()

    def start(self, folder: str, main: str, env: dict, entry: str = "__main__.py") -> None:
        """Start the action's first process and wait until it has imported the action; then
        the runtime serves it. Raises ActionExited (what it printed is logged) if it died."""
        process = ActionProcess(folder, main, env, capture=self.concurrency > 1, entry=entry)
        try:
            process.wait_ready()
        finally:
            self.log_startup(process)
        self.pool = ActionPool(process, folder, main, env, self.concurrency,
                               on_start=self.log_startup, entry=entry)
        self.initialized = True

    def call(self, args: dict | bytes) -> bytes:
        """Run one activation on a free action process (``args``: the request as a dict, or
        as one line of JSON); its reply line. Raises ActionExited if the process died, and
        the action is then gone (as on the stock proxy), or its process is replaced (Note [A
        crashed process is replaced])."""
        line = args if isinstance(args, bytes) else json.dumps(args, ensure_ascii=False).encode("utf-8")
        try:
            process = self.pool.acquire()
        except ActionExited:                  # a new process could not even start
            self.gone = True
            raise
        try:
            reply = process.interact(line)
        except ActionExited as exc:
            self.log_sentinels(process)
            if not self.replaces_crashed:
                self.gone = True
                raise
            self.pool.discard(process)
            print(f"faastube: the action's process exited during an activation ({exc}); a new one "
                  f"starts for the next activation", file=sys.stderr, flush=True)
            raise
        self.log_sentinels(process)
        self.pool.release(process)
        return reply

    def write_logs(self, out: bytes, err: bytes) -> None:
        """Write to stdout and stderr, each whole, after anything the server printed there."""
        with self._log_lock:
            for stream, data in ((sys.stdout, out), (sys.stderr, err)):
                stream.flush()
                _write_all(stream.fileno(), data)

    def log_sentinels(self, process: ActionProcess | None = None) -> None:
        """End an activation's logs; with captured logs, write its output block first."""
        out, err = process.take_logs() if process is not None and process.logs else (b"", b"")
        self.write_logs(out + self.sentinel, err + self.sentinel)

    def log_startup(self, process: ActionProcess) -> None:
        """Pass on what an action process printed while importing (no sentinel)."""
        if process.logs:
            self.write_logs(*process.take_logs())

    def log_both(self, text: str) -> None:
        line = (text + "\n").encode("utf-8")
        self.write_logs(line, line)
