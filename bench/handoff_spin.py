#!/usr/bin/env python3
"""The 64 MB same-GPU hand-off of gpu_bench.py under the SDK's settings that shape it, in
rounds, each setting against the Redis-bytes and fresh-shm baselines of the same round: the
reply spin (``FAASTUBE_REPLY_SPIN_US``, in producer and consumer) and whether a GPU put waits
for its copy (``FAASTUBE_PUT_WAITS``, Note [Put seals when its copy lands]). The measurement
behind both defaults (faastube/config.py).

    python bench/handoff_spin.py [--spins 0,100,300] [--put-waits 1] [--rounds 2] [--runs 15]
                                 [--out results.json]

Prints a table (last) and writes JSON. Needs a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_bench  # noqa: E402
from report import write_json  # noqa: E402

MB = 1 << 20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spins", default="0,100,300", help="µs settings, comma-separated")
    parser.add_argument("--put-waits", default="1", help="FAASTUBE_PUT_WAITS settings, comma-separated (0, 1)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runs", type=int, default=15, help="hand-offs per setting and round")
    parser.add_argument("--out", help="JSON results file (default bench/results/handoff_spin-<time>.json)")
    args = parser.parse_args()
    spins = [float(s) for s in args.spins.split(",") if s]
    waits = [w.strip() == "1" for w in args.put_waits.split(",") if w.strip()]

    import faastube
    from faastube import cuda
    from faastube.local import LocalRedis
    rows = []
    with LocalRedis() as store:
        controller = gpu_bench.start_controller(store.url)
        try:
            for round_ in range(args.rounds):
                for spin in spins:
                    for put_waits in waits:
                        faastube.connect(socket=controller.socket, namespace="bench", reply_spin_us=spin,
                                         put_waits=put_waits)
                        consumer = gpu_bench.Consumer({**controller.env, "FAASTUBE_NAMESPACE": "bench",
                                                       "FAASTUBE_REPLY_SPIN_US": str(spin)})
                        try:
                            handoff = gpu_bench.handoffs(consumer, store.url, 64 * MB, args.runs)
                        finally:
                            consumer.close()
                        rows.append({"round": round_, "spin_us": spin, "put_waits": put_waits, **handoff})
                        print(f"round {round_} spin {spin:g} µs put_waits {int(put_waits)}: "
                              f"{handoff['faastube']['p50_ms']:.3f} ms", flush=True)
        finally:
            faastube.sdk.client().close()
            controller.stop()
    devices = cuda.devices()
    result = {"benchmark": "handoff_spin",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"gpus": [devices.name(i) for i in range(len(devices.uuids))], "cpus": os.cpu_count()},
              "runs": args.runs, "rows": rows}
    out = write_json("handoff_spin", result, args.out)
    print(f"\n== 64 MB hand-off by reply spin and put mode ({result['machine']['gpus'][0]}, "
          f"{os.cpu_count()} cores, {result['date']}; p50 of {args.runs} after a warm-up)")
    print(f"{'round':>5}{'spin µs':>9}{'put waits':>10}{'ours ms':>9}{'producer':>10}{'Redis ms':>10}"
          f"{'×Redis':>8}{'shm ms':>8}{'×shm':>6}  ok")
    for row in rows:
        ours = row["faastube"]["p50_ms"]
        waited = "yes" if row["put_waits"] else "no"
        print(f"{row['round']:>5}{row['spin_us']:>9g}{waited:>10}{ours:>9.3f}"
              f"{row['faastube']['producer_p50_ms']:>10.3f}{row['redis']['p50_ms']:>10.1f}"
              f"{row['redis']['p50_ms'] / ours:>8.0f}"
              f"{row['shm-fresh']['p50_ms']:>8.1f}{row['shm-fresh']['p50_ms'] / ours:>6.0f}  "
              f"{'yes' if all(h['correct'] for k, h in row.items() if isinstance(h, dict)) else 'NO'}")
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
