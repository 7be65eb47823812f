"""Action processes: the user's code runs apart from the HTTP server, so ``sys.exit``, a
crash or a hung import cannot take the server down. The server talks to each one over two
private pipes (shim/launcher.py has the protocol); a reply read that ends in EOF means the
process exited.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading


class ActionExited(Exception):
    """The action process exited (during init or during a call)."""

    def __init__(self, returncode):
        super().__init__(f"the action process exited with {returncode}")
        self.returncode = returncode


class ActionProcess:
    def __init__(self, folder: str, main: str, env: dict):
        request_read, self._request_write = os.pipe()
        self._reply_read, reply_write = os.pipe()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "shim.launcher", str(request_read), str(reply_write), main],
                cwd=folder, env=env, stdin=subprocess.DEVNULL, pass_fds=(request_read, reply_write))
        finally:
            os.close(request_read)
            os.close(reply_write)
        self._requests = os.fdopen(self._request_write, "wb")
        self._replies = os.fdopen(self._reply_read, "rb")

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

    @property
    def exited(self) -> bool:
        return self.process.poll() is not None

    def stop(self) -> None:
        """Close its pipes (the launcher exits at EOF); kill it if it does not go."""
        for stream in (self._requests, self._replies):
            try:
                stream.close()
            except OSError:
                pass
        try:
            self.process.wait(2)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class ActionPool:
    """Up to ``size`` action processes of one action; each serves one activation at a time.

    Size 1 serialises activations (the stock runtime's behaviour). Processes beyond the first
    start on demand, each importing the action again.
    """

    def __init__(self, first: ActionProcess, folder: str, main: str, env: dict, size: int):
        self._folder, self._main, self._env, self.size = folder, main, env, size
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
            process = ActionProcess(self._folder, self._main, self._env)
            process.wait_ready()
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

    def stop(self) -> None:
        with self._available:
            processes = [p for p in self._all if p is not None]
        for process in processes:
            process.stop()
