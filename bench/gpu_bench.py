#!/usr/bin/env python3
"""GPU data plane benchmark, all in one run on the GPU machine (scripts/gpu-check runs it):

1. get latency by size and path, in a consumer process other than the producer: same GPU
   (zero copy), GPU0→GPU1 (a copy over NVLink), host→GPU and GPU→host (pinned PCIe); for the
   copying paths also the bandwidth against the raw limit of the same size, measured in the
   same run with CuPy (pinned copies, memcpyPeerAsync with peer access on), and the
   controller's own copy rate (its link counters);
2. a 64 MB hand-off between two processes on one GPU (put + get, from the producer's first
   byte to the consumer's usable array) against the two baselines users have today: bytes
   through Redis (GPU→host, SET, GET, host→GPU) and host shared memory with pageable
   copies, two ways: a fresh POSIX segment per object (what a host-memory data store does
   per hand-off: its pages are faulted in by the producer's copy) and one warm, pre-faulted
   buffer reused every time (the best a host-memory system can do); "null" is the harness
   passing its message alone.

    python bench/gpu_bench.py [--quick] [--out results.json]

Prints a table (last) and writes JSON. The consumer runs as ``--role consumer``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from multiprocessing import resource_tracker, shared_memory

import numpy as np

from report import percentile, timed, write_json

KB, MB, GB = 1 << 10, 1 << 20, 1 << 30
TARGETS = {"same_gpu_p50_us": 100, "peer_share": 0.85, "h2d_share": 0.90,
           "handoff_vs_redis": 500, "handoff_vs_shm": 100}


# -- the consumer process ---------------------------------------------------------------

def serve_consumer() -> None:
    """Answers one JSON command per stdin line with one JSON line."""
    import cupy
    import redis

    import faastube
    store = None
    shm = None
    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        if op == "get":
            times, checksum = [], None
            start = time.perf_counter()
            view = faastube.get(command["ref"], device=command.get("device"))
            first = time.perf_counter() - start      # maps the slab if this process has not yet
            del view
            for _ in range(command.get("warmup", 0)):
                view = faastube.get(command["ref"], device=command.get("device"))
                del view
            for i in range(command["n"]):
                start = time.perf_counter()
                view = faastube.get(command["ref"], device=command.get("device"))
                times.append(time.perf_counter() - start)
                if i == 0 and isinstance(view, np.ndarray):
                    checksum = int(view.sum(dtype=np.uint64))
                elif i == 0:
                    with view.device:
                        checksum = int(view.sum(dtype=cupy.uint64).get())
                del view
            print(json.dumps({"times": times, "first": first, "checksum": checksum}), flush=True)
        elif op == "handoff":
            mode = command["mode"]
            if mode == "null":                     # the harness alone: no data moves
                print(json.dumps({"done": time.perf_counter(), "checksum": command["checksum"]}), flush=True)
                continue
            if mode == "faastube":
                view = faastube.get(command["ref"])
            elif mode == "redis":
                store = store or redis.Redis.from_url(command["url"])
                view = cupy.asarray(np.frombuffer(store.get(command["key"]), dtype=np.uint8))
            elif mode == "shm-fresh":              # the producer's new segment, then unlinked
                segment = shared_memory.SharedMemory(command["name"])
                view = cupy.asarray(np.ndarray((command["size"],), np.uint8, buffer=segment.buf))
                segment.close()
                segment.unlink()
            else:                                  # the warm buffer, pageable copy in
                if shm is None:
                    shm = np.memmap(command["path"], dtype=np.uint8, mode="r", shape=(command["size"],))
                view = cupy.asarray(shm)
            cupy.cuda.runtime.deviceSynchronize()
            done = time.perf_counter()
            checksum = int(view.sum(dtype=cupy.uint64).get())
            del view
            print(json.dumps({"done": done, "checksum": checksum}), flush=True)
        elif op == "ready":                         # CUDA and the connection up, nothing got yet
            with cupy.cuda.Device(0):
                cupy.zeros(1, dtype=cupy.uint64).sum().get()
            faastube.sdk.client().request(faastube.protocol.Ping())
            print(json.dumps({"ok": True}), flush=True)
        elif op == "cold":                          # new objects in this fresh process
            times, checksum = [], None
            for i, ref in enumerate(command["refs"]):
                start = time.perf_counter()
                view = faastube.get(ref)
                times.append(time.perf_counter() - start)
                if i == len(command["refs"]) - 1:
                    with view.device:
                        checksum = int(view.sum(dtype=cupy.uint64).get())
                del view
            warm = []
            for _ in range(command["warm"]):
                start = time.perf_counter()
                view = faastube.get(command["refs"][0])
                warm.append(time.perf_counter() - start)
                del view
            print(json.dumps({"times": times, "warm": warm, "checksum": checksum}), flush=True)
        elif op == "quit":
            return


class Consumer:
    def __init__(self, env):
        self.process = subprocess.Popen([sys.executable, __file__, "--role", "consumer"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def ask(self, **command) -> dict:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the consumer exited ({self.process.wait()})")
        return json.loads(line)

    def close(self):
        try:
            self.ask(op="quit")
        except (RuntimeError, BrokenPipeError):
            pass
        self.process.wait(30)


# -- raw limits ---------------------------------------------------------------------------


def raw_limits(size: int, gpus: int) -> dict:
    """GB/s of plain CuPy copies of ``size`` bytes (median of 5), the limits our paths are
    measured against: the same size, the same run."""
    import cupy
    out = {}
    with cupy.cuda.Device(0):
        device = cupy.zeros(size, dtype=np.uint8)
        pinned = np.frombuffer(cupy.cuda.alloc_pinned_memory(size), dtype=np.uint8, count=size)
        pinned[:] = 1
        stream = cupy.cuda.Stream(non_blocking=True)

        def h2d():
            device.set(pinned, stream=stream)
            stream.synchronize()

        def d2h():
            device.get(out=pinned, stream=stream)
            stream.synchronize()
        other = cupy.empty_like(device)

        def d2d():
            other.data.copy_from_device_async(device.data, size, stream=stream)
            stream.synchronize()
        out["h2d_pinned_GBps"] = size / timed(h2d, 5) / 1e9
        out["d2h_pinned_GBps"] = size / timed(d2h, 5) / 1e9
        out["d2d_same_gpu_GBps"] = size / timed(d2d, 5) / 1e9
    if gpus > 1:
        cupy.cuda.runtime.setDevice(1)
        try:
            cupy.cuda.runtime.deviceEnablePeerAccess(0)
        except cupy.cuda.runtime.CUDARuntimeError:
            pass
        with cupy.cuda.Device(1):
            target = cupy.empty(size, dtype=np.uint8)
            peer_stream = cupy.cuda.Stream(non_blocking=True)

            def peer():
                cupy.cuda.runtime.memcpyPeerAsync(target.data.ptr, 1, device.data.ptr, 0, size, peer_stream.ptr)
                peer_stream.synchronize()
            out["peer_GBps"] = size / timed(peer, 5) / 1e9
            del target
        cupy.cuda.runtime.setDevice(0)
    del device, other, pinned
    cupy.get_default_memory_pool().free_all_blocks()
    cupy.get_default_pinned_memory_pool().free_all_blocks()
    return out


# -- get latency and bandwidth by size and path -------------------------------------------

def gets(consumer: Consumer, controller, sizes, gpus: int, quick: bool) -> list[dict]:
    import cupy

    import faastube
    rows = []
    for size in sizes:
        limits = raw_limits(size, gpus) if size >= MB else {}
        copies = 10 if size >= 256 * MB else 40 if size >= 16 * MB else 200
        copies = max(3, copies // 4) if quick else copies
        host = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
        expected = int(host.sum(dtype=np.uint64))
        with cupy.cuda.Device(0):
            gpu_ref = faastube.put(cupy.asarray(host))
        host_ref = faastube.put(host)
        paths = [("same GPU (zero copy)", gpu_ref, None, None),
                 ("host → GPU", host_ref, "cuda:0", "h2d_pinned_GBps"),
                 ("GPU → host", gpu_ref, "cpu", "d2h_pinned_GBps")]
        if gpus > 1:
            paths.insert(1, ("GPU0 → GPU1 (NVLink)", gpu_ref, "cuda:1", "peer_GBps"))
        for name, ref, device, limit in paths:
            n = copies if limit else 50 if quick else 200       # a zero-copy get is cheap at any size
            status = controller.status()
            before, requests_before = status.get("links", {}), status.get("requests") or {}
            answer = consumer.ask(op="get", ref=ref, device=device, n=n, warmup=min(n, 20))
            status = controller.status()
            after, requests_after = status.get("links", {}), status.get("requests") or {}
            control_us, copy_us = controller_split(requests_before, requests_after)
            moved = busy = 0.0
            for link, stats in after.items():
                moved += stats["bytes"] - before.get(link, {}).get("bytes", 0)
                busy += stats["busy_s"] - before.get(link, {}).get("busy_s", 0.0)
            times = sorted(answer["times"])
            p50 = statistics.median(times)
            gbps = size / p50 / 1e9 if limit else None
            rows.append({"path": name, "size": size, "n": n, "p50_us": p50 * 1e6,
                         "p99_us": percentile(times, 0.99) * 1e6,
                         "first_us": answer["first"] * 1e6, "GBps": gbps,
                         "controller_us": control_us, "copy_us": copy_us,
                         "engine_GBps": moved / busy / 1e9 if busy else None,
                         "raw_GBps": limits.get(limit), "share_of_raw":
                             gbps / limits[limit] if gbps and limit in limits else None,
                         "correct": answer["checksum"] == expected})
        faastube.delete(gpu_ref)
        faastube.delete(host_ref)
    return rows


def controller_split(before: dict, after: dict) -> tuple[float | None, float | None]:
    """Mean µs per get between two admin status replies (Note [Where a get's time goes],
    controller/handlers.py): the controller's whole service time of a get (from reading it
    to its reply being ready), and of that the copy alone (gets that copied)."""
    def op(report, key):
        entry = report.get("ops", {}).get("get", {})
        return entry.get(key, 0) or 0
    gets = op(after, "ok") - op(before, "ok")
    copies = (after.get("get_copies", {}).get("count", 0) - before.get("get_copies", {}).get("count", 0))
    control = (op(after, "seconds") - op(before, "seconds")) / gets * 1e6 if gets else None
    copy = ((after.get("get_copies", {}).get("seconds", 0.0) - before.get("get_copies", {}).get("seconds", 0.0))
            / copies * 1e6 if copies else None)
    return control, copy


# -- cold gets: new objects in a fresh process ----------------------------------------------

COLD_OBJECTS = 7


HOP_S = 0.02       # between a producer's put and its consumer's get: a platform's hop at least


def cold_gets(env, sizes, trials: int, warm: int, map_ahead: str) -> list[dict]:
    """Gets of objects a process has not seen, on the GPU they were made on (zero copy): per
    size and trial, a fresh consumer process starts (CUDA and its connection up, with
    ``FAASTUBE_MAP_AHEAD`` = ``map_ahead``: Note [Slabs mapped ahead]), COLD_OBJECTS new
    objects are put, and HOP_S later the consumer gets each once — the first get, then gets
    2–7 — and then the first object ``warm`` times more."""
    import cupy

    import faastube
    rows = []
    for size in sizes:
        first, later, warmed, correct = [], [], [], True
        for trial in range(trials):
            host = np.random.default_rng(size + trial).integers(0, 256, size, dtype=np.uint8)
            consumer = Consumer({**env, "FAASTUBE_MAP_AHEAD": map_ahead})
            refs = []
            try:
                consumer.ask(op="ready")
                with cupy.cuda.Device(0):
                    data = cupy.asarray(host)
                    refs = [faastube.put(data) for _ in range(COLD_OBJECTS)]
                    del data
                time.sleep(HOP_S)
                answer = consumer.ask(op="cold", refs=refs, warm=warm)
            finally:
                consumer.close()
                for ref in refs:
                    faastube.delete(ref)
            first.append(answer["times"][0])
            later.extend(answer["times"][1:])
            warmed.extend(answer["warm"])
            correct &= answer["checksum"] == int(host.sum(dtype=np.uint64))
        rows.append({"size": size, "map_ahead": map_ahead, "trials": trials, "correct": correct,
                     "first_p50_us": statistics.median(first) * 1e6, "first_max_us": max(first) * 1e6,
                     "later_p50_us": statistics.median(later) * 1e6,
                     "later_p99_us": percentile(later, 0.99) * 1e6,
                     "warm_p50_us": statistics.median(warmed) * 1e6,
                     "warm_p99_us": percentile(warmed, 0.99) * 1e6})
        print(f"  cold gets of {size} B, map ahead {map_ahead}: first {rows[-1]['first_p50_us']:.0f} µs, "
              f"2–7 {rows[-1]['later_p50_us']:.0f} µs, warm {rows[-1]['warm_p50_us']:.0f} µs", flush=True)
    return rows


# -- the 64 MB hand-off -------------------------------------------------------------------

def start_controller(redis_url: str):
    """The controller every GPU data-plane benchmark measures (this one, handoff_spin.py)."""
    from faastube.local import LocalController
    return LocalController(redis_url, gpus="auto", slab_size="256MiB", pool_limit="8GiB",
                           gpu_slab_size="256MiB", gpu_pool_limit="16GiB").start(timeout_s=60)


def handoffs(consumer: Consumer, redis_url: str, size: int, runs: int) -> dict:
    import cupy
    import redis

    import faastube
    store = redis.Redis.from_url(redis_url)
    path = f"/dev/shm/faastube-bench-{os.getpid()}"
    shm = np.memmap(path, dtype=np.uint8, mode="w+", shape=(size,))
    shm[:] = 0                                       # a host-memory system keeps its buffer
    data = cupy.asarray(np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8))
    expected = int(data.sum(dtype=cupy.uint64).get())
    results = {}
    try:
        for mode in ("null", "faastube", "shm-fresh", "shm", "redis"):
            samples, producer_side, correct = [], [], True
            for run in range(runs + 1):
                cupy.cuda.runtime.deviceSynchronize()
                start = time.perf_counter()
                if mode == "null":
                    command = {"checksum": expected}
                elif mode == "faastube":
                    command = {"ref": faastube.put(data)}
                elif mode == "redis":
                    store.set("bench", cupy.asnumpy(data).tobytes())
                    command = {"url": redis_url, "key": "bench"}
                elif mode == "shm-fresh":
                    segment = shared_memory.SharedMemory(create=True, size=size)
                    data.get(out=np.ndarray((size,), np.uint8, buffer=segment.buf))  # GPU → host
                    command = {"name": segment.name, "size": size}
                    segment.close()
                    # the consumer unlinks it: this process's tracker must not do it again
                    resource_tracker.unregister(segment._name, "shared_memory")
                else:
                    data.get(out=shm)                    # GPU → host, pageable
                    command = {"path": path, "size": size}
                sent = time.perf_counter()
                answer = consumer.ask(op="handoff", mode=mode, **command)
                if run:                                  # the first run is the warm-up
                    samples.append(answer["done"] - start)
                    producer_side.append(sent - start)
                correct &= answer["checksum"] == expected
                if mode == "faastube":
                    faastube.delete(command["ref"])
            results[mode] = {"p50_ms": statistics.median(samples) * 1e3, "runs": runs, "correct": correct,
                             "producer_p50_ms": statistics.median(producer_side) * 1e3}
    finally:
        os.unlink(path)
        store.delete("bench")
    return results


# -- main ---------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["consumer"])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    parser.add_argument("--out", help="JSON results file (default bench/results/gpu_bench-<time>.json)")
    args = parser.parse_args()
    if args.role == "consumer":
        serve_consumer()
        return 0

    import cupy

    import faastube
    from faastube import cuda
    from faastube.local import LocalRedis

    devices = cuda.devices()
    gpus = len(devices.uuids)
    sizes = [KB, MB, 64 * MB, GB] if args.quick else [KB, 64 * KB, MB, 16 * MB, 64 * MB, 256 * MB, GB]
    print(f"{gpus} GPU(s): {', '.join(devices.name(i) for i in range(gpus))}", flush=True)
    with LocalRedis() as store:
        controller = start_controller(store.url)
        consumer = None
        try:
            faastube.connect(socket=controller.socket, namespace="bench")
            env = {**controller.env, "FAASTUBE_NAMESPACE": "bench"}
            consumer = Consumer(env)
            print("measuring gets by size and path, and the raw copy limits per size …", flush=True)
            rows = gets(consumer, controller, sizes, gpus, args.quick)
            print("measuring the 64 MB hand-off …", flush=True)
            handoff = handoffs(consumer, store.url, 64 * MB, 3 if args.quick else 10)
            print("measuring cold gets (new objects, fresh processes) …", flush=True)
            cold = [row for map_ahead in ("none", "gpu") for row in
                    cold_gets(env, [KB, MB, 64 * MB, GB], 3 if args.quick else 5, 50 if args.quick else 200, map_ahead)]
        finally:
            if consumer is not None:
                consumer.close()
            faastube.sdk.client().close()
            controller.stop()

    card = devices.name(0)
    result = {"benchmark": "gpu_bench", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"gpus": [devices.name(i) for i in range(gpus)], "python": platform.python_version(),
                          "cupy": cupy.__version__, "cpus": os.cpu_count()},
              "gets": rows, "handoff_64MB": handoff, "cold_gets": cold, "targets": TARGETS}
    out = write_json("gpu_bench", result, args.out)

    print(f"\n== table ({card} ×{gpus}, {result['date']})")
    print("get = one faastube.get in a consumer process, after up to 20 untimed ones (its very "
          "first get of a slab maps it: 'first'); raw = a plain CuPy copy of the same size, this run")
    print("GB/s = size / get p50 (control round trip included); engine = the controller's copy "
          "alone (its link counters); share = GB/s / raw; ctl / copy = the controller's mean "
          "service time of these gets, and the copy's part of it")
    print(f"{'path':<24}{'size':>8}{'p50 µs':>10}{'p99 µs':>10}{'first µs':>10}{'GB/s':>8}"
          f"{'engine':>8}{'raw GB/s':>10}{'share':>7}{'ctl µs':>9}{'copy µs':>9}  ok")
    for row in rows:
        gbps = f"{row['GBps']:.1f}" if row["GBps"] else "—"
        raw = f"{row['raw_GBps']:.1f}" if row["raw_GBps"] else "—"
        share = f"{row['share_of_raw']:.0%}" if row["share_of_raw"] else "—"
        engine = f"{row['engine_GBps']:.1f}" if row["engine_GBps"] else "—"
        control = f"{row['controller_us']:.0f}" if row["controller_us"] else "—"
        copy = f"{row['copy_us']:.0f}" if row["copy_us"] else "—"
        print(f"{row['path']:<24}{size_text(row['size']):>8}{row['p50_us']:>10.1f}{row['p99_us']:>10.1f}"
              f"{row['first_us']:>10.1f}{gbps:>8}{engine:>8}{raw:>10}{share:>7}{control:>9}{copy:>9}  "
              f"{'yes' if row['correct'] else 'NO'}")
    print(f"cold gets on the GPU they were made on, {COLD_OBJECTS} new objects put {HOP_S * 1e3:.0f} ms "
          f"before, per fresh process; map ahead: none, or GPU slabs (the default) "
          f"(µs; targets: gets 2–7 p50 ≤ 120, warm p99 ≤ 3× p50):")
    print(f"{'size':>8}{'ahead':>6}{'first p50':>11}{'first max':>11}{'2–7 p50':>9}{'2–7 p99':>9}{'warm p50':>10}"
          f"{'warm p99':>10}  ok")
    for row in cold:
        print(f"{size_text(row['size']):>8}{row['map_ahead']:>6}{row['first_p50_us']:>11.0f}{row['first_max_us']:>11.0f}"
              f"{row['later_p50_us']:>9.0f}{row['later_p99_us']:>9.0f}{row['warm_p50_us']:>10.0f}"
              f"{row['warm_p99_us']:>10.0f}  {'yes' if row['correct'] else 'NO'}")
    ours = handoff["faastube"]["p50_ms"]
    print(f"64 MB hand-off p50 (producer side; the harness alone passes a message in "
          f"{handoff['null']['p50_ms']:.3f} ms): FaaSTube {ours:.3f} ms "
          f"({handoff['faastube']['producer_p50_ms']:.3f}), host shm fresh segment "
          f"{handoff['shm-fresh']['p50_ms']:.1f} ms ({handoff['shm-fresh']['p50_ms'] / ours:.0f}×), "
          f"warm buffer {handoff['shm']['p50_ms']:.1f} ms "
          f"({handoff['shm']['p50_ms'] / ours:.0f}×), Redis {handoff['redis']['p50_ms']:.1f} ms "
          f"({handoff['redis']['p50_ms'] / ours:.0f}×); correct: "
          f"{all(h['correct'] for h in handoff.values())}")
    print(f"JSON: {out}")
    return 0 if (all(r["correct"] for r in rows + cold) and all(h["correct"] for h in handoff.values())) else 1


def size_text(size: int) -> str:
    return f"{size // GB} GB" if size >= GB else f"{size // MB} MB" if size >= MB else f"{size // KB} KB"


if __name__ == "__main__":
    sys.exit(main())
