"""``faastube demo``: one 3-stage pipeline, data passed through the pool and through Redis.

Three warm function processes (decode → preprocess → reduce) pass tens of MB per hand-off.
The platform's part (carrying a small message from one function to the next) is a pipe,
the same in both modes. What differs is where the bytes go:

* pool: each stage writes its output straight into ``faastube.empty`` and seals it; the
  next stage's ``faastube.get`` is a zero-copy view (``consumers=1`` frees it after);
* Redis bytes: each stage ``SET``s its output's bytes; the next ``GET``s them (what
  functions on OpenWhisk/Knative do today, since payloads are capped at 1 MB).

A hand-off is timed from the moment the producer starts publishing its output to the moment
the consumer holds it as an array (CLOCK_MONOTONIC is shared by all processes).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import statistics
import time

import numpy as np

from .config import Config, format_size
from .local import LocalController, redis_for

FRAME = (720, 1280, 3)


def _frames_for(size_mb: int) -> int:
    return max(1, round(size_mb * 1e6 / np.prod(FRAME)))


def _publish(mode, redis_client, out, key):
    """Hand ``out`` (already computed) to the next stage; returns the message to send."""
    if mode == "pool":
        import faastube
        return faastube.seal(out)
    redis_client.set(key, out.tobytes())
    return {"key": key, "shape": list(out.shape), "dtype": str(out.dtype)}


def _receive(mode, redis_client, message):
    if mode == "pool":
        import faastube
        return faastube.get(message)
    data = redis_client.get(message["key"])
    redis_client.delete(message["key"])
    return np.frombuffer(data, dtype=message["dtype"]).reshape(message["shape"])


def _output(mode, shape, dtype):
    if mode == "pool":
        import faastube
        return faastube.empty(shape, dtype, consumers=1)
    return np.empty(shape, dtype)


def _stage(name, mode, socket_path, redis_url, frames, inbox, outbox):
    """One warm function process: receive, compute into its output, publish, repeat."""
    import redis as redis_lib
    import faastube
    if mode == "pool":
        faastube.connect(socket=socket_path, redis=redis_url, namespace="demo")
    redis_client = redis_lib.Redis.from_url(redis_url)
    base = np.random.default_rng(0).integers(0, 200, (frames, *FRAME), dtype=np.uint8)
    while True:
        message = inbox.recv()
        if message is None:
            return
        run, sent_at, payload = message
        received_at = None
        if name == "decode":
            out = _output(mode, base.shape, np.uint8)
            np.add(base, run % 50, out=out)                      # "decode" frame batch `run`
        else:
            data = _receive(mode, redis_client, payload)
            received_at = time.monotonic_ns()
            if name == "preprocess":                             # 2× downsample, normalise
                out = _output(mode, (frames, FRAME[0] // 2, FRAME[1] // 2, 3), np.float32)
                np.multiply(data[:, ::2, ::2, :], np.float32(1 / 255), out=out)
            else:                                                # reduce to per-frame means
                result = [float(x) for x in data.mean(axis=(1, 2, 3))]
                del data
                outbox.send((run, sent_at, received_at, time.monotonic_ns(), result))
                continue
            del data
        publish_at = time.monotonic_ns()
        message_out = _publish(mode, redis_client, out, f"demo:{name}:{run}")
        del out
        outbox.send((run, publish_at, received_at, message_out))


def _run_mode(mode, socket_path, redis_url, frames, runs, progress):
    ctx = multiprocessing.get_context("spawn")
    names = ("decode", "preprocess", "reduce")
    inboxes = [ctx.Pipe(duplex=False) for _ in names]        # driver → stage
    outboxes = [ctx.Pipe(duplex=False) for _ in names]       # stage → driver
    procs = [ctx.Process(target=_stage, args=(name, mode, socket_path, redis_url, frames,
                                                inboxes[i][0], outboxes[i][1]), daemon=True)
             for i, name in enumerate(names)]
    for proc in procs:
        proc.start()
    send = [pipe[1] for pipe in inboxes]
    recv = [pipe[0] for pipe in outboxes]
    handoffs, e2e, result = [[], []], [], None
    try:
        for run in range(runs + 1):                           # run 0 warms up
            # The driver plays the platform: it carries each stage's small message (a ref,
            # or a Redis key) to the next stage, as a sequence would carry a result.
            start = time.monotonic_ns()
            send[0].send((run, start, None))
            _run, decoded_at, _, message = recv[0].recv()
            send[1].send((run, decoded_at, message))
            _run, preprocessed_at, pre_received, message = recv[1].recv()
            send[2].send((run, preprocessed_at, message))
            _run, _sent, reduce_received, done, result = recv[2].recv()
            if run:
                handoffs[0].append(pre_received - decoded_at)
                handoffs[1].append(reduce_received - preprocessed_at)
                e2e.append(done - start)
                progress(f"  {mode}: run {run}/{runs} end-to-end {(done - start) / 1e6:.1f} ms")
    finally:
        for pipe in send:
            pipe.send(None)
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    median_ms = lambda xs: statistics.median(xs) / 1e6
    return {"handoffs_ms": [median_ms(h) for h in handoffs], "e2e_ms": median_ms(e2e),
            "result": result}


def run_demo(size_mb: int = 48, runs: int = 5, progress=print) -> int:
    frames = _frames_for(size_mb)
    nbytes = frames * int(np.prod(FRAME))
    progress(f"FaaSTube demo: decode → preprocess → reduce, {format_size(nbytes)} per hand-off, "
             f"{runs} runs per mode (after one warm-up), host-memory pool (CPU)")
    with contextlib.ExitStack() as stack:
        if not Config.given("redis"):
            progress("starting a private redis-server …")
        redis_url = redis_for(stack)
        progress(f"starting a controller (redis {redis_url}) …")
        socket_path = stack.enter_context(LocalController(redis_url, slab_size="256MiB")).socket
        results = {}
        for mode in ("pool", "redis"):
            progress(f"running the pipeline through {'the FaaSTube pool' if mode == 'pool' else 'Redis bytes'} …")
            results[mode] = _run_mode(mode, socket_path, redis_url, frames, runs, progress)
    same = results["pool"]["result"] == results["redis"]["result"]
    rows = [("decode → preprocess", *(results[m]["handoffs_ms"][0] for m in ("pool", "redis"))),
            ("preprocess → reduce", *(results[m]["handoffs_ms"][1] for m in ("pool", "redis"))),
            ("end to end", *(results[m]["e2e_ms"] for m in ("pool", "redis")))]
    progress("")
    progress(f"{'median of ' + str(runs):<22}{'FaaSTube pool':>15}{'Redis bytes':>15}{'speed-up':>11}")
    for label, pool_ms, redis_ms in rows:
        progress(f"{label:<22}{pool_ms:>12.2f} ms{redis_ms:>12.2f} ms{redis_ms / pool_ms:>10.0f}×")
    progress(f"outputs identical in both modes: {'yes' if same else 'NO'}")
    return 0 if same else 1
