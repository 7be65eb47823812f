"""The CUDA data plane on real GPUs: VMM slabs shared by descriptor between real processes,
every path (same GPU, other GPU, host ↔ GPU) with random data and checksums, seal ordering,
release safety, concurrency, a killed producer, torch interop.

Run on the GPU machine with ``pytest -m gpu`` (scripts/gpu-check); skipped where there is
no usable GPU, with the reason.
"""

import hashlib
import json
import signal
from pathlib import Path

import pytest

from faastube import cuda

from .conftest import ControllerProcess, wait_for



def _why_no_gpu() -> str | None:
    if not (Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists()):
        return "this machine has no NVIDIA GPU driver (no /proc/driver/nvidia, no /dev/nvidiactl)"
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "there is an NVIDIA driver but CuPy is not installed (pip install 'faastube[cuda]')"
    try:
        cuda.devices()
    except cuda.CudaError as exc:
        return str(exc)
    return None


NO_GPU = _why_no_gpu()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(NO_GPU is not None, reason=f"no GPU: {NO_GPU}")]

MB = 1 << 20


def gpu_count() -> int:
    return len(cuda.devices().uuids)


two_gpus = pytest.mark.skipif(NO_GPU is None and gpu_count() < 2, reason="needs 2 GPUs")


@pytest.fixture
def controller_settings(metrics_port):
    return {"gpus": "auto", "gpu_slab_size": "64MiB", "gpu_pool_limit": "4GiB", "metrics_port": metrics_port}


def pool(controller, device) -> dict:
    return next(p for p in controller.status()["pools"] if p["device"] == device)


def uuid(ordinal: int) -> str:
    return cuda.devices().uuids[ordinal]


@pytest.mark.parametrize("how", ["empty", "cupy", "torch"])
def test_same_gpu_get_is_zero_copy(worker_env, controller, how):
    made = worker_env.run("gpu_function.py", "put", 3 * MB + 5, 11, how)
    assert made["ref"]["device"] == uuid(0) and made["read_back"]
    used = pool(controller, uuid(0))["used"]
    got = worker_env.run("gpu_function.py", "get", json.dumps(made["ref"]))
    assert got == {"sha": made["sha"], "type": "cupy", "gpu": 0, "shape": [3 * MB + 5]}
    assert pool(controller, uuid(0))["used"] == used        # no copy was made for the get


def test_torch_reads_the_same_memory_through_dlpack(worker_env):
    made = worker_env.run("gpu_function.py", "put", MB, 12, "empty")
    got = worker_env.run("gpu_function.py", "torch-get", json.dumps(made["ref"]))
    assert got == {"sha": made["sha"], "device": "cuda:0"}


def test_jax_reads_the_same_memory_through_dlpack(worker_env):
    pytest.importorskip("jax", reason="JAX is not installed")
    made = worker_env.run("gpu_function.py", "put", MB, 18, "cupy")
    got = worker_env.run("gpu_function.py", "jax-get", json.dumps(made["ref"]), timeout=180,
                         env={"XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
    assert got["sha"] == made["sha"] and "cuda" in got["device"].lower()


def test_gpu_arrays_in_an_action_result_become_refs(worker_env):
    made = worker_env.run("gpu_function.py", "result", MB, 17)
    result = made["result"]
    assert result["n"] == 1 and result["c"]["device"] == result["t"][0]["device"] == uuid(0)
    for ref in (result["c"], result["t"][0]):
        assert worker_env.run("gpu_function.py", "get", json.dumps(ref))["sha"] == made["sha"]


def test_gpus_are_named_by_the_uuids_nvml_reports():
    pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py is not installed")
    pynvml.nvmlInit()
    try:
        by_nvml = {pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))
                   for i in range(pynvml.nvmlDeviceGetCount())}
    finally:
        pynvml.nvmlShutdown()
    by_nvml = {u.decode() if isinstance(u, bytes) else u for u in by_nvml}
    assert set(cuda.devices().uuids) <= by_nvml


def test_seal_publishes_only_finished_writes(worker_env):
    # 64 MiB incremented 200 times by queued kernels: without the seal's synchronise the
    # consumer would see a partial count.
    made = worker_env.run("gpu_function.py", "slow-seal", 64 * MB, 200)
    got = worker_env.run("gpu_function.py", "get", json.dumps(made["ref"]))
    assert got["sha"] == made["sha"]


@pytest.mark.parametrize("put_waits", ["0", "1"])
@pytest.mark.parametrize("how", ["cupy", "torch-stream"])
def test_put_publishes_its_copy_and_not_later_writes_to_the_source(worker_env, put_waits, how):
    # Note [Put seals when its copy lands]: ~0.3 s of GPU work is queued before the put, so
    # an asynchronous put returns long before its copy lands; the producer then overwrites
    # the source and exits at once, and exit must still send the seal. On a torch side
    # stream the copy must come after that stream's kernels (Note [Put copies with one
    # driver call]).
    made = worker_env.run("gpu_function.py", "slow-put", 64 * MB, 20, how,
                          env={"FAASTUBE_PUT_WAITS": put_waits})
    if how == "cupy" or put_waits == "1":
        # Not asserted for an asynchronous put on a torch side stream: torch's
        # Stream.query() said "done" right after such a put on an H200 although a probe saw
        # the stream busy 50 ms later and the put itself return in < 1 ms (docs/benchmarks.md).
        assert made["returned_early"] is (put_waits == "0")
    got = worker_env.run("gpu_function.py", "get", json.dumps(made["ref"]))
    assert got["sha"] == made["sha"]


def test_a_strided_array_is_put_contiguous(worker_env):
    made = worker_env.run("gpu_function.py", "put-strided", 1000, 3001, 19)
    for ref in (made["cupy"], made["torch"]):
        assert ref["shape"] == [3001, 1000]
        assert worker_env.run("gpu_function.py", "get", json.dumps(ref))["sha"] == made["sha"]


def test_host_object_to_gpu_and_gpu_object_to_host(worker_env, controller):
    from_cpu = worker_env.run("function.py", "put", 5 * MB, 13)      # a CPU function's output
    got = worker_env.run("gpu_function.py", "get", json.dumps(from_cpu["ref"]), "cuda")
    assert got["sha"] == from_cpu["sha"] and got["type"] == "cupy"
    from_gpu = worker_env.run("gpu_function.py", "put", 5 * MB, 14, "cupy")
    got = worker_env.run("gpu_function.py", "get", json.dumps(from_gpu["ref"]), "cpu")
    assert got["sha"] == from_gpu["sha"] and got["type"] == "numpy"
    # A function without a GPU gets a GPU object as numpy, by default.
    got = worker_env.run("function.py", "get", json.dumps(from_gpu["ref"]),
                         env={"CUDA_VISIBLE_DEVICES": ""})
    assert got["sha"] == from_gpu["sha"]
    wait_for(lambda: controller.leases() == 0, message="the copies' leases to end")
    assert pool(controller, "host")["used"] == 5 * MB    # the replicas went with their leases


@two_gpus
def test_other_gpu_gets_a_copy_over_nvlink(worker_env, controller):
    made = worker_env.run("gpu_function.py", "put", 7 * MB, 15, "empty", "cuda:0")
    got = worker_env.run("gpu_function.py", "get", json.dumps(made["ref"]), "cuda:1")
    assert got["sha"] == made["sha"] and got["gpu"] == 1
    # A function that sees only the second GPU (as its GPU 0) gets it there: GPUs by UUID.
    got = worker_env.run("gpu_function.py", "get", json.dumps(made["ref"]),
                         env={"CUDA_VISIBLE_DEVICES": "1"})
    assert got["sha"] == made["sha"] and got["gpu"] == 0
    # CuPy lets a kernel on GPU 0 read an array on GPU 1 (peer access): our mapping allows it.
    got = worker_env.run("gpu_function.py", "peer-read", json.dumps(made["ref"]))
    assert got == {"sum": made["sum"], "gpu": 1}
    wait_for(lambda: pool(controller, uuid(1))["used"] == 0, message="the replicas to be freed")


def test_eight_producers_and_consumers_at_once(worker_env, controller):
    producers = [worker_env.start("gpu_function.py", "put", 2 * MB + i, 100 + i,
                                  ["empty", "cupy"][i % 2]) for i in range(8)]
    made = [worker_env.read_json(p, timeout=120) for p in producers]
    consumers = [worker_env.start("gpu_function.py", "get", json.dumps(m["ref"])) for m in made]
    got = [worker_env.read_json(c, timeout=120) for c in consumers]
    assert [g["sha"] for g in got] == [m["sha"] for m in made]
    for process in producers + consumers:
        assert process.wait(60) == 0


def test_killed_producer_frees_its_unsealed_object(worker_env, controller):
    producer = worker_env.start("function.py", "pending", 16 * MB, "cuda")
    ref = worker_env.read_json(producer, timeout=120)["ref"]
    assert pool(controller, uuid(0))["used"] >= 16 * MB
    producer.send_signal(signal.SIGKILL)
    producer.wait()
    wait_for(lambda: pool(controller, uuid(0))["used"] == 0, message="the aborted object to be freed")
    consumer = worker_env.start("gpu_function.py", "get", json.dumps(ref))
    _out, err = consumer.communicate(timeout=120)
    assert consumer.returncode != 0 and "never sealed" in err


def test_views_outlive_the_controller_that_made_them(tmp_path, redis_server, workers):
    """Release safety: the driver keeps a slab alive while a function maps it, even after
    the controller that allocated it is gone (killed here, so nothing is freed politely)."""
    ctl = ControllerProcess(tmp_path, redis_server.url, gpus="auto", gpu_slab_size="64MiB").start()
    try:
        workers.env.update(ctl.env)
        made = workers.run("gpu_function.py", "put", 9 * MB, 16, "empty")
        holder = workers.start("gpu_function.py", "hold", json.dumps(made["ref"]))
        assert workers.read_json(holder, timeout=120)["sha"] == made["sha"]
        ctl.process.send_signal(signal.SIGKILL)
        ctl.process.wait()
        holder.stdin.close()
        assert workers.read_json(holder, timeout=120) == {"sha_after": made["sha"]}
        assert holder.wait(60) == 0
    finally:
        ctl.stop()


def test_a_repeated_gpu_put_takes_its_spare_and_another_process_reads_each_put(ft, worker_env, controller):
    # Note [Spare objects]: the third put of a shape fills the spare the second asked for.
    import cupy
    refs = []
    for value in (1, 2, 3):
        refs.append(ft.put(cupy.full(4 * MB, value, dtype=cupy.uint8), scope="gpu-run"))
    assert ft.flush_puts(30)                           # the puts' seals are out
    assert controller.status()["namespaces"]["test"]["pending"] == 1       # the next spare
    for value, ref in zip((1, 2, 3), refs):
        got = worker_env.run("gpu_function.py", "get", json.dumps(ref))
        assert got["sha"] == hashlib.sha256(bytes([value]) * (4 * MB)).hexdigest()
    assert ft.close_scope("gpu-run") == 3             # the spare's seal put it in the scope


def test_a_gpu_pool_keeps_room_ahead_of_a_function_that_keeps_its_objects(ft, controller):
    # Note [Reservation ahead of demand], on a real GPU tier: after the first activation the
    # reserver makes the next VMM slab off the request path; later puts grow nothing there.
    import cupy
    from faastube import sdk
    refs = []
    ft.connect(socket=controller.socket, namespace="test", spare_bytes=0)   # the room alone, no spares
    for n in range(4):
        with sdk.activation(None, "gpu-keeper"):
            refs.append(ft.put(cupy.full(96 * MB, n, dtype=cupy.uint8)))
        wait_for(lambda: pool(controller, uuid(0))["grown"]["ahead"]["slabs"] == n + 1, timeout=30,
                 message="the next room on GPU 0")
    gpu = pool(controller, uuid(0))
    assert gpu["grown"]["request"]["slabs"] == 1       # only the first put grew on its path
    assert gpu["ahead_wanted"] == {"test": 96 * MB}
    for n, ref in enumerate(refs):
        assert int(ft.get(ref).sum()) == n * 96 * MB
        ft.delete(ref)


def test_a_gpu_pool_gives_empty_slabs_back_when_another_process_takes_the_memory(tmp_path, redis_server):
    # Note [Giving memory back] on a real GPU: this process takes the GPU's memory down
    # under the watermark, as a model loading would; the pool retires its empty slabs.
    import cupy
    import faastube
    ctl = ControllerProcess(tmp_path, redis_server.url, gpus="auto", gpu_slab_size="64MiB",
                            gpu_pool_limit="4GiB", idle_minimum="4GiB", gpu_watermark="8GiB").start()
    hog = None
    try:
        faastube.connect(socket=ctl.socket, namespace="test", spare_bytes=0)
        refs = [faastube.put(cupy.full(48 * MB, n, dtype=cupy.uint8)) for n in range(4)]   # 4 slabs
        for ref in refs[1:]:
            faastube.delete(ref)                              # 3 empty slabs, kept: idle minimum
        assert pool(ctl, uuid(0))["slabs"] == 4
        with cupy.cuda.Device(0):
            free, _total = cupy.cuda.runtime.memGetInfo()
            hog = cupy.cuda.Memory(free - (4 << 30))         # leaves ~4 GiB, under the 8 GiB watermark
            before = cupy.cuda.runtime.memGetInfo()[0]
        # Still under the watermark after the 3 empty slabs: the object moves to the host
        # tier and its slab goes too (Note [Queue-aware eviction]).
        wait_for(lambda: pool(ctl, uuid(0))["slabs"] == 0, timeout=5, message="every slab given back")
        gpu = pool(ctl, uuid(0))
        assert gpu["given_back"]["slabs"] == 4 and gpu["device_free"] < 8 << 30
        assert gpu["moves"]["evict"]["objects"] == 1 and gpu["evicted"]["objects"] == 1
        # The memory is the device's again, with no request from this process: its slab
        # watcher heard of the retired slabs and dropped its mappings (Note [Slabs mapped ahead]).
        with cupy.cuda.Device(0):
            wait_for(lambda: cupy.cuda.runtime.memGetInfo()[0] - before >= 4 * 48 * MB, timeout=5,
                     message="the retired slabs' memory back on the device")
        assert int(faastube.get(refs[0], device="cpu").sum()) == 0     # the same bytes, on the host
    finally:
        del hog
        faastube.sdk._client.close()
        faastube.sdk._client = None
        assert ctl.stop() == 0


def test_a_full_gpu_tier_evicts_to_pinned_host_memory_and_a_get_restores_the_same_bytes(tmp_path, redis_server):
    # Note [Queue-aware eviction] on a real GPU tier: 4 slabs of 64 MiB, 6 objects of 48 MB.
    import cupy
    import faastube
    ctl = ControllerProcess(tmp_path, redis_server.url, gpus="auto", gpu_slab_size="64MiB",
                            gpu_pool_limit="256MiB").start()
    try:
        faastube.connect(socket=ctl.socket, namespace="test", spare_bytes=0)
        sums = []
        refs = []
        for n in range(6):
            array = cupy.random.randint(0, 255, 48 * MB, dtype=cupy.uint8)
            sums.append(int(array.sum()))
            refs.append(faastube.put(array))
        gpu = pool(ctl, uuid(0))
        assert gpu["moves"]["evict"]["objects"] == 2 and gpu["evicted"]["objects"] == 2
        assert [int(faastube.get(ref, device="cpu").sum()) for ref in refs] == sums      # on the host
        got = []
        for ref in refs:                          # each on the GPU: the evicted ones restored
            view = faastube.get(ref)
            assert isinstance(view, cupy.ndarray)
            got.append(int(view.sum()))
            del view
        assert got == sums
        assert pool(ctl, uuid(0))["moves"]["restore"]["objects"] >= 2
    finally:
        faastube.sdk._client.close()
        faastube.sdk._client = None
        assert ctl.stop() == 0


def test_a_gpu_put_that_ranks_last_is_written_to_the_host_and_restored_with_the_same_bytes(tmp_path,
                                                                                          redis_server):
    # Note [Puts that rank last] on a real GPU tier: 4 slabs of 64 MiB, objects of 48 MB; the
    # fifth put joins the back of the consumer's queue, so it goes to the host at once.
    import cupy
    import faastube
    ctl = ControllerProcess(tmp_path, redis_server.url, gpus="auto", gpu_slab_size="64MiB",
                            gpu_pool_limit="256MiB").start()
    try:
        faastube.connect(socket=ctl.socket, namespace="test", spare_bytes=0)
        with faastube.sdk.activation(None, "producer"):
            first = faastube.put(cupy.zeros(48 * MB, cupy.uint8))
        with faastube.sdk.activation(None, "consumer"):
            view = faastube.get(first)
            del view
        faastube.delete(first)
        wait_for(lambda: any(d["reserving"] for d in ctl.status()["demand"] if d["function"] == "consumer"),
                 message="the consumer to be known")
        arrays = [cupy.random.randint(0, 255, 48 * MB, dtype=cupy.uint8) for _ in range(5)]
        strided = cupy.random.randint(0, 255, (4 * MB, 2), dtype=cupy.uint8)[:, 0]     # through CuPy
        with faastube.sdk.activation(None, "producer"):
            refs = [faastube.put(a) for a in arrays]
            on_host = [faastube.put(arrays[0], device="cpu"), faastube.put(strided, device="cpu")]
        gpu = pool(ctl, uuid(0))
        assert gpu["moves"]["spill"]["objects"] == 1 and gpu["moves"]["evict"]["objects"] == 0
        assert [r["device"] for r in on_host] == ["host", "host"]
        assert faastube.get(on_host[0]).tobytes() == arrays[0].get().tobytes()
        assert faastube.get(on_host[1]).tobytes() == strided.get().tobytes()
        with faastube.sdk.activation(None, "consumer"):
            got = []
            for ref in refs:
                view = faastube.get(ref)
                assert isinstance(view, cupy.ndarray)
                got.append(bool((view == arrays[len(got)]).all()))
                del view
                faastube.delete(ref)
        assert got == [True] * 5
    finally:
        faastube.sdk._client.close()
        faastube.sdk._client = None
        assert ctl.stop() == 0


def test_status_lists_a_pool_per_gpu(controller):
    pools = controller.status()["pools"]
    assert [p["device"] for p in pools] == ["host", *cuda.devices().uuids]
    assert all(p["name"].startswith(f"GPU {i} ") for i, p in enumerate(pools[1:]))


def test_concurrent_moves_on_every_path_arrive_intact_and_links_account_for_them(worker_env, controller,
                                                                                  metrics_port):
    """Issue 5: moves go through the chunked links; large and small ones at once, on every
    path this machine has, each with its own random bytes."""
    paths = [("host", "cuda:0"), ("cuda:0", "cpu")]
    if gpu_count() > 1:
        paths += [("cuda:0", "cuda:1"), ("cuda:1", "cuda:0")]
    sizes = [96 * MB + 5, MB + 3, 3 * MB]
    jobs = []
    for p, (source, target) in enumerate(paths):
        for s, size in enumerate(sizes):
            seed = 200 + 10 * p + s
            made = (worker_env.run("function.py", "put", size, seed) if source == "host" else
                    worker_env.run("gpu_function.py", "put", size, seed, "empty", source))
            jobs.append((made, target, size))
    # (a producer on GPU 1 reads its object back on its current GPU 0: a move of its own)
    status_before = controller.status()
    before = status_before.get("links", {})
    consumers = [worker_env.start("gpu_function.py", "get", json.dumps(made["ref"]), target)
                 for made, target, _size in jobs]
    got = [worker_env.read_json(c, timeout=180) for c in consumers]
    assert [g["sha"] for g in got] == [made["sha"] for made, _t, _s in jobs]
    for process in consumers:
        assert process.wait(60) == 0
    status = controller.status()
    links = status["links"]
    moved = {name: {key: link[key] - before.get(name, {}).get(key, 0) for key in ("bytes", "transfers")}
             for name, link in links.items()}
    assert sum(m["bytes"] for m in moved.values()) == sum(size for _m, _t, size in jobs)
    # A move takes one link, or one per route when it is large (Note [Multi-path moves]).
    routes = status["topology"]["routes"]
    multipath_min = status["topology"]["multipath_min"]
    expected = sum(len(routes.get(f"{device(source)}→{device(target)}", [None]))
                   if size >= multipath_min else 1 for (_m, _t, size), (source, target)
                   in zip(jobs, [p for p in paths for _ in sizes]))
    assert sum(m["transfers"] for m in moved.values()) == expected
    assert all(link["queued"] == 0 and link["chunk_bytes"] >= MB for link in links.values())
    # Direct links run on native pumps (Note [The native pump]); relays from Python.
    direct = {name: link for name, link in links.items() if name.count("→") == 1}
    assert direct and all(link["native_pump"] and link["pump"]["bytes"] >= link["bytes"] for link in direct.values())
    from .test_metrics import scrape
    samples = scrape(metrics_port)
    pumped = {dict(labels)["link"] for (name, labels), value in samples.items()
              if name == "faastube_link_pump_pieces_total" and value > 0}
    assert pumped == set(direct)
    # Every consumer's get copied; the copies are timed apart from the gets (Note [Where a
    # get's time goes]), and the copy is part of its get.
    requests, requests_before = status["requests"], status_before["requests"]
    copies = requests["get_copies"]["count"] - requests_before["get_copies"]["count"]
    copy_s = requests["get_copies"]["seconds"] - requests_before["get_copies"]["seconds"]
    get_s = requests["ops"]["get"]["seconds"] - requests_before["ops"]["get"]["seconds"]
    assert copies == len(jobs) and 0 < copy_s < get_s
    assert samples[("faastube_get_copy_seconds_count", ())] == requests["get_copies"]["count"]


def device(name: str) -> str:
    """A test's device name ("host", "cpu", "cuda:N") as the controller names it."""
    return "host" if name in ("host", "cpu") else uuid(int(name[5:]))


@two_gpus
@pytest.mark.parametrize("direction", ["host→gpu", "gpu→host"])
def test_large_host_moves_take_every_route_and_arrive_intact(worker_env, controller, direction):
    """Issue 5: a large host↔GPU move is shared between the GPU's own PCIe link and routes
    through NVLinked peers behind other PCIe switches, each share on its own link."""
    topology = controller.status()["topology"]
    key = f"host→{uuid(0)}" if direction == "host→gpu" else f"{uuid(0)}→host"
    routes = topology["routes"][key]
    if len(routes) < 2:
        pytest.skip(f"this node has one route for {key} ({topology['source']})")
    size = 96 * MB + 4099                      # the test controller's host pool holds 256 MiB
    if direction == "host→gpu":
        made = worker_env.run("function.py", "put", size, 41)
        target = "cuda:0"
    else:
        made = worker_env.run("gpu_function.py", "put", size, 42, "empty", "cuda:0")
        target = "cpu"
    before = controller.status()["links"]
    got = worker_env.run("gpu_function.py", "get", json.dumps(made["ref"]), target)
    assert got["sha"] == made["sha"]
    links = controller.status()["links"]
    moved = {"→".join(r["hops"]): links["→".join(r["hops"])]["bytes"] - before["→".join(r["hops"])]["bytes"]
             for r in routes}
    assert sum(moved.values()) == size
    assert all(n > 0 for n in moved.values()), moved
    assert all(link["queued"] == 0 for link in links.values())


def moves_between_gpus_arrive_intact(topology, peer_access, source: int, target: int) -> dict:
    """Moves of several sizes from GPU ``source`` to GPU ``target`` through an engine that
    plans with ``topology`` and ``peer_access`` instead of what this node reports; bytes are
    staged and checked with plain copies. Returns the bytes each link carried."""
    import ctypes

    import numpy as np

    from controller.gpu import CopyQueue
    from controller.slabs import CudaSlab, MemfdSlab
    from controller.transfer import TransferEngine
    devices = cuda.devices()
    engine = TransferEngine(devices, measure=False, topology=topology, peer_access=peer_access)
    size = 128 * MB
    host, back = MemfdSlab("t", size, pin=True), MemfdSlab("t", size, pin=True)
    gpus = {i: CudaSlab("t", size, i, uuid(i)) for i in (source, target)}
    try:
        data = np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(host.address))
        data[:] = np.random.default_rng(21).integers(0, 256, size, dtype=np.uint8)
        seen = np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(back.address))
        queue = CopyQueue(source)
        queue.wait(queue.issue([(gpus[source].address, host.address, size)]))
        for nbytes in (MB + 3, 96 * MB + 4099):
            engine.move_bytes(uuid(source), gpus[source].address, uuid(target), gpus[target].address, nbytes)
            seen[:] = 0
            queue.wait(queue.issue([(back.address, gpus[target].address, nbytes)]))
            assert np.array_equal(seen[:nbytes], data[:nbytes]), f"{nbytes} bytes"
        return {name: link["bytes"] for name, link in engine.link_stats().items()}
    finally:
        engine.close()
        for slab in [host, back, *gpus.values()]:
            slab.close()


@two_gpus
def test_gpus_that_cannot_reach_each_other_move_through_a_pinned_host_ring():
    """Issue 5: with neither NVLink nor peer access (forced here), a GPU→GPU move goes down
    into a pinned host ring on the source GPU's stream and up on the target's."""
    from controller.topology import HOST, Topology
    a, b = uuid(0), uuid(1)
    alone = Topology((a, b), {a: 50.0, b: 50.0}, {}, {a: "sw0", b: "sw1"})
    carried = moves_between_gpus_arrive_intact(alone, lambda x, y: False, 0, 1)
    assert carried == {f"{a}→{HOST}→{b}": MB + 3 + 96 * MB + 4099}


@pytest.mark.skipif(NO_GPU is None and gpu_count() < 3, reason="needs 3 GPUs")
@pytest.mark.parametrize("direct_GBps", [20.0, 0.0])
def test_a_weak_or_missing_nvlink_between_two_gpus_is_helped_by_a_relay_through_a_third(direct_GBps):
    """Issue 5: where GPU 0→1's direct NVLink is weak (forced here), large moves also take
    the route through GPU 2; where it is missing, every move does."""
    from controller.topology import Topology
    gpus = tuple(uuid(i) for i in range(3))
    links = {(x, y): 300.0 for x in gpus for y in gpus if x != y}
    links[(gpus[0], gpus[1])] = direct_GBps
    topology = Topology(gpus, {g: 50.0 for g in gpus}, {k: v for k, v in links.items() if v},
                        {g: f"sw{i}" for i, g in enumerate(gpus)})
    carried = moves_between_gpus_arrive_intact(topology, lambda x, y: True, 0, 1)
    relay, direct = f"{gpus[0]}→{gpus[2]}→{gpus[1]}", f"{gpus[0]}→{gpus[1]}"
    assert carried[relay] > 0 and sum(carried.values()) == MB + 3 + 96 * MB + 4099
    assert (carried.get(direct, 0) > 0) == bool(direct_GBps)


@two_gpus
def test_small_moves_beside_a_large_one_between_gpus_finish():
    """Issue 5: small moves beside a large one between the same two GPUs (express moves on
    the link's own stream, Note [Express moves]) all finish, intact; a tried gate between
    the two deadlocked here (docs/benchmarks.md)."""
    import threading

    import cupy

    from controller.transfer import TransferEngine
    engine = TransferEngine(cuda.devices(), measure=False)
    size = 512 * MB
    with cupy.cuda.Device(0):
        src = cupy.random.default_rng(29).integers(0, 256, size + 8 * MB, dtype=cupy.uint8)
    with cupy.cuda.Device(1):
        dst = cupy.zeros(size + 8 * MB, cupy.uint8)
    try:
        runner = threading.Thread(target=engine.move_bytes, daemon=True,
                                  args=(uuid(0), src.data.ptr, uuid(1), dst.data.ptr, size))
        runner.start()
        for i in range(8):
            offset = size + i * MB
            engine.move_bytes(uuid(0), src.data.ptr + offset, uuid(1), dst.data.ptr + offset, MB)
        runner.join(60)
        assert not runner.is_alive(), "the large move did not finish"
        assert cupy.asnumpy(dst).tobytes() == cupy.asnumpy(src).tobytes()
    finally:
        engine.close()


def test_the_native_pump_carries_a_large_move_and_express_moves_beside_it_intact():
    """Issue 5, Note [The native pump]: the transfer engine's direct links run on pumps; a
    large host→GPU move with express moves beside it lands intact, and the link carries the
    next move."""
    import ctypes
    import threading

    import cupy
    import numpy as np

    from controller.slabs import MemfdSlab
    from controller.topology import HOST
    from controller.transfer import TransferEngine
    engine = TransferEngine(cuda.devices(), measure=False)
    size = 256 * MB
    host = MemfdSlab("t", size + 8 * MB, pin=True)
    try:
        link = engine.link((HOST, uuid(0)))
        assert link.stats()["native_pump"], "the engine fell back to Python copies"
        data = np.ctypeslib.as_array((ctypes.c_uint8 * (size + 8 * MB)).from_address(host.address))
        data[:] = np.random.default_rng(31).integers(0, 256, data.size, dtype=np.uint8)
        with cupy.cuda.Device(0):
            dst = cupy.zeros(size + 8 * MB, cupy.uint8)
            cupy.cuda.Device(0).synchronize()      # the link's stream does not wait for CuPy's
        runner = threading.Thread(target=link.move, daemon=True, args=(dst.data.ptr, host.address, size))
        runner.start()
        for i in range(8):
            offset = size + i * MB
            link.move(dst.data.ptr + offset, host.address + offset, MB)
        runner.join(60)
        assert not runner.is_alive(), "the large move did not finish"
        assert cupy.asnumpy(dst).tobytes() == data.tobytes()
        assert link.copier.stats()["express_pieces"] >= 1
        with cupy.cuda.Device(0):
            dst[:] = 0
            cupy.cuda.Device(0).synchronize()
        link.move(dst.data.ptr, host.address, 64 * MB)
        assert cupy.asnumpy(dst[:64 * MB]).tobytes() == data[:64 * MB].tobytes()
        del data
    finally:
        engine.close()
        host.close()
