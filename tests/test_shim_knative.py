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


def serving(tmp_path, function: str):
    """A Knative shim serving ``function`` (its source), once it is ready; stopped after."""
    (tmp_path / "func.py").write_text(function)
    server = KnativeShim(tmp_path, "func.py:main")
    wait_for(lambda: server.get("/health/readiness")[0] == 200, message="readiness")
    yield server
    server.stop()


@pytest.fixture
def knative(tmp_path):
    yield from serving(tmp_path, FUNCTION)


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


def test_a_crashed_function_process_is_replaced_and_the_pod_serves_on(knative):
    # Note [A crashed process is replaced]: only the activation that crashed fails.
    status, _headers, body = knative.post_json({"crash": True})
    assert status == 500 and json.loads(body) == {"error": "the function process exited"}
    assert knative.get("/health/liveness")[0] == 200 and knative.get("/health/readiness")[0] == 200
    status, _headers, body = knative.post_json({"a": 3})
    assert status == 200 and json.loads(body)["echo"] == {"a": 3}


def test_liveness_fails_once_a_crashed_process_cannot_be_replaced(tmp_path):
    # The function imports once; any later import fails, so the crashed process has no successor.
    (tmp_path / "func.py").write_text(source("""
        import os
        if os.path.exists("imported-once"):
            raise RuntimeError("this function imports only once")
        open("imported-once", "w").close()
        def main(args):
            os._exit(3)
    """))
    server = KnativeShim(tmp_path, "func.py:main", FAASTUBE_CONCURRENCY="1")
    try:
        wait_for(lambda: server.get("/health/readiness")[0] == 200, message="readiness")
        assert server.post_json({})[0] == 500                  # the crash
        status, _headers, body = server.post_json({})          # no new process can start
        assert status == 500 and json.loads(body) == {"error": "the function process exited"}
        assert server.get("/health/readiness")[0] == 503
        status, body = server.get("/health/liveness")
        assert status == 503 and json.loads(body)["status"] == "dead"
    finally:
        server.stop()


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


# Issue 22: events through the CloudEvents SDK, bytes of any content type, extensions carried
# on, and a function error answered 5xx so Knative Eventing retries and dead-letters.
EVENT_FUNCTION = source("""
    import hashlib
    import faastube
    def main(data):
        event = faastube.event()
        if isinstance(data, dict) and data.get("fail"):
            raise RuntimeError("the model refused frame " + str(data["fail"]))
        if isinstance(data, bytes):
            if data.startswith(b"echo:"):
                return data[5:]                       # bytes back: an octet-stream event
            return {"kind": "bytes", "len": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                    "event": event}
        return {"kind": type(data).__name__, "data": data, "event": event}
""")


@pytest.fixture
def events(tmp_path):
    yield from serving(tmp_path, EVENT_FUNCTION)


def _send(server, event, mode=to_binary):
    headers, body = mode(event)
    status, reply_headers, reply_body = server.request("POST", "/", body, headers)
    return status, reply_headers, reply_body


def _reply(reply_headers, reply_body):
    return from_http({k.lower(): v for k, v in reply_headers.items()}, reply_body)


BINARY = bytes(range(256)) * 3 + b"\xff\x00\xfe"            # not UTF-8


@pytest.mark.parametrize("mode", [to_binary, to_structured])
def test_binary_event_data_reaches_the_function_as_bytes_in_either_mode(events, mode):
    import hashlib
    event = CloudEvent({"type": "dev.example.blob", "source": "/cam", "id": "b-1",
                        "datacontenttype": "application/octet-stream"}, BINARY)
    status, reply_headers, reply_body = _send(events, event, mode)   # structured: data_base64
    assert status == 200, reply_body
    reply = _reply(reply_headers, reply_body)
    assert reply.data["kind"] == "bytes" and reply.data["len"] == len(BINARY)
    assert reply.data["sha256"] == hashlib.sha256(BINARY).hexdigest()


def test_extensions_and_traceparent_reach_the_function_and_the_reply_event(events):
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    event = CloudEvent({"type": "dev.example.frame", "source": "/camera/7", "id": "t-1",
                        "subject": "frame-9", "traceparent": traceparent, "tracestate": "k=v",
                        "tenant": "blue", "datacontenttype": "application/json"}, {"frame": 9})
    status, reply_headers, reply_body = _send(events, event)
    assert status == 200, reply_body
    seen = json.loads(reply_body)["event"]
    assert seen["id"] == "t-1" and seen["source"] == "/camera/7" and seen["subject"] == "frame-9"
    assert seen["traceparent"] == traceparent and seen["tenant"] == "blue"
    reply = _reply(reply_headers, reply_body)
    assert reply["traceparent"] == traceparent and reply["tracestate"] == "k=v"
    assert reply["tenant"] == "blue"
    assert reply["type"] == "dev.faastube.result" and reply["source"] == "/faastube/echo"
    assert reply["id"] != "t-1" and "subject" not in reply.get_attributes()


def test_bytes_a_function_returns_are_an_octet_stream_event_or_body(events):
    event = CloudEvent({"type": "dev.example.blob", "source": "/cam",
                        "datacontenttype": "application/octet-stream"}, b"echo:" + BINARY)
    status, reply_headers, reply_body = _send(events, event)
    assert status == 200 and reply_headers["Content-Type"] == "application/octet-stream"
    assert reply_body == BINARY and _reply(reply_headers, reply_body).data == BINARY
    # A plain request gets the bytes as its body.
    status, headers, body = events.request("POST", "/", json.dumps({"x": 1}).encode(),
                                           {"Content-Type": "application/json"})
    assert status == 200 and json.loads(body) == {"kind": "dict", "data": {"x": 1}, "event": None}


def test_text_and_json_content_types_arrive_as_the_spec_reads_them(events):
    text = CloudEvent({"type": "t", "source": "/s", "datacontenttype": "text/plain"}, "42 é".encode())
    status, headers, body = _send(events, text)
    assert status == 200 and json.loads(body)["kind"] == "bytes"        # not JSON: the bytes
    assert json.loads(body)["len"] == len("42 é".encode())
    number = CloudEvent({"type": "t", "source": "/s", "datacontenttype": "application/json"}, 42)
    status, headers, body = _send(events, number, to_structured)
    assert status == 200 and json.loads(body)["data"] == 42 and json.loads(body)["kind"] == "int"


@pytest.mark.parametrize("mode", [to_binary, to_structured, None])
def test_a_function_that_raises_is_answered_500_with_its_error_and_serves_on(events, mode):
    data = {"fail": 3}
    if mode is None:
        status, headers, body = events.post_json(data)
    else:
        event = CloudEvent({"type": "t", "source": "/s", "datacontenttype": "application/json"}, data)
        status, headers, body = _send(events, event, mode)
    assert status == 500 and json.loads(body) == {"error": "the model refused frame 3"}
    assert not any(k.lower().startswith("ce-") for k in headers), "a failure is not a result event"
    assert events.get("/health/readiness")[0] == 200
    status, _headers, body = events.post_json({"ok": 1})
    assert status == 200 and json.loads(body)["data"] == {"ok": 1}


def test_invalid_events_are_refused_400_saying_why(events):
    status, _h, body = events.request("POST", "/", b'{"specversion": "1.0"}',
                                      {"Content-Type": "application/cloudevents+json"})
    assert status == 400 and "not a valid CloudEvent" in json.loads(body)["error"]
    assert "source" in json.loads(body)["error"]
    status, _h, body = events.request("POST", "/", b"{not json", {
        "ce-specversion": "1.0", "ce-id": "1", "ce-source": "/s", "ce-type": "t",
        "Content-Type": "application/json"})
    assert status == 400 and "not valid JSON" in json.loads(body)["error"]
    assert events.post_json({"still": "serving"})[0] == 200
