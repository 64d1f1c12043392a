"""Run claims: who is training a run right now, written in the run directory so that processes on any host see it.

Before a run trains it takes a claim: `<run dir>/claim.json` holds the owner (host, pid), a token, the start time and
a heartbeat that a thread refreshes while the run trains. Reading, checking and writing the claim happen under a
`filelock` on `<run dir>/claim.lock` (an OS lock, so this holds across processes and on a shared file system), and
the file itself is replaced atomically. No state lives in any process:

- no claim, or a claim with our token (a retry of the same task after its worker died): taken;
- a claim whose heartbeat is older than the timeout, or whose owner process is gone (same host): stale, taken over;
- any other claim: live, someone is on it, the caller skips the run.

Heartbeats are wall-clock times, so hosts sharing a results directory need synchronised clocks (NTP); the timeout
(default 120 s) should be several heartbeat intervals (timeout / 4) long.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from mugcp_bench.atomic import atomic_write_text

log = logging.getLogger(__name__)

CLAIM_FILE = "claim.json"
LOCK_FILE = "claim.lock"
DEFAULT_TIMEOUT_S = 120.0
LOCK_WAIT_S = 60.0  # the lock is held for one small read and write: waiting this long means a hung file system


def new_token() -> str:
    return uuid.uuid4().hex


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host is running. A zombie (killed, not yet reaped by its parent: a SIGKILLed
    `run` whose launcher has not waited for it) is dead: its run must be taken over, not left to it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no procfs (macOS): signal 0 is all we know
        return True
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")  # the state field follows "(comm)"


def claim_is_live(run_dir: Path, timeout: float) -> bool:
    """Whether someone holds a live claim on the run in `run_dir`: the one liveness rule of the store."""
    holder = read_holder(run_dir)
    return holder is not None and holder.is_live(timeout)


@dataclass(frozen=True)
class Holder:
    """The owner of a claim as its file states it."""

    host: str
    pid: int
    token: str
    started: float
    heartbeat: float

    def age(self, now: float | None = None) -> float:
        """Seconds since the last heartbeat."""
        return (time.time() if now is None else now) - self.heartbeat

    def is_live(self, timeout: float, now: float | None = None) -> bool:
        if self.age(now) > timeout:
            return False
        return not (self.host == socket.gethostname() and not pid_alive(self.pid))

    def describe(self) -> str:
        return f"{self.host} pid {self.pid}, heartbeat {self.age():.0f} s ago"


def read_holder(run_dir: Path) -> Holder | None:
    """The claim in `run_dir`, or None (no claim, or an unreadable one: treated as absent)."""
    try:
        obj: dict[str, Any] = json.loads((Path(run_dir) / CLAIM_FILE).read_text())
        return Holder(
            str(obj["host"]), int(obj["pid"]), str(obj["token"]), float(obj["started"]), float(obj["heartbeat"])
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring unreadable claim in %s (%s)", run_dir, e)
        return None


class Claim:
    """A claim on one run directory; `acquire()` then `release()` (or `with claim:` after a successful acquire).

    `token` identifies the task, not the process: a retry of the same task (its worker died) passes the same token
    and takes its own claim back at once instead of waiting for the timeout.
    """

    def __init__(self, run_dir: str | os.PathLike[str], token: str | None = None, timeout: float = DEFAULT_TIMEOUT_S):
        if timeout <= 0:
            raise ValueError("claim timeout must be positive")
        self.dir = Path(run_dir)
        self.token = token or new_token()
        self.timeout = float(timeout)
        self.held = False
        self.lost: Holder | None = None  # set when another owner took the claim over while we held it
        self.previous: Holder | None = None  # the stale claim we took over, if any
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0

    @property
    def path(self) -> Path:
        return self.dir / CLAIM_FILE

    def _lock(self) -> FileLock:
        return FileLock(str(self.dir / LOCK_FILE), timeout=LOCK_WAIT_S)

    def _write(self, now: float) -> None:
        body = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": self.token,
            "started": self._started,
            "heartbeat": now,
            "timeout_s": self.timeout,
        }
        atomic_write_text(self.path, json.dumps(body) + "\n")

    def acquire(self) -> bool:
        """Take the claim if it is free, ours or stale (then start the heartbeat); False if someone else holds it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            with self._lock():
                holder = read_holder(self.dir)
                now = time.time()
                if holder is not None and holder.token != self.token and holder.is_live(self.timeout, now):
                    self.previous = holder
                    return False
                if holder is not None and holder.token != self.token:
                    log.warning("taking over the stale claim on %s (%s)", self.dir, holder.describe())
                self.previous = holder
                self._started = now
                self._write(now)
        except Timeout:
            log.warning("claim lock on %s not obtained in %.0f s; leaving the run", self.dir, LOCK_WAIT_S)
            return False
        self.held = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"claim-heartbeat-{self.dir.name}", daemon=True)
        self._thread.start()
        return True

    def _beat(self) -> None:
        interval = max(self.timeout / 4, 0.05)
        while not self._stop.wait(interval):
            try:
                with self._lock():
                    holder = read_holder(self.dir)
                    if holder is not None and holder.token != self.token:
                        self.lost = holder
                        log.warning("claim on %s was taken over by %s", self.dir, holder.describe())
                        return
                    self._write(time.time())
            except (OSError, Timeout) as e:  # a missed beat is retried; the timeout covers a few of them
                log.warning("claim heartbeat on %s failed (%s)", self.dir, e)

    def release(self) -> None:
        """Stop the heartbeat and remove the claim if it is still ours."""
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.held = False
        try:
            with self._lock():
                holder = read_holder(self.dir)
                if holder is not None and holder.token == self.token:
                    self.path.unlink(missing_ok=True)
        except (OSError, Timeout) as e:
            log.warning("could not release the claim on %s (%s); it goes stale after %.0f s", self.dir, e, self.timeout)

    def __enter__(self) -> Claim:
        if not self.held:
            raise RuntimeError("acquire() the claim before entering it")
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


__all__ = [
    "CLAIM_FILE",
    "DEFAULT_TIMEOUT_S",
    "LOCK_FILE",
    "Claim",
    "Holder",
    "claim_is_live",
    "new_token",
    "pid_alive",
    "read_holder",
]
