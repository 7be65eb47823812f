"""The runtime's Flask app: the OpenWhisk protocol (shim/openwhisk.py) or the Knative
contract (shim/knative.py) over one :class:`~shim.runtime.Runtime`."""

from __future__ import annotations

from flask import Flask

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
    return app
