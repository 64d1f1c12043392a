"""Deferred Ctrl-C: while a sweep runs, the first SIGINT only asks it to stop at the next safe point.

Training stops after the current optimizer step, writes a mid-epoch checkpoint and raises `RunInterrupted` (the run
is recorded `interrupted`, the CLI exits 130, a rerun resumes where it stopped); an evaluation in progress finishes
and the sweep stops before the next run. A second Ctrl-C interrupts at once, as usual.

Runs in other processes (`--executor gpus` workers, Ray tasks) learn of the first Ctrl-C through a `StopFile` the
sweep creates in its results directory: every run checks it between steps and then stops exactly as a local run
does. Workers started by the sweep also defer SIGINT themselves (`install_deferred_handler`), since a Ctrl-C in a
terminal reaches every process of the group.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

_state = {"requested": False}


def stop_requested() -> bool:
    """True once a Ctrl-C arrived inside `deferred_sigint` (never outside it)."""
    return _state["requested"]


def request_stop() -> None:
    """What the first Ctrl-C does (also for callbacks that want the run to stop as if interrupted)."""
    if not _state["requested"]:
        log.warning("interrupt: stopping after this step and saving a checkpoint (Ctrl-C again to stop at once)")
    _state["requested"] = True


def _deferred_handler(signum, frame) -> None:
    if _state["requested"]:  # second Ctrl-C: stop now
        raise KeyboardInterrupt
    request_stop()


def install_deferred_handler() -> None:
    """Defer SIGINT for the rest of this process (a worker process of the sweep; main thread only)."""
    _state["requested"] = False
    signal.signal(signal.SIGINT, _deferred_handler)


@contextlib.contextmanager
def deferred_sigint() -> Iterator[None]:
    """Defer SIGINT for the block (main thread only; elsewhere SIGINT behaves as usual). Resets the request."""
    _state["requested"] = False
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, _deferred_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _state["requested"] = False


class StopFile:
    """A file whose existence asks every run of one sweep, in whatever process or host, to stop as after a Ctrl-C.

    `seen()` stats the file at most every `interval` seconds (runs call it every step; a shared file system is
    slower than a flag).
    """

    def __init__(self, path: str | os.PathLike[str], interval: float = 0.2) -> None:
        self.path = str(path)
        self.interval = interval
        self._next = 0.0
        self._seen = False

    def signal(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        Path(self.path).touch()

    def seen(self) -> bool:
        now = time.monotonic()
        if not self._seen and now >= self._next:
            self._next = now + self.interval
            self._seen = os.path.exists(self.path)
        return self._seen

    def clear(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(self.path))  # the folder, once no other sweep's file is in it
