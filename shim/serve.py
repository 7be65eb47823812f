"""``faastube shim``: the Flask app under gunicorn, on ``$PORT`` (default 8080).

One gunicorn worker (the action is initialised once per container, so all requests must
reach the same process) of the shim's own class (shim/worker.py: a thread per connection):
activations run concurrently in separate action processes when
``__OW_ALLOW_CONCURRENT=true`` or in Knative mode, one at a time otherwise
(faastube.config.ShimConfig has every setting). gunicorn logs only warnings: stdout and
stderr belong to the action's logs.
"""

from __future__ import annotations

from gunicorn.app.base import BaseApplication

from faastube.config import ShimConfig

from .app import create_app


class ShimServer(BaseApplication):
    def __init__(self, settings: ShimConfig):
        self.settings = settings
        super().__init__()

    def load_config(self):
        settings = {
            "bind": f"0.0.0.0:{self.settings.port}",
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
        return create_app(self.settings)


def run_shim(settings: ShimConfig | None = None) -> None:
    ShimServer(settings or ShimConfig.from_env()).run()
