"""``faastube controller``: wire config → pool, directory, object table, socket server."""

from __future__ import annotations

import faulthandler
import functools
import logging
import os
import secrets
import signal
import threading
import time

from faastube import cuda
from faastube.config import Config, format_size, share_of
from faastube.errors import InvalidArgumentError
from faastube.cuda import HOST

from . import gpu
from .directory import Directory, redact
from .handlers import Handlers, load_secrets
from .metrics import RequestStats, serve_metrics
from .objects import ObjectTable
from .pool import Pool
from .reserver import Reserver
from .server import ControllerServer, bind_unix_socket
from .slabs import CudaSlab, MemfdSlab
from .transfer import TransferEngine, move_region

log = logging.getLogger("faastube.controller")

HOUSEKEEPING_INTERVAL_S = 0.1     # TTL precision and idle-slab checks
HEARTBEAT_EVERY = 5               # housekeeping ticks per Redis heartbeat (0.5 s)
# Note [Health endpoints]: the controller is live while its socket is served and its
# housekeeping ticks; a tick more than this late means it is wedged (a liveness probe then
# fails and the kubelet restarts it). Ready also needs Redis: a pod without it cannot
# publish or resolve objects, so functions should not be sent to its node.
HEALTH_STALL_S = 10.0


class Controller:
    def __init__(self, config: Config):
        self.config = config
        self.epoch = secrets.token_hex(6)
        namespace_secrets = load_secrets(config.secrets_file)
        self.directory = Directory(config.redis, config.node, self.epoch, config.tombstone_ttl_s)
        self.gpus = find_gpus(config)
        if config.stand_in_gpus and (self.gpus or config.stand_in_gpus < 0 or config.stand_in_gpus > 16):
            raise InvalidArgumentError("--stand-in-gpus takes 1 to 16 and needs --gpus none (stand-ins "
                                       "replace GPUs, they do not join them)")
        pin = bool(self.gpus)       # host slabs are pinned once when there are GPUs to copy to
        self.pools = [Pool(HOST, config.slab_size, config.pool_limit, config.idle_release_s,
                           slab_factory=functools.partial(MemfdSlab, pin=pin, mapped=bool(config.stand_in_gpus)),
                           idle_minimum=config.idle_minimum, reserve_share=config.reserve_share,
                           quota=config.namespace_quota, per_writer=True)]
        self.pools += [gpu_pool(config, devices, ordinal) for devices, ordinal in self.gpus]
        self.pools += [stand_in_pool(config, index) for index in range(config.stand_in_gpus)]
        if config.chunk_size < 64 << 10:
            raise InvalidArgumentError(f"--chunk-size must be at least 64KiB, got {config.chunk_size}")
        self.transfers = (TransferEngine(self.gpus[0][0], config.chunk_size, pump=config.native_pump)
                          if self.gpus else None)
        self.table = ObjectTable(self.pools, self.directory, config.eviction, config.evict_wait_s,
                                 move=functools.partial(move_region, self.transfers))
        self.reserver = Reserver(self.table, config.demand_window_s)
        self.table.wake_reserver = self.reserver.wake
        self.stats = RequestStats()
        self.handlers = Handlers(self.table, config.node, self.epoch, namespace_secrets, self.transfers,
                                 self.stats, self.reserver)
        self.server: ControllerServer | None = None
        self.metrics_server = None
        self._stop = threading.Event()
        self._swept_old_epochs = False
        self._housekept = time.monotonic()      # the last housekeeping tick: Controller.health

    def run(self) -> None:
        if self.config.metrics_port:
            try:
                self.metrics_server = serve_metrics(self.config.metrics_port, self.table,
                                                    self.directory, self.transfers, self.stats, self.health)
            except OSError as exc:
                raise InvalidArgumentError(
                    f"cannot serve metrics on port {self.config.metrics_port} ({exc.strerror or exc}): "
                    f"choose another --metrics-port / FAASTUBE_METRICS_PORT") from None
            log.info("metrics on http://0.0.0.0:%d/metrics", self.config.metrics_port)
        # Never two controllers for one node name: the second would mark the first's objects
        # lost (the sweep of old epochs below).
        self.directory.check_node_free()
        listener = bind_unix_socket(self.config.socket, self.config.socket_mode)
        self.server = ControllerServer(listener, self.table, self.handlers, self.stats,
                                       max_connections=self.config.max_connections,
                                       max_waiting_gets=self.config.max_waiting_gets,
                                       idle_timeout_s=self.config.idle_timeout_s,
                                       frame_timeout_s=self.config.frame_timeout_s)
        if self._stop.is_set():      # a SIGTERM during start-up found no server to stop
            self.server.stop()
        log.info("faastube controller serving %s (node %s, epoch %s, redis %s)", self.config.socket,
                 self.config.node, self.epoch, redact(self.config.redis))
        for pool in self.pools:
            log.info("pool %s: limit %s in %s slabs", pool.name, format_size(pool.limit),
                     format_size(pool.slab_size))
        self._sweep_old_epochs()
        keeper = threading.Thread(target=self._housekeeping, name="housekeeping", daemon=True)
        keeper.start()
        self.reserver.start()
        self.table.evictor.start()
        try:
            self.server.serve_forever()
        finally:
            self.shutdown()

    def health(self) -> dict:
        """Live while the socket is served and housekeeping (TTLs, heartbeats) ran in the last
        HEALTH_STALL_S; ready when also Redis is up (Note [Health endpoints]). What a
        DaemonSet's probes read (knative/controller-daemonset.yaml)."""
        from faastube import __version__
        stalled_s = time.monotonic() - self._housekept
        serving = self.server is not None and not self._stop.is_set()
        live = serving and stalled_s < HEALTH_STALL_S
        directory = self.directory.state(admin=False)
        return {"live": live, "ready": live and directory["state"] == "up", "serving": serving,
                "housekeeping_s_ago": round(stalled_s, 1), "directory": directory["state"],
                "version": __version__, "node": self.config.node}

    def stop(self, *_signal_args) -> None:
        self._stop.set()
        if self.server is not None:
            self.server.stop()

    def shutdown(self) -> None:
        """Free everything; the directory learns that this node's objects are lost."""
        self._stop.set()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        self.reserver.stop()
        self.table.evictor.stop()
        self.table.shutdown()
        if self.transfers is not None:
            self.transfers.close()
        if not self.directory.flush(timeout_s=5.0):
            log.warning("could not write every queued change to Redis before stopping")
        try:
            self.directory.mark_node_objects_lost(only_other_epochs=False)
        except Exception as exc:
            log.warning("could not mark this node's objects lost in Redis: %s", exc)
        self.directory.release_node()
        self.directory.close()
        try:
            os.unlink(self.config.socket)
        except FileNotFoundError:
            pass
        log.info("faastube controller stopped")

    def _sweep_old_epochs(self) -> None:
        """Objects a previous controller on this node held are lost: say so in Redis."""
        try:
            lost = self.directory.mark_node_objects_lost(only_other_epochs=True)
        except Exception as exc:
            log.warning("%s; will retry", exc)
            return
        self._swept_old_epochs = True
        if lost:
            log.info("marked %d objects of an earlier controller on this node as lost", lost)

    def _housekeeping(self) -> None:
        tick = 0
        while not self._stop.wait(HOUSEKEEPING_INTERVAL_S):
            self._housekept = time.monotonic()
            try:
                self.table.housekeeping()
                if tick % HEARTBEAT_EVERY == 0:
                    self.directory.heartbeat(self.config.socket)
                    if not self._swept_old_epochs and self.directory.healthy:
                        self._sweep_old_epochs()
            except Exception:
                log.exception("housekeeping failed")
            tick += 1


def find_gpus(config: Config) -> list:
    """[(devices, ordinal)] of the GPUs to pool: every GPU this process sees, unless
    ``--gpus none`` or CUDA is unusable here (then the host tier alone, said in the log)."""
    if config.gpus == "none":
        return []
    try:
        devices = cuda.devices()
    except cuda.CudaError as exc:
        log.info("no GPU pools: %s", exc)
        return []
    return [(devices, ordinal) for ordinal in range(len(devices.uuids))]


def gpu_pool(config: Config, devices, ordinal: int) -> Pool:
    total = devices.total_memory(ordinal)
    uuid = devices.uuids[ordinal]
    return Pool(uuid, config.gpu_slab_size, share_of(config.gpu_pool_limit, total), config.idle_release_s,
                slab_factory=functools.partial(CudaSlab, ordinal=ordinal, uuid=uuid),
                alignment=devices.granularity(ordinal),
                name=f"GPU {ordinal} {devices.name(ordinal)} {uuid}",
                limit_setting="--gpu-pool-limit / FAASTUBE_GPU_POOL_LIMIT",
                idle_minimum=config.idle_minimum, reserve_share=config.reserve_share,
                quota=config.namespace_quota, free_probe=functools.partial(gpu.free_memory, ordinal),
                free_share=config.gpu_free_share, watermark=share_of(config.gpu_watermark, total))


STAND_IN_MEMORY = 1 << 30      # what a stand-in's share settings are shares of


def stand_in_pool(config: Config, index: int) -> Pool:
    """Note [Host-backed stand-ins] (faastube/cuda.py): a tier of host memory with a GPU
    pool's settings, named ``host:<index>``."""
    device = f"{cuda.STAND_IN}{index}"
    return Pool(device, config.gpu_slab_size, share_of(config.gpu_pool_limit, STAND_IN_MEMORY),
                config.idle_release_s, slab_factory=functools.partial(MemfdSlab, mapped=True, device=device),
                name=f"stand-in {index} (host memory for a GPU)",
                limit_setting="--gpu-pool-limit / FAASTUBE_GPU_POOL_LIMIT",
                idle_minimum=config.idle_minimum, reserve_share=config.reserve_share,
                quota=config.namespace_quota)


def run_controller(config: Config) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    controller = Controller(config)

    def on_signal(*_signal_args) -> None:
        # Stopping from the first SIGTERM (or SIGINT) on: more of them change nothing, and a
        # handler that each new one re-entered before it returned would recurse until
        # RecursionError (a test sending SIGTERM every 0.2 ms saw it once).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        controller.stop()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # kill -USR1 writes every thread's stack to stderr: how to see where a controller hangs.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        controller.run()
    finally:
        # Stopped. The interpreter's exit puts back the default action of signals with a
        # Python handler, so a late SIGTERM (an orchestrator's second, or one that raced the
        # first) would turn a clean stop into death by signal (exit 143).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
