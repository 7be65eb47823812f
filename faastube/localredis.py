"""A private ``redis-server`` on a free loopback port, for the demo, the tests and benchmarks."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time

import redis

from .errors import RedisUnavailableError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalRedis:
    """``with LocalRedis() as r: r.url`` — started, ready, and stopped on exit."""

    def __init__(self, port: int | None = None):
        self.port = port
        self.process: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> "LocalRedis":
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisUnavailableError(
                "redis-server is not installed: `apt-get install redis-server` (Debian/Ubuntu), "
                "or set FAASTUBE_REDIS to a running Redis")
        self.port = self.port or free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="faastube-redis-")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self._dir.name, "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                return self
            except redis.RedisError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RedisUnavailableError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.01)
            finally:
                client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> "LocalRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
