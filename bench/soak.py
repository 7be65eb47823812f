#!/usr/bin/env python3
"""Soak (issue 20): mixed load for many minutes while producers are killed with SIGKILL and
Redis and the controller restart; counts operations, corrupt reads, leaked bytes, and
samples the controller's RSS and descriptors.

    python bench/soak.py [--minutes 10] [--producers 3] [--consumers 3] [--out results.json]

Producers put objects of 4 KB to 2 MB whose bytes follow from a seed; consumers get them,
check every byte against the seed, and delete them. Every ``--kill-every`` seconds one
producer is killed (SIGKILL) and another started; every ``--redis-every`` seconds Redis is
restarted (empty: it keeps no data) and every ``--controller-every`` seconds the controller
(SIGTERM, then a new one on the same socket and node name: its objects are lost, as
designed). Errors a restart explains (ControllerUnavailableError, RedisUnavailableError,
ObjectLostError, an object that expired in the queue) are counted apart from the rest.
Objects live 15 s at most, so at the end, with every process gone and that time passed, the
controller must hold no lease, no pending object and no bytes.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import multiprocessing
import os
import platform
import random
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from faastube.local import LocalController, LocalRedis  # noqa: E402
from report import write_json  # noqa: E402

EXPECTED = ("ControllerUnavailableError", "ControllerBusyError", "RedisUnavailableError",
            "ObjectLostError", "UnknownObjectError", "ObjectDeletedError", "ObjectExpiredError")
# Objects live at most this long: what a killed producer put but never handed on is freed by
# it, so at the end nothing may be left once it has passed.
TTL_S = 15.0


def pattern(seed: int, nbytes: int):
    import numpy as np
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def producer(socket_path: str, queue, counts, stop) -> None:
    from faastube import errors, sdk
    sdk.connect(socket=socket_path, namespace="soak", spare_bytes=0)
    rng = random.Random(os.getpid())
    while not stop.is_set():
        seed, nbytes = rng.getrandbits(48), rng.choice((4096, 65536, 1 << 20, 2 << 20))
        try:
            ref = sdk.put(pattern(seed, nbytes), ttl=TTL_S)
            queue.put((ref, seed))
            counts["put"] += 1
        except errors.FaasTubeError as exc:
            counts[type(exc).__name__] += 1
            time.sleep(0.05)


def consumer(socket_path: str, queue, counts, stop) -> None:
    import queue as queues

    from faastube import errors, sdk
    sdk.connect(socket=socket_path, namespace="soak", spare_bytes=0)
    while not stop.is_set():
        try:
            ref, seed = queue.get(timeout=0.5)
        except queues.Empty:
            continue
        try:
            view = sdk.get(ref, timeout=5)
            if not (view == pattern(seed, view.size)).all():
                counts["corrupt"] += 1
            del view
            counts["get"] += 1
            sdk.delete(ref)
        except errors.FaasTubeError as exc:
            counts[type(exc).__name__] += 1


def sample(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return {"t": time.monotonic(), "pid": pid, "rss_kib": rss, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--producers", type=int, default=3)
    p.add_argument("--consumers", type=int, default=3)
    p.add_argument("--kill-every", type=float, default=5.0)
    p.add_argument("--redis-every", type=float, default=150.0)
    p.add_argument("--controller-every", type=float, default=200.0)
    p.add_argument("--out")
    args = p.parse_args(argv)
    context = multiprocessing.get_context("spawn")
    manager = context.Manager()
    with contextlib.ExitStack() as stack:
        redis_server = LocalRedis().start()
        stack.callback(lambda: redis_server.stop())
        controller = LocalController(redis_server.url, pool_limit="2GiB", slab_size="16MiB",
                                     node="soak-node", idle_minimum="0").start()
        stack.callback(lambda: controller.stop())
        stop = context.Event()
        # Through the manager: a producer killed in the middle of a put cannot leave the
        # queue half written (a pipe queue would be).
        queue = manager.Queue(maxsize=200)
        tallies = []

        def start(kind):
            tally = manager.dict(collections.Counter())
            tallies.append(tally)
            proc = context.Process(target=producer if kind == "producer" else consumer,
                                   args=(controller.socket, queue, _Tally(tally), stop), daemon=True)
            proc.start()
            return proc
        producers = [start("producer") for _ in range(args.producers)]
        consumers = [start("consumer") for _ in range(args.consumers)]
        began = time.monotonic()
        end = began + args.minutes * 60
        next_kill, next_redis, next_controller = (began + args.kill_every, began + args.redis_every,
                                                  began + args.controller_every)
        samples, kills, redis_restarts, controller_restarts = [sample(controller.process.pid)], 0, 0, 0
        next_sample = began + 10
        while time.monotonic() < end:
            time.sleep(0.2)
            now = time.monotonic()
            if now >= next_kill:
                victim = producers.pop(random.randrange(len(producers)))
                os.kill(victim.pid, signal.SIGKILL)
                victim.join(10)
                producers.append(start("producer"))
                kills, next_kill = kills + 1, now + args.kill_every
            if now >= next_redis:
                port = redis_server.port
                redis_server.stop()
                redis_server = LocalRedis(port=port).start()
                redis_restarts, next_redis = redis_restarts + 1, now + args.redis_every
            if now >= next_controller:
                controller.stop()
                controller.start()
                controller_restarts, next_controller = controller_restarts + 1, now + args.controller_every
            if now >= next_sample:              # progress, and the controller's footprint
                samples.append(sample(controller.process.pid))
                next_sample = now + 10
                print(f"{now - began:6.0f} s  puts {sum(t.get('put', 0) for t in tallies)}  gets "
                      f"{sum(t.get('get', 0) for t in tallies)}  corrupt "
                      f"{sum(t.get('corrupt', 0) for t in tallies)}  kills {kills}  restarts: redis "
                      f"{redis_restarts}, controller {controller_restarts}  controller RSS "
                      f"{samples[-1]['rss_kib']} KiB, {samples[-1]['fds']} descriptors", flush=True)
        stop.set()
        for proc in producers + consumers:
            proc.join(20)
            if proc.is_alive():
                proc.kill()
        totals = collections.Counter()
        for tally in tallies:
            totals.update(dict(tally))
        # Left: what the last producers put that nobody got (deleted now), nothing else.
        from faastube.client import Client
        from faastube.config import Config
        admin = Client(Config.from_env(socket=controller.socket, namespace="soak", spare_bytes=0))
        drained = 0
        while True:
            try:
                ref, _seed = queue.get(timeout=1)
            except Exception:
                break
            with contextlib.suppress(Exception):
                admin.delete(ref["id"])
                drained += 1
        admin.close()
        deadline = time.monotonic() + TTL_S + 15
        while True:
            status = controller.status()
            held = status["namespaces"].get("soak", {})
            leases, pending, used = held.get("leases", 0), held.get("pending", 0), held.get("bytes", 0)
            if (leases, pending, used) == (0, 0, 0) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        samples.append(sample(controller.process.pid))
    last = [s for s in samples if s["pid"] == samples[-1]["pid"]]
    result = {
        "machine": platform.node(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "minutes": args.minutes, "producers": args.producers, "consumers": args.consumers,
        "kills": kills, "redis_restarts": redis_restarts, "controller_restarts": controller_restarts,
        "operations": {"put": totals["put"], "get": totals["get"]}, "corrupt": totals["corrupt"],
        "expected_errors": {k: totals[k] for k in EXPECTED if totals[k]},
        "other_errors": {k: v for k, v in totals.items() if k not in ("put", "get", "corrupt", *EXPECTED)},
        "left_at_end": {"leases": leases, "pending": pending, "bytes": used, "drained_refs": drained},
        "samples": samples,
        "last_controller": {"rss_kib": (last[0]["rss_kib"], last[-1]["rss_kib"]),
                            "fds": (last[0]["fds"], last[-1]["fds"]), "seconds": last[-1]["t"] - last[0]["t"]},
    }
    print(f"== soak ({args.minutes:g} min, {args.producers} producers, {args.consumers} consumers)")
    print(f"operations: {totals['put']} puts, {totals['get']} checked gets; corrupt reads {totals['corrupt']}")
    print(f"faults: {kills} producers killed, Redis restarted {redis_restarts}×, controller {controller_restarts}×")
    print(f"errors a fault explains: {result['expected_errors']}; other errors: {result['other_errors']}")
    print(f"left at the end: {leases} leases, {pending} pending, {used} bytes")
    lc = result["last_controller"]
    print(f"last controller over {lc['seconds']:.0f} s: RSS {lc['rss_kib'][0]} → {lc['rss_kib'][1]} KiB, "
          f"descriptors {lc['fds'][0]} → {lc['fds'][1]}")
    out = write_json("soak", result, args.out)
    print(f"JSON: {out}")
    return 0 if totals["corrupt"] == 0 and not result["other_errors"] and (leases, pending, used) == (0, 0, 0) else 1


class _Tally:
    """A worker's own counters in a manager dict (each worker has its own: no lost updates)."""

    def __init__(self, shared):
        self.shared = shared

    def __getitem__(self, key):
        return self.shared.get(key, 0)

    def __setitem__(self, key, value):
        self.shared[key] = value


if __name__ == "__main__":
    sys.exit(main())
