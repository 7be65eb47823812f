"""What the workflow actions share: how a tensor travels to the next stage (four modes,
chosen by configuration only), where a stage computes, and the models.

Modes (``FAASTUBE_BENCH_MODE``):

- ``pool``: ``faastube.put`` / ``faastube.get`` — the tensor stays in GPU memory (or the host
  tier for CPU stages); only its ref crosses HTTP.
- ``shm``: what a host-memory data-passing system does: GPU→host with a pageable copy, into a
  fresh POSIX shared-memory segment; the consumer maps it and copies host→GPU (pageable).
- ``redis``: what users do today on OpenWhisk and Knative (payloads are capped at 1 MB):
  the bytes go through Redis (``SET``/``GET``), with the same copies as ``shm`` around them.
- ``floor``: data passing taken out, the limit the others are measured against. The same
  workflow, processes and HTTP hops; each stage's inputs are already in place on its device.
  A preparing run (the driver's warm-up, ``args["prepare"]``) hands each output on through
  shm once, and each consumer keeps what it got under the output's key (the producing stage,
  the request's seed, the keys of the stage's own inputs, which of its outputs); a timed run's handle carries only the key, and
  the consumer takes its kept tensor. A CPU stage's output (``Stage.empty``) is one buffer per
  shape, made once: no fresh pages to fault in, as the pool's slabs have none. Same inputs,
  so the same outputs as the other modes (two activations of a Knative container under load
  may write that buffer at once: no timed run reads it).

Every handle names the workflow run (``args["run"]``): the driver frees what a run left
(``cleanup``) after the run, outside its timing, in every mode.

Models: torchvision architectures with random weights made from a fixed seed (no downloads)
where torchvision is installed and ``FAASTUBE_BENCH_SIZE`` is ``gpu``; the CPU-sized variant
(``cpu``, what CI runs) uses small convolutional nets of the same roles. Weights depend only
on the seed, so every container of an action computes the same function.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import time
import warnings

import numpy as np

MODES = ("floor", "pool", "shm", "redis")
SEED = 2026
_counter = itertools.count()


def mode() -> str:
    value = os.environ.get("FAASTUBE_BENCH_MODE", "pool")
    if value not in MODES:
        raise ValueError(f"FAASTUBE_BENCH_MODE must be one of {', '.join(MODES)}, got {value!r}")
    return value


def size() -> str:
    return os.environ.get("FAASTUBE_BENCH_SIZE", "cpu")


def device() -> str:
    """Where this container's GPU stages compute: its (first visible) GPU, else the CPU."""
    import torch
    return "cuda" if torch.cuda.is_available() and size() == "gpu" else "cpu"


@functools.lru_cache(maxsize=1)
def _redis():
    import redis
    return redis.Redis.from_url(os.environ.get("FAASTUBE_REDIS", "redis://127.0.0.1:6379/0"))


# -- passing tensors ----------------------------------------------------------------------

def _new_segment(run: str, shape, dtype) -> tuple[str, np.ndarray]:
    """A fresh POSIX shared-memory segment (/dev/shm, as shm_open makes it) named for
    ``run``, mapped here as a writable array: its name and the array. The mapping lives as
    long as the array, the segment until the driver unlinks it (``cleanup``)."""
    import mmap
    name = f"ftb-{run}-{os.getpid()}-{next(_counter)}"
    nbytes = max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)
    fd = os.open(f"/dev/shm/{name}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, nbytes)
        mapped = mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)
    return name, np.ndarray(shape, dtype, buffer=mapped)


def _from_numpy(array):
    """A torch view of a numpy array that may be read-only (a got view, Redis bytes, a kept
    input): the stages only read it, so torch's warning about that is silenced."""
    import torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)

def send(tensor, run: str, consumers: int = 1, how: str | None = None):
    """Hand ``tensor`` (torch, on any device) to ``consumers`` later stages (through ``how``,
    by default the configured mode); returns what goes in the result JSON."""
    tensor = tensor.detach().contiguous()
    how = how or mode()
    if how == "pool":
        import faastube
        value = tensor if tensor.is_cuda else tensor.numpy()
        return faastube.put(value, consumers=consumers, scope=run)
    host = tensor.cpu().numpy() if tensor.is_cuda else tensor.numpy()   # pageable GPU→host
    if how == "shm":
        name, segment = _new_segment(run, host.shape, host.dtype)
        segment[...] = host
    else:
        name = f"ftb-{run}-{os.getpid()}-{next(_counter)}"
        _redis().set(name, host.tobytes())
    return {"ftb": how, "name": name, "shape": list(host.shape), "dtype": str(host.dtype)}


# floor mode: the inputs this container was handed in preparing runs, by key (module docstring)
_kept: dict[tuple, object] = {}
_output_buffers: dict[tuple, object] = {}   # ... and the one output buffer per shape its empty() reuses


def receive(handle, where: str):
    """The tensor ``handle`` names, as torch on ``where`` ("cpu" or "cuda")."""
    import torch
    if isinstance(handle, dict) and handle.get("ftb") == "floor":
        key = (handle["key"], where)
        if "via" in handle:                              # a preparing run: the bytes, once
            _kept[key] = receive(handle["via"], where)
        elif key not in _kept:
            raise RuntimeError(f"floor mode: no input {handle['key']} was handed to this container "
                               f"in a preparing run (the driver prepares every input on every replica)")
        return _kept[key]
    if isinstance(handle, dict) and "ftb" in handle:
        dtype = np.dtype(handle["dtype"])
        if handle["ftb"] == "shm":
            from multiprocessing import resource_tracker, shared_memory
            segment = shared_memory.SharedMemory(name=handle["name"])
            resource_tracker.unregister(segment._name, "shared_memory")
            view = np.ndarray(handle["shape"], dtype, buffer=segment.buf)
            tensor = torch.from_numpy(view).to(where, copy=True)             # pageable host→GPU
            del view
            segment.close()
            return tensor
        data = _redis().get(handle["name"])
        return _from_numpy(np.frombuffer(data, dtype).reshape(handle["shape"])).to(where, copy=True)
    import faastube
    array = faastube.get(handle, device="cuda" if where == "cuda" else "cpu")
    if isinstance(array, np.ndarray):
        return _from_numpy(array)                        # zero copy, read-only view
    return torch.from_dlpack(array)                       # zero copy on the same GPU


def cleanup(run: str, client) -> None:
    """Free what run ``run`` left in the shm and Redis modes (``client``: Redis); the pool
    frees by consumers and by the run's scope."""
    import glob
    for path in glob.glob(f"/dev/shm/ftb-{run}-*"):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    keys = list(client.scan_iter(match=f"ftb-{run}-*"))
    if keys:
        client.delete(*keys)


def checksum(tensor) -> str:
    """sha256 of a tensor's bytes: how the driver checks that every mode computed the same."""
    return hashlib.sha256(np.ascontiguousarray(tensor.detach().cpu().numpy()).tobytes()).hexdigest()


class Stage:
    """One activation of a stage: gets and puts tensors through the configured mode and
    times them, so the result says how much of the stage was data passing."""

    def __init__(self, args: dict):
        self.run = args["run"]
        self.seed = args["seed"]
        self.prepare = bool(args.get("prepare"))     # floor mode: hand outputs on for real, once
        self._outputs = itertools.count()
        self._empties = itertools.count()
        self._inputs: list[str] = []                 # floor mode: the keys of what it got
        self.started = time.perf_counter()
        self.ops: dict[str, float] = {}            # data passing seconds by kind: get, empty, put
        self._own: dict[int, tuple] = {}           # outputs made by empty(), by id of the tensor
        self._keep: list = []                      # ... and what backs them, alive until the end

    def get(self, handle, where: str):
        started = time.perf_counter()
        if isinstance(handle, dict) and handle.get("ftb") == "floor":
            self._inputs.append(handle["key"])
        tensor = receive(handle, where)
        self._passed("get", started)
        return tensor

    @property
    def passing_s(self) -> float:
        return sum(self.ops.values())

    def _passed(self, op: str, started: float) -> None:
        self.ops[op] = self.ops.get(op, 0.0) + time.perf_counter() - started

    def empty(self, shape, consumers: int = 1):
        """A float32 host tensor for this stage's output, written in place and handed on by
        :meth:`put` without a copy where the mode allows: in the pool (``faastube.empty``,
        the zero-copy put) and in a fresh shm segment; Redis needs the bytes sent anyway."""
        import torch
        how = mode()
        started = time.perf_counter()
        if how == "pool":
            import faastube
            array = faastube.empty(shape, "float32", consumers=consumers, scope=self.run)
            own = ("pool", array)
        elif how == "shm":
            name, array = _new_segment(self.run, shape, np.float32)
            own = ("shm", name)
        elif how == "floor":
            # An output nobody reads in a timed run: one buffer per shape, made (and its pages
            # faulted in) once, as the pool's slabs are, so the floor pays no allocation either.
            key = (tuple(int(d) for d in shape), next(self._empties))   # two outputs, two buffers
            if key not in _output_buffers:
                _output_buffers[key] = torch.zeros(key[0], dtype=torch.float32)
            self._passed("empty", started)
            return _output_buffers[key]
        else:
            self._passed("empty", started)
            return torch.empty(shape, dtype=torch.float32)
        tensor = torch.from_numpy(array)
        self._own[id(tensor)] = own
        self._keep.append((tensor, array))
        self._passed("empty", started)
        return tensor

    def put(self, tensor, consumers: int = 1):
        if tensor.is_cuda:                         # the compute before it is not passing time
            import torch
            torch.cuda.synchronize(tensor.device)
        started = time.perf_counter()
        own = self._own.pop(id(tensor), None)
        if mode() == "floor":
            # Keyed by what makes it: the same stage, seed, inputs (a fan-out's chunks differ
            # only there) and output number give the same tensor.
            made_of = f"{os.environ.get('__OW_ACTION_NAME', '')}:{self.seed}:{'|'.join(self._inputs)}"
            key = f"{hashlib.sha256(made_of.encode()).hexdigest()[:20]}:{next(self._outputs)}"
            handle = {"ftb": "floor", "key": key}
            if self.prepare:
                handle["via"] = send(tensor, self.run, consumers, how="shm")
        elif own is None:
            handle = send(tensor, self.run, consumers)
        elif own[0] == "pool":
            import faastube
            handle = faastube.seal(own[1])
        else:
            handle = {"ftb": "shm", "name": own[1], "shape": list(tensor.shape), "dtype": "float32"}
        self._passed("put", started)
        return handle

    def result(self, **fields) -> dict:
        return {"run": self.run, "seed": self.seed, **({"prepare": True} if self.prepare else {}), **fields,
                "timing": {"total_s": time.perf_counter() - self.started, "passing_s": self.passing_s,
                           "passing_ops": self.ops}}


def preprocess_frames(args: dict, count: int) -> dict:
    """A CPU pre-processing stage: the request's ``count`` frames, normalised straight into
    the stage's output, handed on as ``frames``."""
    stage = Stage(args)
    raw = frames(stage.seed, count)
    return stage.result(frames=stage.put(normalise(raw, stage.empty(raw.shape))))


def classify(args: dict, role: str, source: str, output: str) -> dict:
    """A GPU classifier stage: ``args[source]`` through the ``role`` model; the class
    probabilities handed on as ``output``."""
    stage = Stage(args)
    images = stage.get(args[source], device())
    probs = infer(role, images).softmax(dim=1)
    return stage.result(**{output: stage.put(probs)})


def top_crops(images, features, per_image: int, crop: int):
    """The ``per_image`` strongest locations of ``features`` (N, C, h, w) in each image,
    cut out of ``images`` (N, 3, H, W) as ``crop``×``crop`` patches: (N·k, 3, crop, crop),
    and the boxes as [[image, top, left], …]. Deterministic: ties go to the lower index."""
    import torch
    heat = features.float().mean(dim=1)                          # (N, h, w)
    n, h, w = heat.shape
    height, width = images.shape[-2:]
    index = torch.topk(heat.reshape(n, -1), per_image, dim=1, sorted=True).indices.cpu()
    crops, boxes = [], []
    for i in range(n):
        for flat in index[i].tolist():
            top = min(max(0, (flat // w) * height // h - crop // 2), height - crop)
            left = min(max(0, (flat % w) * width // w - crop // 2), width - crop)
            crops.append(images[i, :, top:top + crop, left:left + crop])
            boxes.append([i, top, left])
    return torch.stack(crops).contiguous(), boxes


# -- models ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def model(role: str):
    """The network for ``role`` on this container's device, eval mode, random weights from
    the seed. Roles: backbone (detection/face features), classifier, embedder, segmenter."""
    import torch
    torch.manual_seed(SEED + sum(map(ord, role)))
    torch.use_deterministic_algorithms(True, warn_only=True)
    if size() == "gpu":
        net = _torchvision(role)
    else:
        net = _small(role)
    net = net.eval()
    if device() == "cuda":
        return net.to("cuda", memory_format=torch.channels_last)
    return net.to("cpu")


def infer(role: str, inputs):
    """``inputs`` through the ``role`` network. On a GPU as production inference runs:
    half-precision tensor-core kernels (autocast) on channels-last tensors; the outputs come
    back as float32, so what a stage hands on has the same size and type in every mode. On
    the CPU (the size CI runs) plainly in float32."""
    import torch
    net = model(role)
    with torch.no_grad():
        if not inputs.is_cuda:
            return net(inputs)
        with torch.autocast("cuda", dtype=torch.float16):
            out = net(inputs.contiguous(memory_format=torch.channels_last))
    if isinstance(out, dict):
        return {key: value.float() for key, value in out.items()}
    return out.float()


def _torchvision(role: str):
    import torchvision
    m = torchvision.models
    if role == "backbone":            # detection and face features: ResNet-50 to its last stage
        resnet = m.resnet50(weights=None)
        import torch
        return torch.nn.Sequential(*list(resnet.children())[:-2])
    if role == "segmenter":
        return m.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=19,
                                          aux_loss=False)
    if role.startswith("classifier"):  # classifier-a/-b/-c: an ensemble of different nets
        return {"classifier": m.resnet50, "classifier-a": m.resnet50, "classifier-b": m.mobilenet_v3_large,
                "classifier-c": m.efficientnet_b0}[role](weights=None)
    if role == "embedder":
        return m.resnet18(weights=None, num_classes=128)
    raise ValueError(f"no model for role {role!r}")


def _small(role: str):
    from torch import nn

    def convs(channels):
        layers, previous = [], 3
        for c in channels:
            layers += [nn.Conv2d(previous, c, 3, stride=2, padding=1), nn.ReLU()]
            previous = c
        return layers

    if role == "backbone":
        return nn.Sequential(*convs([8, 16, 32]))
    if role == "segmenter":
        class Segmenter(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = nn.Sequential(*convs([8, 16]), nn.Conv2d(16, 19, 1))

            def forward(self, x):
                out = nn.functional.interpolate(self.body(x), size=x.shape[-2:], mode="nearest")
                return {"out": out}
        return Segmenter()
    if role.startswith("classifier") or role == "embedder":
        width = {"classifier": 16, "classifier-a": 16, "classifier-b": 12, "classifier-c": 8, "embedder": 16}[role]
        classes = 128 if role == "embedder" else 1000
        return nn.Sequential(*convs([width, 2 * width]), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(2 * width, classes))
    raise ValueError(f"no model for role {role!r}")


# -- inputs ------------------------------------------------------------------------------

FRAME = {"gpu": (720, 1280), "cpu": (64, 96)}          # height, width of a camera frame
CROP = {"gpu": 224, "cpu": 32}


@functools.lru_cache(maxsize=8)
def frames(seed: int, count: int):
    """``count`` deterministic uint8 RGB frames (N, H, W, 3) for input ``seed``, as read-only
    numpy. They stand for frames that arrive decoded from a camera or a store, so each
    container makes an input once and keeps it: drawing 8 random 720p frames takes ~50 ms,
    work no real request does, which would otherwise count as pre-processing."""
    height, width = FRAME[size()]
    out = np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)
    out.flags.writeable = False
    return out


def normalise(batch_uint8, out=None):
    """CPU pre-processing every workflow starts with: uint8 → float32 in [-1, 1], staying
    NHWC (channels last, the layout the GPU stages compute in: :func:`as_images`), so it is
    one contiguous pass rather than a transposing one (~25% less CPU time). Written into
    ``out`` (N, H, W, 3) when given."""
    import torch
    x = _from_numpy(np.ascontiguousarray(batch_uint8))
    if out is None:
        out = torch.empty(x.shape, dtype=torch.float32)
    out.copy_(x)
    # -1 + x/127.5 in one pass over the floats (mul_ then sub_ made two: 3.1 vs 4.5 ms for
    # 8 720p frames with 4 threads on the GPU machine; one pass from the uint8s is slower)
    return torch.add(torch.tensor(-1.0), out, alpha=1 / 127.5, out=out)


def as_images(nhwc):
    """The (N, 3, H, W) view the models take of NHWC frames: no copy; its memory is
    channels-last, which :func:`infer` then uses as it is."""
    return nhwc.permute(0, 3, 1, 2)
