"""Where pool memory becomes an array and an array becomes pool memory again, in one place
(as ``torch/multiprocessing/reductions.py`` does for tensors): the slabs this process maps,
numpy views of host objects, CuPy views of GPU objects (PyTorch and JAX take the same memory
through DLPack), and a GPU array's address, stream and layout for a put.

Note [One mapping per slab]: a slab's descriptor arrives once per process (on the first
reply that needs it) and is mapped at once: read-only always, read-write too if the
descriptor allows it (Note [Read-only descriptors] in controller/slabs.py). Later gets are
one round trip plus pointer arithmetic. Mappings of retired slabs are dropped from the cache;
views still using one keep it alive, and the kernel unmaps it with the last view.

Note [GPU views]: a GPU slab's descriptor is imported and mapped once per process too
(faastube/cuda.py), read-only for readers. A GPU object becomes a CuPy array over the mapping
(``cupy.cuda.UnownedMemory``) whose owner is a small holder object (:class:`GpuOwner`): every
view, slice, and DLPack export (``torch.from_dlpack``) of the array keeps the holder alive,
so its finalizer ends the lease exactly when the last of them is gone; the holder keeps the
mapping alive, so a slab the controller retires stays mapped while a view uses it. Arrays
are found again (seal, release) by their device address (faastube/leases.py).
"""

from __future__ import annotations

import math
import mmap
import os
import threading

import numpy as np

from . import cuda
from .errors import NotAnArrayError
from .protocol import Granted, SlabDescriptor


class HostSlab:
    """A host slab mapped into this process: always readable, writable if the controller
    sent a writer's descriptor."""

    def __init__(self, size: int):
        self.size = size
        self.readable: mmap.mmap | None = None
        self.writable: mmap.mmap | None = None

    def attach(self, fd: int, writable: bool) -> None:
        try:
            if self.readable is None:
                self.readable = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                          prot=mmap.PROT_READ)
            if writable and self.writable is None:
                self.writable = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                          prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)

    def forget(self) -> None:
        """After fork: the child's copies of the mappings go with the child."""


class GpuSlab:
    """A GPU slab mapped into this process (Note [GPU views]): read-only, and read-write too
    if the controller sent a writer's descriptor."""

    def __init__(self, size: int, device: str):
        self.size = size
        self.device = device
        self.readable: cuda.VmmMapping | None = None
        self.writable: cuda.VmmMapping | None = None

    def attach(self, fd: int, writable: bool) -> None:
        if writable:
            if self.writable is None:
                self.writable = cuda.VmmMapping.import_fd(fd, self.size, self.device, writable=True)
                return
        elif self.readable is None:
            self.readable = cuda.VmmMapping.import_fd(fd, self.size, self.device, writable=False)
            return
        os.close(fd)

    def forget(self) -> None:
        """After fork: CUDA mappings do not survive it; there is nothing to unmap."""
        for mapping in (self.readable, self.writable):
            if mapping is not None:
                mapping.forget()


class SlabMappings:
    """This process's mapped slabs by slab id (Note [One mapping per slab]): the connection
    hands it every descriptor a reply carries and every slab a reply retires."""

    def __init__(self):
        self._by_id: dict[int, HostSlab | GpuSlab] = {}
        # Replies and the slab watcher (faastube/watcher.py) attach from their own threads: a
        # slab is mapped once, and a reply for a slab being mapped waits for that mapping.
        self._lock = threading.Lock()

    def attach(self, descriptor: SlabDescriptor, fd: int) -> None:
        """Map a passed descriptor (closing it); raises CudaError for a GPU this process
        cannot use."""
        with self._lock:
            mapping = self._by_id.get(descriptor.slab)
            if mapping is None:
                mapping = (HostSlab(descriptor.size) if cuda.in_host_memory(descriptor.device)
                           else GpuSlab(descriptor.size, descriptor.device))
            mapping.attach(fd, descriptor.writable)
            self._by_id[descriptor.slab] = mapping      # only once it maps: a failure leaves none

    def retire(self, slab_ids) -> None:
        with self._lock:
            for slab_id in slab_ids:
                self._by_id.pop(slab_id, None)

    def clear(self) -> None:
        """Slab ids belong to one controller epoch: a new epoch starts an empty cache."""
        with self._lock:
            self._by_id.clear()

    def forget(self) -> None:
        """After fork: drop every mapping without unmapping what the parent still uses."""
        self._lock = threading.Lock()       # a parent's thread may have held it at the fork
        for mapping in self._by_id.values():
            mapping.forget()
        self._by_id.clear()

    def __getitem__(self, slab_id: int) -> HostSlab | GpuSlab:
        return self._by_id[slab_id]

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self):
        with self._lock:        # a snapshot: the watcher's thread may attach meanwhile
            return iter(list(self._by_id))


class GpuOwner:
    """The owner of a GPU object's memory in this process (Note [GPU views])."""
    __slots__ = ("mapping", "__weakref__")

    def __init__(self, mapping):
        self.mapping = mapping


class ReadOnlyView(np.ndarray):
    """A got host object's numpy view.

    Note [Read-only over DLPack]: its pages are mapped read-only, and DLPack has no
    read-only flag PyTorch honours: ``torch.from_dlpack`` of it, then a write, would kill
    the process with SIGSEGV. So a read-only view refuses to be exported through DLPack,
    with a clear error; arrays computed from it (writable) export as usual."""

    def __dlpack__(self, *args, **kwargs):
        if not self.flags.writeable:
            raise BufferError(
                "a FaaSTube view is read-only (its memory is mapped read-only), which DLPack "
                "cannot pass on: a write through it would crash the process. Export a copy "
                "(numpy.array(view)) to write, or read it with numpy")
        return super().__dlpack__(*args, **kwargs)


def host_view(slabs: SlabMappings, grant: Granted, writable: bool) -> np.ndarray:
    """A flat numpy array over a host object's bytes (read-only unless ``writable``: then
    a :class:`ReadOnlyView`)."""
    mapping = slabs[grant.slab]
    buffer = mapping.writable if writable else mapping.readable
    array = np.frombuffer(buffer, dtype=np.dtype(grant.dtype), count=math.prod(grant.shape),
                          offset=grant.offset)
    return array if writable else array.view(ReadOnlyView)


def gpu_view(slabs: SlabMappings, grant: Granted, writable: bool):
    """(flat CuPy array over a GPU object, its owner, its start address) (Note [GPU views])."""
    slab = slabs[grant.slab]
    # A process that wrote in a slab reads through its read-write mapping: the controller
    # sends each slab's descriptor once, the writer's when it is a writer first.
    mapping = slab.writable if writable else slab.readable or slab.writable
    start = mapping.address + grant.offset
    owner = GpuOwner(mapping)
    array = gpu_array_at(start, grant.nbytes, (math.prod(grant.shape),), np.dtype(grant.dtype),
                         mapping.ordinal, owner)
    return array, owner, start


def gpu_address(slabs: SlabMappings, grant: Granted) -> int:
    """The device address a writer's GPU object starts at (put copies there)."""
    return slabs[grant.slab].writable.address + grant.offset


def gpu_array_at(address: int, nbytes: int, shape: tuple, dtype: np.dtype, ordinal: int, owner=None):
    """A CuPy array over ``nbytes`` of GPU ``ordinal``'s memory at ``address``, kept alive by
    ``owner`` (None: the caller keeps the memory alive)."""
    import cupy
    memory = cupy.cuda.UnownedMemory(address, max(nbytes, 1), owner, device_id=ordinal)
    return cupy.ndarray(shape, dtype=dtype, memptr=cupy.cuda.MemoryPointer(memory, 0))


def cuda_interface(array) -> dict | None:
    """The ``__cuda_array_interface__`` of a CuPy array, a CUDA torch tensor or any other
    GPU array that has one, else None."""
    if isinstance(array, np.ndarray) or not hasattr(type(array), "__cuda_array_interface__"):
        return None
    try:
        return array.__cuda_array_interface__
    except Exception:           # a CPU torch tensor, or one that requires grad
        return None


def cuda_address(array) -> int | None:
    """The device address of a GPU array (:func:`cuda_interface`), else None."""
    interface = cuda_interface(array)
    return None if interface is None else int(interface["data"][0])


def is_c_contiguous(interface: dict, shape: tuple, itemsize: int) -> bool:
    """Whether a ``__cuda_array_interface__`` describes one C-contiguous block."""
    strides = interface.get("strides")
    if strides is None:
        return True
    expected, step = [], itemsize
    for dim in reversed(shape):
        expected.append(step)
        step *= dim
    return tuple(strides) == tuple(reversed(expected))


def stream_of(array, interface: dict, ordinal: int) -> int:
    """The stream a GPU array's data is valid on (Note [Put copies with one driver call],
    faastube/sdk.py): the interface's own (version 3), else PyTorch's current stream for a
    torch tensor, else the legacy default stream, which CuPy and PyTorch use unless told
    otherwise."""
    stream = interface.get("stream")
    if stream:                        # 1 and 2 mean the legacy and per-thread default streams,
        return int(stream)            # as they do to the driver
    if type(array).__module__.split(".", 1)[0] == "torch":
        import torch
        return int(torch.cuda.current_stream(ordinal).cuda_stream)
    return 1                          # CU_STREAM_LEGACY


def device_of_array(array, address: int) -> int:
    """The ordinal of the GPU a GPU array's memory is on, or NotAnArrayError."""
    try:
        return cuda.device_of_pointer(address)
    except cuda.CudaError as exc:
        raise NotAnArrayError(f"faastube.put: this {type(array).__name__}'s __cuda_array_interface__ "
                              f"points at {address:#x}, which is not GPU memory of this process "
                              f"({exc})") from None
