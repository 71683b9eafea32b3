"""Progress of an estimate's chain steps: a tqdm bar on a terminal, or a plain line every
so often for logs and pipes (``SGLDConfig(progress="lines")``), where a bar's carriage
returns would pile up on one line."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from tqdm.auto import tqdm

LINE_EVERY_SECONDS = 30.0


class Progress(Protocol):
    def update(self, steps: int) -> None: ...


class ProgressLines:
    """Prints ``SGLD: done/total steps (p %), elapsed, about ... left`` to stderr at most
    every ``every`` seconds, and once at the end."""

    def __init__(self, total: int, every: float) -> None:
        self.total, self.every, self.done = total, every, 0
        self.start = self.last = time.perf_counter()

    def update(self, steps: int) -> None:
        self.done += steps
        now = time.perf_counter()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            self._print(now - self.start)

    def _print(self, elapsed: float) -> None:
        share = self.done / self.total if self.total else 1.0
        left = f", about {elapsed / share - elapsed:.0f} s left" if 0 < share < 1 else ""
        print(f"SGLD: {self.done}/{self.total} chain steps ({100 * share:.0f} %), "
              f"{elapsed:.0f} s{left}", file=sys.stderr, flush=True)


@contextmanager
def chain_progress(total: int, setting: bool | str | None) -> Iterator[Progress]:
    """The progress reporter ``SGLDConfig.progress`` asks for: True a bar, "lines" plain
    lines, False nothing, None a bar only when stderr is a terminal."""
    if setting == "lines":
        yield ProgressLines(total, LINE_EVERY_SECONDS)
        return
    show = setting if setting is not None else sys.stderr.isatty()
    with tqdm(total=total, disable=not show, desc="SGLD", unit="step") as bar:
        yield bar
