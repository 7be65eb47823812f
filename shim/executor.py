"""Action processes: the user's code runs apart from the HTTP server, so ``sys.exit``, a
crash or a hung import cannot take the server down. The server talks to each one over two
private pipes (shim/launcher.py has the protocol); a reply read that ends in EOF means the
process exited, and a launcher that reads EOF on its request pipe (the server is gone)
exits.
"""

from __future__ import annotations

import os
import queue
import secrets
import subprocess
import sys
import threading


class ActionExited(Exception):
    """The action process exited (during init or during a call)."""

    def __init__(self, returncode):
        super().__init__(f"the action process exited with {returncode}")
        self.returncode = returncode


class ActionProcess:
    """One action process. With ``capture``, its stdout and stderr come back through pipes
    cut into one block per activation (Note [Logs per activation])."""

    def __init__(self, folder: str, main: str, env: dict, capture: bool = False,
                 entry: str = "__main__.py"):
        request_read, self._request_write = os.pipe()
        self._reply_read, reply_write = os.pipe()
        marker = f"\x1e\x1efaastube-end-{secrets.token_hex(8)}\x1e\x1e"
        output = subprocess.PIPE if capture else None
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "shim.launcher", str(request_read), str(reply_write), main, entry],
                cwd=folder, env={**env, "FAASTUBE_LOG_MARKER": marker} if capture else env,
                stdin=subprocess.DEVNULL, stdout=output, stderr=output,
                pass_fds=(request_read, reply_write))
        finally:
            os.close(request_read)
            os.close(reply_write)
        self._requests = os.fdopen(self._request_write, "wb")
        self._replies = os.fdopen(self._reply_read, "rb")
        self.logs = None
        if capture:
            self.logs = (LogSplitter(self.process.stdout, marker.encode()),
                         LogSplitter(self.process.stderr, marker.encode()))

    def take_logs(self) -> tuple[bytes, bytes]:
        """The output of the activation (or start-up) that just ended: (stdout, stderr)."""
        return self.logs[0].take(), self.logs[1].take()

    def wait_ready(self) -> None:
        """Block until the action is imported; ActionExited if the process died instead."""
        if not self._replies.readline():
            raise ActionExited(self.process.wait())

    def interact(self, request: bytes) -> bytes:
        """Send one request line; the reply line without its newline, or ActionExited."""
        try:
            self._requests.write(request + b"\n")
            self._requests.flush()
        except BrokenPipeError:
            raise ActionExited(self.process.wait()) from None
        reply = self._replies.readline()
        if not reply.endswith(b"\n"):
            raise ActionExited(self.process.wait())
        return reply[:-1]


LOG_BLOCK_LIMIT = 10 << 20     # bytes of one activation's stdout (or stderr) held to write whole


class LogSplitter:
    """Note [Logs per activation]: with several action processes running at once, their
    output must not interleave inside an activation's logs. The launcher writes a private
    marker after flushing, before each reply; a reader thread cuts the stream at each marker
    into one block per activation, and the shim writes each block with its sentinel whole.
    At EOF (the process died) what is left is the last block. A block holds at most
    LOG_BLOCK_LIMIT bytes (OpenWhisk's default log limit per activation): the rest of that
    activation's output is dropped and counted in a last line, so memory stays bounded
    whatever an action prints. The stream is searched once, in linear time."""

    def __init__(self, stream, marker: bytes, limit: int = LOG_BLOCK_LIMIT):
        self._blocks: queue.Queue[bytes] = queue.Queue()
        self._marker = marker
        self._limit = limit
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        block = bytearray()       # the activation's output kept so far
        dropped = 0
        tail = b""                # the end of the last chunk: a marker may straddle chunks
        while True:
            chunk = stream.read1(1 << 16)
            if not chunk:
                self._blocks.put(self._ended(block + tail, dropped))
                return
            data = tail + chunk
            while (at := data.find(self._marker)) >= 0:
                block, dropped = self._keep(block, dropped, data[:at])
                self._blocks.put(self._ended(block, dropped))
                block, dropped = bytearray(), 0
                data = data[at + len(self._marker):]
            keep = len(self._marker) - 1          # bytes that may begin a marker
            block, dropped = self._keep(block, dropped, data[:len(data) - keep] if keep else data)
            tail = data[len(data) - keep:] if keep else b""

    def _keep(self, block: bytearray, dropped: int, data: bytes) -> tuple[bytearray, int]:
        room = self._limit - len(block)
        if len(data) <= room:
            block += data
            return block, dropped
        block += data[:max(room, 0)]
        return block, dropped + len(data) - max(room, 0)

    def _ended(self, block: bytearray, dropped: int) -> bytes:
        if dropped:
            if block and not block.endswith(b"\n"):
                block += b"\n"
            block += (f"faastube: {dropped} more bytes of this activation's output dropped (more than "
                      f"{self._limit} bytes)\n").encode()
        return bytes(block)

    def take(self, timeout: float = 10.0) -> bytes:
        try:
            return self._blocks.get(timeout=timeout)
        except queue.Empty:
            return b""


class ActionPool:
    """Up to ``size`` action processes of one action; each serves one activation at a time.

    Size 1 serialises activations (the stock runtime's behaviour). Processes beyond the first
    start on demand, each importing the action again.
    """

    def __init__(self, first: ActionProcess, folder: str, main: str, env: dict, size: int,
                 on_start=lambda process: None, entry: str = "__main__.py"):
        self._folder, self._main, self._env, self.size = folder, main, env, size
        self._entry = entry
        self._on_start = on_start         # told of each process started later (its start-up logs)
        self._idle = [first]
        self._all = [first]
        self._available = threading.Condition()

    def acquire(self) -> ActionProcess:
        with self._available:
            while not self._idle:
                if len(self._all) < self.size:
                    self._all.append(None)           # reserve the slot, start outside the lock
                    break
                self._available.wait()
            else:
                return self._idle.pop()
        try:
            process = ActionProcess(self._folder, self._main, self._env, capture=self.size > 1,
                                    entry=self._entry)
            try:
                process.wait_ready()
            finally:
                self._on_start(process)
        except BaseException:
            with self._available:
                self._all.remove(None)
                self._available.notify()
            raise
        with self._available:
            self._all[self._all.index(None)] = process
        return process

    def release(self, process: ActionProcess) -> None:
        with self._available:
            self._idle.append(process)
            self._available.notify()

    def discard(self, process: ActionProcess) -> None:
        """Forget a process that exited: its slot is free for a new one (Note [A crashed
        process is replaced], shim/runtime.py)."""
        with self._available:
            if process in self._all:
                self._all.remove(process)
            self._available.notify()
