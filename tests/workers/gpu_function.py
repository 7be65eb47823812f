"""A GPU function process for tests: does one thing with the SDK on a GPU and reports it as
a JSON line. Random data is made on the host from a seed (the same bytes as
tests/workers/function.py makes), so checksums compare across CPU and GPU functions.

    gpu_function.py put SIZE SEED HOW [DEVICE]   HOW: empty (empty+write+seal), cupy, torch
    gpu_function.py get REF_JSON [DEVICE]        get; print sha256, array type, device
    gpu_function.py torch-get REF_JSON           get, torch.from_dlpack; print sha256
    gpu_function.py jax-get REF_JSON             get, jax.dlpack.from_dlpack; print sha256
    gpu_function.py result SIZE SEED             publish_arrays of a dict holding CuPy and torch
    gpu_function.py peer-read REF_JSON           get on GPU 1, sum it with a kernel on GPU 0
    gpu_function.py hold REF_JSON                get, print sha256, keep the view until stdin
                                                 closes, then print sha256 again
    gpu_function.py slow-seal SIZE ROUNDS        empty, queue ROUNDS increment kernels, seal at once
    gpu_function.py slow-put SIZE ROUNDS [HOW]   queue ROUNDS increment kernels, put, overwrite the
                                                 source at once, exit without waiting; HOW: cupy
                                                 (default) or torch-stream (on a torch side stream)
    gpu_function.py put-strided ROWS COLS SEED   put transposed CuPy and torch views; print both
                                                 refs and the sha256 of the transpose
"""

import hashlib
import json
import sys

import cupy
import numpy as np

import faastube
from function import random_bytes, report      # tests/workers/function.py, the CPU twin


def sha(array) -> str:
    host = array if isinstance(array, np.ndarray) else cupy.asnumpy(array)
    return hashlib.sha256(np.ascontiguousarray(host)).hexdigest()


def describe(view) -> dict:
    on_gpu = isinstance(view, cupy.ndarray)
    return {"sha": sha(view), "type": "cupy" if on_gpu else "numpy",
            "gpu": view.device.id if on_gpu else None, "shape": list(view.shape)}


def main(op, *args):
    if op == "put":
        size, seed, how = int(args[0]), args[1], args[2]
        device = args[3] if len(args) > 3 else "cuda"
        data = random_bytes(size, seed)
        if how == "empty":
            out = faastube.empty(size, "uint8", device=device)
            with out.device:
                out.set(data)
            ref = faastube.seal(out)
        elif how == "cupy":
            with cupy.cuda.Device(int(device[5:]) if device.startswith("cuda:") else 0):
                ref = faastube.put(cupy.asarray(data))
        elif how == "torch":
            import torch
            ref = faastube.put(torch.from_numpy(data).to("cuda"))
        else:
            raise SystemExit(f"unknown way to put: {how}")
        again = faastube.get(ref)         # the producer reads its own object back
        report(ref=ref, sha=hashlib.sha256(data).hexdigest(), sum=int(data.sum(dtype=np.uint64)),
               read_back=sha(again) == hashlib.sha256(data).hexdigest())
    elif op == "get":
        device = args[1] if len(args) > 1 else None
        report(**describe(faastube.get(json.loads(args[0]), device=device)))
    elif op == "peer-read":               # a kernel on GPU 0 reads an array on GPU 1
        view = faastube.get(json.loads(args[0]), device="cuda:1")
        with cupy.cuda.Device(0):
            report(sum=int(view.sum(dtype=cupy.uint64).get()), gpu=view.device.id)
    elif op == "result":                   # what an action returns: arrays become refs
        import torch

        from faastube.results import publish_arrays
        data = random_bytes(args[0], args[1])
        result = publish_arrays({"c": cupy.asarray(data), "t": [torch.from_numpy(data).cuda()], "n": 1})
        report(result=result, sha=hashlib.sha256(data).hexdigest())
    elif op == "jax-get":
        import jax.dlpack
        array = jax.dlpack.from_dlpack(faastube.get(json.loads(args[0])))
        report(sha=hashlib.sha256(np.asarray(array)).hexdigest(), device=str(array.devices()))
    elif op == "torch-get":
        import torch
        tensor = torch.from_dlpack(faastube.get(json.loads(args[0])))
        report(sha=hashlib.sha256(tensor.cpu().numpy()).hexdigest(), device=str(tensor.device))
    elif op == "hold":
        view = faastube.get(json.loads(args[0]))
        report(**describe(view))
        sys.stdin.read()
        report(sha_after=sha(view))
    elif op == "slow-seal":
        size, rounds = int(args[0]), int(args[1])
        out = faastube.empty(size, "uint8", device="cuda")
        out.fill(0)
        for _ in range(rounds):          # queued, not waited for: seal must wait for them
            out += 1
        report(ref=faastube.seal(out), sha=hashlib.sha256(np.full(size, rounds % 256, np.uint8)).hexdigest())
    elif op == "slow-put":
        size, rounds = int(args[0]), int(args[1])
        how = args[2] if len(args) > 2 else "cupy"
        warm = faastube.put(cupy.zeros(16, dtype=cupy.uint8))   # connect, map a slab: not timed
        faastube.flush_puts()
        faastube.delete(warm)
        # Each way: the GPU busy for ~0.3 s first (far longer than a put takes), then
        # ROUNDS increments, the put, and an overwrite of the source queued after it.
        spin = cupy.RawKernel(r"""extern "C" __global__ void spin(long long cycles) {
            long long start = clock64(); while (clock64() - start < cycles) {} }""", "spin")
        if how == "cupy":
            source = cupy.zeros(size, dtype=cupy.uint8)
            spin((1,), (1,), (np.int64(600_000_000),))
            for _ in range(rounds):
                source += 1
            ref = faastube.put(source)
            returned_early = not cupy.cuda.get_current_stream().done
            source.fill(255)
        elif how == "torch-stream":
            import torch
            with torch.cuda.stream(torch.cuda.Stream()):
                source = torch.zeros(size, dtype=torch.uint8, device="cuda")
                with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
                    spin((1,), (1,), (np.int64(600_000_000),))
                for _ in range(rounds):
                    source += 1
                ref = faastube.put(source)
                returned_early = not torch.cuda.current_stream().query()
                source.fill_(255)
        else:
            raise SystemExit(f"unknown way to put: {how}")
        report(ref=ref, returned_early=returned_early,
               sha=hashlib.sha256(np.full(size, rounds % 256, np.uint8)).hexdigest())
    elif op == "put-strided":
        import torch
        rows, cols = int(args[0]), int(args[1])
        data = random_bytes(rows * cols, args[2]).reshape(rows, cols)
        report(cupy=faastube.put(cupy.asarray(data).T), torch=faastube.put(torch.from_numpy(data).cuda().t()),
               sha=hashlib.sha256(np.ascontiguousarray(data.T)).hexdigest())
    else:
        raise SystemExit(f"unknown op {op}")


if __name__ == "__main__":
    main(*sys.argv[1:])
