"""A local driver that runs the workflows the way the platforms do, over their real
protocols: every stage is an action (a Knative service) with its own containers
(``faastube shim`` processes, :class:`faastube.local.LocalRuntime`).

- ``openwhisk``: each container is initialised once (``/init`` with the workflow's code and
  the stage as ``main``) and then given one activation at a time (``/run``); a stage's
  result is the next stage's ``value``, as in a sequence.
- ``knative``: each container loads its stage at start (``FAASTUBE_FUNCTION=file.py:stage``)
  and is used once its readiness probe answers; a request is a CloudEvent in binary mode
  (``ce-*`` headers, the JSON as data) and the reply event's data goes on to the next
  stage, as a Sequence forwards it.

Fan-out and fan-in work as a conductor or Composer program (or a Knative Parallel) does:
parallel branches are invoked at once and the next stage gets ``{"branches": [their
results]}``.

Placement (documented in docs/benchmarks.md): the GPU stages' containers are dealt to the
node's *G* GPUs in turn (``CUDA_VISIBLE_DEVICES``), in workflow order, replica by replica:
container *i* of all of them runs on GPU *i* mod *G*. So the replicas of an action, and the
parallel branches after a stage, spread over the GPUs instead of time-sharing one (CUDA
time-slices the contexts of processes that share a GPU), and a hand-off crosses NVLink
where consecutive stages landed on different GPUs. CPU stages run without a GPU. An
activation takes any idle replica of its action and waits if all are busy (an invoker's
container pool).

CPU limit: every container computes with ``cpus`` threads (``OMP_NUM_THREADS``), as a
platform's CPU limit would hold it; without one, each of a dozen containers would start a
thread per core of the machine and they would fight over the cores under load.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import json
import os
import queue
import sys
import time
import uuid

import redis

from faastube import protocol
from faastube.client import Client
from faastube.config import Config
from faastube.errors import FaasTubeError
from faastube.local import LocalRuntime

HERE = os.path.dirname(os.path.abspath(__file__))
PLATFORMS = ("openwhisk", "knative")
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import common  # noqa: E402  (bench/workflows/common.py, shared with the actions)


@dataclasses.dataclass(frozen=True)
class Parallel:
    """Every branch (a chain of stages) gets the same input, at once."""
    branches: tuple[tuple[str, ...], ...]


@dataclasses.dataclass(frozen=True)
class ForEach:
    """One branch per element of ``value[key]``, given as ``value["chunk"]``."""
    key: str
    chain: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Workflow:
    name: str
    steps: tuple
    gpu_stages: frozenset

    @property
    def stages(self) -> list[str]:
        out = []
        for step in self.steps:
            chains = ([(step,)] if isinstance(step, str) else
                      step.branches if isinstance(step, Parallel) else [step.chain])
            out += [stage for chain in chains for stage in chain if stage not in out]
        return out

    @property
    def code(self) -> str:
        with open(os.path.join(HERE, f"{self.name}.py")) as file:
            return file.read()


WORKFLOWS = {w.name: w for w in (
    Workflow("traffic", ("preprocess", "detect", Parallel((("classify_person",), ("classify_car",))), "merge"),
             frozenset({"detect", "classify_person", "classify_car"})),
    Workflow("driving", ("preprocess", "segment", "postprocess"), frozenset({"segment"})),
    Workflow("video", ("split", ForEach("chunks", ("detect_faces", "recognise")), "aggregate"),
             frozenset({"detect_faces", "recognise"})),
    Workflow("image", ("preprocess", Parallel((("classify_a",), ("classify_b",), ("classify_c",))), "vote"),
             frozenset({"classify_a", "classify_b", "classify_c"})),
)}


def place(workflow: Workflow, replicas: int, gpus: int) -> dict[str, list[str]]:
    """The placement policy: for each stage, its containers' ``CUDA_VISIBLE_DEVICES`` ("" =
    no GPU). GPU stages' containers are dealt to the GPUs in turn, in workflow order."""
    dealt = itertools.count()
    return {stage: [str(next(dealt) % gpus) if gpus and stage in workflow.gpu_stages else ""
                    for _k in range(replicas)]
            for stage in workflow.stages}


class WorkflowError(FaasTubeError):
    """An activation of a workflow failed."""


@dataclasses.dataclass
class Activation:
    stage: str
    wall_s: float          # the /run round trip, as the invoker sees it
    total_s: float         # inside the action
    passing_s: float       # of which getting and putting tensors
    passing_ops: dict = dataclasses.field(default_factory=dict)   # ... by kind (get, empty, put)


@dataclasses.dataclass
class Run:
    seed: int
    latency_s: float
    result: dict
    activations: list[Activation]
    critical_passing_s: float    # data passing on the critical path (slowest parallel branch)


class Deployment:
    """``workflow``'s actions in data-passing ``mode``, ``replicas`` containers each."""

    def __init__(self, workflow: Workflow, mode: str, size: str, env: dict, log_dir: str,
                 replicas: int = 1, gpus: int = 0, namespace: str = "bench", platform: str = "openwhisk",
                 cpus: int = 4):
        if platform not in PLATFORMS:
            raise ValueError(f"platform must be one of {', '.join(PLATFORMS)}, not {platform!r}")
        if cpus < 1:
            raise ValueError(f"cpus (threads per container) must be at least 1, not {cpus}")
        self.workflow, self.mode, self.namespace, self.platform = workflow, mode, namespace, platform
        config = Config.from_env(env, namespace=namespace)
        self._redis = redis.Redis.from_url(config.redis)
        self._client = Client(config) if mode == "pool" else None     # to close runs' scopes
        self._idle: dict[str, queue.Queue] = {}
        self._all: list[LocalRuntime] = []
        self._ids = itertools.count()
        os.makedirs(log_dir, exist_ok=True)
        # Init env adds to the container's environment, and replaces a variable it names:
        # keep the container's PYTHONPATH after the workflows' folder.
        python_path = os.pathsep.join(p for p in (HERE, env.get("PYTHONPATH")) if p)
        init_env = {"PYTHONPATH": python_path, "FAASTUBE_BENCH_MODE": mode, "FAASTUBE_BENCH_SIZE": size}
        starts = []
        for stage, where in place(workflow, replicas, gpus).items():
            self._idle[stage] = queue.Queue()
            for k, gpu in enumerate(where):
                container_env = {**env, "CUDA_VISIBLE_DEVICES": gpu, "FAASTUBE_NAMESPACE": namespace,
                                 "OMP_NUM_THREADS": str(cpus), "MKL_NUM_THREADS": str(cpus)}
                starts.append((stage, container_env, os.path.join(log_dir, f"{workflow.name}-{mode}-{stage}-{k}.log")))
        try:
            # Containers start and import their models in parallel, as a platform's would.
            with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
                for stage, runtime in zip([s for s, _e, _l in starts], pool.map(
                        lambda s: self._start(s[0], s[1], s[2], init_env), starts)):
                    self._idle[stage].put(runtime)
        except BaseException:
            self.close()
            raise

    def _start(self, stage, env, log_path, init_env) -> LocalRuntime:
        if self.platform == "knative":       # the revision's env carries what /init would
            env = {**env, **init_env, "K_SERVICE": f"{self.workflow.name}-{stage}",
                   "FAASTUBE_FUNCTION": f"{os.path.join(HERE, self.workflow.name)}.py:{stage}",
                   "FAASTUBE_CE_TYPE": f"dev.faastube.bench.{stage}"}
        runtime = LocalRuntime(env, log_path)
        self._all.append(runtime)
        if self.platform == "knative":
            runtime.ready()
        else:
            runtime.init(self.workflow.code, stage, init_env)
        return runtime

    def _call(self, runtime: LocalRuntime, stage: str, value: dict) -> tuple[int, dict]:
        if self.platform == "openwhisk":
            return runtime.run(value, namespace=self.namespace, action_name=stage,
                               activation_id=uuid.uuid4().hex,
                               deadline=str(int(time.time() * 1000) + 600_000))
        status, headers, body = runtime.request("POST", "/", json.dumps(value).encode(), {
            "ce-specversion": "1.0", "ce-id": uuid.uuid4().hex, "ce-source": "/faastube/bench/driver",
            "ce-type": f"dev.faastube.bench.{stage}.request"})
        if status == 200 and headers.get("ce-type") != f"dev.faastube.bench.{stage}":
            return 502, {"error": f"the reply is not the stage's CloudEvent: {headers}"}
        return status, json.loads(body) if body else {}

    def invoke(self, stage: str, value: dict, record: list) -> tuple[dict, Activation]:
        runtime = self._idle[stage].get()
        started = time.perf_counter()
        try:
            status, body = self._call(runtime, stage, value)
        finally:
            self._idle[stage].put(runtime)
        wall = time.perf_counter() - started
        if status != 200 or "error" in body:
            raise WorkflowError(f"{self.workflow.name}/{stage} ({self.mode}, {self.platform}) failed: {status} {body} "
                                f"(see {runtime.log_path})")
        timing = body.get("timing", {})
        activation = Activation(stage, wall, timing.get("total_s", 0.0), timing.get("passing_s", 0.0),
                                timing.get("passing_ops", {}))
        record.append(activation)
        return body, activation

    def run(self, seed: int, prepare: bool = False) -> Run:
        """One request through the whole workflow; returns the last stage's result.
        ``prepare``: a warm-up run, in which the floor mode hands its inputs on for real
        (bench/workflows/common.py)."""
        run_id = f"r{os.getpid()}x{next(self._ids)}x{uuid.uuid4().hex[:8]}"
        record: list[Activation] = []
        started = time.perf_counter()
        value = {"run": run_id, "seed": seed, **({"prepare": True} if prepare else {})}
        critical = 0.0
        try:
            for step in self.workflow.steps:
                value, passing = self._step(step, value, record)
                critical += passing
            latency = time.perf_counter() - started
        finally:
            self.cleanup(run_id)
        return Run(seed, latency, value, record, critical)

    def cleanup(self, run_id: str) -> None:
        """Free what a run left, outside its timing: shm segments and Redis keys; in the
        pool, objects not consumed yet (consumers free the rest as they go)."""
        common.cleanup(run_id, self._redis)
        if self._client is not None:
            self._client.request(protocol.CloseScope(run_id))

    def _step(self, step, value: dict, record: list) -> tuple[dict, float]:
        """The step's result, and the data-passing seconds on its critical path (of parallel
        branches, the one that took longest)."""
        if isinstance(step, str):
            body, activation = self.invoke(step, value, record)
            return body, activation.passing_s
        if isinstance(step, Parallel):
            inputs = [(chain, value) for chain in step.branches]
        else:
            base = {k: v for k, v in value.items() if k != step.key and k != "timing"}
            inputs = [(step.chain, {**base, "chunk": item}) for item in value[step.key]]
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(inputs)) as pool:
            done = list(pool.map(lambda job: self._chain(job[0], job[1], record), inputs))
        slowest = max(done, key=lambda branch: sum(a.wall_s for a in branch[1]))
        return ({"run": value["run"], "seed": value["seed"], "branches": [v for v, _a in done],
                 **({"prepare": True} if value.get("prepare") else {})},
                sum(a.passing_s for a in slowest[1]))

    def _chain(self, chain, value: dict, record: list) -> tuple[dict, list[Activation]]:
        activations = []
        for stage in chain:
            value, activation = self.invoke(stage, value, record)
            activations.append(activation)
        return value, activations

    def close(self) -> None:
        for runtime in self._all:
            runtime.stop()
        self._all.clear()
        if self._client is not None:
            self._client.close()
        self._redis.close()
