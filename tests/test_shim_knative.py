"""The Knative contract: function loaded at start, JSON and CloudEvents on POST /, health
probes, graceful SIGTERM — over real HTTP, with the cloudevents SDK as the client."""

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request

import pytest
from cloudevents.conversion import to_binary, to_structured
from cloudevents.http import CloudEvent, from_http

from faastube.local import free_port

from .conftest import wait_for
from .test_shim_openwhisk import Shim, source

FUNCTION = source("""
    import os, time
    def main(args):
        if isinstance(args, dict) and args.get("started"):
            open(args["started"], "w").close()      # tells the test main() is running
        if isinstance(args, dict) and args.get("sleep"):
            time.sleep(args["sleep"])
        print("invoked with", args)
        if isinstance(args, dict) and args.get("nan"):
            return {"x": float("nan")}
        if isinstance(args, dict) and args.get("crash"):
            os._exit(3)
        return {"echo": args, "service": os.environ.get("K_SERVICE"),
                "activation": os.environ.get("__OW_ACTIVATION_ID")}
""")


class KnativeShim:
    def __init__(self, tmp_path, function_spec, **env):
        self.port = free_port()
        self.log = tmp_path / "knative.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "faastube.cli", "shim"], cwd=tmp_path,
            stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,
            env={**os.environ, "PORT": str(self.port), "K_SERVICE": "echo",
                 "FAASTUBE_FUNCTION": function_spec, **env})
        wait_for(lambda: self.get("/health/liveness")[0] == 200, timeout=20, message="liveness")

    def request(self, method, path, body=None, headers=None):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=body,
                                     headers=headers or {}, method=method)
        try:
            with urllib.request.urlopen(req, timeout=30) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()
        except OSError:
            return 0, {}, b""

    def get(self, path):
        return self.request("GET", path)[::2]

    def post_json(self, value):
        return self.request("POST", "/", json.dumps(value).encode(), {"Content-Type": "application/json"})

    def stop(self):
        self.process.terminate()
        return self.process.wait(30)


@pytest.fixture
def knative(tmp_path):
    (tmp_path / "func.py").write_text(FUNCTION)
    server = KnativeShim(tmp_path, "func.py:main")
    wait_for(lambda: server.get("/health/readiness")[0] == 200, message="readiness")
    yield server
    server.stop()


def test_json_post_calls_main(knative):
    status, headers, body = knative.post_json({"a": 1})
    assert status == 200 and headers["Content-Type"] == "application/json"
    reply = json.loads(body)
    assert reply["echo"] == {"a": 1} and reply["service"] == "echo" and reply["activation"]
    assert "Content-Length" in headers


def test_a_result_json_cannot_hold_is_a_clear_502_and_the_function_serves_on(knative):
    status, _headers, body = knative.post_json({"nan": True})
    assert status == 502
    assert json.loads(body) == {"error": "the function's result is not JSON: Out of range float values "
                                         "are not JSON compliant"}
    assert knative.get("/health/readiness")[0] == 200
    status, _headers, body = knative.post_json({"a": 2})
    assert status == 200 and json.loads(body)["echo"] == {"a": 2}


def test_a_crashed_function_process_fails_liveness_so_the_pod_is_restarted(knative):
    assert knative.get("/health/liveness")[0] == 200
    status, _headers, body = knative.post_json({"crash": True})
    assert status == 500 and json.loads(body) == {"error": "the function process exited"}
    assert knative.get("/health/readiness")[0] == 503
    status, body = knative.get("/health/liveness")
    assert status == 503 and json.loads(body)["status"] == "dead"


@pytest.mark.parametrize("mode", [to_binary, to_structured])
def test_cloudevents_in_either_mode_get_a_binary_cloudevent_back(knative, mode):
    event = CloudEvent({"type": "dev.example.frame", "source": "/camera/7", "id": "evt-42",
                        "datacontenttype": "application/json"}, {"frame": 7})
    headers, body = mode(event)
    status, reply_headers, reply_body = knative.request("POST", "/", body, headers)
    assert status == 200
    assert reply_headers["ce-specversion"] == "1.0"
    assert reply_headers["ce-type"] == "dev.faastube.result"
    assert reply_headers["ce-source"] == "/faastube/echo"
    reply = from_http({k.lower(): v for k, v in reply_headers.items()}, reply_body)
    assert reply.data["echo"] == {"frame": 7} and reply.data["activation"] == "evt-42"
    assert reply["id"] != "evt-42"


def test_not_ready_when_the_function_is_missing(tmp_path):
    server = KnativeShim(tmp_path, "nowhere.py:main")
    try:
        status, body = server.get("/health/readiness")
        assert status == 503 and "no file" in json.loads(body)["reason"]
        status, _headers, body = server.post_json({})
        assert status == 503 and "nowhere.py" in json.loads(body)["error"]
    finally:
        server.stop()


def test_sigterm_finishes_in_flight_requests_then_exits(knative, tmp_path):
    outcome = {}
    args = {"sleep": 1.5, "started": str(tmp_path / "started")}
    thread = threading.Thread(target=lambda: outcome.update(r=knative.post_json(args)))
    thread.start()
    wait_for((tmp_path / "started").exists, message="the request to be inside main()")
    knative.process.send_signal(signal.SIGTERM)
    thread.join(30)
    assert outcome["r"][0] == 200 and json.loads(outcome["r"][2])["echo"] == args
    assert knative.process.wait(30) == 0


def test_one_function_file_runs_unchanged_on_both_platforms(knative, tmp_path):
    ow = Shim(tmp_path, {})
    try:
        assert ow.init(FUNCTION)[0] == 200
        status, body = ow.run({"x": [1, 2]}, activation_id="a-1")
        assert status == 200 and json.loads(body)["echo"] == {"x": [1, 2]}
        status, _h, body = knative.post_json({"x": [1, 2]})
        assert status == 200 and json.loads(body)["echo"] == {"x": [1, 2]}
    finally:
        ow.stop()
