"""The transfer engine: every byte the controller moves between devices goes through here
(host tier ↔ GPU over PCIe, GPU ↔ GPU over NVLink). Copies run on the controller's own
streams, one per GPU, on the GPU end of the move (the destination's when both are GPUs):
peer copies between VMM mappings the controller made accessible to every peer GPU run over
NVLink, and host slabs are pinned, so no staging copy is needed on any path.

Chunking and scheduling between concurrent transfers (SLOs, multi-path) build on this.
"""

from __future__ import annotations

import threading
import time

from faastube import cuda

from .pool import Region


class TransferEngine:
    def __init__(self):
        self._streams = cuda.Streams()
        self._lock = threading.Lock()
        self.links: dict[str, dict] = {}          # "host→GPU-…" → bytes, transfers, busy seconds

    def move(self, src: Region, dst: Region) -> None:
        """Copy ``src``'s bytes into ``dst``; returns once they have arrived."""
        if src.nbytes != dst.nbytes:
            raise ValueError(f"cannot move {src.nbytes} bytes into a region of {dst.nbytes}")
        gpu_end = dst.slab if dst.slab.device != cuda.HOST else src.slab
        started = time.perf_counter()
        cuda.copy(dst.slab.address + dst.offset, src.slab.address + src.offset, src.nbytes,
                  gpu_end.ordinal, self._streams)
        elapsed = time.perf_counter() - started
        with self._lock:
            link = self.links.setdefault(f"{src.slab.device}→{dst.slab.device}",
                                         {"bytes": 0, "transfers": 0, "busy_s": 0.0})
            link["bytes"] += src.nbytes
            link["transfers"] += 1
            link["busy_s"] += elapsed

    def link_stats(self) -> dict:
        """Per link ("host→GPU-…", "GPU-…→GPU-…"): bytes moved, transfers, seconds busy."""
        with self._lock:
            return {name: dict(link) for name, link in self.links.items()}
