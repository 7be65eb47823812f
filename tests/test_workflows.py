"""The four inference workflows (issue 6), CPU-sized, run through real action containers
(``faastube shim`` processes over the OpenWhisk protocol), a real controller and Redis, in
each data-passing mode (the floor mode too: data passing taken out): every mode computes the
same outputs (checksums), and nothing a run passed is left behind. No timing is asserted (bench/workflows/ measures)."""

import glob
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.slow  # real PyTorch models in real function processes
torch = pytest.importorskip("torch", reason="PyTorch is not installed (scripts/setup installs the CPU build)")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench" / "workflows"))
import driver  # noqa: E402

import redis  # noqa: E402

from tests.conftest import wait_for  # noqa: E402


@pytest.mark.parametrize("name", sorted(driver.WORKFLOWS))
def test_every_mode_computes_the_same_and_leaves_nothing_behind(name, controller, tmp_path):
    workflow = driver.WORKFLOWS[name]
    results = {}
    for mode in driver.common.MODES:
        deployment = driver.Deployment(workflow, mode, "cpu", controller.env, str(tmp_path / mode))
        try:
            if mode == "floor":           # its inputs are handed on once, in preparing runs
                prepared = [deployment.run(seed, prepare=True) for seed in (1, 2)]
            runs = [deployment.run(seed) for seed in (1, 2)]
        finally:
            deployment.close()
        results[mode] = [run.result["checksum"] for run in runs]
        for run in runs:
            stages = {a.stage for a in run.activations}
            assert stages == set(workflow.stages), f"{mode}: ran {sorted(stages)}"
            assert all(0 <= a.passing_s <= a.total_s <= a.wall_s for a in run.activations)
            assert run.latency_s >= max(a.wall_s for a in run.activations)
            assert 0 <= run.critical_passing_s <= sum(a.passing_s for a in run.activations)
        # Nothing left: segments, Redis keys, pool objects of the run.
        assert not glob.glob("/dev/shm/ftb-*")
        assert not list(redis.Redis.from_url(controller.redis_url).scan_iter(match="ftb-*"))
        # (a stopped container's spare, Note [Spare objects], goes when the controller sees
        # its connection close)
        wait_for(lambda: controller.status()["namespaces"].get("bench", {}).get("objects", 0) == 0,
                 timeout=10, message="no pool object left")
        if mode == "floor":
            assert [r.result["checksum"] for r in prepared] == results["floor"]
            assert any("get" in a.passing_ops for r in runs for a in r.activations), "the floor's stages got inputs"
    assert results["pool"][0] != results["pool"][1], "two inputs gave the same output"
    assert results["shm"] == results["pool"] and results["redis"] == results["pool"]
    assert results["floor"] == results["pool"], "the floor computes what the other modes do"


def test_knative_sequences_compute_what_openwhisk_sequences_do(controller, tmp_path):
    """The same workflow files as Knative services: loaded at start, CloudEvents in binary
    mode, each reply event's data on to the next stage (fan-out per chunk included)."""
    workflow = driver.WORKFLOWS["video"]
    sums = {}
    for platform in driver.PLATFORMS:
        deployment = driver.Deployment(workflow, "pool", "cpu", controller.env, str(tmp_path / platform),
                                       platform=platform)
        try:
            sums[platform] = [deployment.run(seed).result["checksum"] for seed in (5, 6)]
        finally:
            deployment.close()
    assert sums["knative"] == sums["openwhisk"] and sums["knative"][0] != sums["knative"][1]
    with pytest.raises(ValueError, match="platform must be one of openwhisk, knative"):
        driver.Deployment(workflow, "pool", "cpu", controller.env, str(tmp_path), platform="lambda")


def test_a_failing_stage_names_itself_and_its_log(controller, tmp_path):
    workflow = driver.WORKFLOWS["driving"]
    deployment = driver.Deployment(workflow, "pool", "cpu", controller.env, str(tmp_path))
    try:
        with pytest.raises(driver.WorkflowError, match=r"driving/preprocess \(pool, openwhisk\) failed: 200 .*'error'"):
            deployment.invoke("preprocess", {"run": "bad", "seed": "not a seed"}, [])
        assert deployment.run(3).result["checksum"]         # the deployment still serves
    finally:
        deployment.close()


def test_faastube_bench_writes_results_plots_and_a_report(tmp_path):
    """The whole benchmark command, CPU-sized and short: its own Redis and controller, two
    modes, isolated requests, an open-loop load phase and a max-rate search."""
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install -e '.[bench]')")
    import json
    import subprocess
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, "-m", "faastube.cli", "bench", "--workflow", "driving", "--modes", "floor,pool,shm",
         "--size", "cpu", "--requests", "3", "--rate", "2", "--duration", "2", "--warmup", "0.5",
         "--find-max", "--slo-ms", "5000", "--no-progress", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    (driving,) = results["workflows"]
    assert driving["identical_outputs"] and set(driving["modes"]) == {"floor", "pool", "shm"}
    for mode in driving["modes"].values():
        assert len(mode["isolated"]["latencies_ms"]) == 3
        assert set(mode["isolated"]["stages"]) == set(driver.WORKFLOWS["driving"].stages)
        assert mode["isolated"]["links"] == {}          # no GPU here: the controller moved nothing
        assert mode["load"]["requests"] >= 0 and mode["load"]["failed"] == 0
        assert mode["max"]["max_rps_within_slo"] > 0 and mode["max"]["trials"]   # a 5 s SLO holds
    # The pool's gets, split by the controller's own timers: two a request (post-processing's
    # and segmentation's), no copies on a node without GPUs; shm gets nothing from the pool.
    gets = driving["modes"]["pool"]["isolated"]["gets"]
    assert gets["gets"] == 2 and gets["copying_ms"] == 0
    assert gets["in_functions_ms"] > gets["in_controller_ms"] > 0
    assert driving["modes"]["shm"]["isolated"]["gets"] == {}
    assert driving["modes"]["floor"]["isolated"]["gets"] == {}
    # Every mode against the floor: ms above it and how many times it.
    floor_p50 = driving["modes"]["floor"]["isolated"]["p50_ms"]
    pool_p50 = driving["modes"]["pool"]["isolated"]["p50_ms"]
    assert f"{pool_p50 - floor_p50:+.1f} ({pool_p50 / floor_p50:.2f}×)" in done.stdout
    assert "vs floor" in done.stdout
    assert "driving: the pool's 2 gets a request took " in done.stdout
    for plot in ("driving-cdf.png", "driving-load.png", "driving-stages.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "driving" in report and "![driving-cdf.png](driving-cdf.png)" in report
    assert "outputs identical across modes: True" in done.stdout
    # Threads per container sized to this machine, and said in the table.
    assert results["settings"]["cpus"] == run_module().default_cpus()
    assert f"{results['settings']['cpus']} threads per container" in done.stdout


def run_module():
    import run
    return run


def test_threads_per_container_follow_the_machines_cores(monkeypatch):
    run = run_module()
    for cores, threads in [(1, 1), (2, 1), (4, 2), (8, 4), (128, 4)]:
        monkeypatch.setattr(run.os, "cpu_count", lambda: cores)
        assert run.default_cpus() == threads
        assert run.parse([]).cpus == threads
    assert run.parse(["--cpus", "3"]).cpus == 3


def test_a_load_phase_that_overloads_the_machine_says_so():
    run = run_module()
    queued = {"isolated": {"p50_ms": 40.0}, "load": {"p50_ms": 130.0}}
    warning = run.overload_warning("traffic", "pool", queued, 12.5)
    assert queued["load"]["p50_vs_isolated"] == 3.25
    assert warning.startswith("traffic/pool: the p50 under load (130 ms at 12.5/s) is 3.2× the isolated p50")
    assert "lower --rate, or --rate 0" in warning
    served = {"isolated": {"p50_ms": 40.0}, "load": {"p50_ms": 60.0}}
    assert run.overload_warning("traffic", "pool", served, 5.0) is None
    nothing = {"isolated": {"p50_ms": 40.0}, "load": {"p50_ms": float("nan")}}
    assert run.overload_warning("traffic", "pool", nothing, 5.0) is None


def test_links_per_request_splits_the_controllers_moves_by_link():
    import run
    before = {"host→GPU-0": {"transfers": 4, "bytes": 400, "wait_s": 0.001, "service_s": 0.004}}
    after = {"host→GPU-0": {"transfers": 8, "bytes": 1200, "wait_s": 0.003, "service_s": 0.012},
             "host→GPU-1→GPU-0": {"transfers": 2, "bytes": 600, "wait_s": 0.0, "service_s": 0.002},
             "GPU-0→host": {"transfers": 0, "bytes": 0, "wait_s": 0.0, "service_s": 0.0}}
    assert run.links_per_request(before, after, 2) == {
        "host→GPU-0": {"moves_per_request": 2.0, "bytes_per_request": 400.0,
                       "wait_ms": pytest.approx(0.5), "service_ms": pytest.approx(2.0)},
        "host→GPU-1→GPU-0": {"moves_per_request": 1.0, "bytes_per_request": 300.0,
                             "wait_ms": 0.0, "service_ms": pytest.approx(1.0)}}


def test_gets_per_request_splits_the_pools_gets_three_ways():
    import run
    before = {"requests": {"ops": {"get": {"ok": 10, "error": 0, "seconds": 0.010}},
                           "get_copies": {"count": 4, "seconds": 0.004}}}
    after = {"requests": {"ops": {"get": {"ok": 13, "error": 1, "seconds": 0.016}, "seal": {"ok": 9}},
                          "get_copies": {"count": 6, "seconds": 0.007}}}
    runs = [SimpleNamespace(activations=[SimpleNamespace(passing_ops={"get": 0.003, "put": 0.5}),
                                         SimpleNamespace(passing_ops={"get": 0.002})])] * 2
    assert run.gets_per_request(before, after, runs) == {
        "gets": 2.0, "in_functions_ms": pytest.approx(5.0), "in_controller_ms": pytest.approx(3.0),
        "copying_ms": pytest.approx(1.5)}
    assert run.gets_per_request(after, after, runs) == {}         # nothing got through the pool


def test_placement_deals_gpu_containers_to_the_gpus_in_turn():
    traffic = driver.WORKFLOWS["traffic"]
    # One replica: the parallel classifiers land on different GPUs; CPU stages get none.
    assert driver.place(traffic, 1, 2) == {"preprocess": [""], "detect": ["0"], "classify_person": ["1"],
                                           "classify_car": ["0"], "merge": [""]}
    # Replicas of one action spread over the GPUs; without GPUs nothing is visible.
    assert driver.place(traffic, 2, 2)["detect"] == ["0", "1"]
    assert driver.place(driver.WORKFLOWS["image"], 1, 4) == {
        "preprocess": [""], "classify_a": ["0"], "classify_b": ["1"], "classify_c": ["2"], "vote": [""]}
    assert set(sum(driver.place(traffic, 3, 0).values(), [])) == {""}


def test_the_closed_loop_keeps_its_requests_in_flight_and_counts_them():
    import threading
    import load
    calls, lock, in_flight, most = [], threading.Lock(), [0], [0]
    barrier = threading.Barrier(3)

    def request(i):
        with lock:
            calls.append(i)
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        if len(calls) <= 3:
            barrier.wait(timeout=10)        # the first three are in flight together
        with lock:
            in_flight[0] -= 1

    rps = load.closed_loop_rps(request, concurrency=3, rounds=4)
    assert sorted(calls) == sorted(k + i for k in range(3) for i in range(4))
    assert most[0] == 3 and rps > 0
