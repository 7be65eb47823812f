"""FaaSTube inside actions: a 3-action sequence driven as the OpenWhisk invoker drives it
(init once per container, run per activation, each result becomes the next value), passing
arrays by ref through a real controller and Redis."""

import json
from pathlib import Path

import numpy as np
import pytest

from .conftest import wait_for
from .test_shim_openwhisk import Shim, source

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "sequence"
PREPROCESS, INFER, POSTPROCESS = ((EXAMPLES / f"{name}.py").read_text()
                                  for name in ("preprocess", "infer", "postprocess"))

FAILING = source("""
    import faastube
    def main(args):
        out = faastube.empty(1 << 20, "uint8")
        out[:] = 1
        faastube.seal(out)
        raise RuntimeError("model crashed")
""")


@pytest.fixture
def action_with_env(tmp_path, controller):
    started = []

    def start(code, env=None):
        folder = tmp_path / f"action{len(started)}"
        folder.mkdir()
        server = Shim(folder, {"FAASTUBE_SOCKET": controller.socket, "FAASTUBE_REDIS": controller.redis_url,
                               **(env or {})})
        assert server.init(code) == (200, b'{"ok":true}\n')
        started.append(server)
        return server
    yield start
    for server in started:
        server.stop()


@pytest.fixture
def action(action_with_env):
    return action_with_env


def expected(seed):
    frames = np.random.default_rng(seed).integers(0, 255, (4, 256, 256, 3), dtype=np.uint8)
    scores = frames.reshape(4, 8, -1).mean(axis=2).astype(np.float32)
    return {"best": scores.argmax(axis=1).tolist(), "total": float(scores.sum()), "shape": [4, 8]}


def test_a_sequence_passes_arrays_by_ref_and_only_refs_cross_http(action, controller):
    chain = [action(PREPROCESS), action(INFER), action(POSTPROCESS)]
    for seed in (1, 2, 3):
        value = {"seed": seed}
        crossed = []
        for n, server in enumerate(chain):
            status, body = server.run(value, namespace="guest", activation_id=f"run{seed}-{n}")
            assert status == 200, body
            crossed.append(len(body))
            value = json.loads(body)
        assert value["best"] == expected(seed)["best"] and value["shape"] == [4, 8]
        assert value["total"] == pytest.approx(expected(seed)["total"], rel=1e-6)
        assert max(crossed) < 400, f"HTTP bodies of {crossed} bytes: more than refs crossed"
    # Note [Results have a lifetime]: each result was freed once the next step had got it,
    # so the sequence leaves nothing behind (a pending object may be the producer's spare,
    # Note [Spare objects], which the SDK frees when idle).
    wait_for(lambda: controller.status()["namespaces"].get("guest", {}).get("sealed", 0) == 0,
             message="every result freed by its consumer")


def test_a_result_nobody_gets_is_freed_after_the_result_ttl(action_with_env, controller):
    server = action_with_env(PREPROCESS, {"FAASTUBE_RESULT_TTL_S": "0.5"})
    status, body = server.run({"seed": 1}, namespace="guest", activation_id="ttl-1")
    assert status == 200, body
    ref = json.loads(body)["frames"]
    assert controller.status()["namespaces"]["guest"]["sealed"] == 1       # alive until its ttl
    wait_for(lambda: controller.status()["namespaces"].get("guest", {}).get("sealed", 0) == 0,
             message="the unconsumed result to expire")
    assert ref["id"]


def test_results_live_on_where_the_action_turns_the_lifetime_off(action_with_env, controller):
    server = action_with_env(PREPROCESS, {"FAASTUBE_RESULT_CONSUMERS": "0", "FAASTUBE_RESULT_TTL_S": "0"})
    for n in range(2):
        status, body = server.run({"seed": n}, namespace="guest", activation_id=f"keep-{n}")
        assert status == 200, body
    assert controller.status()["namespaces"]["guest"]["sealed"] == 2


def test_a_bad_result_lifetime_fails_init_in_its_own_words(tmp_path, controller):
    server = Shim(tmp_path, {"FAASTUBE_SOCKET": controller.socket, "FAASTUBE_RESULT_TTL_S": "soon"})
    try:
        status, body = server.init(PREPROCESS)
        assert status == 502, body
        assert "FAASTUBE_RESULT_TTL_S='soon' is not valid" in body.decode() + server.stderr(), body
    finally:
        server.stop()


def test_a_failed_activation_frees_what_it_allocated(action, controller):
    server = action(FAILING)
    status, body = server.run({}, namespace="guest", activation_id="failing-1")
    assert status == 200 and body == b'{"error": "model crashed"}'
    wait_for(lambda: controller.status()["namespaces"].get("guest", {}).get("objects") == 0,
             message="the failed activation's objects to be freed")


def test_plain_actions_work_without_a_controller(tmp_path):
    server = Shim(tmp_path, {"FAASTUBE_SOCKET": str(tmp_path / "no-controller.sock")})
    try:
        server.init("import faastube\ndef main(args):\n    return {'ok': True}\n")
        assert server.run({}) == (200, b'{"ok": true}')
    finally:
        server.stop()
