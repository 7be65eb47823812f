"""``faastube controller``: wire config → pool, directory, object table, socket server."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import threading

from faastube.config import Config, format_size

from .directory import Directory, redact
from .handlers import Handlers, load_secrets
from .objects import ObjectTable
from .pool import Pool
from .server import ControllerServer, bind_unix_socket

log = logging.getLogger("faastube.controller")

HOUSEKEEPING_INTERVAL_S = 0.1     # TTL precision and idle-slab checks
HEARTBEAT_EVERY = 5               # housekeeping ticks per Redis heartbeat (0.5 s)


class Controller:
    def __init__(self, config: Config):
        self.config = config
        self.epoch = secrets.token_hex(6)
        namespace_secrets = load_secrets(config.secrets_file)
        self.directory = Directory(config.redis, config.node, self.epoch, config.tombstone_ttl_s)
        self.pool = Pool("host", config.slab_size, config.pool_limit, config.idle_release_s)
        self.table = ObjectTable(self.pool, self.directory)
        self.handlers = Handlers(self.table, config.node, self.epoch, namespace_secrets)
        self.server: ControllerServer | None = None
        self._stop = threading.Event()
        self._swept_old_epochs = False

    def run(self) -> None:
        listener = bind_unix_socket(self.config.socket, self.config.socket_mode)
        self.server = ControllerServer(listener, self.table, self.handlers)
        log.info("faastube controller serving %s (node %s, epoch %s, host pool limit %s in %s "
                 "slabs, redis %s)", self.config.socket, self.config.node, self.epoch,
                 format_size(self.config.pool_limit), format_size(self.config.slab_size),
                 redact(self.config.redis))
        self._sweep_old_epochs()
        keeper = threading.Thread(target=self._housekeeping, name="housekeeping", daemon=True)
        keeper.start()
        try:
            self.server.serve_forever()
        finally:
            self.shutdown()

    def stop(self, *_signal_args) -> None:
        self._stop.set()
        if self.server is not None:
            self.server.stop()

    def shutdown(self) -> None:
        """Free everything; the directory learns that this node's objects are lost."""
        self._stop.set()
        self.table.shutdown()
        if not self.directory.flush(timeout_s=5.0):
            log.warning("could not write every queued change to Redis before stopping")
        try:
            self.directory.mark_node_objects_lost(only_other_epochs=False)
        except Exception as exc:
            log.warning("could not mark this node's objects lost in Redis: %s", exc)
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
            try:
                self.table.housekeeping()
                if tick % HEARTBEAT_EVERY == 0:
                    self.directory.heartbeat(self.config.socket)
                    if not self._swept_old_epochs and self.directory.healthy:
                        self._sweep_old_epochs()
            except Exception:
                log.exception("housekeeping failed")
            tick += 1


def run_controller(config: Config) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    controller = Controller(config)
    signal.signal(signal.SIGTERM, controller.stop)
    signal.signal(signal.SIGINT, controller.stop)
    controller.run()
