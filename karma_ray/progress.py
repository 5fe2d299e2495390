"""One progress display for every long job: a live bar on a terminal, plain lines in a log.

On a terminal `progress_bar` returns an ordinary tqdm bar. Anywhere else (`ray job logs`, CI, a
file) tqdm would redraw with `\\r` on every update, and each redraw becomes its own line in the log
(a 30-step demo run put 521 bar lines into `ray job logs`). There it returns `LogLines`, a tqdm
whose `display` (the method tqdm documents for overriding) writes the bar's text as one line, and
only when the count has advanced by `log_every`: the training bar advances once per
`train.log_every` steps, so it writes one line per log step. Counting, rate, ETA and postfix
formatting stay tqdm's.
"""
from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm import std
from tqdm.auto import tqdm

LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%) | {rate_fmt} | elapsed {elapsed} | ETA {remaining}{postfix}"
LOG_FORMAT_NO_TOTAL = "{desc}: {n_fmt} {unit} | {rate_fmt} | elapsed {elapsed}{postfix}"
LOG_LINES_PER_BAR = 10  # default for loops with a known total: a line every tenth of it


class LogLines(std.tqdm):
    """tqdm for logs: each display is one plain line; nothing is cleared or redrawn in place."""

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        """Write the bar as one line, unless the count is the one the last line showed (tqdm redisplays
        a bar after `tqdm.write` and on close) or tqdm is clearing it (msg == '')."""
        if msg == "" or (msg is None and self.n == getattr(self, "_line_n", None)):
            return False
        self._line_n = self.n
        self.fp.write((self.__str__() if msg is None else msg) + "\n")
        self.fp.flush()
        return True

    def clear(self, nolock: bool = False) -> None:  # `tqdm.write` clears bars around its message
        pass

    def moveto(self, n: int) -> None:  # nested bars move the cursor; a log has no cursor
        pass

    def close(self) -> None:
        """End with the final count (written only if the last line shows an older one)."""
        if not self.disable:
            self.refresh()
        super().close()


def is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress_bar(iterable: Iterable[Any] | None = None, *, total: float | None = None, desc: str, unit: str = "it",
                 enabled: bool = True, log_every: int | None = None, file: IO[str] | None = None) -> std.tqdm:
    """A tqdm bar on a terminal; `LogLines` (one plain line per `log_every` units) anywhere else.

    `log_every` applies only to logs; by default a tenth of `total` (so about ten lines plus the first
    and the last), or every unit when the total is unknown. `enabled=False` shows nothing.
    """
    stream = file if file is not None else sys.stderr
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if is_terminal(stream):
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, file=stream)
    if log_every is None:
        log_every = max(1, math.ceil(total / LOG_LINES_PER_BAR)) if total else 1
    if log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every}")
    return LogLines(iterable, total=total, desc=desc, unit=unit, disable=not enabled, file=stream,
                    bar_format=LOG_FORMAT if total else LOG_FORMAT_NO_TOTAL, leave=False,
                    miniters=log_every, mininterval=0, maxinterval=math.inf)


def quiet_library_bars_in_logs(stream: IO[str] | None = None) -> None:
    """In a log, turn off the bars that libraries draw themselves (transformers' loading and saving of
    weights), which redraw with \\r. Reads the switch huggingface_hub honours, so call it before
    transformers is imported; a terminal keeps them."""
    if not is_terminal(stream if stream is not None else sys.stderr):
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def quiet_worker_logs() -> None:
    """For code that runs in a Ray worker, whose output always lands in a log (`ray job logs`, the
    driver's stderr): no weight-loading bars from transformers, and no INFO line from Ray Train for
    every `report` (our one line per log step already carries its numbers). Warnings still show."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:  # Ray Train V2 names this logger after its file
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
