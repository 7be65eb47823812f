#!/usr/bin/env python3
"""Crash soak: kill function processes with SIGKILL in the middle of their work, many times,
and report what the controller still holds afterwards.

    python bench/crash_soak.py [--kills 1000] [--parallel 25] [--out results.json]

Each victim connects, then (in turn) holds a view from ``get``, holds a half-written
``empty`` object, or puts an object and holds a view of it, reports that it is ready, and is
killed. Afterwards only the one long-lived object and the victims' sealed puts may remain;
no lease, pending object or client may. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import signal
import subprocess
import sys
import time

import numpy as np

import faastube
from faastube.local import LocalController, redis_for
from report import write_json

VICTIM = r"""
import json, sys
import numpy as np
import faastube
mode, ref = sys.argv[1], json.loads(sys.argv[2])
if mode == "hold":
    view = faastube.get(ref)
elif mode == "pending":
    out = faastube.empty(256 * 1024, "uint8")
    out[:1000] = 1
else:
    mine = faastube.put(np.ones(64 * 1024, np.uint8), scope="victims")
    view = faastube.get(mine)
print("ready", flush=True)
sys.stdin.read()
"""
MODES = ("hold", "pending", "put-hold")


def namespace(controller) -> dict:
    return controller.status()["namespaces"].get("soak", {})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=1000)
    parser.add_argument("--parallel", type=int, default=25)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        redis_url = redis_for(stack)
        controller = stack.enter_context(LocalController(redis_url, slab_size="16MiB"))
        env = {**controller.env, "FAASTUBE_NAMESPACE": "soak"}
        faastube.connect(socket=controller.socket, namespace="soak")
        ref = faastube.put(np.arange(100_000, dtype=np.int64))
        before = namespace(controller)
        started = time.monotonic()
        killed = 0
        while killed < args.kills:
            wave = []
            for i in range(min(args.parallel, args.kills - killed)):
                mode = MODES[(killed + i) % len(MODES)]
                wave.append(subprocess.Popen([sys.executable, "-c", VICTIM, mode, json.dumps(ref)],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env))
            for victim in wave:
                if victim.stdout.readline().strip() != b"ready":
                    raise SystemExit(f"a victim failed before it was ready (exit {victim.wait()})")
            for victim in wave:
                victim.send_signal(signal.SIGKILL)
            for victim in wave:
                victim.wait()
                victim.stdin.close()
                victim.stdout.close()
            killed += len(wave)
            print(f"\rkilled {killed}/{args.kills}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        elapsed = time.monotonic() - started
        deadline = time.monotonic() + 30
        while True:                       # the controller notices each exit asynchronously
            after = namespace(controller)
            settled = after["leases"] == 0 and after["pending"] == 0 and after["clients"] == 1
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        freed_by_scope = faastube.close_scope("victims")
        final = namespace(controller)
        faastube.sdk._client.close()
        pool = controller.status()["pools"][0]
    expected_used = before["used"]
    result = {
        "benchmark": "crash_soak", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "kills": args.kills, "parallel": args.parallel, "seconds": round(elapsed, 1),
        "after_kills": after, "sealed_puts_freed_by_scope": freed_by_scope, "final": final,
        "bytes_held_beyond_the_live_object": final["used"] - expected_used, "pool": pool,
    }
    out = write_json("crash_soak", result, args.out)
    ok = result["bytes_held_beyond_the_live_object"] == 0 and after["leases"] == 0 and after["pending"] == 0
    print(f"{'killed processes':<38}{args.kills:>10}  ({elapsed:.0f} s, {args.parallel} at a time)")
    print(f"{'leases held after the kills':<38}{after['leases']:>10}")
    print(f"{'pending objects after the kills':<38}{after['pending']:>10}")
    print(f"{'clients still connected (this one)':<38}{after['clients']:>10}")
    print(f"{'sealed puts of victims (scope closed)':<38}{freed_by_scope:>10}")
    print(f"{'bytes in use beyond the live object':<38}{result['bytes_held_beyond_the_live_object']:>10}")
    print(f"{'slabs / reserved bytes at the end':<38}{pool['slabs']:>10} / {pool['reserved']}")
    print(f"leak check: {'no leak' if ok else 'LEAK'}   full results: {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
