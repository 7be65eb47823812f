"""The transfer engine: every byte the controller moves between devices goes through here
(host tier ↔ GPU over PCIe, GPU ↔ GPU over NVLink).

Each direction of each path is a link (controller/links.py) with its own CUDA stream on the
GPU end of the move (the destination's when both are GPUs) and its own chunk scheduler
(controller/scheduler.py): moves are cut into chunks and queued a batch or two at a time, so
a small move that arrives during a large one waits for a batch, not for the large move.
Peer copies run between VMM mappings the controller made accessible to every peer GPU, over
NVLink; host slabs are pinned; so no staging copy is needed on any path.

Note [Chunk size per link]: every copy a link queues costs the GPU a few µs besides its bytes
(measured on H200: ~2 µs on PCIe, ~10 µs for a peer copy over NVLink), and the thread that
refills a link needs tens of µs of Python per batch. So a chunk is sized by time, not bytes:
``--chunk-size`` (4 MiB, ~75 µs of PCIe 5) is the PCIe links' chunk, and a faster link's
chunk is that many times larger (NVLink: 8× → 32 MiB). One chunk per batch, two batches
queued: a newly arrived move waits for at most two chunks' time (docs/benchmarks.md, the
transfer engine's table, has the sweep behind these numbers).

Not yet: multi-path moves through peer GPUs (controller/topology.py plans them) and measured
link bandwidths (the estimates below stand in).
"""

from __future__ import annotations

import threading

from faastube import cuda

from .links import DEFAULT_DEPTH, Link
from .pool import Region

PCIE_BYTES_PER_S = 50e9          # estimates, gpu-facts.md: pinned PCIe 5 ~55 GB/s
NVLINK_BYTES_PER_S = 400e9       # NVLink peer copy ~390 GB/s
DEFAULT_CHUNK_BYTES = 4 << 20    # Note [Chunk size per link]
DEFAULT_BATCH_CHUNKS = 1


class TransferEngine:
    def __init__(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES, depth: int = DEFAULT_DEPTH):
        self.chunk_bytes = chunk_bytes
        self.depth = depth
        self._lock = threading.Lock()
        self._links: dict[str, Link] = {}

    def link(self, src: str, dst: str, ordinal: int) -> Link:
        """The link from device ``src`` to ``dst`` ("host" or a GPU UUID), made on first use;
        its copies run on GPU ``ordinal``."""
        name = f"{src}→{dst}"
        with self._lock:
            link = self._links.get(name)
            if link is None:
                bandwidth = PCIE_BYTES_PER_S if cuda.HOST in (src, dst) else NVLINK_BYTES_PER_S
                chunk = self.chunk_bytes * max(1, round(bandwidth / PCIE_BYTES_PER_S))
                link = self._links[name] = Link(name, cuda.CopyQueue(ordinal), bandwidth, chunk,
                                                DEFAULT_BATCH_CHUNKS, self.depth)
            return link

    def move(self, src: Region, dst: Region, slo_s: float | None = None) -> None:
        """Copy ``src``'s bytes into ``dst``; returns once they have arrived."""
        if src.nbytes != dst.nbytes:
            raise ValueError(f"cannot move {src.nbytes} bytes into a region of {dst.nbytes}")
        gpu_end = dst.slab if dst.slab.device != cuda.HOST else src.slab
        link = self.link(src.slab.device, dst.slab.device, gpu_end.ordinal)
        link.move(dst.slab.address + dst.offset, src.slab.address + src.offset, src.nbytes, slo_s)

    def link_stats(self) -> dict:
        """Per link ("host→GPU-…", "GPU-…→GPU-…"): bytes moved, transfers, seconds busy,
        moves queued now, summed wait and service seconds, bandwidth estimate, chunk size."""
        with self._lock:
            links = list(self._links.values())
        return {link.name: link.stats() for link in links}
