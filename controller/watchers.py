"""Slab descriptors sent to watching connections unasked (Note [Slabs mapped ahead],
faastube/watcher.py): one thread sends, whenever the object table says a watcher has new
slabs of its namespace, or retired ones, to hear of.

The table calls :meth:`SlabPusher.want` with its lock held, so that only marks the session;
the thread takes what to send from the table (``take_watched``) and sends it outside the
lock. A watcher that does not read its socket would block the thread in ``send``: a
watcher whose socket cannot take more is cut off instead (its process maps slabs on its
gets, as without a watcher), so one such client delays no other.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading

from faastube import protocol

log = logging.getLogger("faastube.controller")

FDS_PER_FRAME = 32              # well below SCM_RIGHTS's 253 descriptors per message


class SlabPusher:
    def __init__(self, table):
        self.table = table
        self._connections: dict[int, tuple[socket.socket, threading.Lock]] = {}
        self._wanted: set[int] = set()
        self._changed = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="slab-push", daemon=True)
        self._thread.start()
        table.push_to = self.want

    def opened(self, session_id: int, conn: socket.socket, send_lock: threading.Lock) -> None:
        with self._changed:
            self._connections[session_id] = (conn, send_lock)

    def closed(self, session_id: int) -> None:
        with self._changed:
            self._connections.pop(session_id, None)
            self._wanted.discard(session_id)

    def want(self, session) -> None:
        """(table lock held) ``session`` has something to be sent."""
        with self._changed:
            self._wanted.add(session.id)
            self._changed.notify()

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify()
        self._thread.join(5)

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._wanted and not self._stopping:
                    self._changed.wait()
                if self._stopping:
                    return
                wanted, self._wanted = self._wanted, set()
            for session_id in wanted:
                try:
                    self._push(session_id)
                except Exception:   # a bug must cost one watcher its pushes, not every watcher
                    log.exception("sending slabs to watching session %d failed", session_id)

    def _push(self, session_id: int) -> None:
        with self._changed:
            connection = self._connections.get(session_id)
        if connection is None:
            return
        taken = self.table.take_watched(session_id)
        if taken is None:
            return
        fds, retired = taken
        if not fds and not retired:
            return
        conn, send_lock = connection
        batches = [fds[start:start + FDS_PER_FRAME] for start in range(0, len(fds), FDS_PER_FRAME)] or [[]]
        try:
            for number, batch in enumerate(batches):
                _, writable, _ = select.select([], [conn], [], 0)
                if not writable:
                    log.warning("watching session %d does not read its slab descriptors: "
                                "closing its connection", session_id)
                    try:
                        conn.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                frame = protocol.reply_message(None, protocol.Done(), [d for _fd, d in batch],
                                               retired if number == 0 else ())
                frame["watched"] = True
                with send_lock:
                    protocol.send_frame(conn, frame, [fd for fd, _d in batch])
        except OSError:
            pass                        # the watcher left; its connection's thread cleans up
        finally:
            for fd, _descriptor in fds:
                os.close(fd)
