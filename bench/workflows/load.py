"""Open-loop load for the workflows: arrivals at a given mean rate, Poisson or bursty, each
request started at its arrival time whether or not earlier ones finished (a platform's
front door does not wait), latency counted from the arrival (so queueing counts).

Bursty arrivals follow the shape the Azure Functions traces show for busy functions: the
rate switches between a high phase (4× the mean for 20% of the time) and a low one, in
phases of a few seconds, with Poisson arrivals inside each phase (a two-state
Markov-modulated Poisson process with the given mean).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import random
import sys
import threading
import time

_BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _BENCH not in sys.path:
    sys.path.insert(0, _BENCH)
from report import percentile  # noqa: E402  (bench/report.py: what every benchmark shares)

BURST_FACTOR, BURST_SHARE, PHASE_S = 4.0, 0.2, 2.0


def arrivals(kind: str, rate: float, duration_s: float, seed: int = 1) -> list[float]:
    """Arrival offsets in seconds, mean ``rate`` per second, over ``duration_s``."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError("rate and duration must be positive")
    rng = random.Random(seed)
    out, now = [], 0.0
    if kind == "poisson":
        while True:
            now += rng.expovariate(rate)
            if now >= duration_s:
                return out
            out.append(now)
    if kind != "bursty":
        raise ValueError(f"arrivals are 'poisson' or 'bursty', not {kind!r}")
    low = rate * (1 - BURST_SHARE * BURST_FACTOR) / (1 - BURST_SHARE)
    high = rate * BURST_FACTOR
    phase_end = 0.0
    while now < duration_s:
        burst = rng.random() < BURST_SHARE
        phase_end = now + rng.expovariate(1 / PHASE_S)
        phase_rate = high if burst else low
        while True:
            now += rng.expovariate(phase_rate)
            if now >= min(phase_end, duration_s):
                now = min(phase_end, duration_s)
                break
            out.append(now)
    return out


@dataclasses.dataclass
class Outcome:
    arrival_s: float       # offset of its arrival
    latency_s: float       # completion minus arrival
    ok: bool
    run: object = None     # the driver's Run, when it succeeded


def open_loop(request, offsets: list[float], workers: int = 64, progress=None) -> list[Outcome]:
    """Start ``request(i)`` at each offset (seconds from now); returns one Outcome each,
    in arrival order. ``progress`` (a tqdm bar or None) is advanced per finished request."""
    outcomes: list[Outcome | None] = [None] * len(offsets)
    lock = threading.Lock()
    start = time.perf_counter()

    def one(i: int) -> None:
        try:
            run = request(i)
            ok = True
        except Exception as exc:                       # counted, reported, not fatal
            run, ok = exc, False
        finished = time.perf_counter() - start
        with lock:
            outcomes[i] = Outcome(offsets[i], finished - offsets[i], ok, run)
            if progress is not None:
                progress.update(1)

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for i, offset in enumerate(offsets):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(one, i)
    return outcomes


def closed_loop_rps(request, concurrency: int, rounds: int) -> float:
    """Requests per second served with ``concurrency`` requests always in flight: each of
    ``concurrency`` threads calls ``request(i)`` ``rounds`` times, the next as the last returns."""
    def worker(k: int) -> None:
        for i in range(rounds):
            request(k + i)
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    return concurrency * rounds / (time.perf_counter() - started)


def summary(outcomes: list[Outcome], warmup_s: float, duration_s: float, slo_s: float) -> dict:
    """Latency p50/p99, SLO attainment and goodput over the requests that arrived after
    the warm-up; failures count as missed SLOs."""
    measured = [o for o in outcomes if o.arrival_s >= warmup_s]
    ok = [o.latency_s for o in measured if o.ok]
    window = max(duration_s - warmup_s, 1e-9)
    return {"requests": len(measured), "failed": len(measured) - len(ok),
            "offered_rps": len(measured) / window,
            "p50_ms": percentile(ok, 0.5) * 1e3, "p99_ms": percentile(ok, 0.99) * 1e3,
            "slo_attainment": sum(latency <= slo_s for latency in ok) / max(1, len(measured)),
            "goodput_rps": sum(latency <= slo_s for latency in ok) / window}
