#!/usr/bin/env python3
"""Host-pool latency benchmark: control round trip, get and put by size, and cross-process
hand-offs through the pool against bytes through Redis, all in one run.

    python bench/pool_latency.py [--quick] [--out results.json]

Starts a private redis-server (unless FAASTUBE_REDIS is set) and a controller, prints a
table, and writes the full numbers as JSON (default bench/results/pool_latency-<time>.json).

What is timed:
- ping: one control round trip to the controller (no object);
- get: ``faastube.get`` of a sealed object whose slab this process has mapped, the view
  dropped after each get (so its lease ends as in real use);
- put: ``faastube.put`` (one copy into the pool) of a numpy array;
- redis set/get: what functions do today: ``SET key arr.tobytes()``, ``GET`` + ``frombuffer``;
- hand-off: producer process publishes an array it computed, consumer process holds it as
  an array; timed from the start of publishing to the consumer's array (CLOCK_MONOTONIC).
  Pool zero-copy (the producer computed into ``faastube.empty``; publishing is ``seal``),
  pool put (publishing is ``put``, one copy), Redis bytes, and host shared memory as the
  workflow benchmark's ``shm`` mode passes it: the producer computes into a fresh POSIX
  segment, the consumer opens and maps it and copies the array out (``shm``), or keeps
  the mapping as its array (``shm view``: no copy, the strictest host baseline).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import multiprocessing
import os
import platform
import statistics
from multiprocessing import resource_tracker, shared_memory
import sys
import time

import numpy as np
import redis

import faastube
from faastube import protocol
from faastube.local import LocalController, redis_for
from report import percentile, write_json

SIZES = [4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20, 256 << 20]
HANDOFF_SIZES = [64 << 10, 1 << 20, 16 << 20, 64 << 20]
HANDOFF_MODES = ("zero-copy", "put", "shm", "shm-view", "redis")


def percentiles(samples_ns):
    return {"p50_us": percentile(samples_ns, 0.5) / 1e3, "p99_us": percentile(samples_ns, 0.99) / 1e3,
            "n": len(samples_ns)}


def timed(fn, repeat):
    out = []
    for _ in range(repeat):
        start = time.perf_counter_ns()
        fn()
        out.append(time.perf_counter_ns() - start)
    return out


def repeats(size, quick):
    base = 300 if quick else 2000
    return max(5, min(base, int(base * (1 << 20) / max(size, 1 << 20))))


def bench_local(redis_url, quick):
    client = faastube.client()
    rows = {"ping": percentiles(timed(lambda: client.request(protocol.Ping()), 500 if quick else 5000))}
    arrays = {size: np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8) for size in SIZES}
    refs = {size: faastube.put(data) for size, data in arrays.items()}
    for ref in refs.values():
        faastube.get(ref)                                     # map every slab once
    # Gets cost the same at every size (zero copy), so interleave the sizes in rounds:
    # drift in the machine's speed then hits every size alike.
    gets = {size: [] for size in SIZES}
    for _round in range(5 if quick else 20):
        for size, ref in refs.items():
            gets[size] += timed(lambda: faastube.get(ref), 100)
    board = redis.Redis.from_url(redis_url)
    for size, data in arrays.items():
        n = min(repeats(size, quick), 50)
        puts = []
        for _ in range(n):
            start = time.perf_counter_ns()
            other = faastube.put(data)
            puts.append(time.perf_counter_ns() - start)
            faastube.delete(other)
        key = f"bench:{size}"
        redis_n = min(n, 20 if size >= 16 << 20 else n)
        sets = timed(lambda: board.set(key, data.tobytes()), redis_n)
        redis_gets = timed(lambda: np.frombuffer(board.get(key), np.uint8), redis_n)
        board.delete(key)
        faastube.delete(refs[size])
        rows[f"size_{size}"] = {"size": size, "get": percentiles(gets[size]), "put": percentiles(puts),
                                "redis_set": percentiles(sets), "redis_get": percentiles(redis_gets)}
    return rows


def _producer(mode, socket_path, redis_url, size, runs, inbox, outbox):
    faastube.connect(socket=socket_path, namespace="bench")
    board = redis.Redis.from_url(redis_url)
    source = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)
    for run in range(runs):
        inbox.recv()
        if mode == "zero-copy":
            out = faastube.empty(size, "uint8", consumers=1)
            np.add(source, run, out=out)                         # the function's own work
            start = time.monotonic_ns()
            message = faastube.seal(out)
            del out
        elif mode.startswith("shm"):
            name = f"ftb-latency-{os.getpid()}-{run}"
            segment = shared_memory.SharedMemory(name=name, create=True, size=size)
            resource_tracker.unregister(segment._name, "shared_memory")   # the consumer unlinks it
            out = np.ndarray(size, np.uint8, buffer=segment.buf)
            np.add(source, run, out=out)                         # computed into the segment
            start = time.monotonic_ns()
            message = {"segment": name}
            del out
            segment.close()
        else:
            out = np.add(source, run)
            start = time.monotonic_ns()
            if mode == "put":
                message = faastube.put(out, consumers=1)
            else:
                board.set(f"bench:handoff:{run}", out.tobytes())
                message = {"key": f"bench:handoff:{run}"}
        outbox.send((start, message))


def _consumer(mode, socket_path, redis_url, size, runs, inbox, outbox):
    faastube.connect(socket=socket_path, namespace="bench")
    board = redis.Redis.from_url(redis_url)
    for _ in range(runs):
        start, message = inbox.recv()
        segment = None
        if mode == "redis":
            array = np.frombuffer(board.get(message["key"]), np.uint8)
            board.delete(message["key"])
        elif mode.startswith("shm"):
            segment = shared_memory.SharedMemory(name=message["segment"])
            array = np.ndarray(size, np.uint8, buffer=segment.buf)
            if mode == "shm":
                array = array.copy()                             # into the consumer's memory
        else:
            array = faastube.get(message)
        done = time.monotonic_ns()
        checksum = int(array[:: max(1, size // 4096)].sum())
        del array
        if segment is not None:
            segment.close()
            segment.unlink()
        outbox.send((done - start, checksum))


def bench_handoff(mode, socket_path, redis_url, size, runs):
    """Median producer→consumer hand-off over ``runs`` (after one warm-up)."""
    ctx = multiprocessing.get_context("spawn")
    to_producer, producer_in = ctx.Pipe()
    to_consumer, consumer_in = ctx.Pipe()
    producer = ctx.Process(target=_producer, args=(mode, socket_path, redis_url, size, runs + 1,
                                                    producer_in, producer_in), daemon=True)
    consumer = ctx.Process(target=_consumer, args=(mode, socket_path, redis_url, size, runs + 1,
                                                    consumer_in, consumer_in), daemon=True)
    producer.start()
    consumer.start()
    samples = []
    try:
        for run in range(runs + 1):
            to_producer.send(run)
            start, message = to_producer.recv()
            to_consumer.send((start, message))
            elapsed, _checksum = to_consumer.recv()
            if run:
                samples.append(elapsed)
    finally:
        producer.kill()
        consumer.kill()
        producer.join()
        consumer.join()
    return {"median_ms": statistics.median(samples) / 1e6, "runs": runs}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--out", help="JSON output path")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        redis_url = redis_for(stack)
        controller = stack.enter_context(LocalController(redis_url, slab_size="64MiB", pool_limit="4GiB"))
        faastube.connect(socket=controller.socket, namespace="bench")
        print("measuring control round trip, get, put and Redis bytes by size …", file=sys.stderr)
        local = bench_local(redis_url, args.quick)
        handoffs = {}
        runs = 5 if args.quick else 15
        for size in HANDOFF_SIZES:
            for mode in HANDOFF_MODES:
                print(f"measuring the {size_label(size)} hand-off via {mode} …", file=sys.stderr)
                handoffs[f"{mode}_{size}"] = bench_handoff(mode, controller.socket, redis_url, size, runs)
        faastube.sdk._client.close()
    result = {
        "benchmark": "pool_latency", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "quick": args.quick, "local": local, "handoff": handoffs,
    }
    out = write_json("pool_latency", result, args.out)
    print(render(result))
    print(f"\nfull results: {out}")
    return 0


def size_label(size: int) -> str:
    return f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"


def render(result) -> str:
    local, handoff = result["local"], result["handoff"]
    lines = [f"control round trip (ping): p50 {local['ping']['p50_us']:.0f} µs, p99 {local['ping']['p99_us']:.0f} µs",
             "",
             f"{'size':>8} {'get p50':>9} {'get p99':>9} {'put p50':>10} {'redis SET+GET p50':>18}",]
    for key, row in local.items():
        if not key.startswith("size_"):
            continue
        size = row["size"]
        label = size_label(size)
        redis_us = row["redis_set"]["p50_us"] + row["redis_get"]["p50_us"]
        lines.append(f"{label:>8} {row['get']['p50_us']:>7.0f}µs {row['get']['p99_us']:>7.0f}µs "
                     f"{row['put']['p50_us'] / 1e3:>8.2f}ms {redis_us / 1e3:>16.2f}ms")
    lines += ["", "hand-off, 2 processes (median ms); 'pool vs': a mode's time over pool zero-copy's",
              f"{'size':>8}{'pool zero-copy':>16}{'pool put':>10}{'shm':>9}{'shm view':>10}{'Redis':>9}"
              f"{'pool vs shm':>13}{'vs shm view':>13}{'vs Redis':>10}"]
    for size in HANDOFF_SIZES:
        z, p, c, v, r = (handoff[f"{m}_{size}"]["median_ms"] for m in HANDOFF_MODES)
        lines.append(f"{size_label(size):>8}{z:>16.3f}{p:>10.3f}{c:>9.3f}{v:>10.3f}{r:>9.2f}"
                     f"{c / z:>12.1f}×{v / z:>12.1f}×{r / z:>9.0f}×")
    worst_get = max(row["get"]["p50_us"] for k, row in local.items() if k.startswith("size_"))
    z64, r64 = handoff[f"zero-copy_{64 << 20}"]["median_ms"], handoff[f"redis_{64 << 20}"]["median_ms"]
    lines += ["", f"target get p50 ≤ 150 µs at every size: worst {worst_get:.0f} µs → "
                  f"{'met' if worst_get <= 150 else 'MISSED'}",
              f"target 64 MiB hand-off ≥ 100× faster than Redis bytes: {r64 / z64:.0f}× → "
              f"{'met' if r64 / z64 >= 100 else 'MISSED'}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
