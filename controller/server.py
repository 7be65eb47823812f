"""The controller's Unix socket: one thread per connection, frames in, replies out.

A connection is identified once, at accept, by ``SO_PEERCRED`` (pid, uid, gid), then by the
namespace it declares in ``hello``. A frame that is not a valid request gets an error reply
and the connection keeps going; a frame whose length prefix is over the limit cannot be
resynced, so it gets an error reply and the connection is closed. Nothing a client sends
can stop the accept loop or touch another connection's state.

Note [Bounded connections]: every resource a client can make the server spend is bounded.
Connections: at most ``--max-connections`` (lowered to fit the open-files limit, which is
raised to its hard limit first: a connection costs its socket and its peer's pidfd); one
more is answered ControllerBusyError and closed. Running out of descriptors or threads
anyway (another limit of the machine) refuses that one connection the same way and the
loop goes on; a spare descriptor is kept to accept and refuse with when there is none left.
A frame must arrive whole within ``--frame-timeout`` of its first byte; a connection that sent
nothing for ``--idle-timeout`` and holds nothing (no view, no object being written, no
waiting get) is closed, and the SDK reconnects on its next call. Waiting gets: Note
[Waiting gets own no thread] (controller/waiting.py).
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import selectors
import signal
import socket
import threading
import time

from faastube import protocol
from faastube.errors import (ControllerBusyError, ControllerUnavailableError, FaasTubeError, FrameTooLarge,
                             ProtocolError)

from .handlers import Handlers
from .metrics import RequestStats
from .objects import ObjectTable, Session, WouldWait
from .waiting import Parked, ParkedGets
from .watchers import SlabPusher

log = logging.getLogger("faastube.controller")

READ_TICK_S = 1.0             # a connection's reader wakes this often to check its deadlines
DESCRIPTORS_KEPT = 256        # open files left for slabs, Redis and replies' descriptors


def bind_unix_socket(path: str, mode: int) -> socket.socket:
    """Listen on ``path``, replacing a stale socket file but never a live controller's."""
    try:
        return _bind_unix_socket(path, mode)
    except OSError as exc:
        raise FaasTubeError(
            f"cannot listen on {path} ({exc.strerror or exc}): pass --socket (FAASTUBE_SOCKET) a "
            f"path of at most 107 bytes in a folder user {os.getuid()} may write") from None


def _bind_unix_socket(path: str, mode: int) -> socket.socket:
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


def _has_more(conn: socket.socket) -> bool:
    """Whether the peer has sent bytes not read yet (or closed)."""
    try:
        conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    return True


def connection_limit(wanted: int) -> int:
    """The most connections this process can serve: ``wanted``, lowered to fit the open-files
    limit (whose soft value is raised to the hard one first). Note [Bounded connections]."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    fitting = max(1, (soft - min(DESCRIPTORS_KEPT, soft // 4)) // 2)
    if soft == resource.RLIM_INFINITY or fitting >= wanted:
        return wanted
    log.warning("serving at most %d connections, not %d: the open-files limit is %d "
                "(raise it with ulimit -n)", fitting, wanted, soft)
    return fitting


class ControllerServer:
    def __init__(self, listener: socket.socket, table: ObjectTable, handlers: Handlers,
                 stats: RequestStats | None = None, max_connections: int = 1024,
                 max_waiting_gets: int = 4096, idle_timeout_s: float = 0.0, frame_timeout_s: float = 10.0):
        self.listener = listener
        self.table = table
        self.handlers = handlers
        self.stats = stats or RequestStats()
        self.max_connections = connection_limit(max_connections)
        self.idle_timeout_s = idle_timeout_s
        self.frame_timeout_s = frame_timeout_s
        self.parked = ParkedGets(table, max_waiting_gets)
        self.pusher = SlabPusher(table)                     # Note [Slabs mapped ahead]
        self.stats.connection_limit = self.max_connections
        self._count_lock = threading.Lock()
        self._stopping = threading.Event()
        self._wake_read, self._wake_write = os.pipe()      # Note [Signals wake the accept loop]
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._spare_fd = os.open(os.devnull, os.O_RDONLY)   # Note [Bounded connections]
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
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                raise
            self._refuse_without_descriptors(exc)
            return
        conn.setblocking(True)
        with self._count_lock:
            full = self.stats.connections >= self.max_connections
            if not full:
                self.stats.connections += 1
        if full:
            self._refuse(conn, "connections", f"the controller serves {self.max_connections} connections, "
                                              f"its limit (--max-connections); close idle ones or try again later")
            return
        try:
            pid, uid, gid = protocol.peer_credentials(conn)
            session = Session(pid, uid, gid, admin=uid in self._admin_uids)
            threading.Thread(target=self._serve_connection, args=(conn, session),
                             name=f"conn-{session.id}-pid{pid}", daemon=True).start()
        except (RuntimeError, OSError) as exc:        # no thread (or descriptor) to be had now
            self._count_closed()
            self._refuse(conn, "threads", f"the controller cannot serve another connection now ({exc}); "
                                          f"try again later")

    def _refuse(self, conn: socket.socket, limit: str, why: str) -> None:
        """Answer a connection ControllerBusyError and close it (Note [Bounded connections])."""
        refused = self.stats.count_refused(limit)
        if refused in (1, 10, 100) or refused % 1000 == 0:
            log.warning("refused a connection (%d so far): %s", refused, why)
        try:
            conn.settimeout(0.1)
            protocol.send_frame(conn, protocol.error_message(None, ControllerBusyError(why)))
        except OSError:
            pass
        finally:
            conn.close()

    def _refuse_without_descriptors(self, exc: OSError) -> None:
        """No descriptor left to accept with: free the spare one, accept and refuse the
        connection with it, take the spare back (else the listener stays readable and the
        loop spins, and the client waits for nothing)."""
        if self._spare_fd is None:
            time.sleep(0.01)
            return
        os.close(self._spare_fd)
        self._spare_fd = None
        try:
            conn, _ = self.listener.accept()
        except OSError:
            conn = None
        if conn is not None:
            self._refuse(conn, "descriptors", f"the controller is out of file descriptors ({exc.strerror}); "
                                              f"try again later")
        try:
            self._spare_fd = os.open(os.devnull, os.O_RDONLY)
        except OSError:
            pass

    def _count_closed(self) -> None:
        with self._count_lock:
            self.stats.connections -= 1

    def stop(self) -> None:
        self._stopping.set()
        self.parked.stop()
        self.pusher.stop()
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
        try:
            self.table.open_session(session)
            # Kernel receive timeouts (not Python's, a poll per call): the loop wakes every
            # READ_TICK_S to check the frame and idle deadlines.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, protocol.timeval(READ_TICK_S))
            # A client that does not read its replies gets its connection closed, instead of
            # holding a thread (and the answer threads, for its parked gets) in send.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, protocol.timeval(self.frame_timeout_s))
            reader = protocol.FrameReader(conn)
            send_lock = threading.Lock()     # parked gets answer from the answer threads
            self.pusher.opened(session.id, conn, send_lock)
            last_frame = time.monotonic()
            partial_since = None
            while True:
                try:
                    message = reader.read()
                except (BlockingIOError, TimeoutError):
                    now = time.monotonic()
                    if reader.partial:
                        partial_since = partial_since or now
                        if now - partial_since > self.frame_timeout_s:
                            self._send(conn, send_lock, protocol.error_message(None, ProtocolError(
                                f"a frame took more than {self.frame_timeout_s:g} s to arrive "
                                f"(--frame-timeout): closing")))
                            return
                    elif (self.idle_timeout_s and now - last_frame > self.idle_timeout_s
                          and self.table.holds_nothing(session) and not _has_more(conn)):
                        # Nothing was read after the check: the SDK may send its next
                        # request again on a new connection.
                        parting = protocol.error_message(None, ControllerUnavailableError(
                            f"the controller closed this connection after {self.idle_timeout_s:g} s "
                            f"idle (--idle-timeout)"))
                        self._send(conn, send_lock, {**parting, "idle": True})
                        return
                    continue
                except FrameTooLarge as exc:
                    self._send(conn, send_lock, protocol.error_message(None, exc))
                    return
                except ProtocolError as exc:
                    self._send(conn, send_lock, protocol.error_message(None, exc))
                    continue
                if message is None:
                    return                                  # the client closed: clean up
                last_frame, partial_since = time.monotonic(), None
                self._answer(conn, send_lock, session, message)
        except OSError:
            pass                                            # peer vanished mid-reply
        finally:
            self.pusher.closed(session.id)
            self.table.close_session(session)
            conn.close()
            self._count_closed()

    def _answer(self, conn, send_lock, session: Session, message: dict, envelope=None,
                parked_until: float | None = None) -> None:
        """Answer one request; a get that must wait is parked (Note [Waiting gets own no
        thread]) and answered later from an answer thread (``envelope`` given: a retry)."""
        seq = message.get("seq") if isinstance(message.get("seq"), int) else None
        started = time.perf_counter()
        fds = []
        try:
            if envelope is None:
                envelope = protocol.decode_request(message)
                answer = self.handlers.handle(session, envelope)
            else:
                answer = self.handlers.handle(session, envelope, retry=True)
            fds = answer.passed
            reply = protocol.reply_message(seq, answer.reply, [d for _fd, d in fds], answer.retired)
        except WouldWait as wait:
            try:
                self._park(conn, send_lock, session, message, envelope, wait, parked_until)
                return
            except ControllerBusyError as exc:
                self.stats.count_refused("waiting_gets")
                reply = protocol.error_message(seq, exc)
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

    def _park(self, conn, send_lock, session: Session, message: dict, envelope, wait: WouldWait,
              parked_until: float | None) -> None:
        """Park a get that must wait. A retry keeps its first deadline while it waits for the
        seal; a move between tiers that began since gives it the move's bound at least."""
        deadline = time.monotonic() + wait.wait_s
        if parked_until is not None:
            deadline = parked_until if wait.reason == "seal" else max(parked_until, deadline)
        self.parked.park(Parked(session, wait.object_id, deadline, wait.expired, self._answer_parked,
                                (conn, send_lock, message, envelope)))

    def _answer_parked(self, entry: Parked) -> None:
        """(an answer thread) Answer a parked get: its deadline's error, or ask the table again."""
        conn, send_lock, message, envelope = entry.context
        if entry.session.closed:
            return
        try:
            if time.monotonic() >= entry.deadline:
                with self.table.lock:
                    expired = not self.table.may_answer(entry.object_id, entry.session)
                if expired:
                    self.stats.observe("get", False, 0.0)
                    self._send(conn, send_lock, protocol.error_message(message.get("seq"), entry.expired))
                    return
            self._answer(conn, send_lock, entry.session, message, envelope, entry.deadline)
        except OSError:
            pass            # the client left while it waited; close_session cleans up
        except Exception:   # a bug must cost one request, not the answer thread's others
            log.exception("answering a parked get failed")

    @staticmethod
    def _send(conn: socket.socket, send_lock: threading.Lock, reply: dict, fds=()) -> None:
        with send_lock:
            try:
                protocol.send_frame(conn, reply, fds)
            except OSError:
                # Part of a frame may have gone: the stream is out of step. End it (the
                # connection's reader wakes and cleans up).
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                raise
