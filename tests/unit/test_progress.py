"""`progress_bar`: a tqdm bar on a terminal, one plain line per `log_every` units anywhere else."""
from __future__ import annotations

import io

import pytest
from tqdm import tqdm

from karma_ray.progress import LOG_LINES_PER_BAR, LogLines, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_an_ordinary_bar():
    out = Terminal()
    bar = progress_bar(total=4, desc="t", file=out)
    assert type(bar) is not LogLines
    bar.update(4)
    bar.close()
    assert "\r" in out.getvalue()  # redrawn in place


def test_a_log_gets_one_line_per_log_step_with_postfix_and_eta():
    out = io.StringIO()
    bar = progress_bar(total=30, desc="train run", unit="step", log_every=5, file=out)
    for step in (5, 5, 10, 10, 15, 20, 25, 30):  # the driver polls: the same step is seen more than once
        bar.set_postfix({"loss": "1.000", "tok/s": "170"}, refresh=False)
        bar.update(step - bar.n)
    bar.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 1 + 30 // 5  # the 0/30 line, then one per log step
    assert lines[-1].startswith("train run: 30/30 step (100%)")
    assert "ETA" in lines[-1] and "loss=1.000" in lines[-1] and "tok/s=170" in lines[-1]


def test_a_loop_in_a_log_writes_about_ten_lines_and_ends_with_the_total():
    out = io.StringIO()
    assert sum(progress_bar(range(1000), desc="embed", file=out)) == sum(range(1000))
    lines = out.getvalue().splitlines()
    assert len(lines) <= LOG_LINES_PER_BAR + 2
    assert lines[-1].startswith("embed: 1000/1000")


def test_tqdm_write_between_updates_repeats_no_line():
    out = io.StringIO()
    bar = progress_bar(total=4, desc="w", file=out)
    bar.update(1)
    tqdm.write("message", file=out)
    bar.update(3)
    bar.close()
    assert [line.split(":")[0] for line in out.getvalue().splitlines()] == ["w", "w", "message", "w"]


def test_disabled_writes_nothing_and_bad_log_every_is_refused():
    out = io.StringIO()
    for _ in progress_bar(range(3), desc="off", enabled=False, file=out):
        pass
    assert out.getvalue() == ""
    with pytest.raises(ValueError, match="log_every"):
        progress_bar(total=3, desc="x", log_every=0, file=out)
