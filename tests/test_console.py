"""mugcp_bench.console.Progress: plain throttled lines off a terminal (a log file), a rich bar on one."""

from __future__ import annotations

import io
import re

import pytest

from mugcp_bench.console import Progress, format_duration


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0, 4.6, 59, 60, 130, 3599, 3600, 3725)] == [
        "0s",
        "5s",
        "59s",
        "1m00s",
        "2m10s",
        "59m59s",
        "1h00m",
        "1h02m",
    ]


def test_log_lines_start_throttled_end() -> None:
    """Off a terminal: one line at the start, one at most every `interval` s while advancing, one at the end with
    counts, elapsed time and an estimate of what is left."""
    clock, out = FakeClock(), io.StringIO()
    with Progress("pretraining toy CLIP", total=450, stream=out, interval=30, clock=clock) as bar:
        assert lines(out) == ["pretraining toy CLIP: 0/450 steps (0%)"]
        for step in range(1, 451):
            clock.now += 1.0  # one step per second: 450 s in all
            bar.advance(1, status=f"loss {3 - step / 450:.3f}")
    got = lines(out)
    # start, 15 throttled lines (at 30, 60, ..., 450 s), end
    assert len(got) == 1 + 15 + 1, got
    assert got[1] == "pretraining toy CLIP: 30/450 steps (7%), 30s elapsed, ~7m00s left, loss 2.933"
    assert got[4] == "pretraining toy CLIP: 120/450 steps (27%), 2m00s elapsed, ~5m30s left, loss 2.733"
    assert got[-1] == "pretraining toy CLIP: 450/450 steps (100%), done in 7m30s, loss 2.000"
    assert bar.lines == len(got)


def test_no_line_between_intervals_however_many_advances() -> None:
    clock, out = FakeClock(), io.StringIO()
    with Progress("rendering toy suite", total=10_000, unit="images", stream=out, interval=30, clock=clock) as bar:
        for _ in range(10_000):
            clock.now += 0.001  # 10 s in all: never a throttled line
            bar.advance()
    assert lines(out) == [
        "rendering toy suite: 0/10000 images (0%)",
        "rendering toy suite: 10000/10000 images (100%), done in 10s",
    ]


def test_slow_steps_give_a_line_per_step_not_more() -> None:
    clock, out = FakeClock(), io.StringIO()
    with Progress("sweep", total=3, unit="runs", stream=out, interval=30, clock=clock) as bar:
        for _ in range(3):
            clock.now += 100.0
            bar.advance()
    got = lines(out)
    assert len(got) == 1 + 3 + 1
    assert re.fullmatch(r"sweep: 1/3 runs \(33%\), 1m40s elapsed, ~3m20s left", got[1])


def test_unknown_total_and_update_status() -> None:
    clock, out = FakeClock(), io.StringIO()
    with Progress("extracting features", stream=out, interval=5, clock=clock, unit="batches") as bar:
        clock.now += 6
        bar.advance(3)
        clock.now += 6
        bar.total = 10  # the total becomes known
        bar.update(status="dtd test")  # a status change counts as activity: a line once the interval has passed
    assert lines(out) == [
        "extracting features",
        "extracting features: 3 batches, 6s elapsed",
        "extracting features: 3/10 batches (30%), 12s elapsed, ~28s left, dtd test",
        "extracting features: 3/10 batches (30%), done in 12s, dtd test",
    ]


def test_failure_line_says_where_it_stopped() -> None:
    clock, out = FakeClock(), io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        with Progress("pretraining toy CLIP", total=450, stream=out, clock=clock) as bar:
            clock.now += 70
            bar.advance(70)
            raise KeyboardInterrupt
    assert lines(out)[-1] == "pretraining toy CLIP: stopped at 70/450 steps (16%) after 1m10s"


def test_disabled_writes_nothing() -> None:
    out = io.StringIO()
    with Progress("x", total=3, stream=out, enabled=False, interval=0) as bar:
        bar.advance(3)
    assert out.getvalue() == "" and bar.completed == 3


def test_default_stream_is_stderr_when_the_step_starts(capsys: pytest.CaptureFixture[str]) -> None:
    with Progress("x", total=2, interval=0) as bar:
        bar.advance(2)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "x: 0/2 steps (0%)" and err[-1].startswith("x: 2/2 steps (100%), done in")


def test_terminal_gets_a_rich_bar_not_lines() -> None:
    out = io.StringIO()
    with Progress("pretraining toy CLIP", total=5, stream=out, terminal=True, interval=0) as bar:
        bar.advance(5, status="loss 1.0")
    assert bar.lines == 0  # no plain lines: rich drew (and finished) its bar
    assert "pretraining toy CLIP" in out.getvalue() and "5/5" in out.getvalue()


def test_broken_stream_does_not_stop_the_work() -> None:
    out = io.StringIO()
    bar = Progress("x", total=2, stream=out, interval=0)
    bar.start()
    out.close()
    bar.advance(2)
    bar.close()
    assert bar.completed == 2
