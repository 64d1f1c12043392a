"""Run claims: one owner at a time, kept alive by the heartbeat, taken over when stale; safe across processes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from mugcp_bench.store.claims import CLAIM_FILE, Claim, read_holder


def foreign_claim(run_dir: Path, heartbeat: float, token: str = "someone-else") -> None:
    """A claim written by a process on another host (its pid means nothing here)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    body = {"host": "other-node", "pid": 1, "token": token, "started": heartbeat, "heartbeat": heartbeat}
    (run_dir / CLAIM_FILE).write_text(json.dumps(body))


def test_a_live_claim_keeps_others_out_while_its_heartbeat_runs(tmp_path):
    a = Claim(tmp_path, timeout=3.0)
    assert a.acquire()
    try:
        # Twice the timeout: only the heartbeat (every 0.75 s) keeps the claim live; 3 s leaves a loaded machine room.
        time.sleep(6.5)
        b = Claim(tmp_path, timeout=3.0)
        assert not b.acquire() and b.previous.token == a.token
        holder = read_holder(tmp_path)
        assert holder.host == socket.gethostname() and holder.age() < 3.0
    finally:
        a.release()
    assert not (tmp_path / CLAIM_FILE).exists()
    c = Claim(tmp_path, timeout=3.0)
    assert c.acquire()  # released: free again
    c.release()


def test_a_stale_claim_is_taken_over_after_the_timeout(tmp_path):
    foreign_claim(tmp_path, heartbeat=time.time())
    mine = Claim(tmp_path, timeout=1.0)
    assert not mine.acquire()  # fresh heartbeat: someone is on it
    time.sleep(1.2)  # no heartbeat for longer than the timeout
    assert mine.acquire()
    try:
        assert mine.previous.host == "other-node"
        assert read_holder(tmp_path).token == mine.token
    finally:
        mine.release()


def test_the_claim_of_a_dead_process_on_this_host_is_taken_at_once(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    body = {"host": socket.gethostname(), "pid": pid, "token": "t", "started": time.time(), "heartbeat": time.time()}
    (tmp_path / CLAIM_FILE).write_text(json.dumps(body))
    mine = Claim(tmp_path, timeout=3600)
    assert mine.acquire()
    mine.release()


def test_a_retry_with_the_same_token_takes_its_own_claim_back(tmp_path):
    foreign_claim(tmp_path, heartbeat=time.time(), token="task-7")
    retry = Claim(tmp_path, token="task-7", timeout=3600)
    assert retry.acquire()
    retry.release()


def test_a_taken_over_claim_is_noticed_and_not_released_by_the_old_owner(tmp_path):
    old = Claim(tmp_path, timeout=0.4)
    assert old.acquire()
    foreign_claim(tmp_path, heartbeat=time.time(), token="new-owner")  # as if the old one had been judged stale
    time.sleep(0.5)
    assert old.lost is not None and old.lost.token == "new-owner"
    old.release()
    assert read_holder(tmp_path).token == "new-owner"


def test_an_unreadable_claim_counts_as_no_claim(tmp_path):
    (tmp_path / CLAIM_FILE).write_text("{half")
    mine = Claim(tmp_path)
    assert mine.acquire()
    mine.release()


RACE = """
import sys, time
from mugcp_bench.store.claims import Claim
run_dir, start = sys.argv[1], float(sys.argv[2])
claim = Claim(run_dir, timeout=30)
while time.time() < start:
    time.sleep(0.001)
got = claim.acquire()
print("won" if got else "lost", flush=True)
time.sleep(1.0)
claim.release()
"""


def test_of_processes_racing_for_one_claim_exactly_one_wins(tmp_path):
    start = time.time() + 3.0  # the processes import first, then race at the same instant
    procs = [
        subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path), str(start)], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(outs) == ["lost", "lost", "lost", "won"], outs
