"""``faastube bench``: the end-to-end evaluation of the workflows, every data-passing mode in
one run on one machine.

For each workflow, every mode (``pool``, ``shm``, ``redis``) gets its own containers
(driver.Deployment), then, one mode at a time:

1. warm-up requests (models built, slabs mapped, and each of the ``INPUTS`` inputs made once
   in every container, as common.frames keeps them; not measured);
2. isolated: requests one after another — latency p50/p99, the per-stage breakdown (compute,
   data passing, the platform's share), and the output checksums, which must agree across
   modes;
3. load: open-loop arrivals (Poisson or bursty) at ``--rate`` (default: half what the
   slowest mode carries in a closed loop of 4 requests in flight; no load phase by default
   on a machine without a GPU) for ``--duration`` seconds,
   the first ``--warmup`` seconds excluded: p50/p99 and SLO attainment;
4. with ``--find-max``: the highest rate whose p99 stays within the SLO (rates grow ×1.5
   from half what the mode serves one at a time until the p99 breaks it, or halve until it
   holds, at most six runs of ``--duration`` each, then one bisection step).

The SLO is ``--slo-ms``, or by default twice the slowest mode's isolated p50 (so every
mode can meet it when idle: what differs is how much load each carries within it).

Writes ``<out>/results.json``, PNG plots (latency CDFs, latency against load, per-stage
breakdown) and ``<out>/report.md``; prints a table last.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import driver  # noqa: E402
import load  # noqa: E402

MAX_STEPS = 6          # rates tried by --find-max before its bisection step
INPUTS = 4             # distinct inputs (request seeds) the requests cycle through


def parse(argv):
    p = argparse.ArgumentParser(prog="faastube bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--workflow", action="append", choices=sorted(driver.WORKFLOWS),
                   help="a workflow to run (repeat for several; default: traffic)")
    p.add_argument("--modes", default="floor,pool,shm,redis",
                   help="data-passing modes, comma-separated (floor: data passing taken out, the limit)")
    p.add_argument("--size", choices=("cpu", "gpu"), default=None,
                   help="cpu: small models and inputs; gpu: torchvision models, frames of 720p "
                        "(default: gpu where CUDA is usable, else cpu)")
    p.add_argument("--replicas", type=int, default=1, help="containers per action")
    p.add_argument("--cpus", type=int, default=None,
                   help="CPU threads per container, as a platform's CPU limit (default: half this "
                        "machine's cores, 1 to 4)")
    p.add_argument("--platform", choices=driver.PLATFORMS, default="openwhisk",
                   help="drive the actions as OpenWhisk does (/init, /run, sequences) or as Knative "
                        "does (function loaded at start, CloudEvents, a Sequence)")
    p.add_argument("--requests", type=int, default=20, help="isolated requests per mode")
    p.add_argument("--arrivals", choices=("poisson", "bursty"), default="poisson")
    p.add_argument("--rate", type=float, default=None,
                   help="mean requests/s of the load phase (default: half what the slowest mode "
                        "carries here with 4 requests in flight; none on a machine without a GPU; "
                        "0 skips the load phase)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of each load run")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of each load run not measured")
    p.add_argument("--slo-ms", type=float, default=None, help="end-to-end SLO (default: see above)")
    p.add_argument("--find-max", action="store_true", help="search each mode's max rate within the SLO")
    p.add_argument("--out", default=None, help="results folder (default bench/results/workflows-<time> in a checkout, ./workflows-<time> from a wheel)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    args.workflow = args.workflow or ["traffic"]
    args.modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in args.modes if m not in driver.common.MODES]
    if bad or not args.modes:
        p.error(f"--modes takes {', '.join(driver.common.MODES)}; got {args.modes}")
    if args.cpus is None:
        args.cpus = default_cpus()
    for name in ("replicas", "requests", "cpus"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.duration <= args.warmup:
        p.error("--duration must be longer than --warmup")
    return args


def default_cpus() -> int:
    """Threads per container sized to this machine: two stages compute at once in the
    widest workflows (traffic's two classifiers), so each gets half the cores, at most the
    4 a platform's CPU limit would typically give. More threads than cores made the
    2-core VM's compute times swing by 2× and hid the data passing in the noise."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


OVERLOADED = 2.0       # load p50 over isolated p50 from which the load phase overloads the machine


def overload_warning(workflow, mode, entry, rate) -> str | None:
    """A warning when a mode's p50 under load is OVERLOADED× its isolated p50 or more: then
    the machine queues requests and the load columns measure that queue, not data passing."""
    ratio = entry["load"]["p50_ms"] / entry["isolated"]["p50_ms"]
    entry["load"]["p50_vs_isolated"] = ratio
    if not ratio >= OVERLOADED:         # NaN (no request served under load) is not this warning
        return None
    return (f"{workflow}/{mode}: the p50 under load ({entry['load']['p50_ms']:.0f} ms at {rate:.1f}/s) is "
            f"{ratio:.1f}× the isolated p50 on {os.cpu_count()} cores: this machine is overloaded, so the "
            f"load columns measure its queue, not the data passing; lower --rate, or --rate 0 for "
            f"isolated requests only")


def gpus_here() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except ImportError:
        return 0


def bar(args, total, description):
    if args.no_progress:
        return contextlib.nullcontext(None)
    from tqdm import tqdm
    return tqdm(total=total, desc=description, unit="req", leave=False, file=sys.stderr)


def breakdown(runs) -> dict:
    """Mean seconds per request of each stage: compute, data passing (and by kind: get,
    empty, put), platform (HTTP, runtime); and data passing's share of the end-to-end
    latency, on the critical path (of parallel branches, the slowest) and summed over every
    activation."""
    stages: dict[str, dict] = {}
    for run in runs:
        for a in run.activations:
            s = stages.setdefault(a.stage, {"compute_s": 0.0, "passing_s": 0.0, "platform_s": 0.0,
                                            "passing_ops_s": {}})
            s["compute_s"] += (a.total_s - a.passing_s) / len(runs)
            s["passing_s"] += a.passing_s / len(runs)
            for op, seconds in a.passing_ops.items():
                s["passing_ops_s"][op] = s["passing_ops_s"].get(op, 0.0) + seconds / len(runs)
            s["platform_s"] += (a.wall_s - a.total_s) / len(runs)
    latency = statistics.mean(r.latency_s for r in runs)
    summed = sum(s["passing_s"] for s in stages.values())
    critical = statistics.mean(r.critical_passing_s for r in runs)
    return {"stages": stages, "passing_share": critical / latency if latency else 0.0,
            "passing_share_summed": summed / latency if latency else 0.0}


def links_per_request(before: dict, after: dict, requests: int) -> dict:
    """What the controller's links did for each request between two snapshots: moves and
    bytes per request, and each move's mean wait (for its first chunk) and service time (first
    chunk to last), so a get's time splits into the copy and everything around it."""
    out = {}
    for name, link in after.items():
        old = before.get(name, {})
        moves = link["transfers"] - old.get("transfers", 0)
        if moves:
            out[name] = {"moves_per_request": moves / requests,
                         "bytes_per_request": (link["bytes"] - old.get("bytes", 0)) / requests,
                         "wait_ms": (link["wait_s"] - old.get("wait_s", 0.0)) / moves * 1e3,
                         "service_ms": (link["service_s"] - old.get("service_s", 0.0)) / moves * 1e3}
    return out


def gets_per_request(before: dict, after: dict, runs) -> dict:
    """Where the pool's gets spent their time, per request, between two of the controller's
    status replies (Note [Where a get's time goes], controller/handlers.py): in the
    functions (every stage's gets, summed), in the controller, and copying there. Empty
    where the mode got nothing through the pool."""
    def totals(status):
        requests = status.get("requests", {})
        get = requests.get("ops", {}).get("get", {})
        copies = requests.get("get_copies", {})
        return get.get("ok", 0) + get.get("error", 0), get.get("seconds", 0.0), copies.get("seconds", 0.0)

    (gets, in_controller, copying), (gets_0, in_controller_0, copying_0) = totals(after), totals(before)
    if gets == gets_0:
        return {}
    in_functions = sum(a.passing_ops.get("get", 0.0) for run in runs for a in run.activations)
    return {"gets": (gets - gets_0) / len(runs),
            "in_functions_ms": in_functions / len(runs) * 1e3,
            "in_controller_ms": (in_controller - in_controller_0) / len(runs) * 1e3,
            "copying_ms": (copying - copying_0) / len(runs) * 1e3}


def measure_workflow(name, args, controller, log_dir, gpus) -> dict:
    workflow = driver.WORKFLOWS[name]
    deployments = {}
    result = {"workflow": name, "stages": workflow.stages, "modes": {}}
    try:
        for mode in args.modes:
            print(f"{name}: starting {len(workflow.stages) * args.replicas} containers for {mode}", file=sys.stderr)
            deployments[mode] = driver.Deployment(workflow, mode, args.size, controller.env,
                                                  os.path.join(log_dir, mode), args.replicas, gpus,
                                                  platform=args.platform, cpus=args.cpus)
        for mode, deployment in deployments.items():
            # Warm-up: every input once per container. Sequential runs take the replicas of
            # each action in turn (driver.Deployment), so input k goes to each replica once.
            # The floor mode's inputs are handed on in these runs, once per container.
            for k in range(INPUTS * args.replicas):
                deployment.run(k // args.replicas % INPUTS, prepare=True)
            runs = []
            status_before = controller.status()
            with bar(args, args.requests, f"{name}/{mode} isolated") as progress:
                for i in range(args.requests):
                    runs.append(deployment.run(i % INPUTS))
                    if progress is not None:
                        progress.update(1)
            latencies = [r.latency_s for r in runs]
            status_after = controller.status()
            result["modes"][mode] = {
                "isolated": {"p50_ms": load.percentile(latencies, 0.5) * 1e3,
                             "p99_ms": load.percentile(latencies, 0.99) * 1e3,
                             "latencies_ms": [x * 1e3 for x in latencies],
                             "checksums": {str(r.seed): r.result["checksum"] for r in runs},
                             "links": links_per_request(status_before.get("links", {}),
                                                        status_after.get("links", {}), len(runs)),
                             "gets": gets_per_request(status_before, status_after, runs),
                             **breakdown(runs)}}
        sums = {mode: m["isolated"]["checksums"] for mode, m in result["modes"].items()}
        result["identical_outputs"] = all(s == next(iter(sums.values())) for s in sums.values())
        slowest = max(m["isolated"]["p50_ms"] for m in result["modes"].values())
        slo_s = (args.slo_ms or 2 * slowest) / 1e3
        result["slo_ms"] = slo_s * 1e3
        if args.rate is not None:
            rate = args.rate
        elif not gpus:
            # Without a GPU every stage computes on the same few cores: a load phase measures
            # how those cores queue, not data passing (on the 2-core VM, half of what a closed
            # loop carried still queued every mode for seconds). Asked for, it runs.
            rate = 0.0
            result["load_skipped"] = ("no load phase by default on a machine without a GPU: the stages' "
                                      "compute shares its cores, so load measures their queue (give --rate to run it)")
            print(f"{name}: {result['load_skipped']}", file=sys.stderr)
        else:
            # Half what the slowest mode carries here, measured: a closed loop of concurrent
            # requests, since on a machine whose stages share few cores that is far below
            # what one request at a time suggests (1 / p50).
            slowest_mode = max(result["modes"], key=lambda m: result["modes"][m]["isolated"]["p50_ms"])
            deployment = deployments[slowest_mode]
            carried = load.closed_loop_rps(lambda i: deployment.run(i % INPUTS),
                                           PROBE_CONCURRENCY * args.replicas, PROBE_ROUNDS)
            rate = 0.5 * min(carried, 1e3 / slowest * args.replicas)
            result["default_rate"] = {"mode": slowest_mode, "closed_loop_rps": carried, "rate": rate}
        for mode, deployment in deployments.items():
            entry = result["modes"][mode]
            if rate > 0:
                entry["load"] = run_load(deployment, args, rate, slo_s, f"{name}/{mode} {rate:.1f}/s")
                warning = overload_warning(name, mode, entry, rate)
                if warning:
                    print(f"warning: {warning}", file=sys.stderr)
                    result.setdefault("warnings", []).append(warning)
            if args.find_max:
                entry["max"] = find_max(deployment, args, slo_s, 0.5e3 / entry["isolated"]["p50_ms"],
                                        f"{name}/{mode}")
    finally:
        for deployment in deployments.values():
            deployment.close()
    return result


PROBE_CONCURRENCY = 4   # requests in flight in the closed loop that sizes the default rate
PROBE_ROUNDS = 5        # ... and how many of them each thread sends


def run_load(deployment, args, rate, slo_s, label, duration=None) -> dict:
    duration = duration or args.duration
    offsets = load.arrivals(args.arrivals, rate, duration, seed=7)
    with bar(args, len(offsets), label) as progress:
        outcomes = load.open_loop(lambda i: deployment.run(i % INPUTS), offsets, progress=progress)
    summary = load.summary(outcomes, args.warmup, duration, slo_s)
    summary.update(rate=rate, arrivals=args.arrivals,
                   latencies_ms=[o.latency_s * 1e3 for o in outcomes if o.ok and o.arrival_s >= args.warmup],
                   errors=sorted({str(o.run)[:300] for o in outcomes if not o.ok})[:5])
    return summary


def find_max(deployment, args, slo_s, start, label) -> dict:
    """The highest tried rate whose p99 stays within the SLO with nothing failing: rates
    grow ×1.5 from ``start`` while they hold (or halve until one holds), then one bisection
    step between the best that held and the lowest that broke."""
    duration = args.duration
    trials: list[dict] = []

    def holds(rate) -> bool:
        s = run_load(deployment, args, rate, slo_s, f"{label} max? {rate:.2f}/s", duration)
        trials.append({k: v for k, v in s.items() if k != "latencies_ms"})
        return s["failed"] == 0 and s["p99_ms"] <= slo_s * 1e3

    best, broke, rate = None, None, max(start, 0.05)
    for _ in range(MAX_STEPS):
        if holds(rate):
            best = rate
            if broke is not None:
                break
            rate *= 1.5
        else:
            broke = rate
            if best is not None:
                break
            rate /= 2
    if best is not None and broke is not None and broke > best:
        middle = (best + broke) / 2
        if holds(middle):
            best = middle
    return {"max_rps_within_slo": best or 0.0, "trials": trials}


def main(argv=None) -> int:
    args = parse(argv)
    gpus = gpus_here()
    args.size = args.size or ("gpu" if gpus else "cpu")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    # bench/results in a source checkout; the current folder where a wheel installed this.
    checkout = os.path.basename(os.path.dirname(HERE)) == "bench"
    out = args.out or os.path.join(os.path.join(os.path.dirname(HERE), "results") if checkout else os.getcwd(),
                                   f"workflows-{stamp}")
    os.makedirs(out, exist_ok=True)
    from faastube.local import LocalController, LocalRedis
    results = {"benchmark": "workflows",
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "command": "faastube bench " + " ".join(argv if argv is not None else sys.argv[1:]),
               "machine": machine(gpus), "settings": {k: v for k, v in vars(args).items()},
               "targets": {"traffic_p50_lower_than_redis": 0.95, "traffic_p50_lower_than_shm": 0.75,
                           "max_rps_vs_redis": 20, "max_rps_vs_shm": 4, "passing_share_below": 0.10},
               "workflows": []}
    with LocalRedis() as redis_server, LocalController(
            redis_server.url, log_path=os.path.join(out, "controller.log"),
            gpus="auto" if gpus else "none", pool_limit="8GiB", slab_size="256MiB") as controller:
        for name in args.workflow:
            results["workflows"].append(
                measure_workflow(name, args, controller, os.path.join(out, "logs", name), gpus))
            with open(os.path.join(out, "results.json"), "w") as file:   # after each workflow
                json.dump(results, file, indent=2)
    import render
    render.write(results, out)
    print(render.table(results))
    for workflow in results["workflows"]:
        if workflow.get("load_skipped"):
            print(f"{workflow['workflow']}: {workflow['load_skipped']}")
        for warning in workflow.get("warnings", []):
            print(f"warning: {warning}")
    print(f"results: {out}/results.json, report: {out}/report.md")
    return 0 if all(w["identical_outputs"] for w in results["workflows"]) else 1


def machine(gpus: int) -> dict:
    info = {"python": platform.python_version(), "cpus": os.cpu_count(), "gpus": []}
    if gpus:
        import torch
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(gpus)]
        info["torch"] = torch.__version__
    return info


if __name__ == "__main__":
    sys.exit(main())
