"""The `faastube` command: controller, status, demo — run as real processes."""

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from faastube import errors, protocol
from faastube.config import DEFAULT_SOCKET, Config, parse_size

from .conftest import ControllerProcess, wait_for


def faastube_cli(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "faastube.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=timeout)


def test_status_prints_pools_slabs_objects_and_bytes_per_namespace(controller, ft, redis_server):
    ft.put(np.zeros(1_000_000, np.uint8))
    other = controller.client("team-b")
    try:
        target, object_id, _ = other.create_for_put((10,), np.dtype("float64"))
        del target                                  # pending: created, not sealed
        result = faastube_cli("status", "--socket", controller.socket)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert re.fullmatch(r"controller 0\.1\.0, up \d+s", lines[0]), lines[0]
        assert lines[1].startswith(f"node {controller.node}  epoch ")
        assert re.fullmatch(rf"directory: Redis [\d.]+ up at {re.escape(redis_server.url)}; \d+ writes "
                            r"queued, 0 refused", lines[2]), lines[2]
        lines = lines[2:]
        assert lines[1].startswith("pool host: 2 slabs of 4.0 MiB, reserved 8.0 MiB, used ")
        assert lines[2] == ("  room kept ahead 0 B for 0 namespaces; grown ahead 0 slabs (0 B), on a "
                            "request's path 2 (8.0 MiB); idle minimum 0 B")
        # Requests answered so far, by op (this status itself is counted after its reply).
        answered = dict(re.findall(r"(\w+) (\d+) mean \d+ µs", lines[3]))
        assert lines[3].startswith("requests: ") and answered["create"] == "2" and answered["hello"] == "2"
        # This status's own connection, the two clients', and any whose thread is still ending.
        assert re.fullmatch(r"connections [3-9] of 1024; refused at a limit: none", lines[4]), lines[4]
        assert lines[5].split() == ["namespace", "slabs", "reserved", "used", "objects", "pending",
                                    "sealed", "bytes", "leases", "freeing", "waiting", "clients"]
        rows = {cells[0]: cells for cells in (re.split(r"\s{2,}", line.strip()) for line in lines[6:])}
        #                 slabs reserved     used         objects pending sealed bytes        leases freeing waiting clients
        assert rows["test"][1:] == ["1", "4.0 MiB", "976.8 KiB", "1", "0", "1", "976.6 KiB", "0", "0", "0", "1"]
        assert rows["team-b"][1:] == ["1", "4.0 MiB", "256 B", "1", "1", "0", "80 B", "1", "0", "0", "1"]
        as_json = json.loads(faastube_cli("status", "--socket", controller.socket, "--json").stdout)
        assert as_json["namespaces"]["test"]["object_bytes"] == 1_000_000
        assert as_json["pools"][0]["slabs"] == 2
        other.seal(object_id, drop_writer=True)
    finally:
        other.close()


def test_status_without_a_controller_says_how_to_start_one(tmp_path):
    result = faastube_cli("status", "--socket", str(tmp_path / "none.sock"))
    assert result.returncode == 1
    assert f"no controller at {tmp_path / 'none.sock'}" in result.stderr
    assert "start `faastube controller`" in result.stderr


def test_a_second_controller_on_the_same_socket_is_refused(controller):
    result = faastube_cli("controller", "--socket", controller.socket, "--redis", controller.redis_url)
    assert result.returncode == 1
    assert f"another controller is already serving {controller.socket}" in result.stderr


def test_a_stale_socket_file_is_replaced(tmp_path, redis_server):
    ctl = ControllerProcess(tmp_path, redis_server.url)
    os.makedirs(os.path.dirname(ctl.socket))
    open(ctl.socket, "w").close()                 # left behind by a controller that died
    ctl.start()
    assert ctl.stop() == 0
    assert not os.path.exists(ctl.socket)         # removed on a clean stop


def test_controller_reads_its_settings_from_the_environment(tmp_path, redis_server):
    ctl = ControllerProcess(tmp_path, redis_server.url, slab_size=None, pool_limit=None,
                            idle_release=None)
    ctl.extra_env = {"FAASTUBE_SLAB_SIZE": "2MiB", "FAASTUBE_POOL_LIMIT": "10MiB"}
    ctl.start()
    try:
        pool = ctl.status()["pools"][0]
        assert pool["slab_size"] == 2 << 20 and pool["limit"] == 10 << 20
    finally:
        assert ctl.stop() == 0


def test_a_tiny_chunk_size_is_refused(tmp_path, redis_server):
    result = faastube_cli("controller", "--socket", str(tmp_path / "c.sock"), "--redis", redis_server.url,
                          "--gpus", "none", "--chunk-size", "1k")
    assert result.returncode == 1
    assert "--chunk-size must be at least 64KiB, got 1024" in result.stderr


def test_config_defaults_and_errors():
    config = Config.from_env({})
    assert config.socket == DEFAULT_SOCKET == "/run/faastube/controller.sock"
    assert Config.from_env({"__OW_NAMESPACE": "guest"}).namespace == "guest"
    assert Config.from_env({"FAASTUBE_NAMESPACE": "x", "__OW_NAMESPACE": "guest"}).namespace == "x"
    assert parse_size("64MiB") == 64 << 20 and parse_size("1.5k") == 1536 and parse_size("10") == 10
    with pytest.raises(errors.InvalidArgumentError, match="cannot read '12 parsecs' as a size"):
        parse_size("12 parsecs")
    with pytest.raises(errors.InvalidArgumentError, match="FAASTUBE_SLAB_SIZE='big' is not valid"):
        Config.from_env({"FAASTUBE_SLAB_SIZE": "big"})
    assert config.put_waits is True
    assert Config.from_env({"FAASTUBE_PUT_WAITS": "0"}).put_waits is False
    assert Config.from_env({"FAASTUBE_PUT_WAITS": "Off"}).put_waits is False
    assert Config.from_env({"FAASTUBE_PUT_WAITS": "yes"}).put_waits is True
    with pytest.raises(errors.InvalidArgumentError, match="FAASTUBE_PUT_WAITS='maybe' is not valid: write 1 or 0"):
        Config.from_env({"FAASTUBE_PUT_WAITS": "maybe"})
    assert config.native_pump is True and Config.from_env({"FAASTUBE_NATIVE_PUMP": "0"}).native_pump is False
    with pytest.raises(errors.InvalidArgumentError, match="FAASTUBE_NATIVE_PUMP='fast' is not valid"):
        Config.from_env({"FAASTUBE_NATIVE_PUMP": "fast"})


@pytest.mark.parametrize("args, text", [
    (["--chunk-size", "huge"], "argument --chunk-size: 'huge': cannot read 'huge' as a size"),
    (["--gpus", "some"], "argument --gpus: 'some': write 'auto' (every GPU the controller sees) or 'none'"),
    (["--gpu-pool-limit", "150%"], "argument --gpu-pool-limit: '150%': write a share in (0, 1]"),
])
def test_controller_flags_refuse_bad_values_in_their_own_words(args, text):
    done = subprocess.run([sys.executable, "-m", "faastube.cli", "controller", *args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and text in done.stderr, done.stderr


# Each refused before anything starts, in one line naming the flag and the fix (argparse's
# exit status 2), never a traceback.
@pytest.mark.parametrize("args, text", [
    (["controller", "--metrics-port", "99999"], "argument --metrics-port: '99999': write a port from 1 to 65535"),
    (["controller", "--redis", "notaurl"], "argument --redis: 'notaurl': write a Redis URL such as redis://"),
    (["controller", "--redis", "redis://:6379/0"], "a redis:// URL needs a host"),
    (["controller", "--redis", "redis://h:99x/0"], "the port in a Redis URL must be a number"),
    (["controller", "--pool-limit", "-5"], "argument --pool-limit: '-5': cannot read '-5' as a size"),
    (["controller", "--slab-size", "0"], "argument --slab-size: '0': write a size of at least 1 byte"),
    (["controller", "--socket-mode", "1777"], "write an octal file mode from 000 to 777"),
    (["controller", "--idle-timeout", "inf"], "argument --idle-timeout: 'inf': write a number of seconds"),
    (["controller", "--frame-timeout", "0"], "write a number of seconds above 0"),
    (["controller", "--evict-wait", "-1"], "argument --evict-wait: '-1': write a number of seconds, at least 0"),
    (["controller", "--max-connections", "0"], "argument --max-connections: '0': write a whole number of at least 1"),
    (["controller", "--stand-in-gpus", "-2"], "argument --stand-in-gpus: '-2': write a whole number of at least 0"),
    (["controller", "--tombstone-ttl", "0"], "argument --tombstone-ttl: '0': write a whole number of at least 1"),
    (["shim", "--port", "70000"], "argument --port: '70000': write a port from 1 to 65535"),
    (["demo", "--runs", "0"], "argument --runs: '0': write runs from 1 to 1000"),
    (["demo", "--size-mb", "-3"], "argument --size-mb: '-3': write megabytes from 1 to 4096"),
    (["conformance", "not-a-url"], "'not-a-url' is not a runtime's URL: write http://HOST:PORT"),
    (["conformance", "http://127.0.0.1:8080", "--timeout", "0"], "write seconds above 0"),
])
def test_every_flag_is_checked_with_a_one_line_error(args, text):
    done = faastube_cli(*args)
    assert done.returncode == 2 and text in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"faastube {args[0]}: error: ")


def test_errors_found_after_the_flags_are_one_line_too(tmp_path, redis_server):
    unwritable = faastube_cli("controller", "--socket", "/proc/faastube/c.sock", "--redis", redis_server.url,
                              "--gpus", "none")
    assert unwritable.returncode == 1 and "Traceback" not in unwritable.stderr
    assert ("faastube controller: cannot listen on /proc/faastube/c.sock (No such file or directory): "
            "pass --socket (FAASTUBE_SOCKET) a path") in unwritable.stderr
    half = faastube_cli("conformance", "http://127.0.0.1:1", "--stdout", str(tmp_path / "out.log"))
    assert half.returncode == 1 and "--stdout and --stderr go together" in half.stderr
    missing = faastube_cli("conformance", "http://127.0.0.1:1", "--stdout", str(tmp_path / "out.log"),
                           "--stderr", str(tmp_path / "err.log"))
    assert missing.returncode == 1 and f"no log file at {tmp_path / 'out.log'}" in missing.stderr
    bad_env = faastube_cli("status", env={"FAASTUBE_CONNECT_TIMEOUT_S": "soon"})
    assert bad_env.returncode == 1 and "FAASTUBE_CONNECT_TIMEOUT_S='soon' is not valid" in bad_env.stderr
    assert "Traceback" not in bad_env.stderr


def test_version_and_help_list_every_command():
    import faastube
    version = faastube_cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"faastube {faastube.__version__}"
    helped = faastube_cli("--help")
    assert helped.returncode == 0 and "``" not in helped.stdout
    for command in ("controller", "status", "shim", "conformance", "demo", "bench"):
        assert re.search(rf"^\s+{command}\b", helped.stdout, re.M), command


def test_status_says_when_redis_is_down_and_exits_1(tmp_path):
    from faastube.local import LocalRedis
    with LocalRedis() as redis:
        ctl = ControllerProcess(tmp_path, redis.url).start()
        try:
            up = faastube_cli("status", "--socket", ctl.socket)
            assert up.returncode == 0 and re.search(r"^directory: Redis [\d.]+ up at ", up.stdout, re.M)
            redis.stop()
            wait_for(lambda: ctl.status()["directory"]["state"] == "down", message="Redis seen down")
            down = faastube_cli("status", "--socket", ctl.socket)
            assert down.returncode == 1, down.stderr
            assert re.search(rf"^directory: Redis DOWN at {re.escape(redis.url)} \(last reached \d+ s ago\): "
                             r"new puts fail until it is back", down.stdout, re.M), down.stdout
            as_json = json.loads(faastube_cli("status", "--socket", ctl.socket, "--json").stdout)
            assert as_json["directory"]["state"] == "down"
            assert as_json["controller"]["version"] and as_json["controller"]["uptime_s"] >= 0
        finally:
            ctl.stop()


@pytest.fixture
def secrets_file(tmp_path):
    path = tmp_path / "secrets.json"
    path.write_text(json.dumps({"locked": "s3cret"}))
    return path


def test_namespaces_with_a_secret_need_it(tmp_path, redis_server, secrets_file):
    ctl = ControllerProcess(tmp_path, redis_server.url, secrets_file=str(secrets_file)).start()
    try:
        for secret, text in ((None, "namespace 'locked' needs its secret: set FAASTUBE_SECRET"),
                             ("wrong", "wrong secret for namespace 'locked'")):
            client = ctl.client("locked", secret=secret)
            with pytest.raises(errors.NamespaceError, match=text):
                client.create((1,), np.dtype("uint8"))
            client.close()
        good = ctl.client("locked", secret="s3cret")
        target, object_id, _ = good.create_for_put((3,), np.dtype("uint8"))
        del target
        good.seal(object_id, drop_writer=True)
        good.close()
        open_ns = ctl.client("open")                  # namespaces not in the file stay open
        open_ns.request(protocol.Ping())
        open_ns.close()
    finally:
        assert ctl.stop() == 0


def test_the_demo_runs_both_modes_and_cleans_up(redis_server):
    result = faastube_cli("demo", "--size-mb", "8", "--runs", "2",
                          env={"FAASTUBE_REDIS": redis_server.url}, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "median of 2" in out and "FaaSTube pool" in out and "Redis bytes" in out
    for row in ("decode → preprocess", "preprocess → reduce", "end to end"):
        line = next(l for l in out.splitlines() if l.startswith(row))
        pool_ms, redis_ms = [float(x) for x in line.replace("ms", "").split()[-3:-1]]
        assert pool_ms > 0 and redis_ms > 0
    assert "outputs identical in both modes: yes" in out
    leftovers = subprocess.run(["pgrep", "-f", "faastube.cli controller --socket /tmp/faastube-demo"],
                               capture_output=True, text=True)
    assert leftovers.stdout == ""


@pytest.mark.parametrize("args, text", [
    (["--modes", "pool,tcp"], "--modes takes floor, pool, shm, redis; got ['pool', 'tcp']"),
    (["--workflow", "chess"], "argument --workflow: invalid choice: 'chess'"),
    (["--requests", "0"], "--requests must be at least 1"),
    (["--cpus", "0"], "--cpus must be at least 1"),
    (["--duration", "2", "--warmup", "3"], "--duration must be longer than --warmup"),
])
def test_bench_refuses_bad_settings_before_starting_anything(args, text):
    done = subprocess.run([sys.executable, "-m", "faastube.cli", "bench", *args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and text in done.stderr, done.stderr


def test_sigusr1_dumps_the_controllers_threads_and_it_serves_on(controller):
    import signal
    controller.process.send_signal(signal.SIGUSR1)
    wait_for(lambda: "serve_forever" in controller.log(), timeout=10, message="the stack dump in the log")
    assert controller.request(protocol.Ping()).node == controller.node


def test_sigterms_that_keep_coming_while_the_controller_stops_leave_a_clean_exit(tmp_path, redis_server):
    """An orchestrator may send SIGTERM more than once. Python's exit puts the default action
    back, so a late one used to kill the stopping controller (exit -15, every time here)."""
    import signal
    ctl = ControllerProcess(tmp_path, redis_server.url).start()
    try:
        deadline = time.monotonic() + 20
        while ctl.process.poll() is None and time.monotonic() < deadline:
            try:
                os.kill(ctl.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                break
            time.sleep(0.0002)
        assert ctl.process.wait(10) == 0, ctl.log()
        assert "faastube controller stopped" in ctl.log()
    finally:
        ctl.stop(timeout_s=5)


def test_sigterm_stops_the_controller_whichever_of_its_threads_takes_it(tmp_path, redis_server):
    """The kernel gives a process's signal to any thread not blocking it; CPython runs the
    handler in the main thread only once that thread runs again. A SIGTERM sent to each of
    the controller's other threads (a connection's, housekeeping's, the Redis writer's)
    must still stop it, although no new connection wakes the accept loop."""
    import signal
    ctl = ControllerProcess(tmp_path, redis_server.url).start()
    try:
        client = ctl.client()
        client.request(protocol.Ping())          # a connection thread, blocked in recv
        pid = ctl.process.pid
        others = [int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid]
        assert others
        for tid in others:
            try:
                os.kill(tid, signal.SIGTERM)     # kill(2) with a thread id: that thread takes it
            except ProcessLookupError:
                pass
        ctl.process.wait(10)
        assert ctl.process.returncode == 0, ctl.log()
        assert "faastube controller stopped" in ctl.log()
        client.close()
    finally:
        ctl.stop(timeout_s=5)


@pytest.mark.slow
def test_bench_runs_from_an_installed_wheel(tmp_path):
    """A wheel carries the workflows (the faastube_bench package, pyproject.toml), so
    `faastube bench` works without a source checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    python = os.path.abspath(sys.executable)          # the commands below run elsewhere
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    built = subprocess.run([python, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(wheels), root], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = wheels.glob("faastube-*.whl")
    installed = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--target",
                                str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([python, "-c", "from faastube.cli import workflows_folder; print(workflows_folder())"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.strip() == str(site / "faastube_bench" / "workflows"), where.stdout + where.stderr
    # The wheel's bench checks its settings like the checkout's does.
    done = subprocess.run([python, "-m", "faastube.cli", "bench", "--requests", "0"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--requests must be at least 1" in done.stderr, done.stderr
