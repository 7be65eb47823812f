"""Random input on the runtime's HTTP entry points (issue 20): every answer is JSON with one
of the stock runtime's status codes, the runtime keeps serving, and an activation after the
storm still computes the right result. One shim per mode, hypothesis drives the requests."""

import json
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .test_shim_http import read_response
from .test_shim_openwhisk import Shim, source

ECHO = source("""
    def main(args):
        return {"echo": args}
""")

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20)
BODIES = st.one_of(
    st.binary(max_size=512),                                         # not JSON at all
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),               # JSON, any shape
    st.dictionaries(st.sampled_from(["value", "action_name", "activation_id", "deadline", "api_key",
                                     "namespace", "transaction_id", "code", "main", "binary", "env"]),
                    JSON_VALUES, max_size=6).map(lambda v: json.dumps(v).encode()),
)
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module", params=["serial", "concurrent"])
def fuzzed(tmp_path_factory, request):
    env = {"__OW_ALLOW_CONCURRENT": "true", "FAASTUBE_CONCURRENCY": "2"} if request.param == "concurrent" else {}
    server = Shim(tmp_path_factory.mktemp(request.param), env)
    assert server.init(ECHO)[0] == 200
    yield server
    assert server.process.poll() is None, server.stderr()
    status, body = server.run({"after": "the storm"})
    assert status == 200 and json.loads(body) == {"echo": {"after": "the storm"}}
    server.stop()


def exchange(server, method: str, path: str, body: bytes) -> tuple[int, dict, bytes]:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        status, headers, payload, _rest = read_response(sock)
    return status, headers, payload


@FUZZ
@given(body=BODIES)
def test_random_run_bodies_get_json_answers_and_leave_the_runtime_serving(fuzzed, body):
    status, headers, payload = exchange(fuzzed, "POST", "/run", body)
    assert status in (200, 400, 502), (status, payload)
    assert headers["content-type"] == "application/json"
    answer = json.loads(payload)
    if status != 200:
        assert isinstance(answer, dict) and isinstance(answer.get("error"), str)


@FUZZ
@given(body=BODIES)
def test_random_init_bodies_on_an_initialised_runtime_are_refused_and_change_nothing(fuzzed, body):
    status, headers, payload = exchange(fuzzed, "POST", "/init", body)
    # The stock proxy checks the body before it finds the action already initialised.
    assert status in (400, 403), (status, payload)
    assert headers["content-type"] == "application/json" and "error" in json.loads(payload)


@FUZZ
@given(method=st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "POST"]),
       path=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e, exclude_characters="?#%"),
                    max_size=30).map(lambda p: "/" + p))
def test_other_methods_and_paths_are_answered_and_leave_the_runtime_serving(fuzzed, method, path):
    status, _headers, _payload = exchange(fuzzed, method, path, b"{}")
    if path in ("/run", "/init") and method == "POST":
        assert status in (200, 403)
    else:
        assert status in (404, 405), (method, path, status)
