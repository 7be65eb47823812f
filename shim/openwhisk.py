"""The OpenWhisk action runtime protocol (``POST /init``, ``POST /run``), byte for byte as the
stock Python runtime (Go ActionLoop proxy + Python launcher) answers it. The statuses and
texts are the stock runtime's (docs/runtime.md); handlers check each step in order
and return early through :func:`error_response`.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import traceback

from flask import Flask, Response, request

from .executor import ActionExited
from .extractor import BuildError, DecodeError, extract, remove
from .launcher import IMPORT_FAILED_EXIT
from .runtime import Runtime, action_environment

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


def error_body(message: str) -> bytes:
    return go_json({"error": message}) + b"\n"


def error_response(status: int, message: str) -> Response:
    return json_response(error_body(message), status)


def json_response(body: bytes, status: int = 200) -> Response:
    return Response(body, status=status, mimetype="application/json")


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
    # The stock proxy's check (json.Unmarshal into a map, else a slice) also takes "null",
    # which a Go map accepts: `return None` answers 200 null there, so it does here.
    if reply[:1] not in (b"{", b"[") and reply != b"null":
        return 502, error_body(NOT_A_DICT)
    return 200, reply


def _wrong_init_field(value: dict) -> str | None:
    """What is wrong with the types in an /init ``value``, or None: code and main are
    strings, binary a boolean, env an object whose names can be environment variables."""
    for name, kind, label in (("code", str, "a string"), ("main", str, "a string"),
                              ("binary", bool, "a boolean"), ("env", dict, "an object")):
        if value.get(name) is not None and not isinstance(value[name], kind):
            return f"field value.{name} must be {label}, got {type(value[name]).__name__}"
    for key, item in (value.get("env") or {}).items():
        if not key or "=" in key or "\0" in key or (isinstance(item, str) and "\0" in item):
            return f"env name {key!r} (or its value) cannot be an environment variable"
    return None


def initialize(runtime: Runtime, body) -> Response:
    value = body.get("value") if isinstance(body, dict) else None
    value = value if isinstance(value, dict) else {}
    wrong = _wrong_init_field(value)
    if wrong:               # the stock proxy cannot unmarshal it into its request either
        return error_response(400, f"Error unmarshaling request: {wrong}")
    code = value.get("code")
    if not code:
        return error_response(403, "Missing main/no code to execute.")
    main = value.get("main") or "main"
    init_env = value.get("env") or {}
    try:
        action = extract(code, bool(value.get("binary")))
    except DecodeError as exc:
        return error_response(400, f"cannot decode the request: {exc}")
    except BuildError as exc:
        print(exc, file=sys.stderr, flush=True)
        return error_response(502, BUILD_FAILED)
    if not action.prebuilt:      # the stock compile step checks the source; a build it runs as is
        try:
            with open(os.path.join(action.folder, action.entry), "rb") as file:
                compile(file.read(), action.entry, "exec")
        except (SyntaxError, ValueError):
            traceback.print_exc(limit=0, file=sys.stderr)
            sys.stderr.flush()
            remove(action.folder)
            return error_response(502, BUILD_FAILED)
    try:
        # A build names its own entry point (Note [Prebuilt ActionLoop zips]).
        runtime.start(action.folder, action.main or main, action_environment(init_env), entry=action.entry)
    except ActionExited as exc:
        if exc.returncode != IMPORT_FAILED_EXIT:
            print("Command exited abruptly during initialization.", file=sys.stderr, flush=True)
        remove(action.folder)
        return error_response(502, CANNOT_START)
    atexit.register(remove, action.folder)    # the action's files go with the runtime
    return json_response(b'{"ok":true}\n')
