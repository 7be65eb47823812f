"""The node's links, and which paths a move should take over them.

Note [Multi-path moves] (research-system.md, gpu-facts.md): one PCIe link carries ~55 GB/s
each way, NVLink between two GPUs ~390 GB/s. A large host→GPU move therefore goes faster if
part of it travels over *another* GPU's PCIe link and then over NVLink to the target (measured:
1.66–1.7× with two GPUs). A route GPU must not sit behind the same PCIe switch as the target
or as another route (they would share one uplink), and its relay is only as fast as the
slower of its two hops. GPU→GPU moves take the direct NVLink; where it is missing or weak,
they add (or use only) two-hop paths through intermediate GPUs; with no NVLink at all they go
through host memory.

Shares are proportional to each path's bandwidth. Pure Python: the controller fills a
:class:`Topology` from NVML and its own measurements at start; tests build them by hand.
"""

from __future__ import annotations

import dataclasses

HOST = "host"
# A direct NVLink this much slower than the best two-hop relay counts as weak: relays help.
WEAK_DIRECT = 0.5


@dataclasses.dataclass(frozen=True)
class Path:
    hops: tuple[str, ...]        # devices in order, e.g. ("host", "GPU-b", "GPU-a")
    GBps: float                  # the path's bandwidth: its slowest hop


@dataclasses.dataclass(frozen=True)
class Topology:
    gpus: tuple[str, ...]                          # GPU UUIDs
    pcie_GBps: dict[str, float]                    # host↔GPU bandwidth of each GPU's link
    nvlink_GBps: dict[tuple[str, str], float]      # direct GPU→GPU bandwidth (absent: none)
    pcie_switch: dict[str, str]                    # GPU → the PCIe switch (or root port) it is behind

    def nvlink(self, a: str, b: str) -> float:
        return self.nvlink_GBps.get((a, b), 0.0)

    def host_to_gpu(self, target: str) -> list[Path]:
        """Paths for a host→``target`` move (the reverse serves GPU→host)."""
        self._check(target)
        paths = [Path((HOST, target), self.pcie_GBps[target])]
        switches_used = {self.pcie_switch[target]}
        routes = sorted((gpu for gpu in self.gpus if gpu != target and self.nvlink(gpu, target) > 0),
                        key=lambda gpu: -min(self.pcie_GBps[gpu], self.nvlink(gpu, target)))
        for gpu in routes:                         # the best route per PCIe switch
            if self.pcie_switch[gpu] in switches_used:
                continue
            switches_used.add(self.pcie_switch[gpu])
            paths.append(Path((HOST, gpu, target), min(self.pcie_GBps[gpu], self.nvlink(gpu, target))))
        return paths

    def gpu_to_host(self, source: str) -> list[Path]:
        return [Path(tuple(reversed(p.hops)), p.GBps) for p in self.host_to_gpu(source)]

    def gpu_to_gpu(self, source: str, target: str) -> list[Path]:
        """Paths for a ``source``→``target`` move."""
        self._check(source)
        self._check(target)
        if source == target:
            raise ValueError("a move needs two different devices")
        direct = self.nvlink(source, target)
        relays = sorted((Path((source, gpu, target), min(self.nvlink(source, gpu), self.nvlink(gpu, target)))
                         for gpu in self.gpus if gpu not in (source, target)
                         and self.nvlink(source, gpu) > 0 and self.nvlink(gpu, target) > 0),
                        key=lambda p: -p.GBps)
        if direct and (not relays or direct >= WEAK_DIRECT * relays[0].GBps):
            return [Path((source, target), direct)]
        paths = ([Path((source, target), direct)] if direct else []) + relays
        if paths:
            return paths
        return [Path((source, HOST, target), min(self.pcie_GBps[source], self.pcie_GBps[target]))]

    def _check(self, gpu: str) -> None:
        if gpu not in self.gpus:
            raise ValueError(f"{gpu} is not a GPU of this node ({', '.join(self.gpus)})")


def split(nbytes: int, paths: list[Path], chunk: int) -> list[list[tuple[int, int]]]:
    """Cut ``nbytes`` into chunks of ``chunk`` bytes and deal them to ``paths`` in
    proportion to their bandwidth (largest remainder first, ties to the faster path):
    per path, its (offset, length) chunks in order. Every byte goes to exactly one path."""
    if nbytes < 0 or chunk <= 0 or not paths:
        raise ValueError("split needs a non-negative size, a positive chunk and a path")
    count = -(-nbytes // chunk)
    total = sum(p.GBps for p in paths)
    exact = [count * p.GBps / total for p in paths]
    counts = [int(x) for x in exact]
    order = sorted(range(len(paths)), key=lambda i: (-(exact[i] - counts[i]), -paths[i].GBps, i))
    for i in order[:count - sum(counts)]:
        counts[i] += 1
    # Interleave so that every path's chunks spread over the whole range in order: chunk k
    # goes to the path whose share of the first k chunks is furthest behind its quota.
    dealt = [0] * len(paths)
    out: list[list[tuple[int, int]]] = [[] for _ in paths]
    for k in range(count):
        i = max((i for i in range(len(paths)) if dealt[i] < counts[i]),
                key=lambda i: (counts[i] * (k + 1) / count - dealt[i], paths[i].GBps, -i))
        offset = k * chunk
        out[i].append((offset, min(chunk, nbytes - offset)))
        dealt[i] += 1
    return out
