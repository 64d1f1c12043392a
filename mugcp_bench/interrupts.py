"""Deferred Ctrl-C: while a sweep runs, the first SIGINT only asks it to stop at the next safe point.

Training stops after the current optimizer step, writes a mid-epoch checkpoint and raises `RunInterrupted` (the run
is recorded `interrupted`, the CLI exits 130, a rerun resumes where it stopped); an evaluation in progress finishes
and the sweep stops before the next run. A second Ctrl-C interrupts at once, as usual.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

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


@contextlib.contextmanager
def deferred_sigint() -> Iterator[None]:
    """Defer SIGINT for the block (main thread only; elsewhere SIGINT behaves as usual). Resets the request."""
    _state["requested"] = False
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if _state["requested"]:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        request_stop()

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _state["requested"] = False
