"""The Knative contract: the function is loaded at start, ``POST /`` calls it with a JSON body
or a CloudEvent's data, and health probes have their own routes.

- ``FAASTUBE_FUNCTION=/path/to/file.py:main`` names the function (default ``func.py:main``
  in the working directory); its folder is the working directory of the action processes.
  (faastube.config.ShimConfig has every setting.)
- A CloudEvent in binary mode (``ce-specversion`` header) or structured mode
  (``Content-Type: application/cloudevents+json``), parsed by the CloudEvents SDK, calls
  ``main(event data)`` (Note [Event data through the SDK]); ``faastube.event()`` gives the
  function the event's attributes. The answer is a CloudEvent in binary mode with ``ce-type:
  dev.faastube.result`` (or ``FAASTUBE_CE_TYPE``), ``ce-source: /faastube/<K_SERVICE>`` (or
  ``FAASTUBE_CE_SOURCE``) and the incoming event's extensions (``traceparent`` …), so a
  Sequence goes on and its trace stays one; its data is the result's JSON, or the bytes the
  function returned (``application/octet-stream``).
- Any other JSON body calls ``main(body)`` and answers its JSON (or its bytes).
- A function that raises is answered 500 ``{"error": …}``: Knative Eventing retries a 5xx and
  dead-letters the event once the retries are spent, where a 200 would count as delivered.
- ``GET /health/readiness`` is 200 once the function is loaded (503 before, or if it failed);
  ``GET /health/liveness`` is 200 while the server runs.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import uuid

from cloudevents.conversion import to_binary
from cloudevents.exceptions import GenericException as CloudEventError
from cloudevents.http import CloudEvent, from_http
from cloudevents.sdk.converters import is_binary
from flask import Flask, Response, request

from .executor import ActionExited
from .launcher import BYTES, KNATIVE, NOT_JSON, RAISED
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


class InvalidEvent(ValueError):
    """A request that says it is a CloudEvent and is not a valid one."""


def _is_json(mimetype: str) -> bool:
    """Whether event data of this content type is JSON (absent: JSON, as a JSON body is)."""
    return not mimetype or mimetype in ("application/json", "text/json") or mimetype.endswith("+json")


def _incoming():
    """(the CloudEvent's attributes, or None for a plain request; the data main gets).

    Note [Event data through the SDK]: the CloudEvents SDK parses both modes, so attributes
    (extensions such as ``traceparent`` among them) and ``data_base64`` are read as the
    spec says. Data main gets: JSON (by content type) parsed; any other content type, and
    ``data_base64``, as bytes; a structured event's ``data`` as its JSON value. Raises
    InvalidEvent, or ValueError for a plain body that is not JSON."""
    headers = {key.lower(): value for key, value in request.headers.items()}
    body = request.get_data()
    binary = is_binary(headers)
    if not binary and request.mimetype != STRUCTURED:
        return None, json.loads(body) if body else {}
    try:
        event = from_http(headers, body, data_unmarshaller=lambda data: data)
    except CloudEventError as exc:
        raise InvalidEvent(str(exc)) from None
    data = event.get_data()
    if binary:
        if _is_json(request.mimetype):
            try:
                data = json.loads(body) if body else None
            except ValueError as exc:
                raise InvalidEvent(f"its data is {request.mimetype or 'JSON'} and not valid JSON: {exc}") from None
        else:
            data = bytes(body)
    elif isinstance(data, str):
        data = json.loads(data)          # the SDK gives a structured event's data re-encoded
    return dict(event.get_attributes()), data


# Context attributes a reply event sets itself; every other attribute of the incoming event
# (its extensions: traceparent, tracestate, partitionkey, …) is carried to the reply.
OWN_ATTRIBUTES = ("specversion", "id", "source", "type", "time", "datacontenttype", "dataschema", "subject")


def _reply_event(incoming: dict, settings, payload: bytes, content_type: str) -> Response:
    attributes = {key: value for key, value in incoming.items() if key not in OWN_ATTRIBUTES}
    attributes.update(type=settings.ce_type, datacontenttype=content_type,
                      source=settings.ce_source or f"/faastube/{settings.service or 'function'}")
    headers, body = to_binary(CloudEvent(attributes, payload), data_marshaller=lambda data: data)
    headers.pop("content-type", None)
    return Response(body, content_type=content_type, headers=headers)


def register_knative(app: Flask, runtime: Runtime) -> None:
    @app.get("/health/liveness")
    def liveness():
        # A process that exits is replaced (Note [A crashed process is replaced]); once a new
        # one cannot start either, fail liveness, so Kubernetes restarts the container
        # instead of keeping a pod that is never ready again.
        if runtime.gone:
            return _json({"status": "dead", "reason": "the function process exited and a new one "
                                                      "could not start; see the logs"}, 503)
        return _json({"status": "alive"})

    @app.get("/health/readiness")
    def readiness():
        if runtime.pool is None or runtime.gone:
            return _json({"status": "not ready", "reason": runtime.load_error or "loading"}, 503)
        return _json({"status": "ready"})

    @app.post("/")
    def invoke():
        try:
            event, data = _incoming()
        except InvalidEvent as exc:
            return _json({"error": f"the request is not a valid CloudEvent: {exc}"}, 400)
        except ValueError as exc:
            return _json({"error": f"the request body is not valid JSON: {exc}"}, 400)
        if runtime.pool is None or runtime.gone:
            return _json({"error": runtime.load_error or "the function is not loaded"}, 503)
        settings = runtime.settings
        args = {"activation_id": (event or {}).get("id") or str(uuid.uuid4()),
                "namespace": settings.pod_namespace, "action_name": settings.service, "event": event}
        if isinstance(data, bytes):
            args["value_base64"] = base64.b64encode(data).decode("ascii")
        else:
            args["value"] = data
        try:
            reply = runtime.call(KNATIVE + json.dumps(args, ensure_ascii=False).encode("utf-8"))
        except ActionExited:
            return _json({"error": "the function process exited"}, 500)
        if reply.startswith(NOT_JSON):
            return _json({"error": f"the function's result is not JSON: "
                                   f"{reply[1:].decode('utf-8', 'replace')}"}, 502)
        if reply.startswith(RAISED):
            # A 5xx, so Knative Eventing retries the event and dead-letters it at the end.
            return Response(reply[1:], status=500, mimetype="application/json")
        if reply.startswith(BYTES):
            payload, content_type = base64.b64decode(reply[1:]), "application/octet-stream"
        else:
            payload, content_type = reply, "application/json"
        if event is None:
            return Response(payload, mimetype=content_type)
        return _reply_event(event, settings, payload, content_type)
