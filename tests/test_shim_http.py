"""The shim's HTTP/1.1 layer (shim/worker.py) over raw sockets: keep-alive, pipelining,
chunked bodies, Expect: 100-continue, HTTP/1.0, malformed requests, graceful stop with idle
keep-alive connections open. The same route answers identically on the direct and the Flask
path."""

import json
import signal
import socket

import pytest

from .conftest import wait_for
from .test_shim_openwhisk import Shim, source

ECHO = source("""
    def main(args):
        return {"echo": args}
""")


@pytest.fixture
def shim(tmp_path):
    server = Shim(tmp_path)
    assert server.init(ECHO)[0] == 200
    yield server
    server.stop()


def connect(shim) -> socket.socket:
    return socket.create_connection(("127.0.0.1", shim.port), timeout=30)


def read_response(sock, buffer=b"") -> tuple[int, dict, bytes, bytes]:
    """One response: status, headers (lower-case names), body, and what follows it."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-response: {buffer!r}"
        buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        rest += chunk
    return status, headers, rest[:length], rest[length:]


def request(path: str, body: bytes, extra: str = "", version: str = "1.1") -> bytes:
    return (f"POST {path} HTTP/{version}\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def closed(sock) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_pipelined_requests_are_answered_in_order_on_one_connection(shim):
    sock = connect(shim)
    sock.sendall(b"".join(request("/run", json.dumps({"value": {"n": n}}).encode())
                          for n in range(5)))
    rest = b""
    for n in range(5):
        status, headers, body, rest = read_response(sock, rest)
        assert status == 200 and json.loads(body) == {"echo": {"n": n}}
        assert headers["content-type"] == "application/json" and "connection" not in headers
    sock.close()


def test_chunked_body(shim):
    sock = connect(shim)
    body = json.dumps({"value": {"text": "❄ ☃ ❄" * 1000}}).encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part)
                      for part in (body[:100], body[100:3000], body[3000:]))
    sock.sendall(b"POST /run HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n")
    status, _headers, reply, _ = read_response(sock)
    assert status == 200 and json.loads(reply) == {"echo": {"text": "❄ ☃ ❄" * 1000}}
    sock.close()


def test_expect_100_continue(shim):
    sock = connect(shim)
    body = json.dumps({"value": {"big": "x" * 50000}}).encode()
    sock.sendall(request("/run", b"", extra="Expect: 100-continue\r\n").replace(
        b"Content-Length: 0", b"Content-Length: %d" % len(body)))
    interim = b""
    while b"\r\n\r\n" not in interim:
        interim += sock.recv(1024)
    assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    sock.sendall(body)
    status, _headers, reply, _ = read_response(sock, interim[len(b"HTTP/1.1 100 Continue\r\n\r\n"):])
    assert status == 200 and json.loads(reply)["echo"]["big"] == "x" * 50000
    sock.close()


@pytest.mark.parametrize("version, extra", [("1.1", "Connection: close\r\n"), ("1.0", "")])
def test_the_connection_closes_when_the_client_asks(shim, version, extra):
    sock = connect(shim)
    sock.sendall(request("/run", b'{"value":{}}', extra, version))
    status, headers, body, rest = read_response(sock)
    assert status == 200 and body == b'{"echo": {}}' and headers["connection"] == "close"
    assert rest == b"" and closed(sock)


def test_malformed_request_gets_400_and_the_server_keeps_serving(shim):
    sock = connect(shim)
    sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
    status, headers, body, _ = read_response(sock)
    assert status == 400 and body.startswith(b"Bad request") and headers["connection"] == "close"
    assert closed(sock)
    assert shim.run({"after": 1}) == (200, b'{"echo": {"after": 1}}')


def test_direct_and_flask_paths_answer_alike(shim):
    # /run (direct) and /init (Flask) both carry the JSON headers; unknown routes are Flask's.
    sock = connect(shim)
    sock.sendall(request("/run", b"not json"))
    status, headers, body, _ = read_response(sock)
    assert status == 400 and body.startswith(b'{"error":"Error unmarshaling request:')
    assert headers["content-type"] == "application/json" and "date" in headers
    sock.sendall(request("/init", b"not json"))
    status, headers, body, _ = read_response(sock)
    assert status == 400 and body.startswith(b'{"error":"Error unmarshaling request:')
    assert headers["content-type"] == "application/json" and "date" in headers
    sock.sendall(request("/nowhere", b"{}"))
    assert read_response(sock)[0] == 404
    sock.sendall(b"GET /run HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(sock)[0] == 405
    sock.close()


def test_sigterm_closes_idle_keep_alive_connections_and_exits(shim):
    idle = connect(shim)
    idle.sendall(request("/run", b'{"value":{}}'))
    assert read_response(idle)[0] == 200             # now idle, kept alive
    shim.connection.close()
    shim.process.send_signal(signal.SIGTERM)
    wait_for(lambda: shim.process.poll() is not None, timeout=20, message="the shim to exit")
    assert shim.process.returncode == 0 and closed(idle)


@pytest.mark.parametrize("head, status", [
    (b"POST /run?" + b"q" * 5000 + b" HTTP/1.1\r\nHost: x\r\n", 414),
    (b"POST /run HTTP/1.1\r\nX-Big: " + b"v" * 9000 + b"\r\n", 431),
    (b"POST /run HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(101)), 431),
])
def test_oversized_request_heads_are_refused(shim, head, status):
    sock = connect(shim)
    sock.sendall(head + b"Content-Length: 2\r\n\r\n{}")
    got, headers, _body, _ = read_response(sock)
    assert got == status and headers["connection"] == "close" and closed(sock)


@pytest.fixture
def limited_shim(tmp_path):
    server = Shim(tmp_path, {"FAASTUBE_MAX_BODY": "1MiB", "FAASTUBE_REQUEST_TIMEOUT_S": "1"})
    assert server.init(ECHO)[0] == 200
    yield server
    server.stop()


def test_a_body_over_the_limit_is_refused_before_it_is_read_and_when_chunked(limited_shim):
    sock = connect(limited_shim)
    sock.sendall(b"POST /run HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n")    # no body sent
    status, _headers, body, _ = read_response(sock)
    assert status == 413 and b"more than 1048576 bytes" in body
    sock.close()
    sock = connect(limited_shim)
    chunk = b"x" * 65536
    sock.sendall(b"POST /run HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    try:
        for _ in range(20):                                  # 1.25 MiB in chunks
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    except (BrokenPipeError, ConnectionResetError):
        pass                                                 # refused midway: the answer is there
    status, _headers, body, _ = read_response(sock)
    assert status == 413
    sock.close()
    status, body = limited_shim.run({"n": 1})
    assert status == 200 and json.loads(body) == {"echo": {"n": 1}}


def test_a_request_that_trickles_in_is_cut_off_and_others_are_served(limited_shim):
    slow = [connect(limited_shim) for _ in range(20)]
    for sock in slow:
        sock.sendall(b"POST /run HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")   # 1 of 100 bytes
    status, body = limited_shim.run({"n": 2})
    assert status == 200 and json.loads(body) == {"echo": {"n": 2}}
    for sock in slow:
        status, _headers, body, _ = read_response(sock)
        assert status == 408 and body == b"Request Timeout: the request did not arrive within 1 s\n"
        assert closed(sock)
        sock.close()
    # Idle keep-alive connections are not cut by the request timeout.
    sock = connect(limited_shim)
    sock.sendall(request("/run", b'{"value": {"a": 1}}'))
    assert read_response(sock)[0] == 200
    import time
    time.sleep(1.5)
    sock.sendall(request("/run", b'{"value": {"a": 2}}'))
    assert json.loads(read_response(sock)[2]) == {"echo": {"a": 2}}
    sock.close()
