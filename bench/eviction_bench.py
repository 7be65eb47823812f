#!/usr/bin/env python3
"""A workflow under load with the device tier capped below its working set (issue 19,
benchmark b): p99 end to end with queue-aware eviction against LRU and against host memory
only, in one run (Note [Queue-aware eviction], controller/eviction.py).

    python bench/eviction_bench.py [--gpu] [--quick] [--out results.json]

The workflow: a producer function puts one object per request on the device tier, a consumer
function gets it there, works on it and deletes it; requests arrive in bursts (``--burst``
at once), so the objects waiting for the consumer (its queue) reach ``burst × size``: the
working set. ``--pace drained`` (the default) starts each burst once the consumer has
finished the one before (and ``--gap-ms`` more), so every burst meets the same empty queue
and the p99 is a burst's own; ``--pace timed`` starts bursts at fixed times (three times the
consumer's work for a burst apart), as runs 1–14 did: a burst not drained in time carries
over into the next, and the p99 then measures the backlog. The tier is capped at 10% and at 1% of
it (``--gpu-pool-limit``; stand-in tiers on a machine without a GPU, ``--stand-in-gpus``).
Modes, each on its own controller: ``queue`` and ``lru`` (``--eviction``), and ``host`` (the
producer puts to the host tier, one copy, ``put(..., device="cpu")``; the consumer's get
copies to the device, as host-memory data passing does). The producer and the consumer are separate processes, each request an
activation of its function (faastube.sdk.activation), so the controller learns who consumes
what. Latency: from a request's arrival to the consumer's end of it. Printed: p50/p99 per
mode and cap, the ratios of the p99s, the moves; JSON: every latency.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import multiprocessing
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from faastube.local import LocalController, redis_for  # noqa: E402
from report import write_json  # noqa: E402


def produce(socket_path: str, mode: str, device: str, size: int, arrivals: list, start: float, queue,
            drained=None, burst: int = 0, gap_s: float = 0.0) -> None:
    """Put one object per arrival (``arrivals``: seconds after ``start``). With ``drained``
    (a queue the consumer signals on), each burst of ``burst`` arrivals after the first
    starts ``gap_s`` after the consumer has finished the one before, instead."""
    import numpy as np
    from faastube import sdk
    sdk.connect(socket=socket_path, namespace="bench", spare_bytes=0)
    gpu = device.startswith("GPU-")
    if gpu:
        import cupy
        source = cupy.arange(size, dtype=cupy.uint8)
    else:
        source = np.arange(size, dtype=np.uint8)
    put_s = []
    for n, offset in enumerate(arrivals):
        if drained is not None and n and n % burst == 0:
            drained.get(timeout=600)
            start = time.monotonic() + gap_s - offset       # this burst arrives now + gap
        delay = start + offset - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        began = time.perf_counter()
        with sdk.activation(None, "producer"):
            if mode == "host":                   # host-memory data passing: one copy to the host
                ref = sdk.put(source, device="cpu")
            elif gpu:
                ref = sdk.put(source)
            else:
                ref = sdk.put(source, device=device)
        put_s.append(time.perf_counter() - began)
        queue.put((ref, start + offset))
    queue.put(("puts", put_s))
    queue.put(None)
    sdk.client().close()


def consume(socket_path: str, device: str, service_s: float, queue, results, drained=None,
            burst: int = 0) -> None:
    from faastube import sdk
    sdk.connect(socket=socket_path, namespace="bench", spare_bytes=0)
    latencies, checks, get_s, put_s = [], set(), [], []
    while True:
        item = queue.get()
        if item is None:
            break
        if item[0] == "puts":
            put_s = item[1]
            continue
        ref, arrival = item
        began = time.perf_counter()
        with sdk.activation(None, "consumer"):
            view = sdk.get(ref, device=device)
            get_s.append(time.perf_counter() - began)
            checks.add(int(view[-1]))            # the bytes came back (arange: size - 1 mod 256)
            time.sleep(service_s)                # the function's own work
            del view
            sdk.delete(ref)
        latencies.append(time.monotonic() - arrival)
        if drained is not None and len(latencies) % burst == 0:
            drained.put(len(latencies))          # the producer may start the next burst
    results.put({"latencies": latencies, "checks": sorted(checks), "get_s": get_s, "put_s": put_s})
    sdk.client().close()


def spread(seconds: list) -> dict:
    """Mean, p50, p90, p99 and max in ms."""
    ordered = sorted(seconds)
    at = lambda q: 1e3 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]   # noqa: E731
    return {"mean": 1e3 * statistics.fmean(ordered), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99),
            "max": 1e3 * ordered[-1], "total": sum(ordered)}


def run_mode(mode: str, cap: int, args, device_setting: dict, arrivals: list) -> dict:
    context = multiprocessing.get_context("spawn")
    with contextlib.ExitStack() as stack:
        redis_url = redis_for(stack)
        controller = stack.enter_context(LocalController(
            redis_url, pool_limit="16GiB", gpu_pool_limit=str(cap), gpu_slab_size=str(args.slab),
            eviction="lru" if mode == "lru" else "queue", idle_minimum="0", **device_setting))
        device = next(p["device"] for p in controller.status()["pools"] if p["device"] != "host")
        queue, results = context.Queue(), context.Queue()
        drained = context.Queue() if args.pace == "drained" else None
        start = time.monotonic() + 1.0
        workers = [context.Process(target=produce, args=(controller.socket, mode, device, args.size,
                                                         arrivals, start, queue, drained, args.burst,
                                                         args.gap_ms / 1e3)),
                   context.Process(target=consume, args=(controller.socket, device, args.service_ms / 1e3,
                                                         queue, results, drained, args.burst))]
        for worker in workers:
            worker.start()
        outcome = results.get(timeout=600)
        for worker in workers:
            worker.join(60)
        status = controller.status()
        pools, requests = status["pools"], status.get("requests")
        tier = next(p for p in pools if p["device"] == device)
        host = next(p for p in pools if p["device"] == "host")
    measured = outcome["latencies"][args.warmup_bursts * args.burst:]     # the warm-up bursts left out
    latencies = sorted(measured)
    return {"mode": mode, "cap_bytes": cap, "requests": len(latencies),
            "p50_ms": 1e3 * statistics.median(latencies),
            "p99_ms": 1e3 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "checks": outcome["checks"], "moves": tier["moves"], "waits": tier["waits"],
            "put_p50_ms": 1e3 * statistics.median(outcome["put_s"]),
            "get_p50_ms": 1e3 * statistics.median(outcome["get_s"]),
            "put_ms": spread(outcome["put_s"]), "get_ms": spread(outcome["get_s"]),
            "controller_requests": requests,
            "host_grown": host["grown"], "tier_grown": tier["grown"],
            "latencies_ms": [1e3 * x for x in measured]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="GPU 0's tier (default: a host-backed stand-in)")
    p.add_argument("--quick", action="store_true", help="fewer bursts")
    p.add_argument("--size", type=int, default=None, help="bytes per object (default 4 MB; 16 MB with --gpu)")
    p.add_argument("--burst", type=int, default=200, help="requests arriving at once")
    p.add_argument("--bursts", type=int, default=None, help="bursts (default 4; 2 with --quick)")
    p.add_argument("--warmup-bursts", type=int, default=1,
                   help="bursts before the measured ones, not measured (the tiers grow in them)")
    p.add_argument("--service-ms", type=float, default=2.0, help="the consumer's own work per request")
    p.add_argument("--pace", choices=("drained", "timed"), default="drained",
                   help="drained: a burst starts once the one before is consumed (below saturation); "
                        "timed: at fixed times, a backlog carrying over (runs 1-14)")
    p.add_argument("--gap-ms", type=float, default=200.0,
                   help="with --pace drained: the pause between a burst's end and the next")
    p.add_argument("--out", default=None, help="JSON results (default bench/results/eviction_bench-<time>.json)")
    args = p.parse_args(argv)
    args.size = args.size or (16_000_000 if args.gpu else 4_000_000)
    args.bursts = args.bursts or (2 if args.quick else 4)
    granule = 2 << 20
    args.slab = -(-args.size // granule) * granule
    working_set = args.burst * args.slab
    pause = args.burst * args.service_ms / 1e3 * 3          # the consumer drains a burst in it
    arrivals = [b * pause for b in range(args.warmup_bursts + args.bursts) for _ in range(args.burst)]
    device_setting = {"gpus": "auto"} if args.gpu else {"gpus": "none", "stand_in_gpus": "1"}
    rows = []
    for share in (0.10, 0.01):
        # At least two objects: one the consumer holds, one the producer writes.
        cap = max(2 * args.slab, int(working_set * share) // args.slab * args.slab)
        for mode in ("queue", "lru", "host"):
            row = run_mode(mode, cap, args, device_setting, arrivals)
            row["cap_share"] = share
            rows.append(row)
            print(f"cap {share:.0%} ({cap >> 20} MiB) {mode:5s}: p50 {row['p50_ms']:7.1f} ms  "
                  f"p99 {row['p99_ms']:7.1f} ms  evicted {row['moves']['evict']['objects']}, restored on get "
                  f"{row['moves']['restore']['objects']}, ahead {row['moves']['ahead']['objects']}, puts to the host "
                  f"{row['moves']['spill']['objects']}; put p50 "
                  f"{row['put_p50_ms']:.2f} ms, get p50 {row['get_p50_ms']:.2f} ms, host slabs grown on requests "
                  f"{row['host_grown']['request']['slabs']}", flush=True)
    print()
    print(f"== eviction under load ({'GPU 0' if args.gpu else 'stand-in tier'}, {args.bursts} bursts of "
          f"{args.burst} × {args.size / 1e6:g} MB after {args.warmup_bursts} unmeasured, paced {args.pace}, "
          f"working set {working_set >> 20} MiB, consumer {args.service_ms:g} ms per request)")
    print("| cap | queue p99 ms | LRU p99 ms | host-only p99 ms | queue vs host | queue vs LRU |")
    print("|---|---|---|---|---|---|")
    for share in (0.10, 0.01):
        by = {r["mode"]: r for r in rows if r["cap_share"] == share}
        q, lru, host = by["queue"]["p99_ms"], by["lru"]["p99_ms"], by["host"]["p99_ms"]
        print(f"| {share:.0%} | {q:.1f} | {lru:.1f} | {host:.1f} | {100 * (q / host - 1):+.0f}% | "
              f"{100 * (q / lru - 1):+.0f}% |")
    out = write_json("eviction_bench", {
        "machine": platform.node(), "gpu": args.gpu, "size": args.size, "burst": args.burst,
        "bursts": args.bursts, "service_ms": args.service_ms, "working_set": working_set,
        "pace": args.pace, "gap_ms": args.gap_ms if args.pace == "drained" else None,
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "rows": rows}, args.out)
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
