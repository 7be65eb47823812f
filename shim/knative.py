"""The Knative contract: the function is loaded at start, ``POST /`` calls it with a JSON body
or a CloudEvent's data, and health probes have their own routes.

- ``FAASTUBE_FUNCTION=/path/to/file.py:main`` names the function (default ``func.py:main``
  in the working directory); its folder is the working directory of the action processes.
  (faastube.config.ShimConfig has every setting.)
- A CloudEvent in binary mode (``ce-specversion`` header) or structured mode
  (``Content-Type: application/cloudevents+json``) calls ``main(event data)``; the answer is a
  CloudEvent in binary mode with ``ce-type: dev.faastube.result`` (or ``FAASTUBE_CE_TYPE``)
  and ``ce-source: /faastube/<K_SERVICE>`` (or ``FAASTUBE_CE_SOURCE``), so a Sequence goes on.
- Any other JSON body calls ``main(body)`` and answers its JSON.
- ``GET /health/readiness`` is 200 once the function is loaded (503 before, or if it failed);
  ``GET /health/liveness`` is 200 while the server runs.
"""

from __future__ import annotations

import json
import os
import sys
import uuid

from flask import Flask, Response, request

from .executor import ActionExited
from .launcher import NOT_JSON
from .runtime import Runtime, action_environment

STRUCTURED = "application/cloudevents+json"


def load_function(runtime: Runtime, spec: str) -> None:
    """Start the action processes for ``file.py:name``; on failure readiness stays 503."""
    path, _, name = spec.rpartition(":") if ":" in spec else (spec, "", "main")
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        runtime.load_error = f"FAASTUBE_FUNCTION={spec}: no file {path}"
        print(runtime.load_error, file=sys.stderr, flush=True)
        return
    folder, entry = os.path.dirname(path), os.path.basename(path)
    try:
        runtime.start(folder, name or "main", action_environment({}), entry=entry)
    except ActionExited as exc:
        runtime.load_error = f"the function {spec} failed to load ({exc}); see the logs"


def _json(value, status=200, headers=None) -> Response:
    return Response(json.dumps(value, ensure_ascii=False), status=status,
                    mimetype="application/json", headers=headers)


def _incoming_event():
    """(is_event, event id, data) of the request, or raises ValueError for a bad body."""
    body = request.get_data()
    if request.headers.get("ce-specversion"):
        kind = request.mimetype or "application/json"
        data = json.loads(body) if kind.endswith("json") and body else body.decode("utf-8")
        return True, request.headers.get("ce-id") or str(uuid.uuid4()), data
    if request.mimetype == STRUCTURED:
        event = json.loads(body)
        if not isinstance(event, dict) or "specversion" not in event:
            raise ValueError("a structured CloudEvent must be a JSON object with 'specversion'")
        data = event.get("data")
        if data is None and "data_base64" in event:
            import base64
            data = base64.b64decode(event["data_base64"]).decode("utf-8")
        return True, str(event.get("id") or uuid.uuid4()), data
    return False, str(uuid.uuid4()), json.loads(body) if body else {}


def register_knative(app: Flask, runtime: Runtime) -> None:
    @app.get("/health/liveness")
    def liveness():
        # A function process that exited does not come back: fail liveness, so Kubernetes
        # restarts the container, instead of a pod that is never ready again.
        if runtime.gone:
            return _json({"status": "dead", "reason": "the function process exited; see the logs"}, 503)
        return _json({"status": "alive"})

    @app.get("/health/readiness")
    def readiness():
        if runtime.pool is None or runtime.gone:
            return _json({"status": "not ready", "reason": runtime.load_error or "loading"}, 503)
        return _json({"status": "ready"})

    @app.post("/")
    def invoke():
        try:
            is_event, event_id, data = _incoming_event()
        except ValueError as exc:
            return _json({"error": f"the request body is not valid JSON: {exc}"}, 400)
        if runtime.pool is None or runtime.gone:
            return _json({"error": runtime.load_error or "the function is not loaded"}, 503)
        settings = runtime.settings
        args = {"value": data, "activation_id": event_id, "namespace": settings.pod_namespace,
                "action_name": settings.service}
        try:
            reply = runtime.call(args)
        except ActionExited:
            return _json({"error": "the function process exited"}, 500)
        if reply.startswith(NOT_JSON):
            return _json({"error": f"the function's result is not JSON: "
                                   f"{reply[1:].decode('utf-8', 'replace')}"}, 502)
        if not is_event:
            return Response(reply, mimetype="application/json")
        headers = {"ce-specversion": "1.0", "ce-id": str(uuid.uuid4()),
                   "ce-source": settings.ce_source or f"/faastube/{settings.service or 'function'}",
                   "ce-type": settings.ce_type}
        return Response(reply, mimetype="application/json", headers=headers)


