"""The OpenWhisk runtime protocol, over real HTTP against `faastube shim` run as a process.

Expected statuses and bodies are the stock Python runtime's (platform-contracts.md).
"""

import base64
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
import zipfile

import pytest

from faastube.local import free_port

from .conftest import wait_for

SENTINEL = "XXX_THE_END_OF_A_WHISK_ACTIVATION_XXX"
BUILD_FAILED = b'{"error":"The action failed to generate or locate a binary. See logs for details."}\n'
CANNOT_START = b'{"error":"Cannot start action. Check logs for details."}\n'


class Shim:
    """`faastube shim` on a free port; logs to files; every response must carry Content-Length."""

    def __init__(self, tmp_path, env=None):
        self.port = free_port()
        self.out_path, self.err_path = tmp_path / "shim.out", tmp_path / "shim.err"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "faastube.cli", "shim"],
            stdout=open(self.out_path, "wb"), stderr=open(self.err_path, "wb"),
            env={**os.environ, "PORT": str(self.port), "PYTHONUNBUFFERED": "1", **(env or {})})
        import http.client
        self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        wait_for(self._ready, timeout=20, message="the shim to listen")

    def _ready(self):
        import socket
        if self.process.poll() is not None:
            pytest.fail(f"shim exited: {self.err_path.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def post(self, path, body) -> tuple[int, bytes]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.connection.request("POST", path, data, {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        payload = response.read()
        assert response.getheader("Content-Length") == str(len(payload)), "no Content-Length"
        if payload:
            assert response.getheader("Content-Type") == "application/json"
        return response.status, payload

    def init(self, code, main="main", binary=False, env=None):
        return self.post("/init", {"value": {"name": "action", "main": main, "code": code,
                                             "binary": binary, "env": env}})

    def run(self, value=None, **keys):
        body = dict(keys)
        if value is not None:
            body["value"] = value
        return self.post("/run", body)

    def stdout(self) -> str:
        return self.out_path.read_text()

    def stderr(self) -> str:
        return self.err_path.read_text()

    def stop(self):
        self.connection.close()
        self.process.terminate()
        self.process.wait(20)


@pytest.fixture(params=["serial", "concurrent"])
def shim(tmp_path, request):
    """Start shims; every protocol test runs with activations serialised (the stock
    behaviour) and with __OW_ALLOW_CONCURRENT=true (a pool of action processes)."""
    started = []
    mode = {"__OW_ALLOW_CONCURRENT": "true", "FAASTUBE_CONCURRENCY": "4"} if request.param == "concurrent" else {}

    def start(**env):
        folder = tmp_path / f"shim{len(started)}"
        folder.mkdir()
        server = Shim(folder, {**mode, **env})
        started.append(server)
        return server
    start.mode = request.param
    yield start
    for server in started:
        server.stop()


def source(text: str) -> str:
    return textwrap.dedent(text).strip() + "\n"


def zipped(files: dict) -> str:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return base64.b64encode(buffer.getvalue()).decode()


ECHO = source("""
    def main(args):
        print("hello stdout", args.get("n"))
        import sys
        print("hello stderr", file=sys.stderr)
        return args
""")


def test_run_before_init(shim):
    assert shim().run({}) == (500, b'{"error":"no action defined yet"}\n')


def test_init_then_run_and_the_logs(shim):
    s = shim()
    assert s.init(ECHO) == (200, b'{"ok":true}\n')
    assert SENTINEL not in s.stdout() + s.stderr()           # a successful init writes none
    status, body = s.run({"n": 1, "s": "❄ ☃ ❄"})
    assert status == 200 and body == json.dumps({"n": 1, "s": "❄ ☃ ❄"}, ensure_ascii=False).encode()
    s.run({"n": 2})
    assert s.stdout() == f"hello stdout 1\n{SENTINEL}\nhello stdout 2\n{SENTINEL}\n"
    assert s.stderr() == f"hello stderr\n{SENTINEL}\nhello stderr\n{SENTINEL}\n"


def test_second_init_is_refused_and_logged_without_sentinels(shim):
    s = shim()
    s.init(ECHO)
    assert s.init(ECHO) == (403, b'{"error":"Cannot initialize the action more than once."}\n')
    assert s.stdout() == s.stderr() == "Cannot initialize the action more than once.\n"


def test_init_body_not_json(shim):
    status, body = shim().post("/init", b"{nope")
    assert status == 400 and body.startswith(b'{"error":"Error unmarshaling request: ')


@pytest.mark.parametrize("payload", [{}, {"value": {}}, {"value": {"code": "", "main": "main"}}])
def test_init_without_code(shim, payload):
    assert shim().post("/init", payload) == (403, b'{"error":"Missing main/no code to execute."}\n')


def test_init_bad_base64(shim):
    status, body = shim().init("!!!not base64!!!", binary=True)
    assert status == 400 and body.startswith(b'{"error":"cannot decode the request: ')


def test_zip_without_main_py(shim):
    s = shim()
    assert s.init(zipped({"other.py": "x = 1"}), binary=True) == (502, BUILD_FAILED)
    assert "Zip file does not include" in s.stderr()
    assert s.stdout().endswith(SENTINEL + "\n") and s.stderr().endswith(SENTINEL + "\n")


def test_code_that_does_not_compile(shim):
    s = shim()
    assert s.init("def main(args) return {}") == (502, BUILD_FAILED)
    assert "SyntaxError" in s.stderr() and s.stderr().endswith(SENTINEL + "\n")


def test_import_that_fails(shim):
    s = shim()
    assert s.init("import iamnotsupported\ndef main(args):\n    return {}\n") == (502, CANNOT_START)
    assert "Traceback" in s.stderr() and "iamnotsupported" in s.stderr()
    assert s.stdout().endswith(SENTINEL + "\n") and s.stderr().endswith(SENTINEL + "\n")
    assert s.run({}) == (500, b'{"error":"no action defined yet"}\n')


def test_exit_at_import(shim):
    s = shim()
    assert s.init("import sys\nsys.exit(1)\n") == (502, CANNOT_START)
    assert "Command exited abruptly during initialization." in s.stderr()


def test_missing_main_function(shim):
    s = shim()
    assert s.init("def handler(args):\n    return {}\n") == (502, CANNOT_START)
    assert "no function 'main'" in s.stderr()


def test_zip_with_data_files_custom_main_and_init_env(shim):
    s = shim()
    code = zipped({
        "__main__.py": source("""
            import os
            AT_IMPORT = os.environ.get("GREETING")
            def entry(args):
                with open("data/words.txt") as f:
                    return {"words": f.read().split(), "greeting": AT_IMPORT, "cwd_file": os.path.exists("data")}
        """),
        "data/words.txt": "alpha beta",
    })
    assert s.init(code, main="entry", binary=True, env={"GREETING": "hi"}) == (200, b'{"ok":true}\n')
    status, body = s.run({})
    assert status == 200
    assert json.loads(body) == {"words": ["alpha", "beta"], "greeting": "hi", "cwd_file": True}


def test_tar_gz_archive(shim):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        data = b"def main(args):\n    return {'from': 'tar'}\n"
        info = tarfile.TarInfo("__main__.py")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    s = shim()
    assert s.init(base64.b64encode(buffer.getvalue()).decode(), binary=True)[0] == 200
    assert s.run({}) == (200, b'{"from": "tar"}')


def test_zip_with_a_virtualenv_is_activated(shim):
    activate = source("""
        import os, sys
        site = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib", "site")
        sys.path.insert(0, site)
    """)
    code = zipped({
        "__main__.py": "import venvonly\ndef main(args):\n    return {'from': venvonly.WHERE}\n",
        "virtualenv/bin/activate_this.py": activate,
        "virtualenv/lib/site/venvonly.py": "WHERE = 'virtualenv'\n",
    })
    s = shim()
    assert s.init(code, binary=True) == (200, b'{"ok":true}\n')
    assert s.run({}) == (200, b'{"from": "virtualenv"}')


def test_a_prebuilt_actionloop_zip_runs_its_builds_entry_point_whatever_init_main_says(shim):
    # Note [Prebuilt ActionLoop zips]: what `docker run -i IMAGE -compile main` makes.
    from faastube.conformance import prebuilt_zip
    s = shim()
    assert s.init(prebuilt_zip("naim"), main="main", binary=True) == (200, b'{"ok":true}\n')
    status, body = s.run({"n": 3})
    assert status == 200 and json.loads(body) == {"entry": "naim", "args": {"n": 3}}


def test_a_prebuilt_zip_without_its_action_cannot_start(shim):
    from faastube.conformance import prebuilt_zip
    s = shim()
    assert s.init(prebuilt_zip(without=("main__.py",)), binary=True) == (502, CANNOT_START)
    assert "main__.py" in s.stderr()
    assert s.init(prebuilt_zip(), binary=True) == (200, b'{"ok":true}\n')    # a later init works


def test_an_invalid_virtualenv_fails_as_on_stock_in_a_source_zip_and_in_a_build(shim):
    stock_text = "Invalid virtualenv. Zip file does not include 'activate_this.py'."
    s = shim()
    source_zip = zipped({"__main__.py": "def main(args):\n    return {}\n", "virtualenv/README.md": "x"})
    assert s.init(source_zip, binary=True) == (502, BUILD_FAILED)      # the stock compile step's check
    assert stock_text in s.stderr()
    import base64 as b64
    from faastube import conformance
    build = io.BytesIO(b64.b64decode(conformance.prebuilt_zip()))
    with zipfile.ZipFile(build, "a") as archive:
        archive.writestr("virtualenv/README.md", "x")
    assert s.init(b64.b64encode(build.getvalue()).decode(), binary=True) == (502, CANNOT_START)  # its launcher's
    assert s.stderr().count(stock_text) == 2


def test_a_prebuilt_binary_for_another_language_is_refused_saying_why(shim):
    s = shim()
    assert s.init(zipped({"exec": b"\x7fELF\x02\x01\x01" + b"\0" * 64}), binary=True) == (502, BUILD_FAILED)
    assert "this runtime runs Python actions" in s.stderr()


def test_an_exec_that_is_not_executable_is_the_actions_source(shim):
    s = shim()
    assert s.init(zipped({"exec": "def main(args):\n    return {'from': 'exec'}\n"}), binary=True)[0] == 200
    assert s.run({}) == (200, b'{"from": "exec"}')


def test_run_results_and_errors(shim):
    s = shim()
    s.init(source("""
        import sys
        def main(args):
            kind = args.get("kind")
            if kind == "list":
                return [1, "two", None]
            if kind == "error":
                return {"error": "sorry"}
            if kind == "raise":
                raise ValueError("bad input")
            if kind == "string":
                return "not a dict"
            if kind == "none":
                return None
            if kind == "nan":
                return {"x": float("nan")}
            return {"args": args}
    """))
    assert s.run() == (200, b'{"args": {}}')                              # value missing → {}
    assert s.run({"kind": "list"}) == (200, b'[1, "two", null]')
    assert s.run({"kind": "error"}) == (200, b'{"error": "sorry"}')
    assert s.run({"kind": "raise"}) == (200, b'{"error": "bad input"}')
    assert "Traceback" in s.stderr() and "ValueError: bad input" in s.stderr()
    assert s.run({"kind": "string"}) == (502, b'{"error":"The action did not return a dictionary or array."}\n')
    # The stock proxy's json.Unmarshal into a map takes "null": 200 null, as there.
    assert s.run({"kind": "none"}) == (200, b'null')
    # NaN is not JSON: the stock proxy cannot parse it either, and answers the same 502.
    assert s.run({"kind": "nan"}) == (502, b'{"error":"The action did not return a dictionary or array."}\n')
    assert "the action's result is not JSON: Out of range float values are not JSON compliant" in s.stderr()
    assert s.stdout().count(SENTINEL) == 7 and s.stderr().count(SENTINEL) == 7


def test_sys_exit_during_run_then_no_action_or_a_new_process(shim):
    s = shim()
    s.init("import sys\ndef main(args):\n    if args.get('exit'):\n        sys.exit(1)\n    return {'ok': 1}\n")
    assert s.run({"exit": True}) == (400, b'{"error":"command exited"}\n')
    if shim.mode == "serial":        # the stock proxy's rule: the action is gone
        assert s.run({}) == (500, b'{"error":"no action defined yet"}\n')
        assert s.stdout().count(SENTINEL) == 1 and s.stderr().count(SENTINEL) == 1
    else:                            # Note [A crashed process is replaced]
        assert s.run({}) == (200, b'{"ok": 1}')
        assert "a new one starts for the next activation" in s.stderr()
        assert s.stdout().count(SENTINEL) == 2 and s.stderr().count(SENTINEL) == 2


def test_in_concurrent_mode_one_crashing_activation_leaves_the_others_running(tmp_path):
    import http.client
    server = Shim(tmp_path, {"__OW_ALLOW_CONCURRENT": "true", "FAASTUBE_CONCURRENCY": "3"})
    started = tmp_path / "started"
    try:
        server.init(source("""
            import os, time
            def main(args):
                if args.get("crash"):
                    os._exit(9)
                if args.get("started"):
                    open(args["started"], "w").close()
                    time.sleep(1.0)
                return {"pid": os.getpid()}
        """))

        def slow_run():
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            connection.request("POST", "/run", json.dumps({"value": {"started": str(started)}}))
            results["slow"] = connection.getresponse().status
        results = {}
        slow = threading.Thread(target=slow_run)
        slow.start()
        wait_for(started.exists, message="the slow activation to be running")
        assert server.run({"crash": True}) == (400, b'{"error":"command exited"}\n')
        slow.join(30)
        assert results["slow"] == 200, "the activation beside the crash finished"
        assert {server.run({})[0] for _ in range(4)} == {200}, "the pool serves on with a new process"
    finally:
        server.stop()


def test_ow_environment_per_activation(shim):
    s = shim(__OW_API_HOST="https://whisk.example")
    s.init(source("""
        import os
        def main(args):
            return {k: v for k, v in os.environ.items()
                    if k.startswith("__OW_") and k != "__OW_ALLOW_CONCURRENT"}
    """))
    status, body = s.run({}, namespace="guest", action_name="/guest/echo", activation_id="a1",
                         deadline="1732700000000", api_key="key")
    assert json.loads(body) == {"__OW_NAMESPACE": "guest", "__OW_ACTION_NAME": "/guest/echo",
                                "__OW_ACTIVATION_ID": "a1", "__OW_DEADLINE": "1732700000000",
                                "__OW_API_KEY": "key", "__OW_API_HOST": "https://whisk.example"}
    status, body = s.run({}, activation_id="a2")
    assert json.loads(body) == {"__OW_ACTIVATION_ID": "a2", "__OW_API_HOST": "https://whisk.example"}


def test_container_environment_reaches_the_action(shim):
    s = shim(LD_LIBRARY_PATH="/usr/local/cuda/lib64", CUDA_VISIBLE_DEVICES="0",
             NVIDIA_VISIBLE_DEVICES="all")
    s.init("import os\ndef main(args):\n    return {k: os.environ.get(k) for k in args['keys']}\n")
    keys = ["PATH", "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"]
    status, body = s.run({"keys": keys})
    got = json.loads(body)
    assert got["PATH"] == os.environ["PATH"] and got["LD_LIBRARY_PATH"] == "/usr/local/cuda/lib64"
    assert got["CUDA_VISIBLE_DEVICES"] == "0" and got["NVIDIA_VISIBLE_DEVICES"] == "all"


def test_a_1mb_unicode_payload_roundtrips_exactly(shim):
    s = shim()
    s.init("def main(args):\n    return args\n")
    text = ("❄ ☃ ❄" * 209713)[:1_048_561]
    status, body = s.run({"payload": text})
    assert status == 200 and json.loads(body)["payload"] == text
    assert body == json.dumps({"payload": text}, ensure_ascii=False).encode()


SLEEPER = source("""
    import os, time
    def main(args):
        started = time.monotonic()
        for i in range(3):
            print(f"activation {os.environ['__OW_ACTIVATION_ID']} line {i}", flush=True)
            time.sleep(args["sleep"] / 3)
        return {"id": os.environ["__OW_ACTIVATION_ID"], "n": args["n"], "pid": os.getpid(),
                "started": started, "ended": time.monotonic()}
""")


def run_in_parallel(server_port, count, sleep):
    """`count` keep-alive clients, one /run each, all at once."""
    import concurrent.futures
    import http.client

    def one(n):
        conn = http.client.HTTPConnection("127.0.0.1", server_port, timeout=60)
        conn.request("POST", "/run", json.dumps({"value": {"n": n, "sleep": sleep}, "activation_id": f"act-{n}"}))
        response = conn.getresponse()
        body = response.read()
        conn.close()
        return response.status, json.loads(body)
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def overlapping(results) -> int:
    """The most activations that were running at the same moment."""
    events = sorted([(r["started"], 1) for r in results] + [(r["ended"], -1) for r in results])
    running = peak = 0
    for _time, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def test_concurrent_activations_run_at_once_each_with_its_own_result_and_logs(tmp_path):
    server = Shim(tmp_path, {"__OW_ALLOW_CONCURRENT": "true", "FAASTUBE_CONCURRENCY": "4"})
    try:
        server.init(SLEEPER)
        run_in_parallel(server.port, 4, 0.05)               # start the pool's processes
        results = run_in_parallel(server.port, 4, 0.6)
        assert all(status == 200 for status, _ in results)
        assert [(r["id"], r["n"]) for _, r in results] == [(f"act-{n}", n) for n in range(4)]
        assert overlapping([r for _, r in results]) >= 2
        assert len({r["pid"] for _, r in results}) >= 2
        # Each activation's lines form one block that ends with the sentinel.
        blocks = server.stdout().split(SENTINEL + "\n")
        assert blocks[-1] == "" and len(blocks) == 9
        for block in blocks[:-1]:
            ids = {line.split()[1] for line in block.splitlines()}
            assert len(ids) == 1 and len(block.splitlines()) == 3
    finally:
        server.stop()


def test_without_concurrency_activations_run_one_at_a_time(tmp_path):
    server = Shim(tmp_path)
    try:
        server.init(SLEEPER)
        results = run_in_parallel(server.port, 3, 0.3)
        assert [r["n"] for _, r in results] == [0, 1, 2]
        assert overlapping([r for _, r in results]) == 1
        assert len({r["pid"] for _, r in results}) == 1
    finally:
        server.stop()


def test_action_folders_go_with_a_failed_init_and_with_the_runtime(shim, tmp_path):
    # A failed /init leaves no files behind (a zip bomb's gigabytes included), and a good
    # action's folder is removed when the runtime stops.
    temp = tmp_path / "tmp"
    temp.mkdir()
    folders = lambda: sorted(p.name for p in temp.iterdir())      # noqa: E731
    for code, binary in ((zipped({"other.py": "x = 1"}), True), ("def main(args) return {}", False),
                         ("import iamnotsupported\n", False)):
        assert shim(TMPDIR=str(temp)).init(code, binary=binary)[0] == 502
        assert folders() == []
    s = shim(TMPDIR=str(temp))
    assert s.init("def main(args):\n    return {}\n") == (200, b'{"ok":true}\n')
    assert len(folders()) == 1
    s.stop()
    assert folders() == []


def test_an_archive_that_unpacks_past_the_bound_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    import tempfile
    import shim.extractor as extractor
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(extractor, "MAX_UNPACKED_BYTES", 1 << 20)      # 2 GiB in production
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("__main__.py", "def main(args):\n    return {}\n")
        archive.writestr("zeros.bin", b"\0" * (2 << 20))                  # 2 MiB: a 2 KiB zip
    code = base64.b64encode(bomb.getvalue()).decode()
    with pytest.raises(extractor.BuildError, match=r"the archive unpacks to 2097\d+ bytes, more than the 1048576"):
        extractor.extract(code, binary=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value, wrong", [
    ({"code": "def main(a):\n    return {}\n", "main": 123}, "field value.main must be a string, got int"),
    ({"code": 5}, "field value.code must be a string, got int"),
    ({"code": "x", "binary": "yes"}, "field value.binary must be a boolean, got str"),
    ({"code": "x", "env": ["A"]}, "field value.env must be an object, got list"),
    ({"code": "x", "env": {"A=B": "1"}}, "env name 'A=B' (or its value) cannot be an environment variable"),
    ({"code": "x", "env": {"A": "nul\u0000"}}, "env name 'A' (or its value) cannot be an environment variable"),
])
def test_init_fields_of_the_wrong_type_are_a_400_json_error_and_a_later_init_works(shim, value, wrong):
    s = shim()
    status, body = s.post("/init", {"value": value})
    assert status == 400 and json.loads(body) == {"error": f"Error unmarshaling request: {wrong}"}
    assert s.init("def main(args):\n    return {'ok': 1}\n") == (200, b'{"ok":true}\n')
    assert s.run({}) == (200, b'{"ok": 1}')


def test_an_action_that_prints_more_than_the_log_limit_is_answered_and_its_log_is_cut(shim):
    # Note [Logs per activation]: in concurrent mode an activation's output is held to be
    # written whole; past 10 MiB the rest is dropped and counted, so memory stays bounded.
    server = shim()
    server.init(source("""
        import sys
        def main(args):
            line = "z" * 1023 + "\\n"
            for _ in range(args["kib"]):
                sys.stdout.write(line)
            print("last line")
            return {"done": True}
        """))
    started = time.monotonic()
    assert server.run({"kib": 12 * 1024}) == (200, b'{"done": true}')
    assert time.monotonic() - started < 60
    assert server.run({"kib": 1}) == (200, b'{"done": true}')         # the next one is whole
    wait_for(lambda: server.stdout().count(SENTINEL) == 2, message="both activations' logs")
    first, second, _rest = server.stdout().split(SENTINEL + "\n")
    if shim.mode == "concurrent":
        assert first.endswith("more bytes of this activation's output dropped (more than 10485760 bytes)\n")
        assert len(first) < (10 << 20) + 200
    else:                                                                # serial: streamed as it is
        assert first.endswith("last line\n") and len(first) > 12 << 20
    assert second == "z" * 1023 + "\nlast line\n"


def test_an_activation_ends_when_its_process_answers_whatever_children_it_left(shim):
    server = shim()
    server.init(source("""
        import os, time
        def main(args):
            if os.fork() == 0:           # a child that keeps every inherited pipe open
                time.sleep(20)
                os._exit(0)
            print("parent done")
            return {"ok": 1}
        """))
    for _ in range(2):
        started = time.monotonic()
        assert server.run({}) == (200, b'{"ok": 1}')
        assert time.monotonic() - started < 5
    wait_for(lambda: server.stdout().count("parent done\n" + SENTINEL) == 2, message="both activations' logs")


def test_request_fields_that_cannot_be_environment_variables_are_left_out_and_the_action_lives(shim):
    # Found by tests/test_shim_fuzz.py: such a field used to end the action's process, and
    # every later activation answered "no action defined yet".
    server = shim()
    server.init(source("""
        import os
        def main(args):
            return {"args": args, "id": os.environ.get("__OW_ACTIVATION_ID")}
        """))
    body = json.dumps({"value": {"k": 1}, "": 1, "a=b": "x", "nul\u0000": "y", "s": "\ud800",
                       "activation_id": "act-1"}).encode()
    status, payload = server.post("/run", body)
    assert status == 200 and json.loads(payload) == {"args": {"k": 1}, "id": "act-1"}
    assert server.run({"k": 2}) == (200, b'{"args": {"k": 2}, "id": null}')
    wait_for(lambda: "request field 'a=b' cannot be an environment variable; left out" in server.stderr(),
             message="the left-out field logged")
