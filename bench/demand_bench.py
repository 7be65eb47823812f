#!/usr/bin/env python3
"""A put under rising demand (issue 19, benchmark a): a function that keeps one more 128 MB
object per activation, its put timed against a plain copy of the same bytes, with room kept
ahead of demand (Note [Reservation ahead of demand], controller/demand.py) and without it
(``--reserve-share 0``), in one run.

    python bench/demand_bench.py [--quick] [--gpu] [--out results.json]

Each mode starts its own controller (and a private redis-server unless FAASTUBE_REDIS is
set). An activation is ``faastube.sdk.activation(None, "rising")`` around one put of a
128 MB array (numpy on the host tier; with ``--gpu`` a CuPy array on GPU 0, so the put goes
to GPU 0's pool); activations come ``--interval`` seconds apart, as requests of a function
do. The plain copy is ``numpy.copyto`` (``cupy`` copy with ``--gpu``) of the same bytes into
memory allocated and touched once. Printed: the put's p50 and max over the activations after
the first (the demand is known from then on), its ratio to the plain copy, and the slabs
grown on a request's path after the first activation, with and without spare objects
(which make a repeated put's create ahead too). JSON: every activation's time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from faastube import protocol, sdk  # noqa: E402
from faastube.local import LocalController, redis_for  # noqa: E402
from report import elapsed, write_json  # noqa: E402

SIZE = 128 * 10**6
# (name, --reserve-share, spare objects). Spare objects (Note [Spare objects]) also make a
# repeated put's create ahead, for objects up to FAASTUBE_SPARE_BYTES: the modes without
# them show room kept ahead alone.
MODES = [("room ahead + spares", "0.5", True), ("spares only", "0", True),
         ("room ahead only", "0.5", False), ("neither", "0", False)]


def plain_copy_s(source, gpu: bool, repeat: int = 7) -> float:
    """Median seconds of one copy of ``source`` into memory allocated and touched once."""
    if gpu:
        import cupy
        target = cupy.empty_like(source)

        def copy():
            target[...] = source
            cupy.cuda.Device(0).synchronize()
    else:
        target = np.empty_like(source)
        target[...] = 0

        def copy():
            np.copyto(target, source)
    copy()
    return statistics.median(elapsed(copy) for _ in range(repeat))


def run_mode(name: str, reserve_share: str, spares: bool, activations: int, interval_s: float,
             gpu: bool) -> dict:
    with contextlib.ExitStack() as stack:
        redis_url = redis_for(stack)
        controller = stack.enter_context(LocalController(
            redis_url, pool_limit="16GiB", gpu_pool_limit="16GiB", reserve_share=reserve_share,
            gpus="auto" if gpu else "none"))
        sdk.connect(socket=controller.socket, namespace="bench", spare_bytes=None if spares else 0)
        if gpu:
            import cupy
            with cupy.cuda.Device(0):
                source = cupy.random.randint(0, 255, SIZE, dtype=cupy.uint8)
        else:
            source = np.random.default_rng(1).integers(0, 255, SIZE, dtype=np.uint8)
        copy_s = plain_copy_s(source, gpu)
        device = 1 if gpu else 0                # the pool the puts land in
        kept, times, grown = [], [], []
        for _n in range(activations):
            with sdk.activation(None, "rising"):
                started = time.perf_counter()
                kept.append(sdk.put(source))
                times.append(time.perf_counter() - started)
            time.sleep(interval_s)
            pool = controller.status()["pools"][device]
            grown.append(pool["grown"]["request"]["slabs"])
        for ref in kept:
            sdk.client().request(protocol.Delete(ref["id"]))
        sdk.client().close()
    later = times[1:]
    return {"mode": name, "reserve_share": reserve_share, "spares": spares, "copy_s": copy_s, "put_s": times,
            "put_p50_after_first_s": statistics.median(later), "put_max_after_first_s": max(later),
            "ratio_p50": statistics.median(later) / copy_s, "ratio_max": max(later) / copy_s,
            "grown_on_request_slabs": grown,
            "grown_on_request_after_first": grown[-1] - grown[0]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 activations instead of 12")
    parser.add_argument("--gpu", action="store_true", help="put CuPy arrays into GPU 0's pool")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between activations (0.5)")
    parser.add_argument("--size-mb", type=int, default=128, help="the object each activation keeps (128 MB)")
    parser.add_argument("--out", help="JSON output path")
    parser.add_argument("--mode", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    global SIZE
    SIZE = args.size_mb * 10**6
    activations = 6 if args.quick else 12
    if args.mode is None:
        print(f"a function keeping one more {SIZE // 10**6} MB object per activation, {activations} "
              f"activations {args.interval} s apart, {'GPU 0' if args.gpu else 'host tier'} …", file=sys.stderr)
    if args.mode is not None:                  # one mode, in a process of its own (below)
        name, share, spares = MODES[args.mode]
        print(json.dumps(run_mode(name, share, spares, activations, args.interval, args.gpu)))
        return 0
    # Each mode runs in a fresh process, so no mode pays for the memory an earlier one mapped.
    modes = []
    for index in range(len(MODES)):
        command = [sys.executable, os.path.abspath(__file__), "--mode", str(index), "--interval",
                   str(args.interval), "--size-mb", str(args.size_mb)]
        command += ["--quick"] * args.quick + ["--gpu"] * args.gpu
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
        modes.append(json.loads(done.stdout.strip().splitlines()[-1]))
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.node(), "cpus": os.cpu_count(), "gpu": args.gpu, "size": SIZE,
              "interval_s": args.interval, "activations": activations, "modes": modes,
              "target": "put ≤ 1.5× a plain copy once the demand was seen, no growth on the request path"}
    path = write_json("demand_bench", result, args.out)
    print(f"\n== put under rising demand ({'GPU 0' if args.gpu else 'host tier'}, {os.cpu_count()} cores, "
          f"{result['date']})")
    print(f"{'mode':<22}{'copy ms':>9}{'put p50 ms':>12}{'put max ms':>12}{'p50 / copy':>12}"
          f"{'max / copy':>12}{'grown on request after 1st':>28}")
    for m in modes:
        print(f"{m['mode']:<22}{m['copy_s'] * 1e3:>9.1f}{m['put_p50_after_first_s'] * 1e3:>12.1f}"
              f"{m['put_max_after_first_s'] * 1e3:>12.1f}{m['ratio_p50']:>11.2f}×{m['ratio_max']:>11.2f}×"
              f"{m['grown_on_request_after_first']:>28}")
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
