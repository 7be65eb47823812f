#!/usr/bin/env python3
"""The transfer engine's links on the GPU machine (issue 5), all in one run:

1. large-move efficiency: a 1 GB move through a link (chunked, a batch or two queued) against
   one plain ``cuMemcpyAsync`` of 1 GB on a stream, the same run;
2. a 1 MB move alone, and issued while 1 GB moves run back to back on the same link: p50/p99,
   against the same 1 MB copy on a second stream during a 1 GB copy without any scheduler
   (what gpu-facts.md measured as 17 ms);

for host→GPU 0 over PCIe (and GPU 0→host, engine defaults only) and, with two GPUs, GPU 0→GPU 1
over NVLink, for several chunk / batch / depth settings (the engine's defaults are marked);

3. with two GPUs, multi-path: 1 GB host→GPU 0 and GPU 0→host through the controller's own
   transfer engine (its measured topology, every route at once) against one plain 1 GB
   ``cuMemcpyAsync`` over the GPU's own link and the engine's single chunked link, with the
   bytes checked after a round trip;
4. SLO sharing on one link (host→GPU 0): a "tight" workflow moving 32 MB every 10 ms with an
   SLO of twice its time alone, while a "bulk" workflow moves 256 MB back to back; the tight
   one's SLO attainment and the bulk one's throughput, with SLOs and without (fair sharing).

    python bench/transfer_bench.py [--quick] [--out results.json]

Prints a table (last) and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from report import elapsed, percentile, timed, write_json  # noqa: E402

MB, GB = 1 << 20, 1 << 30


def copy_once(queue, dst, src, nbytes) -> None:
    """One plain cuMemcpyAsync on ``queue``'s stream, waited for."""
    queue.wait(queue.issue([(dst, src, nbytes)]))


def small_spaced(move_small, samples: int) -> list[float]:
    """Latency of ``move_small`` issued every ~2 ms with nothing else on the link: the same
    cadence as :func:`small_during_big`, so the two differ only by the large moves (back to
    back, a move finds caches and the CPU warm; after 2 ms asleep it does not)."""
    times = []
    for _ in range(samples):
        times.append(elapsed(move_small))
        time.sleep(0.002)
    return times


def small_during_big(move_big, move_small, samples: int) -> list[float]:
    """Latency of ``move_small`` issued every ~2 ms while ``move_big`` runs back to back."""
    stop = threading.Event()

    def run_big():
        while not stop.is_set():
            move_big()

    runner = threading.Thread(target=run_big)
    runner.start()
    time.sleep(0.05)                                   # the large moves are under way
    try:
        return small_spaced(move_small, samples)
    finally:
        stop.set()
        runner.join()


def traced_during(link, pump, dst_big, src_big, dst_small, src_small, samples: int) -> dict:
    """Where each small move's time goes during the large ones, one move at a time (a second
    pass, so the pump's counters read around each move stay out of the untraced figures):
    queued in the pump, from going on the copy engine to the pump seeing it done, and the
    rest, outside the pump (the caller's Python, the GIL, waking up). Reported for the
    median move and for the slowest 1%."""
    traces = []

    def traced():
        before = pump.stats()
        started = time.perf_counter()
        link.move(dst_small, src_small, MB)
        total = time.perf_counter() - started
        after = pump.stats()
        pieces = after["express_pieces"] - before["express_pieces"]
        queued = after["express_queued_s"] - before["express_queued_s"]
        copy = after["express_copy_s"] - before["express_copy_s"]
        traces.append({"total_us": total * 1e6, "express": pieces == 1, "queued_us": queued * 1e6,
                       "engine_us": copy * 1e6, "outside_us": (total - queued - copy) * 1e6})

    small_during_big(lambda: link.move(dst_big, src_big, GB), traced, samples)
    ordered = sorted(traces, key=lambda t: t["total_us"])
    tail = ordered[min(len(ordered) - 1, int(0.99 * len(ordered))):]

    def mean(rows, key):
        return statistics.fmean(r[key] for r in rows)
    middle = ordered[len(ordered) // 2]
    return {"samples": len(traces), "not_express": sum(not t["express"] for t in traces),
            "median": {k: middle[k] for k in ("total_us", "queued_us", "engine_us", "outside_us")},
            "slowest_1pct": {k: mean(tail, k) for k in ("total_us", "queued_us", "engine_us", "outside_us")},
            "slowest": ordered[-3:]}


def make_copier(kind: str, ordinal: int, bandwidth: float, chunk: int, split: int):
    """The link's copier: the native pump (Note [The native pump]) or copies issued from Python."""
    from controller.gpu import CopyQueue
    from controller.pump import Pump
    if kind == "pump":
        return Pump.on_gpu(ordinal, bandwidth, piece_bytes=chunk, split_bytes=split)
    return CopyQueue(ordinal)


def measure_path(name, dst_big, src_big, dst_small, src_small, ordinal, bandwidth, configs, quick):
    from controller.gpu import CopyQueue
    from controller.links import Link
    repeat = 3 if quick else 5
    samples = 100 if quick else 300
    raw_queue, other_queue = CopyQueue(ordinal), CopyQueue(ordinal)
    raw = timed(lambda: copy_once(raw_queue, dst_big, src_big, GB), repeat)
    alone = [elapsed(lambda: copy_once(raw_queue, dst_small, src_small, MB)) for _ in range(samples)]
    # Without a scheduler: the 1 MB copy on its own stream while a 1 GB copy runs on another.
    unscheduled = small_during_big(lambda: copy_once(raw_queue, dst_big, src_big, GB),
                                   lambda: copy_once(other_queue, dst_small, src_small, MB),
                                   max(10, samples // 5))
    result = {"path": name, "raw_1GB_GBps": GB / raw / 1e9,
              "raw_1MB_p50_us": statistics.median(alone) * 1e6,
              "unscheduled_1MB_during_p50_us": statistics.median(unscheduled) * 1e6,
              "unscheduled_1MB_during_p99_us": percentile(unscheduled, 0.99) * 1e6, "configs": []}
    print(f"{name}: raw 1 GB {result['raw_1GB_GBps']:.1f} GB/s", flush=True)
    for chunk, batch, depth, kind, split, default in configs:
        print(f"  {kind}: chunk {chunk / MB:g} MiB, batch {batch}, depth {depth}, split {split / MB:g} MiB …",
              flush=True)
        copier = make_copier(kind, ordinal, bandwidth, chunk, split)
        link = Link(name, copier, bandwidth, chunk, batch, depth)
        big = timed(lambda: link.move(dst_big, src_big, GB), repeat)
        small_alone = [elapsed(lambda: link.move(dst_small, src_small, MB)) for _ in range(samples)]
        spaced = small_spaced(lambda: link.move(dst_small, src_small, MB), samples)
        before = copier.stats() if kind == "pump" else None
        during = small_during_big(lambda: link.move(dst_big, src_big, GB),
                                  lambda: link.move(dst_small, src_small, MB), samples)
        pumped = None
        if kind == "pump":        # where the small moves' time went inside the pump, during the big ones
            after = copier.stats()
            express = max(1, after["express_pieces"] - before["express_pieces"])
            pumped = {"express_queued_us": (after["express_queued_s"] - before["express_queued_s"]) / express * 1e6,
                      "express_copy_us": (after["express_copy_s"] - before["express_copy_s"]) / express * 1e6,
                      "idles": after["idles"], "lead_us": after["lead_s"] * 1e6,
                      "learnt_GBps": after["learnt_bandwidth"] / 1e9,
                      "traced": traced_during(link, copier, dst_big, src_big, dst_small, src_small, samples)}
            copier.close()
        result["configs"].append({
            "pump": pumped,
            "chunk_MB": chunk / MB, "batch": batch, "depth": depth, "default": default,
            "copier": kind, "split_MB": split / MB if kind == "pump" else None,
            "big_GBps": GB / big / 1e9, "big_share_of_raw": raw / big,
            "small_alone_p50_us": statistics.median(small_alone) * 1e6,
            "small_alone_p99_us": percentile(small_alone, 0.99) * 1e6,
            "small_during_p50_us": statistics.median(during) * 1e6,
            "small_during_p99_us": percentile(during, 0.99) * 1e6,
            "during_p99_over_alone_p50": percentile(during, 0.99) / statistics.median(small_alone),
            "small_spaced_p50_us": statistics.median(spaced) * 1e6,
            "small_spaced_p99_us": percentile(spaced, 0.99) * 1e6,
            "during_p99_over_spaced_p50": percentile(during, 0.99) / statistics.median(spaced)})
    return result


def multipath(engine, devices, quick: bool) -> dict:
    """Section 3: 1 GB each way between the host and GPU 0 over every route at once."""
    import ctypes

    import numpy as np

    from controller.gpu import CopyQueue
    from controller.slabs import CudaSlab, MemfdSlab
    from controller.topology import HOST
    gpu = devices.uuids[0]
    repeat = 3 if quick else 5
    host, back = MemfdSlab("bench", GB, pin=True), MemfdSlab("bench", GB, pin=True)
    device = CudaSlab("bench", GB, 0, gpu)
    try:
        data = np.ctypeslib.as_array((ctypes.c_uint8 * GB).from_address(host.address))
        data[:] = np.random.default_rng(5).integers(0, 256, GB, dtype=np.uint8)
        raw_queue = CopyQueue(0)
        result = {"routes": {f"{a}→{b}": [{"hops": list(p.hops), "GBps": p.GBps} for p in paths]
                             for (a, b), paths in engine.routes.items() if gpu in (a, b)}}
        for name, src, dst, start, end in (("host→GPU 0", host.address, device.address, HOST, gpu),
                                           ("GPU 0→host", device.address, back.address, gpu, HOST)):
            raw = timed(lambda: copy_once(raw_queue, dst, src, GB), repeat)
            link = engine.link((start, end))
            chunked = timed(lambda: link.move(dst, src, GB), repeat)
            multi = timed(lambda: engine.move_bytes(start, src, end, dst, GB), repeat)
            result[name] = {"raw_GBps": GB / raw / 1e9, "single_link_GBps": GB / chunked / 1e9,
                            "multipath_GBps": GB / multi / 1e9, "multipath_over_raw": raw / multi,
                            "paths": len(engine.routes.get((start, end), [])) or 1}
        back_bytes = np.ctypeslib.as_array((ctypes.c_uint8 * GB).from_address(back.address))
        result["round_trip_intact"] = bool(np.array_equal(data, back_bytes))
        del data, back_bytes
        return result
    finally:
        host.close()
        back.close()
        device.close()


def slo_sharing(engine, devices, quick: bool) -> dict:
    """Section 4: two workflows on host→GPU 0, with and without SLOs."""
    from controller.slabs import CudaSlab, MemfdSlab
    from controller.topology import HOST
    gpu = devices.uuids[0]
    link = engine.link((HOST, gpu))
    tight_bytes, bulk_bytes, period = 32 * MB, 256 * MB, 0.010
    rounds = 60 if quick else 200
    host = MemfdSlab("bench", bulk_bytes + tight_bytes, pin=True)
    device = CudaSlab("bench", bulk_bytes + tight_bytes, 0, gpu)
    try:
        def move_tight(slo_s=None):
            link.move(device.address + bulk_bytes, host.address + bulk_bytes, tight_bytes, slo_s)

        alone = [elapsed(move_tight) for _ in range(20)]
        slo_s = 2 * statistics.median(alone)
        result = {"tight_MB": tight_bytes / MB, "bulk_MB": bulk_bytes / MB, "period_ms": period * 1e3,
                  "tight_alone_p50_ms": statistics.median(alone) * 1e3, "slo_ms": slo_s * 1e3}
        for mode in ("fair", "slo"):
            stop = threading.Event()
            moved = [0]

            def bulk():
                while not stop.is_set():
                    link.move(device.address, host.address, bulk_bytes)
                    moved[0] += bulk_bytes

            runner = threading.Thread(target=bulk)
            runner.start()
            time.sleep(0.05)
            times = []
            started = time.perf_counter()
            try:
                for _ in range(rounds):
                    times.append(elapsed(lambda: move_tight(slo_s if mode == "slo" else None)))
                    time.sleep(max(0.0, period - times[-1]))
            finally:
                wall = time.perf_counter() - started
                stop.set()
                runner.join()
            result[mode] = {"attainment": sum(t <= slo_s for t in times) / len(times),
                            "tight_p50_ms": statistics.median(times) * 1e3,
                            "tight_p99_ms": percentile(times, 0.99) * 1e3,
                            "bulk_GBps": moved[0] / wall / 1e9}
        return result
    finally:
        host.close()
        device.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer settings and samples")
    parser.add_argument("--out", help="JSON results file (default bench/results/transfer_bench-<time>.json)")
    args = parser.parse_args()

    import cupy

    from controller.links import DEFAULT_BATCH_CHUNKS, DEFAULT_DEPTH, PUMP_BATCH_CHUNKS, PUMP_DEPTH
    from controller.transfer import NVLINK_BYTES_PER_S, PCIE_BYTES_PER_S
    from faastube.config import DEFAULT_CHUNK_BYTES
    from faastube import cuda

    devices = cuda.devices()
    gpus = len(devices.uuids)
    peer_factor = round(NVLINK_BYTES_PER_S / PCIE_BYTES_PER_S)
    # (chunk, batch, depth, copier, split, engine default): the pump as the engine runs it, and
    # the links as they were before it (copies issued from Python), side by side.
    pcie, nvlink = DEFAULT_CHUNK_BYTES, DEFAULT_CHUNK_BYTES * peer_factor
    pcie_configs = [(pcie, PUMP_BATCH_CHUNKS, PUMP_DEPTH, "pump", pcie // 4, True),
                    (pcie, DEFAULT_BATCH_CHUNKS, DEFAULT_DEPTH, "python", 0, False),
                    # fewer leader wake-ups, each one a GIL turn a small move may wait for
                    (pcie, 2 * PUMP_BATCH_CHUNKS, PUMP_DEPTH, "pump", pcie // 4, False)]
    nvlink_configs = [(nvlink, PUMP_BATCH_CHUNKS, PUMP_DEPTH, "pump", nvlink // 4, True),
                      (nvlink, DEFAULT_BATCH_CHUNKS, DEFAULT_DEPTH, "python", 0, False)]
    if not args.quick:
        pcie_configs += [(pcie, PUMP_BATCH_CHUNKS, PUMP_DEPTH, "pump", pcie // 2, False),
                         (pcie, PUMP_BATCH_CHUNKS, PUMP_DEPTH, "pump", 0, False),
                         (pcie, 1, 3, "pump", pcie // 4, False),
                         (2 * MB, 1, 2, "python", 0, False), (8 * MB, 1, 2, "python", 0, False)]
        nvlink_configs += [(nvlink, PUMP_BATCH_CHUNKS, PUMP_DEPTH, "pump", nvlink // 2, False),
                           (16 * MB, 1, 2, "python", 0, False), (64 * MB, 1, 2, "python", 0, False)]

    host_big = cupy.cuda.alloc_pinned_memory(GB)
    host_small = cupy.cuda.alloc_pinned_memory(MB)
    with cupy.cuda.Device(0):
        gpu0_big = cupy.zeros(GB, cupy.uint8)
        gpu0_small = cupy.zeros(MB, cupy.uint8)
    print(f"{gpus} GPU(s): {', '.join(devices.name(i) for i in range(gpus))}", flush=True)
    paths = [measure_path("host→GPU 0 (PCIe)", gpu0_big.data.ptr, host_big.ptr, gpu0_small.data.ptr,
                          host_small.ptr, 0, PCIE_BYTES_PER_S, pcie_configs, args.quick)]
    paths.append(measure_path("GPU 0→host (PCIe)", host_big.ptr, gpu0_big.data.ptr, host_small.ptr,
                              gpu0_small.data.ptr, 0, PCIE_BYTES_PER_S, pcie_configs[:1], args.quick))
    if gpus > 1:
        with cupy.cuda.Device(1):
            gpu1_big = cupy.zeros(GB, cupy.uint8)
            gpu1_small = cupy.zeros(MB, cupy.uint8)
            cupy.cuda.runtime.deviceEnablePeerAccess(0)
        with cupy.cuda.Device(0):
            cupy.cuda.runtime.deviceEnablePeerAccess(1)
        paths.append(measure_path("GPU 0→GPU 1 (NVLink)", gpu1_big.data.ptr, gpu0_big.data.ptr,
                                  gpu1_small.data.ptr, gpu0_small.data.ptr, 1, NVLINK_BYTES_PER_S,
                                  nvlink_configs, args.quick))

    del host_big, host_small, gpu0_big, gpu0_small
    if gpus > 1:
        del gpu1_big, gpu1_small
    cupy.get_default_memory_pool().free_all_blocks()
    cupy.get_default_pinned_memory_pool().free_all_blocks()

    from controller.transfer import TransferEngine
    engine = TransferEngine(devices)         # measures its links and plans routes, as the controller does
    multi = multipath(engine, devices, args.quick) if gpus > 1 else None
    slo = slo_sharing(engine, devices, args.quick)
    engine.close()

    result = {"benchmark": "transfer_bench",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"gpus": [devices.name(i) for i in range(gpus)], "python": platform.python_version(),
                          "cupy": cupy.__version__, "cpus": os.cpu_count()},
              "paths": paths, "multipath": multi, "slo": slo,
              "measured_links_GBps": {name: rate / 1e9 for name, rate in engine.measured.items()},
              "topology_source": engine.topology_source,
              "targets": {"small_during_p99_over_alone": 3, "big_share_of_raw": 0.95,
                          "multipath_over_raw_h200": 1.6, "multipath_over_raw_h100": 1.5,
                          "tight_slo_attainment": 0.95}}
    out = write_json("transfer_bench", result, args.out)

    print(f"\n== transfer engine ({devices.name(0)} ×{gpus}, {result['date']})")
    print("big = one 1 GB move through a link vs one plain 1 GB cuMemcpyAsync (raw); small = a 1 MB "
          "move alone, and during back-to-back 1 GB moves on the same link; * = engine default")
    for path in paths:
        print(f"{path['path']}: raw 1 GB {path['raw_1GB_GBps']:.1f} GB/s, raw 1 MB p50 "
              f"{path['raw_1MB_p50_us']:.0f} µs; without a scheduler a 1 MB copy during a 1 GB copy: "
              f"p50 {path['unscheduled_1MB_during_p50_us']:.0f} µs, p99 {path['unscheduled_1MB_during_p99_us']:.0f} µs")
        print(f"  {'copier':>7}{'split':>6}{'chunk':>6}{'batch':>6}{'depth':>6}{'big GB/s':>10}{'share':>7}"
              f"{'1MB alone p50':>15}{'p99':>7}{'during p50':>12}{'p99':>8}{'p99/alone':>10}")
        for c in path["configs"]:
            split = f"{c['split_MB']:>5g}M" if c["split_MB"] else f"{'-':>6}"
            print(f"  {c['copier']:>7}{split}{c['chunk_MB']:>5.0f}M{c['batch']:>6}{c['depth']:>6}{c['big_GBps']:>10.1f}"
                  f"{c['big_share_of_raw']:>7.0%}{c['small_alone_p50_us']:>15.0f}{c['small_alone_p99_us']:>7.0f}"
                  f"{c['small_during_p50_us']:>12.0f}{c['small_during_p99_us']:>8.0f}"
                  f"{c['during_p99_over_alone_p50']:>9.1f}×{' *' if c['default'] else ''}")
            print(f"{'':>9}alone every 2 ms as during: p50 {c['small_spaced_p50_us']:.0f} µs, p99 "
                  f"{c['small_spaced_p99_us']:.0f} µs; during p99 / that p50 {c['during_p99_over_spaced_p50']:.1f}×")
            if c["pump"]:
                q = c["pump"]
                print(f"{'':>9}in the pump, mean per small move during: queued {q['express_queued_us']:.0f} µs, "
                      f"on the engine until seen {q['express_copy_us']:.0f} µs; lead {q['lead_us']:.0f} µs, "
                      f"ran dry {q['idles']}×, learnt {q['learnt_GBps']:.1f} GB/s")
                t = q["traced"]
                for label, part in (("median", t["median"]), ("slowest 1%", t["slowest_1pct"])):
                    print(f"{'':>9}traced ({t['samples']}, {t['not_express']} not express), {label}: "
                          f"{part['total_us']:.0f} µs = queued {part['queued_us']:.0f} + engine until seen "
                          f"{part['engine_us']:.0f} + outside the pump {part['outside_us']:.0f}")
    print(f"topology: {engine.topology_source}")
    if multi:
        for name in ("host→GPU 0", "GPU 0→host"):
            m = multi[name]
            print(f"multi-path 1 GB {name}: {m['multipath_GBps']:.1f} GB/s over {m['paths']} paths = "
                  f"{m['multipath_over_raw']:.2f}× one plain copy ({m['raw_GBps']:.1f} GB/s); engine's "
                  f"single link {m['single_link_GBps']:.1f} GB/s")
        print(f"multi-path round trip intact: {multi['round_trip_intact']}")
    print(f"SLO sharing on host→GPU 0: tight {slo['tight_MB']:.0f} MB every {slo['period_ms']:.0f} ms, SLO "
          f"{slo['slo_ms']:.2f} ms (2× its {slo['tight_alone_p50_ms']:.2f} ms alone), bulk {slo['bulk_MB']:.0f} MB "
          f"back to back")
    for mode in ("fair", "slo"):
        s = slo[mode]
        print(f"  {mode:>4}: tight attainment {s['attainment']:.0%}, p50 {s['tight_p50_ms']:.2f} ms, "
              f"p99 {s['tight_p99_ms']:.2f} ms; bulk {s['bulk_GBps']:.1f} GB/s")
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
