"""Path planning over a node's links (controller/topology.py), on topologies built by hand:
the 2-GPU NV18 machines of gpu-facts.md, and 4- and 8-GPU layouts with shared PCIe switches."""

import pytest

from controller.topology import HOST, Path, Topology, discover, plan, report, shares

PCIE, NVL = 55.0, 390.0


def node(n, switch_of=lambda i: f"sw{i}", nvlink=lambda i, j: NVL):
    gpus = tuple(f"GPU-{i}" for i in range(n))
    return Topology(
        gpus=gpus, pcie_GBps={g: PCIE for g in gpus},
        nvlink_GBps={(a, b): nvlink(i, j) for i, a in enumerate(gpus) for j, b in enumerate(gpus)
                     if i != j and nvlink(i, j)},
        pcie_switch={g: switch_of(i) for i, g in enumerate(gpus)})


def test_two_nvlinked_gpus_split_a_host_move_over_both_pcie_links():
    topo = node(2)
    assert topo.host_to_gpu("GPU-0") == [Path((HOST, "GPU-0"), PCIE),
                                         Path((HOST, "GPU-1", "GPU-0"), PCIE)]
    assert topo.gpu_to_host("GPU-0")[1] == Path(("GPU-0", "GPU-1", HOST), PCIE)


def test_gpus_behind_the_targets_switch_or_a_used_one_are_not_routes():
    # 4 GPUs on 2 switches (0,1 | 2,3): one route from the other switch only.
    topo = node(4, switch_of=lambda i: f"sw{i // 2}")
    assert [p.hops for p in topo.host_to_gpu("GPU-0")] == [(HOST, "GPU-0"), (HOST, "GPU-2", "GPU-0")]
    # 8 GPUs on 4 switches: the direct link plus one route per other switch.
    topo = node(8, switch_of=lambda i: f"sw{i // 2}")
    assert [p.hops[1] for p in topo.host_to_gpu("GPU-0")] == ["GPU-0", "GPU-2", "GPU-4", "GPU-6"]


def test_a_route_is_as_fast_as_its_slower_hop_and_no_nvlink_means_no_route():
    topo = node(3, nvlink=lambda i, j: 20.0 if {i, j} == {0, 1} else 0.0)
    assert topo.host_to_gpu("GPU-0") == [Path((HOST, "GPU-0"), PCIE), Path((HOST, "GPU-1", "GPU-0"), 20.0)]
    assert topo.host_to_gpu("GPU-2") == [Path((HOST, "GPU-2"), PCIE)]


def test_gpu_to_gpu_takes_the_direct_nvlink_when_it_is_strong():
    assert node(4).gpu_to_gpu("GPU-0", "GPU-3") == [Path(("GPU-0", "GPU-3"), NVL)]


def test_gpu_to_gpu_adds_relays_where_the_direct_link_is_weak_or_missing():
    # Hybrid mesh: 0-1 has one slow link (under half the best relay), 0-2-1 and 0-3-1 are fast.
    weak = node(4, nvlink=lambda i, j: 20.0 if {i, j} == {0, 1} else 50.0)
    assert weak.gpu_to_gpu("GPU-0", "GPU-1") == [
        Path(("GPU-0", "GPU-1"), 20.0), Path(("GPU-0", "GPU-2", "GPU-1"), 50.0),
        Path(("GPU-0", "GPU-3", "GPU-1"), 50.0)]
    half = node(4, nvlink=lambda i, j: 25.0 if {i, j} == {0, 1} else 50.0)
    assert half.gpu_to_gpu("GPU-0", "GPU-1") == [Path(("GPU-0", "GPU-1"), 25.0)]
    missing = node(3, nvlink=lambda i, j: 0.0 if {i, j} == {0, 1} else 50.0)
    assert missing.gpu_to_gpu("GPU-0", "GPU-1") == [Path(("GPU-0", "GPU-2", "GPU-1"), 50.0)]
    none = node(2, nvlink=lambda i, j: 0.0)
    assert none.gpu_to_gpu("GPU-0", "GPU-1") == [Path(("GPU-0", HOST, "GPU-1"), PCIE)]


def test_plan_routes_every_pair_of_devices_with_measured_bandwidths():
    topo = node(2)
    routes = plan(topo, {"host→GPU-1→GPU-0": 48.5, "GPU-0→GPU-1": 380.0}, lambda a, b: True)
    assert set(routes) == {(HOST, "GPU-0"), ("GPU-0", HOST), (HOST, "GPU-1"), ("GPU-1", HOST),
                           ("GPU-0", "GPU-1"), ("GPU-1", "GPU-0")}
    assert routes[(HOST, "GPU-0")] == [Path((HOST, "GPU-0"), PCIE), Path((HOST, "GPU-1", "GPU-0"), 48.5)]
    assert routes[("GPU-0", "GPU-1")] == [Path(("GPU-0", "GPU-1"), 380.0)]
    assert routes[("GPU-1", "GPU-0")] == [Path(("GPU-1", "GPU-0"), NVL)]      # not measured: the estimate


def test_plan_sends_gpus_without_nvlink_directly_with_peer_access_and_through_host_memory_without():
    topo = node(3, nvlink=lambda i, j: 0.0 if 2 in (i, j) else NVL)
    peer = {("GPU-0", "GPU-2")}                                  # PCIe peer access one way only
    routes = plan(topo, {}, lambda a, b: (a, b) in peer)
    assert routes[("GPU-0", "GPU-2")] == [Path(("GPU-0", "GPU-2"), PCIE)]
    assert routes[("GPU-2", "GPU-0")] == [Path(("GPU-2", HOST, "GPU-0"), PCIE)]
    assert routes[("GPU-1", "GPU-2")] == [Path(("GPU-1", HOST, "GPU-2"), PCIE)]
    assert routes[("GPU-0", "GPU-1")] == [Path(("GPU-0", "GPU-1"), NVL)]   # NVLink needs no peer check
    missing = node(3, nvlink=lambda i, j: 0.0 if {i, j} == {0, 1} else 50.0)
    assert plan(missing, {}, lambda a, b: False)[("GPU-0", "GPU-1")] == [Path(("GPU-0", "GPU-2", "GPU-1"), 50.0)]


def test_status_shows_the_routes_a_move_can_take_and_not_the_direct_gpu_pairs():
    from faastube.cli import render_status
    topo = node(3, nvlink=lambda i, j: 0.0 if {i, j} == {0, 1} else NVL)
    routes = plan(topo, {"GPU-0→GPU-2→GPU-1": 370.0}, lambda a, b: False)
    status = {"node": "n1", "epoch": "e", "clients": 0, "pools": [], "namespaces": {},
              "topology": report(topo, routes, "given", 32 << 20)}
    text = render_status(status)
    assert "topology (given); moves of 32.0 MiB or more take every route:" in text
    assert "  route GPU-0→GPU-1: GPU-0→GPU-2→GPU-1 370.0 GB/s" in text
    assert f"  route host→GPU-0: host→GPU-0 {PCIE:.1f} GB/s + host→GPU-2→GPU-0 {PCIE:.1f} GB/s" in text
    assert "  NVLink GPU-0→GPU-2: 390.0 GB/s" in text
    assert "route GPU-0→GPU-2:" not in text          # a direct pair: nothing to route


def test_unknown_gpus_and_self_moves_are_refused():
    with pytest.raises(ValueError, match="GPU-9 is not a GPU of this node"):
        node(2).host_to_gpu("GPU-9")
    with pytest.raises(ValueError, match="two different devices"):
        node(2).gpu_to_gpu("GPU-0", "GPU-0")


@pytest.mark.parametrize("nbytes, speeds, expected_lengths", [
    (10 * 4, [55.0, 55.0], [20, 20]),
    (10 * 4, [30.0, 10.0], [32, 8]),                 # 7.5/2.5 units: the remainder to the faster
    (10 * 4 - 3, [55.0, 55.0, 55.0], [16, 12, 9]),   # 10 units, the last one short
    (3, [10.0, 30.0], [0, 3]),                       # one unit: all of it on the faster path
    (0, [55.0], [0]),
])
def test_shares_cover_every_byte_once_in_proportion(nbytes, speeds, expected_lengths):
    paths = [Path((HOST, f"GPU-{i}"), s) for i, s in enumerate(speeds)]
    ranges = shares(nbytes, paths, align=4)
    assert [length for _off, length in ranges] == expected_lengths
    offset = 0
    for start, length in ranges:                     # contiguous, in path order, no overlap
        assert start == offset
        assert length % 4 == 0 or start + length == nbytes
        offset += length
    assert offset == nbytes


def test_shares_refuse_nonsense():
    with pytest.raises(ValueError, match="positive alignment"):
        shares(10, [Path((HOST, "GPU-0"), 1.0)], align=0)
    with pytest.raises(ValueError, match="a path"):
        shares(10, [], align=4)


def test_without_nvml_no_move_is_routed_through_a_peer():
    # On machines where NVML cannot tell (here: nvidia-ml-py missing, or no driver), the
    # GPUs count as behind one switch with no NVLink: one path per move.
    topology, source = discover(["GPU-0", "GPU-1"], pcie_GBps=50.0, nvlink_GBps=400.0)
    assert "no multi-path routes" in source
    assert topology.host_to_gpu("GPU-0") == [Path((HOST, "GPU-0"), 50.0)]
    assert topology.gpu_to_host("GPU-1") == [Path(("GPU-1", HOST), 50.0)]
