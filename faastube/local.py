"""Private services for the demo, the tests and the benchmarks: a ``redis-server`` on a free
loopback port, a ``faastube controller`` process on a socket of its own, and action
containers (``faastube shim`` processes) driven over the OpenWhisk runtime protocol."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import redis

from . import protocol
from .client import Client
from .config import Config
from .errors import ControllerUnavailableError, FaasTubeError, RedisUnavailableError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(process: subprocess.Popen, sig=signal.SIGTERM, timeout_s: float = 15.0,
                 dump_signal: int | None = None) -> int:
    """Send ``sig`` to a process still running, wait up to ``timeout_s``, then kill it;
    returns its exit code. ``dump_signal``: sent first when it outlives the wait, so a
    process that dumps its threads' stacks on it (the controller: SIGUSR1) says where it
    hung before it is killed."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            if dump_signal is not None:
                process.send_signal(dump_signal)
                try:
                    process.wait(1)          # time to write the stacks out
                except subprocess.TimeoutExpired:
                    pass
            process.kill()
            process.wait()
    return process.returncode


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
        if self.process is not None:
            stop_process(self.process, timeout_s=5)
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> "LocalRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def redis_for(stack: contextlib.ExitStack) -> str:
    """The Redis ``FAASTUBE_REDIS`` names, else a private redis-server that ``stack`` stops."""
    return Config.given("redis") or stack.enter_context(LocalRedis()).url


class LocalController:
    """``with LocalController(redis_url) as c: c.socket`` — a controller process, ready to
    serve, stopped with SIGTERM on exit. ``settings`` are ``faastube controller`` flags
    (``slab_size="64MiB"`` → ``--slab-size 64MiB``); None leaves a flag out."""

    def __init__(self, redis_url: str, socket_path: str | None = None, node: str | None = None,
                 log_path: str | None = None, **settings):
        self._dir = None if socket_path else tempfile.mkdtemp(prefix="faastube-controller-")
        self.socket = socket_path or os.path.join(self._dir, "controller.sock")
        self.redis_url = redis_url
        self.node = node or f"local-{os.getpid()}-{id(self):x}"
        self.log_path = log_path or os.path.join(os.path.dirname(self.socket), "controller.log")
        self.settings = settings
        self.extra_env: dict = {}
        self.process: subprocess.Popen | None = None

    @property
    def env(self) -> dict:
        """The environment that points a function process at this controller."""
        return {**os.environ, "FAASTUBE_SOCKET": self.socket, "FAASTUBE_REDIS": self.redis_url,
                "FAASTUBE_NODE": self.node, "PYTHONUNBUFFERED": "1", **self.extra_env}

    def start(self, timeout_s: float = 15.0) -> "LocalController":
        args = [sys.executable, "-m", "faastube.cli", "controller", "--socket", self.socket,
                "--redis", self.redis_url, "--node", self.node]
        for key, value in self.settings.items():
            if value is not None:
                args += [f"--{key.replace('_', '-')}", str(value)]
        os.makedirs(os.path.dirname(self.socket), exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise FaasTubeError(f"the controller exited with {self.process.returncode}:\n{self.log()}")
            try:
                self.request(protocol.Ping())
                return self
            except ControllerUnavailableError:
                if time.monotonic() > deadline:
                    self.stop(signal.SIGKILL)
                    raise
                time.sleep(0.01)

    def request(self, request):
        """One request on an anonymous connection (status, ping); its typed reply."""
        client = Client(Config.from_env(socket=self.socket), anonymous=True)
        try:
            return client.request(request)
        finally:
            client.close()

    def status(self) -> dict:
        """The controller's status report as a JSON-like map (``faastube status --json``)."""
        return self.request(protocol.Status()).as_dict()

    def stop(self, sig=signal.SIGTERM, timeout_s: float = 15.0) -> int:
        """Stop the controller; returns its exit code (killed if it outlives ``timeout_s``)."""
        if self.process is None:
            return 0
        code = stop_process(self.process, sig, timeout_s, dump_signal=signal.SIGUSR1)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
        return code

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as log:
                return log.read()
        except OSError:
            return ""

    def __enter__(self) -> "LocalController":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class LocalRuntime:
    """One container of an action as an OpenWhisk invoker runs it (``init`` once, then
    ``run`` per activation) or as Knative runs a revision's pod (the function named by
    ``FAASTUBE_FUNCTION`` in ``env``; ``ready``, then ``post("/", ...)``): ``faastube shim``
    on a free loopback port, over one keep-alive connection. One request at a time (the
    caller serialises)."""

    def __init__(self, env: dict, log_path: str, timeout_s: float = 300.0):
        self.port = free_port()
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "faastube.cli", "shim"], stdout=log, stderr=subprocess.STDOUT,
                env={**env, "PORT": str(self.port), "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 30
        while True:
            if self.process.poll() is not None:
                raise FaasTubeError(f"the runtime exited with {self.process.returncode}: see {log_path}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise FaasTubeError(f"the runtime did not listen within 30 s: see {log_path}") from None
                time.sleep(0.01)
        self._connection = self.connection(timeout_s)

    def connection(self, timeout_s: float = 60.0) -> http.client.HTTPConnection:
        """A new keep-alive HTTP connection to this runtime (for callers that drive several)."""
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout_s)

    def post(self, path: str, body: dict, headers: dict | None = None) -> tuple[int, dict]:
        status, _headers, payload = self.request("POST", path, json.dumps(body).encode(), headers)
        return status, json.loads(payload) if payload else {}

    def request(self, method: str, path: str, data: bytes | None = None,
                headers: dict | None = None) -> tuple[int, dict, bytes]:
        """(status, response headers, body)."""
        headers = {"Content-Type": "application/json", **(headers or {})}
        for attempt in (1, 2):
            try:
                self._connection.request(method, path, data, headers)
                response = self._connection.getresponse()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # The runtime closed the idle keep-alive connection before reading this
                # request (as an invoker's HTTP client sees it too): reconnect, send again.
                self._connection.close()
                if attempt == 2 or self.process.poll() is not None:
                    raise
        payload = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, payload

    def ready(self, timeout_s: float = 120.0) -> None:
        """Wait for Knative's readiness route to answer 200 (the function loaded)."""
        deadline = time.monotonic() + timeout_s
        while True:
            status, _headers, body = self.request("GET", "/health/readiness")
            if status == 200:
                return
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise FaasTubeError(f"the function did not get ready ({status} {body[:300]!r}): "
                                    f"see {self.log_path}")
            time.sleep(0.05)

    def init(self, code: str, main: str, env: dict | None = None) -> None:
        status, body = self.post("/init", {"value": {"name": main, "main": main, "code": code,
                                                     "binary": False, "env": env or {}}})
        if status != 200:
            raise FaasTubeError(f"/init of {main} failed with {status} {body}: see {self.log_path}")

    def run(self, value: dict, **keys) -> tuple[int, dict]:
        return self.post("/run", {"value": value, **keys})

    def stop(self) -> None:
        if hasattr(self, "_connection"):
            self._connection.close()
        stop_process(self.process, timeout_s=20)
