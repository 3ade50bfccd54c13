"""What a server prints on stdout while it starts, before its ready line: `progress STAGE
DONE TOTAL` (e.g. a runner's weights, in bytes). The supervisor shows these to whoever started
the instance (tools/start_progress.py); stdout is read only until the ready line."""

from __future__ import annotations

import sys
from typing import TextIO

PREFIX = "progress "


def progress_line(stage: str, done: int, total: int) -> str:
    return f"{PREFIX}{stage} {done} {total}\n"


def parse_progress(line: str) -> tuple[str, int, int] | None:
    """(stage, done, total) of a progress line; None for any other line."""
    if not line.startswith(PREFIX):
        return None
    parts = line[len(PREFIX):].split()
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    return parts[0], int(parts[1]), int(parts[2])


class StageProgress:
    """`progress(done, total)` for one stage: a line at most every 1/steps of the way (and at
    the end), so a large model does not print a line per tensor."""

    def __init__(self, stage: str, stream: TextIO | None = None, steps: int = 50) -> None:
        self.stage, self.stream, self.steps = stage, stream or sys.stdout, steps
        self._last = -1

    def __call__(self, done: int, total: int) -> None:
        mark = self.steps if total <= 0 or done >= total else done * self.steps // total
        if mark != self._last:
            self._last = mark
            self.stream.write(progress_line(self.stage, done, total))
            self.stream.flush()
