"""The transfer engine: every byte the controller moves between devices goes through here
(host tier ↔ GPU over PCIe, GPU ↔ GPU over NVLink).

Each direction of each path is a link (controller/links.py) with its own CUDA stream on the
GPU end of the move (the destination's when both are GPUs) and its own chunk scheduler
(controller/scheduler.py): moves are cut into chunks and queued a batch or two at a time, so
a small move that arrives during a large one waits for a batch, not for the large move.
Peer copies run between VMM mappings the controller made accessible to every peer GPU, over
NVLink; host slabs are pinned; so no staging copy is needed on any path.

Note [Batch size per link]: one chunk size for every link (``--chunk-size``, 2 MiB), but a
batch on a link holds as many chunks as make it last about as long as one chunk on PCIe
(NVLink: ~7×): the leader that refills a link needs tens of µs of Python per batch, which a
2 MB chunk over NVLink (5 µs) would not cover.

Not yet: multi-path moves through peer GPUs (controller/topology.py plans them) and measured
link bandwidths (the estimates below stand in).
"""

from __future__ import annotations

import threading

from faastube import cuda

from .links import DEFAULT_DEPTH, Link
from .pool import Region
from .scheduler import DEFAULT_CHUNK

PCIE_BYTES_PER_S = 50e9          # estimates, gpu-facts.md: pinned PCIe 5 ~55 GB/s
NVLINK_BYTES_PER_S = 350e9       # NVLink peer copy ~390 GB/s


class TransferEngine:
    def __init__(self, chunk_bytes: int = DEFAULT_CHUNK, depth: int = DEFAULT_DEPTH):
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
                batch = max(1, round(bandwidth / PCIE_BYTES_PER_S))    # Note [Batch size per link]
                link = self._links[name] = Link(name, cuda.CopyQueue(ordinal), bandwidth,
                                                self.chunk_bytes, batch, self.depth)
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
