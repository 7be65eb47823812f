"""The OpenWhisk action runtime protocol (``POST /init``, ``POST /run``), byte for byte as the
stock Python runtime (Go ActionLoop proxy + Python launcher) answers it. The statuses and
texts come from ../shared/reference/platform-contracts.md; handlers check each step in order
and return early through :func:`error_response`.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import traceback

from flask import Flask, Response, request

from .executor import ActionExited, ActionPool, ActionProcess
from .extractor import BuildError, DecodeError, extract
from .launcher import IMPORT_FAILED_EXIT

SENTINEL = b"XXX_THE_END_OF_A_WHISK_ACTIVATION_XXX\n"
BUILD_FAILED = "The action failed to generate or locate a binary. See logs for details."
CANNOT_START = "Cannot start action. Check logs for details."
NOT_A_DICT = "The action did not return a dictionary or array."


def go_json(value) -> bytes:
    """JSON as Go's encoding/json writes it: compact, UTF-8, with <, >, & escaped."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    for raw, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(raw, escaped)
    return text.encode("utf-8")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def error_body(message: str) -> bytes:
    return go_json({"error": message}) + b"\n"


def error_response(status: int, message: str) -> Response:
    return json_response(error_body(message), status)


def json_response(body: bytes, status: int = 200) -> Response:
    return Response(body, status=status, mimetype="application/json")


class Runtime:
    """The one action this container runs, and how many activations may run at once."""

    def __init__(self, concurrency: int, sentinel: bytes = SENTINEL):
        self.concurrency = concurrency
        self.sentinel = sentinel            # OpenWhisk cuts logs per activation; Knative not
        self.pool: ActionPool | None = None
        self.initialized = False
        self.gone = False                   # the action process exited: no action any more
        self.load_error: str | None = None  # Knative: why the function did not load
        self.init_lock = threading.Lock()      # /init runs once, never twice at a time
        self._log_lock = threading.Lock()

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

    def call(self, args: dict | bytes) -> bytes:
        """Run one activation on a free action process (``args``: the request as a dict, or
        as one line of JSON); its reply line. Raises ActionExited if the process died, and
        the action is then gone (as on the stock proxy)."""
        line = args if isinstance(args, bytes) else json.dumps(args, ensure_ascii=False).encode("utf-8")
        process = self.pool.acquire()
        try:
            reply = process.interact(line)
        except ActionExited:
            self.gone = True
            self.log_sentinels(process)
            raise
        self.log_sentinels(process)
        self.pool.release(process)
        return reply

    def log_startup(self, process: ActionProcess) -> None:
        """Pass on what an action process printed while importing (no sentinel)."""
        if process.logs:
            self.write_logs(*process.take_logs())

    def log_both(self, text: str) -> None:
        line = (text + "\n").encode("utf-8")
        self.write_logs(line, line)


def action_environment(init_env: dict) -> dict:
    """The container's environment (PATH, LD_LIBRARY_PATH, CUDA_*, NVIDIA_*, FAASTUBE_* …)
    plus the init env. Unlike the stock proxy, nothing of the container's is dropped."""
    env = dict(os.environ)
    env.update({str(k): v if isinstance(v, str) else json.dumps(v) for k, v in init_env.items()})
    shim_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (shim_root, env.get("PYTHONPATH")) if p)
    return env


def register_openwhisk(app: Flask, runtime: Runtime) -> None:
    @app.post("/init")
    def init():
        try:
            body = json.loads(request.get_data())
        except ValueError as exc:
            return error_response(400, f"Error unmarshaling request: {exc}")
        with runtime.init_lock:
            if runtime.initialized:
                text = "Cannot initialize the action more than once."
                runtime.log_both(text)
                return error_response(403, text)
            response = initialize(runtime, body)
            if response.status_code != 200:
                runtime.log_sentinels()
            return response

    @app.post("/run")
    def run():
        status, payload = run_activation(runtime, request.get_data())
        return json_response(payload, status)

    # The shim's gunicorn worker answers POST /run with run_activation directly, without a
    # WSGI environ or a Flask request (shim/worker.py): /run is the hot path.
    app.extensions["faastube_direct_routes"] = {
        ("POST", b"/run"): lambda body: run_activation(runtime, body)}


def run_activation(runtime: Runtime, body: bytes) -> tuple[int, bytes]:
    """``POST /run``: the status and JSON body, as the stock proxy answers them."""
    try:
        args = json.loads(body)
    except ValueError as exc:
        return 400, error_body(f"Error unmarshaling request: {exc}")
    if runtime.pool is None or runtime.gone:
        return 500, error_body("no action defined yet")
    if isinstance(args, dict):
        # The body goes to the action as it came, on one line (as the Go proxy sends it).
        request_line = body.replace(b"\r", b"").replace(b"\n", b"")
    else:
        request_line = b"{}"                  # not an object: main({}), like the launcher
    try:
        reply = runtime.call(request_line)
    except ActionExited:
        return 400, error_body("command exited")   # later runs: no action defined yet
    # The launcher wrote the reply with json.dumps: a dict starts with "{", a list with "[".
    if reply[:1] not in (b"{", b"["):
        return 502, error_body(NOT_A_DICT)
    return 200, reply


def initialize(runtime: Runtime, body) -> Response:
    value = body.get("value") if isinstance(body, dict) else None
    value = value if isinstance(value, dict) else {}
    code = value.get("code")
    if not code or not isinstance(code, str):
        return error_response(403, "Missing main/no code to execute.")
    main = value.get("main") or "main"
    init_env = value.get("env") if isinstance(value.get("env"), dict) else {}
    try:
        folder = extract(code, bool(value.get("binary")))
    except DecodeError as exc:
        return error_response(400, f"cannot decode the request: {exc}")
    except BuildError as exc:
        print(exc, file=sys.stderr, flush=True)
        return error_response(502, BUILD_FAILED)
    try:
        with open(os.path.join(folder, "__main__.py"), "rb") as file:
            compile(file.read(), "__main__.py", "exec")
    except (SyntaxError, ValueError):
        traceback.print_exc(limit=0, file=sys.stderr)
        sys.stderr.flush()
        return error_response(502, BUILD_FAILED)
    env = action_environment(init_env)
    process = ActionProcess(folder, main, env, capture=runtime.concurrency > 1)
    try:
        process.wait_ready()
    except ActionExited as exc:
        runtime.log_startup(process)
        if exc.returncode != IMPORT_FAILED_EXIT:
            print("Command exited abruptly during initialization.", file=sys.stderr, flush=True)
        return error_response(502, CANNOT_START)
    runtime.log_startup(process)
    runtime.pool = ActionPool(process, folder, main, env, runtime.concurrency,
                              on_start=runtime.log_startup)
    runtime.initialized = True
    return json_response(b'{"ok":true}\n')


def create_app(concurrency: int = 1, knative: bool = False, function: str | None = None) -> Flask:
    """The runtime's Flask app: the OpenWhisk protocol, or the Knative contract with the
    function loaded now. ``concurrency`` > 1 runs that many activations at once."""
    app = Flask("faastube-shim")
    runtime = Runtime(concurrency, sentinel=b"" if knative else SENTINEL)
    app.extensions["faastube_runtime"] = runtime
    if knative:
        from .knative import load_function, register_knative
        register_knative(app, runtime)
        load_function(runtime, function)
    else:
        register_openwhisk(app, runtime)
    return app
