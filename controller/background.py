"""A controller thread that runs in the background, woken early by an event (the reserver's
and the restorer's): one way to start, wake and stop such a thread."""

from __future__ import annotations

import threading


class BackgroundThread:
    """Subclasses set ``thread_name`` and write ``_run``, which loops until ``_stop`` is set,
    waiting on ``_wake`` between steps."""

    thread_name = "background"

    def __init__(self):
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        raise NotImplementedError
