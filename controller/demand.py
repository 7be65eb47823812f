"""What each function asks of the pool, learnt from its activations (policy only: the object
table's reserver acts on it, controller/objects.py).

Note [Reservation ahead of demand]: a put that finds no free room in its namespace's slabs
grows the pool on the put's own path: a new host slab is committed (and pinned, with GPUs) or
a GPU slab created, which costs far more than the copy (docs/benchmarks.md). A function
usually puts the same sizes on every activation, so the runtime reports each activation that
ends (piggybacked on a request it sends anyway, protocol.Activity: the function, how long it
ran, the sizes it put per device) and the controller keeps, per function: when its
activations started and ended, the sizes of its largest recent activation per device, its
window (the 99th percentile of the intervals between its activations' starts; a default
until it has two) and its concurrency (the most of its activations that overlapped). While a
function's last activation ended within its window, each device's pool keeps free room in
the namespace's slabs for its sizes × its concurrency, grown by a thread of the controller,
off every request's path, and never more than the reserve share of the pool's limit per
namespace. Once no activation came within the window, that room is no longer kept and its
empty slabs go as idle slabs do (``--idle-release``), except the idle minimum each pool keeps
(``--idle-minimum``). A put that still grows the pool is counted (``grown`` by path, in the
status and on /metrics).
"""

from __future__ import annotations

import collections
import dataclasses
import math

from .eviction import DemandView

# What a client can make the controller keep is bounded: functions followed, activations and
# sizes kept per function, and the sizes room is kept for per namespace and device.
ACTIVATIONS_KEPT = 64          # per function: the window and the concurrency come from these
FUNCTIONS_KEPT = 1024          # functions followed at once; the least recently active go first
SIZES_KEPT = 16                # per activation and device, the largest
WANTED_KEPT = 256              # sizes room is kept for per namespace and device, the largest
WINDOW_MIN_S, WINDOW_MAX_S = 0.5, 3600.0


@dataclasses.dataclass
class FunctionDemand:
    """One function's recent activations (times are the controller's monotonic clock)."""
    namespace: str
    function: str
    spans: collections.deque = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=ACTIVATIONS_KEPT))   # (start, end)
    recent_sizes: collections.deque = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=4))   # {device: sizes} per activation
    activations: int = 0

    # The window and the concurrency sort every kept span: computed once per change of
    # ``spans`` (record), not on every read, since the reserver and eviction read them for
    # every function on every step (they were most of the controller's CPU per request).
    _window: float | None = dataclasses.field(default=None, repr=False, compare=False)
    _concurrency: int | None = dataclasses.field(default=None, repr=False, compare=False)

    def add_span(self, start: float, end: float) -> None:
        self.spans.append((start, end))
        self._window = self._concurrency = None

    def window_s(self, default_s: float) -> float:
        """The 99th percentile of the intervals between starts, within sane bounds (``default_s``
        until there are two)."""
        if self._window is None:
            starts = sorted(start for start, _end in self.spans)
            intervals = sorted(b - a for a, b in zip(starts, starts[1:]))
            if not intervals:
                return default_s
            p99 = intervals[min(len(intervals) - 1, math.ceil(0.99 * len(intervals)) - 1)]
            self._window = min(max(p99 * 1.5, WINDOW_MIN_S), WINDOW_MAX_S)   # a margin: the next may come a bit late
        return self._window

    def concurrency(self) -> int:
        """The most of the kept activations that ran at once."""
        if self._concurrency is None:
            events = sorted([(start, 1) for start, _ in self.spans] + [(end, -1) for _, end in self.spans],
                            key=lambda e: (e[0], e[1]))
            running = most = 0
            for _time, step in events:
                running += step
                most = max(most, running)
            self._concurrency = max(most, 1)
        return self._concurrency

    def sizes(self) -> dict[str, list[int]]:
        """Per device, the sizes of the recent activation that put the most bytes there."""
        best: dict[str, list[int]] = {}
        for sizes in self.recent_sizes:
            for device, counts in sizes.items():
                if sum(counts) > sum(best.get(device, ())):
                    best[device] = list(counts)
        return best

    def last_end(self) -> float:
        return self.spans[-1][1] if self.spans else -math.inf


class DemandTracker:
    """Every function's demand, the room it asks each namespace and device to keep, and which
    function gets what another puts (Note [Queue-aware eviction], controller/eviction.py)."""

    def __init__(self, default_window_s: float):
        self.default_window_s = default_window_s
        self._functions: collections.OrderedDict[tuple[str, str], FunctionDemand] = collections.OrderedDict()
        self._consumers: collections.OrderedDict[tuple[str, str], str] = collections.OrderedDict()

    def learn(self, namespace: str, producer: str, consumer: str) -> bool:
        """A get by ``consumer`` of an object ``producer`` put (the latest consumer wins);
        whether that is news."""
        key = (namespace, producer)
        news = self._consumers.get(key) != consumer
        self._consumers[key] = consumer
        self._consumers.move_to_end(key)
        while len(self._consumers) > FUNCTIONS_KEPT:
            self._consumers.popitem(last=False)
        return news

    def view(self, now: float) -> DemandView:
        """What eviction reads: who consumes what, and each active function's pace (its
        activations' mean run time over their concurrency) and concurrency."""
        pace, active = {}, {}
        for key, demand in self._functions.items():
            if not demand.spans:
                continue
            times = demand.concurrency()
            mean = sum(end - start for start, end in demand.spans) / len(demand.spans)
            pace[key] = max(mean, 1e-3) / times
            if now - demand.last_end() <= demand.window_s(self.default_window_s):
                active[key] = times
        return DemandView(dict(self._consumers), pace, active)

    def record(self, namespace: str, activities, now: float, devices=None) -> None:
        """Activations that ended just now in a process of ``namespace`` (protocol.Activity);
        ``devices``: the only devices whose sizes are kept (this node's pools)."""
        for activity in activities:
            key = (namespace, activity.function)
            demand = self._functions.get(key)
            if demand is None:
                demand = self._functions[key] = FunctionDemand(namespace, activity.function)
                while len(self._functions) > FUNCTIONS_KEPT:
                    self._functions.popitem(last=False)
            else:
                self._functions.move_to_end(key)
            demand.add_span(now - activity.seconds, now)
            demand.recent_sizes.append({device: tuple(sorted(sizes, reverse=True)[:SIZES_KEPT])
                                        for device, sizes in activity.sizes.items()
                                        if devices is None or device in devices})
            demand.activations += 1

    def wanted(self, now: float) -> dict[tuple[str, str], list[int]]:
        """(namespace, device) → the object sizes to keep free room for, largest first."""
        wanted: dict[tuple[str, str], list[int]] = {}
        for demand in self._functions.values():
            if now - demand.last_end() > demand.window_s(self.default_window_s):
                continue
            times = demand.concurrency()
            for device, sizes in demand.sizes().items():
                wanted.setdefault((demand.namespace, device), []).extend(sizes * times)
        for sizes in wanted.values():
            sizes.sort(reverse=True)
            del sizes[WANTED_KEPT:]
        return wanted

    def summary(self, now: float, most: int = 100) -> list[dict]:
        """The most recently active functions' demand, for the status."""
        out = []
        for demand in list(reversed(self._functions.values()))[:most]:
            window = demand.window_s(self.default_window_s)
            out.append({"namespace": demand.namespace, "function": demand.function,
                        "activations": demand.activations, "window_s": window,
                        "concurrency": demand.concurrency(),
                        "bytes": {device: sum(sizes) for device, sizes in demand.sizes().items()},
                        "idle_s": now - demand.last_end(),
                        "consumer": self._consumers.get((demand.namespace, demand.function)),
                        "reserving": now - demand.last_end() <= window})
        return out


def fit(holes: list[int], sizes: list[int], align) -> tuple[list[int], list[int], list[int]]:
    """First fit, largest first: which holes (by index) the sizes take, the sizes that fit
    in none (the pool must grow for them), and what is left of each hole."""
    free = list(holes)
    used, missing = set(), []
    for size in sorted(sizes, reverse=True):
        need = align(max(size, 1))
        for index, hole in enumerate(free):
            if hole >= need:
                free[index] -= need
                used.add(index)
                break
        else:
            missing.append(size)
    return sorted(used), missing, free
