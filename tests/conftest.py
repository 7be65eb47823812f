"""Shared fixtures: a real redis-server, a real controller process, worker processes.

The ``controller`` fixture fails a test that leaves leases held or worker processes running
(the leak check runs after the test body, before the controller stops).
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import faastube
from faastube.client import Client
from faastube.config import Config
from faastube.local import LocalController, LocalRedis, free_port

WORKERS = Path(__file__).parent / "workers"
_nodes = itertools.count(1)


def wait_for(condition, timeout=10.0, interval=0.005, message="condition"):
    """Poll ``condition`` until it returns a truthy value; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def redis_server():
    with LocalRedis() as server:
        yield server


class ControllerProcess(LocalController):
    """A controller for one test: its own socket, node name and log under tmp_path."""

    def __init__(self, tmp_path: Path, redis_url: str, **settings):
        # GPU pools only where a test asks for them (tests/test_gpu.py): the rest of the suite
        # checks the host tier alone, on any machine.
        settings = {"slab_size": "4MiB", "pool_limit": "256MiB", "idle_release": "30",
                    "idle_minimum": "0", "gpus": "none", **settings}
        node = settings.pop("node", None) or f"test-node-{os.getpid()}-{next(_nodes)}"
        super().__init__(redis_url, socket_path=str(tmp_path / "ctl" / "controller.sock"), node=node,
                         log_path=str(tmp_path / "controller.log"), **settings)

    def leases(self) -> int:
        return sum(ns["leases"] for ns in self.status()["namespaces"].values())

    def client(self, namespace="test", **settings) -> Client:
        return Client(Config.from_env(socket=self.socket, redis=self.redis_url,
                                      namespace=namespace, **settings))


@pytest.fixture
def metrics_port():
    """A free port for a controller's /metrics (modules that scrape put it in controller_settings)."""
    return free_port()


@pytest.fixture
def controller_settings():
    """Override in a test module (or parametrize) to start the controller differently."""
    return {}


@pytest.fixture
def controller(tmp_path, redis_server, controller_settings, workers):
    ctl = ControllerProcess(tmp_path, redis_server.url, **controller_settings).start()
    yield ctl
    # Leak check: the test's own arrays must be gone, and with them every lease. The SDK's
    # spares (Note [Spare objects]) are its own, not the test's: freed first.
    workers.finish()
    gc.collect()
    try:
        if faastube.sdk._client is not None and ctl.process.poll() is None:
            faastube.sdk._client.drop_spares()
        if ctl.process.poll() is None:
            wait_for(lambda: ctl.leases() == 0, timeout=10, message="every lease to end")
    finally:
        if faastube.sdk._client is not None:
            faastube.sdk._client.close()
            faastube.sdk._client = None
        code = ctl.stop()
    assert code == 0, f"controller exited with {code}:\n{ctl.log()}"


@pytest.fixture
def ft(controller):
    """The faastube SDK connected to this test's controller, in namespace 'test'."""
    faastube.connect(socket=controller.socket, namespace="test")
    yield faastube


class Workers:
    """Worker scripts (tests/workers/*.py) run as real processes; none may outlive a test."""

    def __init__(self):
        self.env = dict(os.environ)
        self.processes: list[subprocess.Popen] = []

    def start(self, script: str, *args, env=None, namespace="test") -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, str(WORKERS / script), *map(str, args)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**self.env, "FAASTUBE_NAMESPACE": namespace, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.processes.append(process)
        return process

    def run(self, script: str, *args, timeout=60, **kwargs) -> dict:
        """Run a worker to completion; its last stdout line is JSON."""
        process = self.start(script, *args, **kwargs)
        out, err = process.communicate(timeout=timeout)
        assert process.returncode == 0, f"{script} exited {process.returncode}:\n{err}"
        return json.loads(out.strip().splitlines()[-1])

    @staticmethod
    def read_json(process: subprocess.Popen, timeout=30) -> dict:
        """The next JSON line a running worker prints."""
        import select
        ready, _, _ = select.select([process.stdout], [], [], timeout)
        if not ready:
            pytest.fail(f"worker printed nothing within {timeout} s")
        line = process.stdout.readline()
        if not line:
            pytest.fail(f"worker exited ({process.wait()}): {process.stderr.read()}")
        return json.loads(line)

    def finish(self) -> None:
        alive = [p for p in self.processes if p.poll() is None]
        for process in alive:
            process.kill()
        for process in self.processes:
            process.wait()
            for stream in (process.stdin, process.stdout, process.stderr):
                stream and stream.close()
        self.processes.clear()
        assert not alive, f"{len(alive)} worker processes were still running after the test"


@pytest.fixture
def workers(redis_server):
    pool = Workers()
    yield pool
    pool.finish()


@pytest.fixture
def worker_env(controller, workers):
    """Point worker processes at this test's controller."""
    workers.env.update(controller.env)
    return workers
