"""The controller's Prometheus endpoint, scraped over real HTTP and parsed with
prometheus_client's own parser."""

import socket
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families


@pytest.fixture
def controller_settings(metrics_port):
    return {"metrics_port": metrics_port}


def scrape(port) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_show_pools_objects_leases_and_requests(ft, controller, metrics_port):
    ft.connect(socket=controller.socket, namespace="test", spare_bytes=0)   # counts without spares
    refs = [ft.put(np.arange(1000, dtype=np.int64)) for _ in range(3)]
    held = ft.get(refs[0])
    pending = ft.empty(10, "uint8")
    with pytest.raises(Exception):
        ft.get({**refs[0], "id": "f" * 32})               # one failed request
    m = scrape(metrics_port)
    host = (("device", "host"), ("name", "host"))
    assert m[("faastube_pool_reserved_bytes", host)] == 4 << 20          # one 4 MiB slab
    assert m[("faastube_pool_used_bytes", host)] >= 3 * 8000 + 10
    assert m[("faastube_pool_limit_bytes", host)] == 256 << 20
    assert m[("faastube_objects", (("namespace", "test"), ("state", "sealed")))] == 3
    assert m[("faastube_objects", (("namespace", "test"), ("state", "pending")))] == 1
    assert m[("faastube_leases", (("namespace", "test"),))] == 2         # the view + the writer
    assert m[("faastube_clients", (("namespace", "test"),))] == 1
    assert m[("faastube_redis_up", ())] == 1
    assert m[("faastube_requests_total", (("op", "create"), ("outcome", "ok")))] == 4
    assert m[("faastube_requests_total", (("op", "get"), ("outcome", "ok")))] == 1
    assert m[("faastube_requests_total", (("op", "get"), ("outcome", "error")))] == 1
    assert m[("faastube_request_seconds_count", (("op", "get"),))] == 2
    assert m[("faastube_request_seconds_bucket", (("le", "+Inf"), ("op", "create")))] == 4
    assert m[("faastube_request_seconds_sum", (("op", "seal"),))] > 0
    assert m[("faastube_get_copy_seconds_count", ())] == 0       # a host-only node copies nothing
    assert m[("process_open_fds", ())] > 0
    # The admin's status carries the same counts (Note [Where a get's time goes]).
    requests = controller.status()["requests"]
    assert requests["ops"]["get"]["ok"] == 1 and requests["ops"]["get"]["error"] == 1
    assert requests["ops"]["create"]["ok"] == 4
    assert requests["ops"]["get"]["seconds"] == pytest.approx(m[("faastube_request_seconds_sum", (("op", "get"),))])
    assert requests["get_copies"] == {"count": 0, "seconds": 0.0}
    del held, pending


def test_a_metrics_port_in_use_stops_the_controller_with_a_clear_error(tmp_path, redis_server):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "faastube.cli", "controller", "--socket", str(tmp_path / "c.sock"),
             "--redis", redis_server.url, "--gpus", "none", "--metrics-port", str(port)],
            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"cannot serve metrics on port {port}" in result.stderr
    assert not (tmp_path / "c.sock").exists()


def _probe(port, path):
    import json
    import urllib.error
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_health_endpoints_follow_the_controller_and_redis(tmp_path, metrics_port):
    """Note [Health endpoints]: /healthz is live while the controller serves, /readyz also
    needs Redis: what the DaemonSet's probes read."""
    from faastube.local import LocalRedis

    from .conftest import ControllerProcess, wait_for
    with LocalRedis() as redis:
        ctl = ControllerProcess(tmp_path, redis.url, metrics_port=metrics_port).start()
        try:
            assert _probe(metrics_port, "/healthz")[0] == 200
            status, ready = _probe(metrics_port, "/readyz")
            assert status == 200 and ready["ready"] and ready["directory"] == "up"
            assert _probe(metrics_port, "/nothing")[0] == 404
            redis.stop()
            wait_for(lambda: _probe(metrics_port, "/readyz")[0] == 503, message="not ready without Redis")
            status, health = _probe(metrics_port, "/healthz")
            assert status == 200 and health["live"] and not health["ready"] and health["directory"] == "down"
        finally:
            assert ctl.stop() == 0


def test_idle_http_connections_cannot_hold_the_health_port(controller, metrics_port):
    """More silent connections than the port serves at once: they are refused or time out,
    and a probe afterwards is answered."""
    from controller.metrics import HTTP_CONNECTIONS
    idle = [socket.create_connection(("127.0.0.1", metrics_port)) for _ in range(HTTP_CONNECTIONS + 8)]
    try:
        # A probe made while every slot is held is closed unanswered (not queued forever).
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/healthz", timeout=10).read()
    finally:
        for conn in idle:
            conn.close()
    from .conftest import wait_for
    wait_for(lambda: _probe(metrics_port, "/healthz")[0] == 200, timeout=15, message="the port serves again")
