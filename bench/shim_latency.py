#!/usr/bin/env python3
"""Action runtime benchmark: no-op /run latency with one keep-alive client, and throughput
with 8 clients, serialised (the stock behaviour) and with __OW_ALLOW_CONCURRENT=true.

    python bench/shim_latency.py [--seconds 5] [--work-ms 20] [--out results.json]

The stock runtime (a Docker image) cannot run on our CI machines; platform-contracts.md has
its numbers measured on a machine like ours (no-op /run p50 0.36–0.43 ms, 2,300–2,600 req/s).
The serial mode measured here is the in-run baseline for the concurrency target.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import json
import os
import platform
import sys
import tempfile
import time

from faastube.local import LocalRuntime
from report import write_json

NOOP = "def main(args):\n    return {}\n"
WORK = "import time\ndef main(args):\n    t = time.monotonic() + args['ms'] / 1000\n    while time.monotonic() < t:\n        pass\n    return {'n': args['n']}\n"
STOCK = {"p50_ms": (0.36, 0.43), "requests_per_s": (2300, 2600)}


@contextlib.contextmanager
def shim_runtime(env: dict):
    """A `faastube shim` on a free port, listening, logging to a temporary file; stopped
    and its log removed on exit."""
    log = tempfile.NamedTemporaryFile(prefix="shim-latency-", suffix=".log", delete=False)
    log.close()
    try:
        runtime = LocalRuntime({**os.environ, **env}, log.name)
        try:
            yield runtime
        finally:
            runtime.stop()
    finally:
        os.unlink(log.name)


def post(conn, path, body):
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, response.read()


def latency(seconds):
    with shim_runtime({}) as runtime:
        conn = runtime.connection()
        assert post(conn, "/init", {"value": {"code": NOOP, "main": "main"}})[0] == 200
        for _ in range(200):
            post(conn, "/run", {"value": {}})
        samples = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            start = time.perf_counter_ns()
            status, _ = post(conn, "/run", {"value": {}})
            samples.append(time.perf_counter_ns() - start)
            assert status == 200
        samples.sort()
        total_s = sum(samples) / 1e9
        return {"p50_ms": samples[len(samples) // 2] / 1e6, "p99_ms": samples[int(len(samples) * 0.99)] / 1e6,
                "requests_per_s": len(samples) / total_s, "n": len(samples)}


def throughput(env, clients, seconds, work_ms):
    with shim_runtime(env) as runtime:
        conn = runtime.connection()
        assert post(conn, "/init", {"value": {"code": WORK, "main": "main"}})[0] == 200
        end = time.monotonic() + seconds

        def client(index):
            conn = runtime.connection()
            done = wrong = 0
            n = index * 1_000_000
            while time.monotonic() < end:
                status, body = post(conn, "/run", {"value": {"ms": work_ms, "n": n}})
                if status != 200 or json.loads(body) != {"n": n}:
                    wrong += 1
                done += 1
                n += 1
            return done, wrong
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            list(pool.map(lambda i: post(runtime.connection(), "/run", {"value": {"ms": 1, "n": 0}}), range(clients)))
            started = time.monotonic()
            end = started + seconds
            results = list(pool.map(client, range(clients)))
            elapsed = time.monotonic() - started
        return {"requests_per_s": sum(d for d, _ in results) / elapsed,
                "wrong_results": sum(w for _, w in results), "requests": sum(d for d, _ in results)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--work-ms", type=float, default=20.0,
                        help="wall-clock time each activation busy-waits (stands in for GPU time)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    print("measuring no-op /run latency …", file=sys.stderr)
    noop = latency(args.seconds)
    print("measuring throughput, serial …", file=sys.stderr)
    serial = throughput({}, args.clients, args.seconds, args.work_ms)
    print("measuring throughput, concurrent …", file=sys.stderr)
    concurrent_ = throughput({"__OW_ALLOW_CONCURRENT": "true", "FAASTUBE_CONCURRENCY": str(args.clients)},
                             args.clients, args.seconds, args.work_ms)
    result = {"benchmark": "shim_latency",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "noop": noop, "serial": serial, "concurrent": concurrent_, "work_ms": args.work_ms,
              "clients": args.clients, "stock_reference": STOCK}
    out = write_json("shim_latency", result, args.out)
    print(f"no-op /run, one keep-alive client: p50 {noop['p50_ms']:.3f} ms, p99 {noop['p99_ms']:.3f} ms, "
          f"{noop['requests_per_s']:.0f} req/s  (stock, platform-contracts.md: p50 0.36–0.43 ms, "
          f"2,300–2,600 req/s; target p50 ≤ 1.2× stock)")
    print(f"{args.clients} clients, each activation busy-waits {args.work_ms:g} ms of wall-clock time:")
    print(f"  serialised (stock behaviour): {serial['requests_per_s']:8.1f} req/s, {serial['wrong_results']} wrong")
    print(f"  concurrent:                   {concurrent_['requests_per_s']:8.1f} req/s, "
          f"{concurrent_['wrong_results']} wrong  → {concurrent_['requests_per_s'] / serial['requests_per_s']:.2f}×")
    print(f"full results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
