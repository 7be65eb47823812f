"""The transfer engine: every byte the controller moves between devices goes through here
(host tier ↔ GPU over PCIe, GPU ↔ GPU over NVLink, and host ↔ GPU through peer GPUs).

Each direction of each path is a link (controller/links.py) with its own CUDA stream on the
GPU end of the move (the destination's when both are GPUs) and its own chunk scheduler
(controller/scheduler.py): moves are cut into chunks and queued a batch or two at a time, so
a small move that arrives during a large one waits for a batch, not for the large move.
Peer copies run between VMM mappings the controller made accessible to every peer GPU, over
NVLink; host slabs are pinned; so no staging copy is needed on a direct path.

Note [Chunk size per link]: every copy a link queues costs the GPU a few µs besides its bytes
(more for a peer copy over NVLink than on PCIe), and the thread that refills a link needs
tens of µs of Python per batch. So a chunk is sized by time, not bytes: ``--chunk-size``
(faastube.config.DEFAULT_CHUNK_BYTES) is the PCIe links' chunk, and a faster link's chunk is
that many times larger (NVLink: ``NVLINK_BYTES_PER_S / PCIE_BYTES_PER_S``). One chunk per batch, two batches
queued: a newly arrived move waits for at most two chunks' time (docs/benchmarks.md, the
transfer engine's table, has the sweep behind these numbers).

Note [Multi-path moves]: a host↔GPU move of at least ``multipath_min`` bytes is cut into one
contiguous share per path the topology plans (controller/topology.py: the GPU's own PCIe
link, and each NVLinked peer on another PCIe switch), sized by the paths' measured bandwidth,
and the shares travel at once, each as a move on its own link; the caller's thread drives
one, pooled threads the others. A route through a peer is a relay link whose copier stages
each chunk in a small ring on the peer GPU (controller.gpu.RelayQueue). Relay links move
chunks ``relay_factor`` times the PCIe chunk: with two links refilled by Python threads at
once, larger relay chunks came much nearer the rate of everything queued at once
(docs/benchmarks.md, the relay probe). Only large moves take relays, so no small move waits
on a relay link; but a relay link and the peer's own host link share that peer's PCIe wire
without knowing of each other: the peer's own small moves may wait behind a relay chunk as
well as behind their own link's.

GPU→GPU moves are planned the same way (topology.plan): the direct link where it is strong;
where the direct NVLink is weak, large moves add routes through intermediate GPUs, and where
it is missing, every move takes the best such route. Two GPUs with neither NVLink nor any
route reach each other directly if the driver grants peer access (PCIe), else through a
pinned ring in host memory: a relay link whose first hop runs down from the source GPU on a
stream of that GPU and whose second runs up into the target (controller.gpu.RelayQueue with
``source_ordinal``).

Note [Measured links]: at start the engine moves a probe buffer over every direct link and
every planned route, and keeps the best of a few runs as that link's bandwidth: it sizes
multi-path shares and the schedulers' SLO arithmetic, and ``faastube status`` shows it.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import logging
import threading
import time

from faastube import cuda
from faastube.config import DEFAULT_CHUNK_BYTES
from faastube.errors import InvalidArgumentError, PumpUnavailable

from .gpu import CopyQueue, RelayQueue
from .links import DEFAULT_BATCH_CHUNKS, DEFAULT_DEPTH, PUMP_BATCH_CHUNKS, PUMP_DEPTH, Link
from .pool import Region
from .pump import Pump
from .slabs import CudaSlab, MemfdSlab
from .topology import HOST, Path, Topology, discover, plan, report, shares

log = logging.getLogger("faastube.controller")

PCIE_BYTES_PER_S = 50e9          # estimates until measured, gpu-facts.md: pinned PCIe 5 ~55 GB/s
NVLINK_BYTES_PER_S = 400e9       # NVLink peer copy ~390 GB/s
MULTIPATH_MIN_BYTES = 32 << 20   # smaller moves take one path: a share would be a few chunks
RELAY_CHUNK_FACTOR = 4          # Note [Multi-path moves]: relays move big chunks
PROBE_BYTES = 64 << 20           # Note [Measured links]
PROBE_RUNS = 3


class TransferEngine:
    def __init__(self, devices, chunk_bytes: int = DEFAULT_CHUNK_BYTES, depth: int = DEFAULT_DEPTH,
                 multipath_min: int = MULTIPATH_MIN_BYTES, measure: bool = True,
                 relay_factor: int = RELAY_CHUNK_FACTOR, topology: Topology | None = None,
                 peer_access=None, pump: bool = True):
        """``topology`` and ``peer_access(source, target)`` stand in for what NVML and the
        driver report (tests force paths this node's links would never take)."""
        self.devices = devices
        self._peer_access = peer_access or self._can_access_peer
        self.chunk_bytes = chunk_bytes
        self.relay_factor = relay_factor
        self.depth = depth
        self.pump = pump
        self.multipath_min = multipath_min
        self._links: dict[str, Link] = {}
        self._making = threading.Lock()
        if topology is not None:
            self.topology, self.topology_source = topology, "given"
        else:
            self.topology, self.topology_source = discover(
                list(devices.uuids), PCIE_BYTES_PER_S / 1e9, NVLINK_BYTES_PER_S / 1e9)
        self.measured: dict[str, float] = {}      # link name → bytes/s (Note [Measured links])
        self.routes: dict[tuple[str, str], list[Path]] = {}
        self._helpers = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, 2 * len(devices.uuids)), thread_name_prefix="faastube-path")
        if measure:
            try:
                self.measure()
            except cuda.CudaError as exc:          # e.g. a GPU too full for the probe
                log.warning("could not measure the links (%s): estimates stand in", exc)
        self._plan()

    # -- links -------------------------------------------------------------------------

    def link(self, hops: tuple[str, ...]) -> Link:
        """The link along ``hops`` (devices: "host" or GPU UUIDs), made on first use. A
        direct link's copies run on its GPU end (the destination's when both are GPUs); a
        two-hop route's on the middle GPU, through its staging ring (Note [Chunk size per
        link] and Note [Multi-path moves] size their chunks)."""
        name = "→".join(hops)
        link = self._links.get(name)                  # made once; read without the lock
        if link is not None:
            return link
        with self._making:                            # streams and rings are made once per link
            link = self._links.get(name)
            if link is not None:
                return link
            bandwidth = self.measured.get(name) or (PCIE_BYTES_PER_S if HOST in hops else NVLINK_BYTES_PER_S)
            batch, depth = DEFAULT_BATCH_CHUNKS, self.depth
            if len(hops) == 3 and hops[1] == HOST:        # between GPUs that cannot reach each other
                chunk = self.chunk_bytes * self.relay_factor
                copier = RelayQueue(self.devices.ordinal(hops[2]), chunk, self.depth + 2,
                                         source_ordinal=self.devices.ordinal(hops[0]))
            elif len(hops) == 3:
                chunk = self.chunk_bytes * self.relay_factor
                copier = RelayQueue(self.devices.ordinal(hops[1]), chunk, self.depth + 2)
            elif len(hops) == 2:
                gpu_end = hops[1] if hops[1] != HOST else hops[0]
                chunk = self.chunk_bytes * (1 if HOST in hops else
                                            max(1, round(NVLINK_BYTES_PER_S / PCIE_BYTES_PER_S)))
                copier, batch, depth = self._direct_copier(self.devices.ordinal(gpu_end), bandwidth, chunk)
            else:
                raise ValueError(f"no link takes {len(hops) - 1} hops: {name}")
            link = self._links[name] = Link(name, copier, bandwidth, chunk, batch, depth)
            return link

    def _direct_copier(self, ordinal: int, bandwidth: float, chunk: int):
        """A direct link's copier, batch and depth: a native pump (Note [The native pump]),
        which puts chunks on the engine one at a time (quarter chunks while small moves are
        about), so its link hands it larger batches and wakes less often; else a copy queue
        driven from Python."""
        if self.pump:
            try:
                pump = Pump.on_gpu(ordinal, bandwidth, piece_bytes=chunk, split_bytes=chunk // 4)
                return pump, PUMP_BATCH_CHUNKS, PUMP_DEPTH
            except PumpUnavailable as exc:
                log.warning("the native pump is unavailable (%s): links issue copies from Python", exc)
                self.pump = False
        return CopyQueue(ordinal), DEFAULT_BATCH_CHUNKS, self.depth

    # -- moves -------------------------------------------------------------------------

    def move(self, src: Region, dst: Region, slo_s: float | None = None) -> None:
        """Copy ``src``'s bytes into ``dst``; returns once they have arrived."""
        if src.nbytes != dst.nbytes:
            raise ValueError(f"cannot move {src.nbytes} bytes into a region of {dst.nbytes}")
        self.move_bytes(src.slab.device, src.slab.address + src.offset,
                        dst.slab.device, dst.slab.address + dst.offset, src.nbytes, slo_s)

    def move_bytes(self, src_device: str, src: int, dst_device: str, dst: int, nbytes: int,
                   slo_s: float | None = None) -> None:
        """Copy ``nbytes`` from address ``src`` on ``src_device`` to ``dst`` on
        ``dst_device``, over several paths if it is large (Note [Multi-path moves])."""
        paths = self.routes.get((src_device, dst_device)) or [Path((src_device, dst_device), 0.0)]
        if len(paths) == 1 or nbytes < self.multipath_min:
            self.link(paths[0].hops).move(dst, src, nbytes, slo_s)
            return
        ranges = shares(nbytes, paths, self.chunk_bytes)
        try:
            jobs = [(self.link(path.hops), offset, length)
                    for path, (offset, length) in zip(paths, ranges) if length]
        except cuda.CudaError as exc:              # a relay's staging ring could not be made
            log.warning("multi-path %s→%s off (%s): one path from now on", src_device, dst_device, exc)
            self.routes[(src_device, dst_device)] = paths[:1]
            self.link(paths[0].hops).move(dst, src, nbytes, slo_s)
            return
        others = [self._helpers.submit(link.move, dst + offset, src + offset, length, slo_s)
                  for link, offset, length in jobs[1:]]
        error = None
        try:
            link, offset, length = jobs[0]
            link.move(dst + offset, src + offset, length, slo_s)
        except BaseException as exc:
            error = exc
        for other in others:                   # every share must land before the regions go
            try:
                other.result()
            except BaseException as exc:
                error = error or exc
        if error is not None:
            raise error

    # -- topology ----------------------------------------------------------------------

    def _plan(self) -> None:
        """Routes for every pair of devices from the topology, with measured bandwidths."""
        self.routes = plan(self.topology, {name: rate / 1e9 for name, rate in self.measured.items()},
                           self._peer_access)

    def _can_access_peer(self, source: str, target: str) -> bool:
        return self.devices.can_access_peer(self.devices.ordinal(target), self.devices.ordinal(source))

    def measure(self) -> None:
        """Time a probe over every direct link, then over every route through a peer the
        measured topology plans (Note [Measured links])."""
        started = time.perf_counter()
        gpus = list(self.devices.uuids)
        scratch = []                              # pinned host and GPU slabs, as pools make them
        try:
            scratch.append(MemfdSlab("probe", PROBE_BYTES, pin=True))
            for gpu in gpus:
                scratch.append(CudaSlab("probe", PROBE_BYTES, self.devices.ordinal(gpu), gpu))
            buffers = {slab.device: slab.address for slab in scratch}
            direct = [(HOST, gpu) for gpu in gpus] + [(gpu, HOST) for gpu in gpus]
            direct += [(a, b) for a in gpus for b in gpus
                       if a != b and self.devices.can_access_peer(self.devices.ordinal(b), self.devices.ordinal(a))]
            for hops in direct:
                self._probe(hops, buffers)
            self.topology = Topology(
                self.topology.gpus,
                {gpu: self.measured[f"{HOST}→{gpu}"] / 1e9 for gpu in gpus},
                {pair: self.measured.get(f"{pair[0]}→{pair[1]}", 0.0) / 1e9
                 for pair in self.topology.nvlink_GBps},
                self.topology.pcie_switch)
            for paths in plan(self.topology, {}, self._peer_access).values():
                for path in paths:
                    if len(path.hops) == 3 and "→".join(path.hops) not in self.measured:
                        self._probe(path.hops, buffers)
        finally:
            for slab in scratch:                  # the links (streams, relay rings) stay
                slab.close()
        log.info("measured %d links in %.0f ms (%s): %s", len(self.measured),
                 (time.perf_counter() - started) * 1e3, self.topology_source,
                 ", ".join(f"{name} {rate / 1e9:.1f} GB/s" for name, rate in self.measured.items()))

    def _probe(self, hops: tuple[str, ...], buffers: dict[str, int]) -> None:
        link = self.link(hops)
        times = []
        for _ in range(PROBE_RUNS):
            started = time.perf_counter()
            link.move(buffers[hops[-1]], buffers[hops[0]], PROBE_BYTES)
            times.append(time.perf_counter() - started)
        best = min(times)
        rate = self.measured[link.name] = PROBE_BYTES / best
        link.scheduler.bandwidth = rate

    # -- reporting ---------------------------------------------------------------------

    def link_stats(self) -> dict:
        """Per link ("host→GPU-…", "GPU-…→GPU-…", "host→GPU-b→GPU-a"): bytes moved, transfers,
        seconds busy, moves queued now, summed wait and service seconds, bandwidth (measured
        at start), chunk size."""
        return {link.name: link.stats() for link in list(self._links.values())}

    def topology_report(self) -> dict:
        """What ``faastube status`` shows of the node: how the topology was learnt, each
        GPU's PCIe switch, the NVLinks, and the routes of host↔GPU and GPU↔GPU moves with their
        measured bandwidths."""
        return report(self.topology, self.routes, self.topology_source, self.multipath_min)

    def close(self) -> None:
        self._helpers.shutdown(wait=True)
        for link in list(self._links.values()):
            if isinstance(link.copier, Pump):
                link.copier.close()


def move_region(transfers: TransferEngine | None, src: Region, dst: Region, slo_s: float | None = None) -> None:
    """Copy ``src``'s bytes into ``dst``: within host memory (the host tier and its stand-ins,
    Note [Host-backed stand-ins]) with one memmove, which releases the GIL; anything else
    through the transfer engine."""
    if src.nbytes != dst.nbytes:
        raise ValueError(f"cannot move {src.nbytes} bytes into a region of {dst.nbytes}")
    if cuda.in_host_memory(src.slab.device) and cuda.in_host_memory(dst.slab.device):
        if not (src.slab.address and dst.slab.address):
            raise InvalidArgumentError("this controller does not map its host slabs: it has neither "
                                       "GPUs nor stand-ins to copy between")
        ctypes.memmove(dst.slab.address + dst.offset, src.slab.address + src.offset, src.nbytes)
        return
    if transfers is None:
        raise InvalidArgumentError(f"cannot copy {src.slab.device} → {dst.slab.device}: this controller "
                                   f"has no GPU transfer engine")
    transfers.move(src, dst, slo_s)
