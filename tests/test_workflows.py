"""The four inference workflows (issue 6), CPU-sized, run through real action containers
(``faastube shim`` processes over the OpenWhisk protocol), a real controller and Redis, in
each of the three data-passing modes: every mode computes the same outputs (checksums), and
nothing a run passed is left behind. No timing is asserted (bench/workflows/ measures)."""

import glob
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (scripts/setup installs the CPU build)")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench" / "workflows"))
import driver  # noqa: E402

import redis  # noqa: E402


@pytest.mark.parametrize("name", sorted(driver.WORKFLOWS))
def test_every_mode_computes_the_same_and_leaves_nothing_behind(name, controller, tmp_path):
    workflow = driver.WORKFLOWS[name]
    results = {}
    for mode in driver.common.MODES:
        deployment = driver.Deployment(workflow, mode, "cpu", controller.env, str(tmp_path / mode))
        try:
            runs = [deployment.run(seed) for seed in (1, 2)]
        finally:
            deployment.close()
        results[mode] = [run.result["checksum"] for run in runs]
        for run in runs:
            stages = {a.stage for a in run.activations}
            assert stages == set(workflow.stages), f"{mode}: ran {sorted(stages)}"
            assert all(0 <= a.passing_s <= a.total_s <= a.wall_s for a in run.activations)
            assert run.latency_s >= max(a.wall_s for a in run.activations)
        # Nothing left: segments, Redis keys, pool objects of the run.
        assert not glob.glob("/dev/shm/ftb-*")
        assert not list(redis.Redis.from_url(controller.redis_url).scan_iter(match="ftb-*"))
        assert controller.status()["namespaces"].get("bench", {}).get("objects", 0) == 0
    assert results["pool"][0] != results["pool"][1], "two inputs gave the same output"
    assert results["shm"] == results["pool"] and results["redis"] == results["pool"]


def test_a_failing_stage_names_itself_and_its_log(controller, tmp_path):
    workflow = driver.WORKFLOWS["driving"]
    deployment = driver.Deployment(workflow, "pool", "cpu", controller.env, str(tmp_path))
    try:
        with pytest.raises(driver.WorkflowError, match=r"driving/preprocess \(pool\) failed: 200 .*'error'"):
            deployment.invoke("preprocess", {"run": "bad", "seed": "not a seed"}, [])
        assert deployment.run(3).result["checksum"]         # the deployment still serves
    finally:
        deployment.close()
