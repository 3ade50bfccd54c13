"""Start-up progress on the terminal of whoever started an instance: a bar per process and
stage (a runner's weights, its tokenizer) from the servers' progress lines
(servers/start_progress.py). In the foreground the supervisor feeds it directly; detached,
the supervisor forwards the lines, named, to `llmos up`/`serve` (`NAME STAGE DONE TOTAL`),
which feeds them here. Off when stderr is not a terminal. Runs in the user's shell or the
foreground supervisor."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from llmos.servers.start_progress import PREFIX, parse_progress


def forwarded_line(name: str, stage: str, done: int, total: int) -> str:
    return f"{PREFIX}{name} {stage} {done} {total}\n"


def parse_forwarded(line: str) -> tuple[str, str, int, int] | None:
    """(name, stage, done, total) of a forwarded line: a server's progress line with its name."""
    name, sep, rest = line[len(PREFIX):].partition(" ") if line.startswith(PREFIX) else ("", "", "")
    progress = parse_progress(PREFIX + rest) if sep and name else None
    return None if progress is None else (name, *progress)


class StartProgress:
    """Use as a context manager; `update(name, stage, done, total)`."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        console = Console(stderr=True)
        self._progress = Progress(TextColumn("{task.description:<20}"), BarColumn(), TaskProgressColumn(),
                                  TimeElapsedColumn(), console=console, disable=not console.is_terminal,
                                  transient=True)
        self._tasks: dict[tuple[str, str], Any] = {}

    def __enter__(self) -> StartProgress:
        self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._progress.stop()

    def update(self, name: str, stage: str, done: int, total: int) -> None:
        key = (name, stage)
        if key not in self._tasks:
            self._tasks[key] = self._progress.add_task(f"{name} {stage}", total=max(total, 1))
        self._progress.update(self._tasks[key], completed=min(done, total) if total > 0 else 1, total=max(total, 1))
