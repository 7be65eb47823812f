"""Prometheus metrics on ``--metrics-port`` (``GET /metrics``).

Gauges of pools, objects, leases and links are read from the object table when Prometheus
scrapes, so they cost nothing on the request path; the request path only counts requests
and files their latency in a histogram (one lock, a few dict updates per request).
"""

from __future__ import annotations

import bisect
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)

from .objects import Session

# Seconds: a get is ~0.1 ms; a copy of 1 GB over PCIe ~20 ms; a waiting get up to its timeout.
LATENCY_BUCKETS = (50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 25e-3, 50e-3,
                   0.1, 0.25, 1.0, 10.0)


class RequestStats:
    """Requests per op and outcome, a latency histogram per op, and one of the time gets
    spend copying: a get's time less its copy is the control around it (Note [Where a
    get's time goes], controller/handlers.py)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts: dict[tuple[str, str], int] = {}
        self.buckets: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}
        self.copy_buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.copy_sum = 0.0
        # Note [Bounded connections] (controller/server.py): connections served now, the
        # most that may be, and what was refused at a limit, by which.
        self.connections = 0
        self.connection_limit = 0
        self.refused: dict[str, int] = {}

    def count_refused(self, limit: str) -> int:
        """One request or connection refused at ``limit``; how many so far, all limits."""
        with self._lock:
            self.refused[limit] = self.refused.get(limit, 0) + 1
            return sum(self.refused.values())

    def observe(self, op: str, ok: bool, seconds: float) -> None:
        slot = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        with self._lock:
            key = (op, "ok" if ok else "error")
            self.counts[key] = self.counts.get(key, 0) + 1
            buckets = self.buckets.get(op)
            if buckets is None:
                buckets = self.buckets[op] = [0] * (len(LATENCY_BUCKETS) + 1)
            buckets[slot] += 1
            self.sums[op] = self.sums.get(op, 0.0) + seconds

    def observe_copy(self, seconds: float) -> None:
        """A get's copy to the device it asked for, from the move's start to its landing."""
        slot = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        with self._lock:
            self.copy_buckets[slot] += 1
            self.copy_sum += seconds

    def snapshot(self):
        """(counts by (op, outcome), latency buckets by op, seconds by op, copy buckets, copy seconds)."""
        with self._lock:
            return (dict(self.counts), {op: list(b) for op, b in self.buckets.items()}, dict(self.sums),
                    list(self.copy_buckets), self.copy_sum)

    def summary(self) -> dict:
        """For the admin's status: ``{"ops": {op: {"ok", "error", "seconds"}}, "get_copies":
        {"count", "seconds"}, "connections": {"open", "limit", "refused": {limit: count}}}``;
        seconds are summed, so two summaries' difference gives means."""
        counts, _buckets, sums, copy_buckets, copy_sum = self.snapshot()
        ops: dict[str, dict] = {}
        for (op, outcome), count in counts.items():
            ops.setdefault(op, {"ok": 0, "error": 0, "seconds": sums.get(op, 0.0)})[outcome] = count
        with self._lock:
            connections = {"open": self.connections, "limit": self.connection_limit,
                           "refused": dict(self.refused)}
        return {"ops": ops, "get_copies": {"count": sum(copy_buckets), "seconds": copy_sum},
                "connections": connections}


class ControllerCollector:
    """Reads the controller's state at scrape time."""

    def __init__(self, table, directory, transfers, stats: RequestStats):
        self.table, self.directory, self.transfers, self.stats = table, directory, transfers, stats
        self._admin = Session(0, 0, 0, admin=True)       # pid 0: no process to watch

    def collect(self):
        status = self.table.status(self._admin)
        pool_metrics = {
            "limit": GaugeMetricFamily("faastube_pool_limit_bytes", "Most bytes the pool may hold",
                                       labels=["device", "name"]),
            "reserved": GaugeMetricFamily("faastube_pool_reserved_bytes", "Bytes held in slabs",
                                          labels=["device", "name"]),
            "used": GaugeMetricFamily("faastube_pool_used_bytes", "Bytes objects occupy in slabs",
                                      labels=["device", "name"]),
            "slabs": GaugeMetricFamily("faastube_pool_slabs", "Live slabs", labels=["device", "name"]),
            "slabs_created": CounterMetricFamily("faastube_pool_slabs_created", "Slabs created",
                                                 labels=["device", "name"]),
            "slabs_retired": CounterMetricFamily("faastube_pool_slabs_retired", "Slabs released",
                                                 labels=["device", "name"]),
            "writers": GaugeMetricFamily("faastube_pool_writers", "Connections that write in slabs of "
                                         "their own (the host tier: Note [Slabs of one writer])",
                                         labels=["device", "name"]),
        }
        # Growth by path, and the room kept ahead (Note [Reservation ahead of demand]).
        grown = CounterMetricFamily("faastube_pool_grown_bytes", "Bytes of slabs grown, by path: "
                                    "ahead of demand, or on a request's path", labels=["device", "name", "path"])
        grown_slabs = CounterMetricFamily("faastube_pool_grown_slabs", "Slabs grown, by path",
                                          labels=["device", "name", "path"])
        ahead = GaugeMetricFamily("faastube_pool_ahead_wanted_bytes", "Bytes of room the pool keeps "
                                  "free ahead of the functions' demand", labels=["device", "name"])
        given_back = CounterMetricFamily("faastube_pool_given_back_bytes", "Bytes of empty slabs retired "
                                         "because the device's free memory fell under the watermark",
                                         labels=["device", "name"])
        # Objects moved off the tier and back, by kind (Note [Queue-aware eviction]).
        moved = CounterMetricFamily("faastube_pool_moved_bytes", "Bytes moved off the device tier "
                                    "(evict) or back (restore: on a get; ahead: before it)",
                                    labels=["device", "name", "kind"])
        moved_objects = CounterMetricFamily("faastube_pool_moved_objects", "Objects moved off the device "
                                            "tier or back, by kind", labels=["device", "name", "kind"])
        moved_seconds = CounterMetricFamily("faastube_pool_moved_seconds", "Seconds spent copying "
                                            "moved objects, by kind", labels=["device", "name", "kind"])
        evicted = GaugeMetricFamily("faastube_pool_evicted_bytes", "Bytes of this tier's objects on the "
                                    "host tier now", labels=["device", "name"])
        waits = CounterMetricFamily("faastube_pool_eviction_waits", "Puts and gets that waited for "
                                    "eviction to make room, by outcome", labels=["device", "name", "outcome"])
        for pool in status["pools"]:
            labels = [pool["device"], pool["name"]]
            for kind, entry in pool["moves"].items():
                moved.add_metric(labels + [kind], entry["bytes"])
                moved_objects.add_metric(labels + [kind], entry["objects"])
                moved_seconds.add_metric(labels + [kind], entry["seconds"])
            evicted.add_metric(labels, pool["evicted"]["bytes"])
            waits.add_metric(labels + ["room"], pool["waits"]["requests"] - pool["waits"]["failed"])
            waits.add_metric(labels + ["failed"], pool["waits"]["failed"])
            given_back.add_metric([pool["device"], pool["name"]], pool["given_back"]["bytes"])
            for key, family in pool_metrics.items():
                family.add_metric([pool["device"], pool["name"]], pool[key])
            for path, entry in pool["grown"].items():
                grown.add_metric([pool["device"], pool["name"], path], entry["bytes"])
                grown_slabs.add_metric([pool["device"], pool["name"], path], entry["slabs"])
            ahead.add_metric([pool["device"], pool["name"]], sum(pool["ahead_wanted"].values()))
        yield from pool_metrics.values()
        yield from (grown, grown_slabs, ahead, given_back, moved, moved_objects, moved_seconds, evicted, waits)

        per_namespace = {
            "objects": GaugeMetricFamily("faastube_objects", "Objects by state",
                                         labels=["namespace", "state"]),
            "object_bytes": GaugeMetricFamily("faastube_object_bytes", "Bytes of live objects",
                                              labels=["namespace"]),
            "leases": GaugeMetricFamily("faastube_leases", "Views functions hold",
                                        labels=["namespace"]),
            "freeing": GaugeMetricFamily("faastube_leases_freeing",
                                         "Leases on objects already freed", labels=["namespace"]),
            "waiting_gets": GaugeMetricFamily("faastube_waiting_gets",
                                              "Gets waiting for an object to be sealed",
                                              labels=["namespace"]),
            "clients": GaugeMetricFamily("faastube_clients", "Connected function processes",
                                         labels=["namespace"]),
        }
        for namespace, entry in sorted(status["namespaces"].items()):
            for state in ("pending", "sealed"):
                per_namespace["objects"].add_metric([namespace, state], entry[state])
            for key in ("object_bytes", "leases", "freeing", "waiting_gets", "clients"):
                per_namespace[key].add_metric([namespace], entry[key])
        yield from per_namespace.values()

        up = GaugeMetricFamily("faastube_redis_up", "1 while the Redis directory answers")
        up.add_metric([], 1.0 if self.directory.healthy else 0.0)
        yield up

        if self.transfers is not None:
            links = self.transfers.link_stats()
            for key, name, text in (("bytes", "faastube_link_bytes", "Bytes moved over a link"),
                                    ("transfers", "faastube_link_transfers", "Moves over a link"),
                                    ("busy_s", "faastube_link_busy_seconds", "Seconds a link was busy"),
                                    ("wait_s", "faastube_link_wait_seconds",
                                     "Seconds finished moves waited for their first chunk to go"),
                                    ("service_s", "faastube_link_service_seconds",
                                     "Seconds from a finished move's first chunk to its last")):
                family = CounterMetricFamily(name, text, labels=["link"])
                for link, values in sorted(links.items()):
                    family.add_metric([link], values[key])
                yield family
            queued = GaugeMetricFamily("faastube_link_queued", "Moves waiting or in flight on a link",
                                       labels=["link"])
            bandwidth = GaugeMetricFamily("faastube_link_bandwidth_bytes_per_second",
                                          "A link's bandwidth, measured at start (estimated until then)",
                                          labels=["link"])
            pieces = CounterMetricFamily("faastube_link_pump_pieces", "Copies a link's native pump put "
                                         "on the copy engine", labels=["link", "kind"])
            dry = CounterMetricFamily("faastube_link_pump_ran_dry", "Times a native pump's engine ran "
                                      "dry with work waiting (its lead then grows)", labels=["link"])
            lead = GaugeMetricFamily("faastube_link_pump_lead_seconds", "How long before a running "
                                     "copy ends a native pump puts on the next", labels=["link"])
            for link, values in sorted(links.items()):
                queued.add_metric([link], values["queued"])
                bandwidth.add_metric([link], values["bandwidth"])
                pump = values.get("pump")
                if pump:
                    express = pump["express_pieces"]
                    pieces.add_metric([link, "express"], express)
                    pieces.add_metric([link, "normal"], pump["pieces"] - express)
                    dry.add_metric([link], pump["idles"])
                    lead.add_metric([link], pump["lead_s"])
            yield queued
            yield bandwidth
            yield pieces
            yield dry
            yield lead

        counts, buckets, sums, copy_buckets, copy_sum = self.stats.snapshot()
        requests = CounterMetricFamily("faastube_requests", "Requests answered",
                                       labels=["op", "outcome"])
        for (op, outcome), count in sorted(counts.items()):
            requests.add_metric([op, outcome], count)
        yield requests
        latency = HistogramMetricFamily("faastube_request_seconds",
                                        "Time from reading a request to its reply being ready",
                                        labels=["op"])
        for op, counts_by_bucket in sorted(buckets.items()):
            latency.add_metric([op], _cumulative(counts_by_bucket), sums[op])
        yield latency
        copies = HistogramMetricFamily("faastube_get_copy_seconds",
                                       "Time gets spent copying an object to the device they "
                                       "asked for (only gets that copied)")
        copies.add_metric([], _cumulative(copy_buckets), copy_sum)
        yield copies
        summary = self.stats.summary()["connections"]
        open_now = GaugeMetricFamily("faastube_connections", "Client connections served now")
        open_now.add_metric([], summary["open"])
        yield open_now
        limit = GaugeMetricFamily("faastube_connection_limit", "Most connections served at once "
                                  "(--max-connections, fitted to the open-files limit)")
        limit.add_metric([], summary["limit"])
        yield limit
        refused = CounterMetricFamily("faastube_refused", "Connections and requests refused at a limit "
                                      "(ControllerBusyError)", labels=["limit"])
        for name, count in sorted(summary["refused"].items()):
            refused.add_metric([name], count)
        yield refused


def _cumulative(counts_by_bucket: list[int]) -> list[tuple[str, int]]:
    """Prometheus' cumulative (upper bound, count) pairs of one histogram's buckets."""
    cumulative, total = [], 0
    for bound, count in zip((*map(str, LATENCY_BUCKETS), "+Inf"), counts_by_bucket):
        total += count
        cumulative.append((bound, total))
    return cumulative


#: HTTP requests served at once on the metrics port; more are closed unanswered. A request
#: must arrive within HTTP_TIMEOUT_S: slow clients cannot hold the port (Note [Bounded
#: connections], controller/server.py, for the socket).
HTTP_CONNECTIONS = 16
HTTP_TIMEOUT_S = 5.0


class _HttpHandler(BaseHTTPRequestHandler):
    """/metrics (Prometheus), /healthz (liveness: the controller serves and its housekeeping
    runs) and /readyz (readiness: also Redis up), for probes: Note [Health endpoints]."""
    timeout = HTTP_TIMEOUT_S
    server_version = "faastube-controller"

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._answer(200, generate_latest(self.server.registry), CONTENT_TYPE_LATEST)
        elif path in ("/healthz", "/readyz"):
            health = self.server.health()
            ok = health["live"] if path == "/healthz" else health["ready"]
            self._answer(200 if ok else 503, json.dumps(health).encode(), "application/json")
        else:
            self._answer(404, b'{"error": "not found: /metrics, /healthz or /readyz"}', "application/json")

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass                          # probes every few seconds would fill the log


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, port: int, registry, health):
        super().__init__(("0.0.0.0", port), _HttpHandler)
        self.registry = registry
        self.health = health
        self._slots = threading.BoundedSemaphore(HTTP_CONNECTIONS)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)            # at the limit: refuse this one
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()                     # e.g. no thread could be started
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def serve_metrics(port: int, table, directory, transfers, stats: RequestStats, health):
    """Start the HTTP server of /metrics, /healthz and /readyz on all interfaces, ``health``
    giving the probes' answer (Controller.health); returns the server (shutdown())."""
    registry = CollectorRegistry()
    registry.register(ControllerCollector(table, directory, transfers, stats))
    ProcessCollector(registry=registry)
    server = _HttpServer(port, registry, health)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
