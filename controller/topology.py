"""The node's links, and which paths a move should take over them.

Routes (Note [Multi-path moves], controller/transfer.py): NVLink between two GPUs carries
several times what one PCIe link carries each way. A large host→GPU move therefore goes faster if part of it travels over
*another* GPU's PCIe link and then over NVLink to the target (docs/benchmarks.md has the
multi-path figures). A route GPU must not sit behind the same PCIe switch as the target
or as another route (they would share one uplink), and its relay is only as fast as the
slower of its two hops. GPU→GPU moves take the direct NVLink; where it is missing or weak,
they add (or use only) two-hop paths through intermediate GPUs; with no NVLink at all they go
through host memory.

Each path gets one contiguous share of a move, proportional to its bandwidth (:func:`shares`),
and carries it as one move on its own link. Pure Python apart from :func:`discover`, which asks
NVML; the transfer engine puts its own measured bandwidths in; tests build topologies by hand.
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


def plan(topology: Topology, measured_GBps: dict[str, float], peer_access) -> dict[tuple[str, str], list[Path]]:
    """The routes of every move between two devices of the node, best path first, with
    measured bandwidths (``measured_GBps``: link name such as "host→GPU-a" → GB/s) where
    there are any. ``peer_access(a, b)`` says whether GPU ``b`` can read GPU ``a``'s memory
    directly (over NVLink or PCIe): a pair without NVLink then takes that direct link, and
    only a pair without it goes through host memory. A move smaller than the engine's
    multi-path minimum takes the first path only."""
    def measured(path: Path) -> Path:
        return dataclasses.replace(path, GBps=measured_GBps.get("→".join(path.hops), path.GBps))

    routes = {}
    for gpu in topology.gpus:
        routes[(HOST, gpu)] = [measured(p) for p in topology.host_to_gpu(gpu)]
        routes[(gpu, HOST)] = [measured(p) for p in topology.gpu_to_host(gpu)]
        for other in topology.gpus:
            if other == gpu:
                continue
            paths = topology.gpu_to_gpu(gpu, other)
            if paths[0].hops[1] == HOST and peer_access(gpu, other):
                paths = [Path((gpu, other), min(topology.pcie_GBps[gpu], topology.pcie_GBps[other]))]
            routes[(gpu, other)] = [measured(p) for p in paths]
    return routes


def report(topology: Topology, routes: dict[tuple[str, str], list[Path]], source: str,
           multipath_min: int) -> dict:
    """The topology and its routes as JSON for ``faastube status`` (faastube/cli.py
    renders it)."""
    return {"source": source, "multipath_min": multipath_min,
            "pcie_switch": dict(topology.pcie_switch),
            "nvlink_GBps": {f"{a}→{b}": rate for (a, b), rate in topology.nvlink_GBps.items()},
            "routes": {f"{src}→{dst}": [{"hops": list(p.hops), "GBps": p.GBps} for p in paths]
                       for (src, dst), paths in routes.items()}}


# NVML's common-ancestor levels (nvmlGpuTopologyLevel_t) up to which two GPUs share a PCIe
# switch (or a board): their host links then share one uplink.
_SAME_SWITCH_LEVEL = 20          # NVML_TOPOLOGY_MULTIPLE
_NVML_P2P_NVLINK, _NVML_P2P_OK = 2, 0


def discover(gpus: list[str], pcie_GBps: float, nvlink_GBps: float) -> tuple[Topology, str]:
    """The node's topology from NVML: which GPUs share a PCIe switch, which pairs NVLink
    joins. Bandwidths are the given estimates until the transfer engine measures them. Where
    NVML cannot tell (not installed, no driver), every GPU counts as behind one switch with
    no NVLink, so no move is routed through a peer. Returns the topology and how it was
    learnt, for the log."""
    try:
        import pynvml
    except ImportError:
        return _alone(gpus, pcie_GBps), "nvidia-ml-py is not installed: no multi-path routes"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return _alone(gpus, pcie_GBps), f"NVML unavailable ({exc}): no multi-path routes"
    try:
        handles = {gpu: pynvml.nvmlDeviceGetHandleByUUID(gpu) for gpu in gpus}
        switch = {gpu: gpu for gpu in gpus}       # union-find over "shares a switch"

        def root(gpu):
            while switch[gpu] != gpu:
                gpu = switch[gpu]
            return gpu
        nvlinks = {}
        for a in gpus:
            for b in gpus:
                if a >= b:
                    continue
                if pynvml.nvmlDeviceGetTopologyCommonAncestor(handles[a], handles[b]) <= _SAME_SWITCH_LEVEL:
                    switch[root(b)] = root(a)
                for x, y in ((a, b), (b, a)):
                    if pynvml.nvmlDeviceGetP2PStatus(handles[x], handles[y], _NVML_P2P_NVLINK) == _NVML_P2P_OK:
                        nvlinks[(x, y)] = nvlink_GBps
    except pynvml.NVMLError as exc:
        return _alone(gpus, pcie_GBps), f"NVML could not tell the topology ({exc}): no multi-path routes"
    finally:
        pynvml.nvmlShutdown()
    labels: dict[str, str] = {}                  # switches named in order of their first GPU
    for gpu in gpus:
        labels.setdefault(root(gpu), f"pcie-{len(labels)}")
    topology = Topology(tuple(gpus), {gpu: pcie_GBps for gpu in gpus}, nvlinks,
                        {gpu: labels[root(gpu)] for gpu in gpus})
    return topology, (f"NVML: {len(nvlinks) // 2} NVLink pairs, "
                      f"{len(set(topology.pcie_switch.values()))} PCIe switches for {len(gpus)} GPUs")


def _alone(gpus: list[str], pcie_GBps: float) -> Topology:
    return Topology(tuple(gpus), {gpu: pcie_GBps for gpu in gpus}, {}, {gpu: "unknown" for gpu in gpus})


def shares(nbytes: int, paths: list[Path], align: int) -> list[tuple[int, int]]:
    """Cut ``nbytes`` into one contiguous (offset, length) range per path, in path order,
    sized in proportion to the paths' bandwidth so that they finish together. Ranges are
    whole multiples of ``align`` (the links' chunk; the remainder goes to the faster path),
    and every byte is in exactly one range; a path may get an empty range."""
    if nbytes < 0 or align <= 0 or not paths:
        raise ValueError("shares needs a non-negative size, a positive alignment and a path")
    units = -(-nbytes // align)
    total = sum(p.GBps for p in paths)
    exact = [units * p.GBps / total for p in paths]
    counts = [int(x) for x in exact]
    order = sorted(range(len(paths)), key=lambda i: (-(exact[i] - counts[i]), -paths[i].GBps, i))
    for i in order[:units - sum(counts)]:
        counts[i] += 1
    out, offset = [], 0
    for count in counts:
        length = min(count * align, nbytes - offset)
        out.append((offset, length))
        offset += length
    return out
