"""The slab watcher: a thread of the SDK that maps its namespace's slabs as the controller makes
them, so that gets do not.

Note [Slabs mapped ahead]: a process's first get of an object in a slab it has not mapped
imports and maps that slab on the get's path (on a GPU: import the exported handle, reserve
address space, map, set access; about a millisecond for a fresh process on an H200, a few
hundred µs for each new 1 GB slab later), where a warm get takes under 100 µs. So, once a
process has connected, a thread of its own opens a second connection and asks ``watch``:
the controller sends on it, unasked, a read-only descriptor of every slab of the namespace
(``FAASTUBE_MAP_AHEAD``: GPU slabs, the default, or host slabs too), those there now and each
new one as it is made, and which slabs it retired. The thread maps each into the process's
one slab cache (faastube/views.py) and drops the retired ones at once, where a process that
only maps on gets hears of a retirement on its next reply; a GPU slab's memory goes back to
the device only once every process has unmapped it. A get whose slab the thread has mapped
finds it in the cache (its reply's descriptor is closed unused); one whose slab it is still
mapping waits for that mapping. The thread starts nothing on a machine where this process
cannot use a GPU (``gpu``), waits until the process runs on one, and maps only slabs of GPUs
it runs on (mapping one elsewhere would make the process a CUDA context on that GPU, hundreds
of MB of its memory, which a process that only touches host objects must not pay); it ends
when its connection closes (the SDK's next connection starts
another), and a failure costs only the mapping ahead, never a request.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from .config import Config

log = logging.getLogger("faastube")


GPU_WAIT_TICK_S = 0.25


def _can_map_gpus() -> bool:
    """Whether this process can map GPU slabs (asked on the watcher's thread: loading CUDA
    takes a while, and CPU-only processes never pay it on a request)."""
    try:
        from . import cuda
        return bool(cuda.devices().uuids)
    except Exception:           # no CUDA bindings, no driver, no GPU: nothing to map ahead
        return False


def _gpu_in_use(uuid: str | None = None) -> bool:
    """Whether this process runs on GPU ``uuid`` (any of its GPUs if None) already: mapping a
    slab of a GPU it does not use would make it a CUDA context there (hundreds of MB of that
    GPU's memory), which a process that only ever touches host objects must not pay."""
    from . import cuda
    try:
        found = cuda.devices()
        return any(found.in_use(u) for u in ([uuid] if uuid else found.uuids))
    except Exception:
        return False


class SlabWatcher:
    """The watcher thread of one client connection (Note [Slabs mapped ahead])."""

    def __init__(self, config: Config, slabs, epoch: str | None):
        self.config = config
        self.slabs = slabs
        self.epoch = epoch
        self.connection = None
        self._closed = threading.Event()
        self._warmed = False
        self.thread = threading.Thread(target=self._run, name="faastube-slab-watcher", daemon=True)

    def start(self) -> "SlabWatcher":
        self.thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def close(self) -> None:
        self._closed.set()
        connection = self.connection
        if connection is not None:
            connection.close()

    def forget(self) -> None:
        """After fork: the parent's watcher and its socket are the parent's."""
        if self.connection is not None:
            self.connection.reset()

    def _accept(self, descriptor) -> bool:
        from .cuda import in_host_memory
        return in_host_memory(descriptor.device) or _gpu_in_use(descriptor.device)

    def _warm(self) -> None:
        """After the first GPU slab is mapped: make (and drop) a view over it, so the first
        get's view finds CuPy's code for it loaded (the process's first CuPy array over
        foreign memory costs far more than later ones)."""
        if self._warmed:
            return
        from . import cuda
        from .views import gpu_array_at
        for slab_id in self.slabs:
            try:
                slab = self.slabs[slab_id]
            except KeyError:
                continue
            mapping = getattr(slab, "readable", None) or getattr(slab, "writable", None)
            if isinstance(mapping, cuda.VmmMapping):
                gpu_array_at(mapping.address, 1, (1,), np.dtype("uint8"), mapping.ordinal, mapping)
                self._warmed = True
                return

    def _run(self) -> None:
        from . import protocol
        from .connection import Connection
        if self.config.map_ahead == "gpu":
            if not _can_map_gpus():
                return
            # Until this process runs on a GPU, there is nothing it could map for free.
            while not _gpu_in_use():
                if self._closed.wait(GPU_WAIT_TICK_S):
                    return
        try:
            connection = Connection(self.config, self.slabs)
            connection.epoch = self.epoch           # the same controller: keep the cache
            connection.accept_slab = self._accept
            self.connection = connection
            if self._closed.is_set():
                return
            connection.request(protocol.Watch(self.config.map_ahead))
            if self._closed.is_set():
                connection.close()
                return
            connection.follow(self._warm)
        except Exception as exc:    # the controller went away, or refused: gets map as before
            log.debug("the slab watcher stopped: %s", exc)
