"""The runtime's Flask app: the OpenWhisk protocol (shim/openwhisk.py) or the Knative
contract (shim/knative.py) over one :class:`~shim.runtime.Runtime`."""

from __future__ import annotations

import json

from flask import Flask, Response
from werkzeug.exceptions import HTTPException

from faastube.config import ShimConfig

from .knative import load_function, register_knative
from .openwhisk import register_openwhisk
from .runtime import SENTINEL, Runtime


def create_app(settings: ShimConfig | None = None) -> Flask:
    """The runtime's Flask app: the OpenWhisk protocol, or the Knative contract with the
    function loaded now (``settings.knative``); ``settings.activations_at_once`` at once."""
    settings = settings or ShimConfig.from_env()
    app = Flask("faastube-shim")
    runtime = Runtime(settings, sentinel=b"" if settings.knative else SENTINEL)
    app.extensions["faastube_runtime"] = runtime
    if settings.knative:
        register_knative(app, runtime)
        load_function(runtime, settings.function)
    else:
        register_openwhisk(app, runtime)

    @app.errorhandler(Exception)
    def unexpected(exc):
        # A failure of ours is JSON, never Flask's HTML page: platforms read every answer as
        # JSON. (HTTP errors such as 404 for an unknown path stay as they are.)
        if isinstance(exc, HTTPException):
            return exc
        app.logger.exception("unexpected error")
        return Response(json.dumps({"error": f"the runtime failed: {type(exc).__name__}: {exc}"}),
                        status=500, mimetype="application/json")
    return app
