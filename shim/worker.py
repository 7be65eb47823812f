"""The shim's gunicorn worker: one thread per connection, HTTP/1.1 keep-alive parsed by
``httptools`` (llhttp), the Flask app called through WSGI.

Why not gunicorn's gthread worker: every keep-alive request there goes main loop → poller →
thread pool and through gunicorn's pure-Python parser; on a 2-core machine that alone cost
more per request than the whole stock runtime (Go proxy + launcher; docs/benchmarks.md).
A platform talks to a container over a few long-lived connections, so a thread that owns
its connection and blocks in ``recv`` is the shortest path.

Routes the app lists in ``app.extensions["faastube_direct_routes"]`` (``(method, path) →
handler(body) -> (status, body)``) are answered without building a WSGI environ or a Flask
request: the Flask view of the same route calls the same handler, so the behaviour is
defined once (shim/app.py) and this is only the shorter way in. Everything else — /init,
the Knative routes, 404 and 405 — is Flask's.

Shutdown (SIGTERM, gunicorn's graceful stop): stop accepting, let requests in flight finish
and answer them with ``Connection: close``, close idle connections, exit.
"""

from __future__ import annotations

import email.utils
import io
import os
import select
import socket
import sys
import threading
import time
from http import HTTPStatus
from urllib.parse import unquote_to_bytes

import httptools
from gunicorn.workers import base

from faastube.config import ShimConfig

RECV_SIZE = 1 << 16
IDLE_POLL_S = 1.0        # how often the accept loop tells the arbiter it lives


def reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


class _Date:
    """The Date header, formatted once per second."""

    def __init__(self):
        self._second = -1
        self._value = b""

    def value(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second, self._value = now, email.utils.formatdate(now, usegmt=True).encode()
        return self._value


DATE = _Date()


class Request:
    __slots__ = ("method", "url", "headers", "body", "version", "keep_alive")

    def __init__(self):
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []


class TooLarge(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Parse:
    """httptools callbacks: collect each complete request of a connection (pipelining
    included) in order. The request line and headers are bounded by gunicorn's
    ``limit_request_*`` settings, as gunicorn's own workers bound them."""

    def __init__(self, client: socket.socket, cfg, max_body: int):
        self.client = client
        self.parser = httptools.HttpRequestParser(self)
        self.current: Request | None = None
        self.complete: list[Request] = []
        self.error: TooLarge | None = None
        self.max_line = cfg.limit_request_line or 1 << 20
        self.max_fields = cfg.limit_request_fields
        self.max_field = cfg.limit_request_field_size or 1 << 20
        self.max_body = max_body
        self.body_bytes = 0

    def on_message_begin(self):
        self.current = Request()
        self.body_bytes = 0

    def on_url(self, url: bytes):
        self.current.url += url
        if len(self.current.url) > self.max_line:
            self.error = TooLarge(414, "Request-URI Too Long")
            raise self.error

    def on_header(self, name: bytes, value: bytes):
        headers = self.current.headers       # httptools hands each header over whole
        headers.append((name, value))
        if len(headers) > self.max_fields or len(name) + len(value) > self.max_field:
            self.error = TooLarge(431, "Request Header Fields Too Large")
            raise self.error

    def on_headers_complete(self):
        request = self.current
        request.method = self.parser.get_method().decode("latin-1")
        request.version = self.parser.get_http_version()
        request.keep_alive = self.parser.should_keep_alive()
        length = next((v for n, v in request.headers if n.lower() == b"content-length"), b"0")
        if length.isdigit() and int(length) > self.max_body:      # refused before it is sent
            self.error = TooLarge(413, f"Request Entity Too Large: more than {self.max_body} bytes")
            raise self.error
        if any(n.lower() == b"expect" and v.lower() == b"100-continue" for n, v in request.headers):
            # The client waits for this before sending a large body (curl, Go clients).
            self.client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes):
        self.body_bytes += len(body)
        if self.body_bytes > self.max_body:                     # chunked: counted as it comes
            self.error = TooLarge(413, f"Request Entity Too Large: more than {self.max_body} bytes")
            raise self.error
        self.current.body.append(body)

    def on_message_complete(self):
        self.complete.append(self.current)
        self.current = None


class ShimWorker(base.Worker):
    def init_process(self):
        self._limits = ShimConfig()                # the app's settings, once it is loaded
        self._state = threading.Condition()
        self._connections: dict[socket.socket, bool] = {}    # connection → busy
        self._direct = {}
        super().init_process()

    def load_wsgi(self):
        super().load_wsgi()
        extensions = getattr(self.wsgi, "extensions", None) or {}
        self._direct = extensions.get("faastube_direct_routes", {})
        runtime = extensions.get("faastube_runtime")
        if runtime is not None:
            self._limits = runtime.settings        # max_body, request_timeout_s

    # -- accepting ---------------------------------------------------------------------

    def run(self):
        for listener in self.sockets:
            listener.setblocking(False)
        limit = self.cfg.worker_connections
        while self.alive:
            self.notify()
            with self._state:
                if len(self._connections) >= limit:
                    self._state.wait(IDLE_POLL_S)
                    continue
            try:
                ready, _, _ = select.select(self.wait_fds, [], [], IDLE_POLL_S)
            except InterruptedError:
                continue
            if self.PIPE[0] in ready:          # a signal arrived (gunicorn's wake-up pipe)
                ready.remove(self.PIPE[0])
                _drain_pipe(self.PIPE[0])
            for listener in ready:
                try:
                    client, address = listener.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    continue
                if client.family in (socket.AF_INET, socket.AF_INET6):
                    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with self._state:
                    self._connections[client] = False
                threading.Thread(target=self._serve, args=(listener, client, address),
                                 name="shim-connection", daemon=True).start()
        self._drain()

    def _drain(self):
        """Graceful stop: close idle connections now, wait for busy ones to finish."""
        deadline = time.monotonic() + self.cfg.graceful_timeout
        with self._state:
            while self._connections and time.monotonic() < deadline:
                for client, busy in self._connections.items():
                    if not busy:
                        _shutdown(client)
                self._state.wait(min(IDLE_POLL_S, max(0.0, deadline - time.monotonic())))
                self.notify()

    # -- one connection ----------------------------------------------------------------

    def _serve(self, listener, client: socket.socket, address):
        parse = _Parse(client, self.cfg, self._limits.max_body)
        server = listener.getsockname()
        # Idle between requests: the connection goes after the keep-alive time. Inside a
        # request: it must arrive whole within the request timeout of its first byte, so a
        # client that trickles cannot hold a thread (and a connection slot) for long.
        idle = self.cfg.keepalive or None
        client.settimeout(idle)
        request_deadline = None
        try:
            while True:
                try:
                    data = client.recv(RECV_SIZE)
                except TimeoutError:
                    if request_deadline is not None:
                        self._send(client, 408, b"Request Timeout: the request did not arrive within "
                                   b"%g s\n" % self._limits.request_timeout_s, b"text/plain", close=True)
                    return
                except OSError:                  # reset, or shut down by _drain
                    return
                if not data:
                    return
                if not self._mark(client, busy=True):
                    return
                try:
                    parse.parser.feed_data(data)
                except httptools.HttpParserUpgrade:
                    self._send(client, 400, b"Upgrade is not supported\n", b"text/plain", close=True)
                    return
                except httptools.HttpParserError as exc:
                    status, text = ((parse.error.status, str(parse.error)) if parse.error
                                    else (400, f"Bad request: {exc}"))
                    self._send(client, status, f"{text}\n".encode(), b"text/plain", close=True)
                    return
                while parse.complete:
                    request = parse.complete.pop(0)
                    close = not request.keep_alive or not self.alive
                    self._respond(request, client, address, server, close)
                    if close:
                        return
                if parse.current is None:
                    if request_deadline is not None:
                        request_deadline = None
                        client.settimeout(idle)
                    if not self._mark(client, busy=False):
                        return
                else:
                    now = time.monotonic()
                    if request_deadline is None:
                        request_deadline = now + self._limits.request_timeout_s
                    client.settimeout(max(request_deadline - now, 0.001))
        finally:
            with self._state:
                self._connections.pop(client, None)
                self._state.notify_all()
            try:
                client.close()
            except OSError:
                pass

    def _mark(self, client, busy: bool) -> bool:
        """Record whether a request is in flight; False once the worker stops (idle
        connections then close)."""
        with self._state:
            if client not in self._connections:
                return False
            self._connections[client] = busy
            if not busy and not self.alive:
                return False
            self._state.notify_all()
        return True

    def _respond(self, request: Request, client, address, server, close: bool):
        body = b"".join(request.body)
        path = request.url.split(b"?", 1)[0]
        handler = self._direct.get((request.method, path))
        try:
            if handler is not None:
                status, payload = handler(body)
                self._send(client, status, payload, b"application/json", close=close)
            else:
                self._wsgi(request, body, client, address, server, close)
        except ConnectionError:
            raise
        except Exception:
            self.log.exception("Error handling %s %s", request.method, request.url)
            self._send(client, 500, b"Internal Server Error\n", b"text/plain", close=True)

    def _send(self, client, status: int, payload: bytes, content_type: bytes, close: bool):
        _write(client, b"%d %s" % (status, reason(status).encode()),
               b"Content-Type: " + content_type, payload, len(payload), close)

    def _wsgi(self, request: Request, body: bytes, client, address, server, close: bool):
        environ = self._environ(request, body, address, server)
        response: list = []

        def start_response(status, headers, exc_info=None):
            if exc_info and response:
                raise exc_info[1].with_traceback(exc_info[2])
            response[:] = [status, headers]
            return lambda data: None        # the legacy write() callable: nothing uses it

        result = self.wsgi(environ, start_response)
        try:
            payload = b"".join(result) if request.method != "HEAD" else b""
        finally:
            if hasattr(result, "close"):
                result.close()
        status, headers = response
        fields, length = [], len(payload)
        for name, value in headers:
            lowered = name.lower()
            if lowered == "content-length":
                length = int(value)
            elif lowered not in ("connection", "date", "transfer-encoding"):
                fields.append(f"{name}: {value}".encode("latin-1"))
        _write(client, status.encode("latin-1"), b"\r\n".join(fields), payload, length, close)

    def _environ(self, request: Request, body: bytes, address, server) -> dict:
        path, _, query = request.url.partition(b"?")
        environ = {
            "REQUEST_METHOD": request.method,
            "SCRIPT_NAME": "",
            "PATH_INFO": unquote_to_bytes(path).decode("latin-1"),
            "QUERY_STRING": query.decode("latin-1"),
            "RAW_URI": request.url.decode("latin-1"),
            "SERVER_PROTOCOL": f"HTTP/{request.version}",
            "SERVER_NAME": str(server[0]) if isinstance(server, tuple) else "localhost",
            "SERVER_PORT": str(server[1]) if isinstance(server, tuple) else "",
            "REMOTE_ADDR": str(address[0]) if isinstance(address, tuple) else "",
            "REMOTE_PORT": str(address[1]) if isinstance(address, tuple) else "",
            "CONTENT_LENGTH": str(len(body)),
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(body),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        for name, value in request.headers:
            key = name.decode("latin-1").upper().replace("-", "_")
            text = value.decode("latin-1")
            if key == "CONTENT_TYPE":
                environ["CONTENT_TYPE"] = text
                continue
            if key in ("CONTENT_LENGTH", "TRANSFER_ENCODING"):
                continue             # the body is already whole and decoded
            key = "HTTP_" + key
            environ[key] = f"{environ[key]},{text}" if key in environ else text
        return environ


def _write(client, status: bytes, fields: bytes, payload: bytes, length: int, close: bool) -> None:
    """One response: status line, the route's header fields, then the ones every response
    carries (Date, Content-Length, Connection: close when closing), then the body."""
    client.sendall(b"HTTP/1.1 %s\r\n%s%sDate: %s\r\nContent-Length: %d\r\n%s\r\n%s"
                   % (status, fields, b"\r\n" if fields else b"", DATE.value(), length,
                      b"Connection: close\r\n" if close else b"", payload))


def _shutdown(client: socket.socket) -> None:
    try:
        client.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _drain_pipe(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
