"""``faastube shim``: the Flask app under gunicorn, on ``$PORT`` (default 8080).

One gunicorn worker (the action is initialised once per container, so all requests must
reach the same process) of the shim's own class (shim/worker.py: a thread per connection):
activations run concurrently in separate action processes when
``__OW_ALLOW_CONCURRENT=true`` or in Knative mode, one at a time otherwise.
gunicorn logs only warnings: stdout and stderr belong to the action's logs.
"""

from __future__ import annotations

import os

from gunicorn.app.base import BaseApplication

from .app import create_app
from .knative import DEFAULT_FUNCTION, knative_mode

DEFAULT_CONCURRENCY = 8


def concurrency_from_env(environ=os.environ) -> int:
    if environ.get("__OW_ALLOW_CONCURRENT", "").lower() != "true" and not knative_mode(environ):
        return 1
    return max(1, int(environ.get("FAASTUBE_CONCURRENCY", DEFAULT_CONCURRENCY)))


class ShimServer(BaseApplication):
    def __init__(self, port: int, concurrency: int):
        self.port = port
        self.concurrency = concurrency
        super().__init__()

    def load_config(self):
        settings = {
            "bind": f"0.0.0.0:{self.port}",
            "workers": 1,
            "worker_class": "shim.worker.ShimWorker",
            "timeout": 0,                        # the platform enforces the action's limit
            "graceful_timeout": 300,             # SIGTERM: finish in-flight activations
            "keepalive": 75,
            "loglevel": "warning",
            "accesslog": None,
        }
        for key, value in settings.items():
            self.cfg.set(key, value)

    def load(self):
        return create_app(self.concurrency, knative=knative_mode(),
                          function=os.environ.get("FAASTUBE_FUNCTION", DEFAULT_FUNCTION))


def run_shim(port: int | None = None) -> None:
    port = port or int(os.environ.get("PORT", "8080"))
    ShimServer(port, concurrency_from_env()).run()
