"""The runtime's Flask app: the OpenWhisk protocol (shim/openwhisk.py) or the Knative
contract (shim/knative.py) over one :class:`~shim.runtime.Runtime`."""

from __future__ import annotations

from flask import Flask

from .knative import load_function, register_knative
from .openwhisk import register_openwhisk
from .runtime import SENTINEL, Runtime


def create_app(concurrency: int = 1, knative: bool = False, function: str | None = None) -> Flask:
    """The runtime's Flask app: the OpenWhisk protocol, or the Knative contract with the
    function loaded now. ``concurrency`` > 1 runs that many activations at once."""
    app = Flask("faastube-shim")
    runtime = Runtime(concurrency, sentinel=b"" if knative else SENTINEL)
    app.extensions["faastube_runtime"] = runtime
    if knative:
        register_knative(app, runtime)
        load_function(runtime, function)
    else:
        register_openwhisk(app, runtime)
    return app
