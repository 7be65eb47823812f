"""What every benchmark in bench/ shares: timing a call, and where its JSON goes."""

from __future__ import annotations

import json
import os
import statistics
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def write_json(name: str, result: dict, out: str | None = None) -> str:
    """Write ``result`` to ``out``, by default bench/results/<name>-<time>.json; returns the path."""
    out = out or os.path.join(RESULTS, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as file:
        json.dump(result, file, indent=2)
    return out


def percentile(values, q: float) -> float:
    """The nearest-rank ``q`` quantile of ``values`` (NaN when there are none)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def elapsed(fn) -> float:
    """Seconds one call of ``fn`` took."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def timed(fn, repeat: int) -> float:
    """Median seconds of ``fn`` after one warm-up."""
    fn()
    return statistics.median(elapsed(fn) for _ in range(repeat))
