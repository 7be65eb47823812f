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
