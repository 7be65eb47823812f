"""`faastube conformance` passes against our runtime in both modes, and fails a runtime that
does not behave like the stock one."""

import http.server
import subprocess
import sys
import threading

import pytest

from .test_shim_openwhisk import Shim


def conformance(url, *args):
    return subprocess.run([sys.executable, "-m", "faastube.cli", "conformance", url, *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("env", [{}, {"__OW_ALLOW_CONCURRENT": "true", "FAASTUBE_CONCURRENCY": "2"}],
                         ids=["serial", "concurrent"])
def test_our_runtime_conforms(tmp_path, env):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    server, second = Shim(tmp_path / "a", env), Shim(tmp_path / "b", env)
    try:
        result = conformance(f"http://127.0.0.1:{server.port}",
                             "--stdout", str(server.out_path), "--stderr", str(server.err_path),
                             "--prebuilt", f"http://127.0.0.1:{second.port}")
    finally:
        server.stop()
        second.stop()
    assert result.returncode == 0, result.stdout
    concurrent = bool(env)
    # Concurrent: the process that exited was replaced, a deliberate difference (DIFF, not FAIL).
    assert ("DIFF  run after the action exited" in result.stdout) == concurrent
    assert "FAIL" not in result.stdout and result.stdout.count("PASS") == 29 - concurrent
    assert "PASS  prebuilt zip: run calls the build's entry point" in result.stdout
    assert "NOTE  not checked, and different on the FaaSTube runtime on purpose" in result.stdout
    assert "all checks passed" in result.stdout


def test_without_logs_the_log_checks_are_skipped_with_a_reason(tmp_path):
    server = Shim(tmp_path, {})
    try:
        result = conformance(f"http://127.0.0.1:{server.port}")
    finally:
        server.stop()
    assert result.returncode == 0
    assert "SKIP  log checks" in result.stdout and "pass --stdout and --stderr" in result.stdout
    assert "SKIP  prebuilt zip checks" in result.stdout and "--prebuilt" in result.stdout


def test_a_runtime_that_answers_everything_with_200_fails():
    class Always200(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Always200)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        result = conformance(f"http://127.0.0.1:{httpd.server_address[1]}")
    finally:
        httpd.shutdown()
    assert result.returncode == 1
    assert "FAIL  run before init" in result.stdout and "checks failed" in result.stdout
