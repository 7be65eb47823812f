"""The controller's Unix socket: one thread per connection, frames in, replies out.

A connection is identified once, at accept, by ``SO_PEERCRED`` (pid, uid, gid), then by the
namespace it declares in ``hello``. A frame that is not a valid request gets an error reply
and the connection keeps going; a frame whose length prefix is over the limit cannot be
resynced, so it gets an error reply and the connection is closed. Nothing a client sends
can stop the accept loop or touch another connection's state.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import threading
import time

from faastube import protocol
from faastube.errors import FaasTubeError, FrameTooLarge, ProtocolError

from .handlers import Handlers
from .metrics import RequestStats
from .objects import ObjectTable, Session, WouldWait

log = logging.getLogger("faastube.controller")


def bind_unix_socket(path: str, mode: int) -> socket.socket:
    """Listen on ``path``, replacing a stale socket file but never a live controller's."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)          # nobody answers: a leftover from a controller that died
        else:
            raise FaasTubeError(f"another controller is already serving {path}; stop it or "
                                f"pass another --socket")
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, mode)
    listener.listen(1024)
    return listener


class ControllerServer:
    def __init__(self, listener: socket.socket, table: ObjectTable, handlers: Handlers,
                 stats: RequestStats | None = None):
        self.listener = listener
        self.table = table
        self.handlers = handlers
        self.stats = stats or RequestStats()
        self._stopping = threading.Event()
        self._wake_read, self._wake_write = os.pipe()      # Note [Signals wake the accept loop]
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._admin_uids = {0, os.getuid()}

    def serve_forever(self) -> None:
        """Accept connections until :meth:`stop`.

        Note [Signals wake the accept loop]: the kernel hands a process's SIGTERM to any of
        its threads, and CPython runs the handler in the main thread only when that thread
        runs again; blocked in ``accept`` it would not until the next connection. So the loop waits on the listener and on a wake-up
        pipe together: :meth:`stop` writes to it, and so does CPython's C signal handler
        (``signal.set_wakeup_fd``) whichever thread took the signal."""
        previous_wakeup = None
        if threading.current_thread() is threading.main_thread():
            previous_wakeup = signal.set_wakeup_fd(self._wake_write)
        selector = selectors.DefaultSelector()
        try:
            selector.register(self.listener, selectors.EVENT_READ)
            selector.register(self._wake_read, selectors.EVENT_READ)
            self.listener.setblocking(False)
            while not self._stopping.is_set():
                for key, _events in selector.select():
                    if key.fileobj is self._wake_read:
                        try:
                            os.read(self._wake_read, 512)   # a signal's handler runs on return
                        except BlockingIOError:
                            pass
                    elif not self._stopping.is_set():
                        self._accept()
        except (OSError, ValueError):
            if not self._stopping.is_set():        # stop() closed the listener under us
                raise
        finally:
            selector.close()
            if previous_wakeup is not None:
                signal.set_wakeup_fd(previous_wakeup)

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return                              # the peer gave up before we got to it
        conn.setblocking(True)
        pid, uid, gid = protocol.peer_credentials(conn)
        session = Session(pid, uid, gid, admin=uid in self._admin_uids)
        threading.Thread(target=self._serve_connection, args=(conn, session),
                         name=f"conn-{session.id}-pid{pid}", daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()
        try:
            os.write(self._wake_write, b"s")
        except (BlockingIOError, OSError):
            pass                                   # full (already woken) or closed
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()

    def _serve_connection(self, conn: socket.socket, session: Session) -> None:
        self.table.open_session(session)
        reader = protocol.FrameReader(conn)
        send_lock = threading.Lock()     # waiting gets answer from their own threads
        try:
            while True:
                try:
                    message = reader.read()
                except FrameTooLarge as exc:
                    self._send(conn, send_lock, protocol.error_message(None, exc))
                    return
                except ProtocolError as exc:
                    self._send(conn, send_lock, protocol.error_message(None, exc))
                    continue
                if message is None:
                    return                                  # the client closed: clean up
                self._answer(conn, send_lock, session, message)
        except OSError:
            pass                                            # peer vanished mid-reply
        finally:
            self.table.close_session(session)
            conn.close()

    def _answer(self, conn, send_lock, session: Session, message: dict, envelope=None) -> None:
        """Answer one request; a get that must wait is answered later from a helper thread."""
        seq = message.get("seq") if isinstance(message.get("seq"), int) else None
        started = time.perf_counter()
        fds = []
        try:
            if envelope is None:
                envelope = protocol.decode_request(message)
                answer = self.handlers.handle(session, envelope)
            else:
                answer = self.handlers.handle(session, envelope, may_wait=True)
            fds = answer.passed
            reply = protocol.reply_message(seq, answer.reply, [d for _fd, d in fds], answer.retired)
        except WouldWait:
            threading.Thread(target=self._answer_quietly, name=f"wait-{session.id}-{seq}",
                             args=(conn, send_lock, session, message, envelope), daemon=True).start()
            return
        except FaasTubeError as exc:
            reply = protocol.error_message(seq, exc)
        except Exception as exc:  # a bug must cost one request, not the controller
            log.exception("request %r from pid %d failed", message.get("op"), session.pid)
            reply = protocol.error_message(seq, FaasTubeError(
                f"internal controller error: {type(exc).__name__}: {exc}"))
        # Counted before the reply goes: a client that has its reply finds it counted, and the
        # time leaves out the send, where the woken client may take this thread's core.
        op = message.get("op")
        self.stats.observe(op if isinstance(op, str) and op in protocol.REQUESTS else "invalid",
                           reply["ok"], time.perf_counter() - started)
        try:
            self._send(conn, send_lock, reply, [fd for fd, _info in fds])
        finally:
            for fd, _info in fds:
                os.close(fd)

    def _answer_quietly(self, conn, send_lock, session, message, envelope) -> None:
        try:
            self._answer(conn, send_lock, session, message, envelope)
        except OSError:
            pass            # the client left while we waited; close_session cleans up

    @staticmethod
    def _send(conn: socket.socket, send_lock: threading.Lock, reply: dict, fds=()) -> None:
        with send_lock:
            protocol.send_frame(conn, reply, fds)
