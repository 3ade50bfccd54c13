"""Runners the scheduler stopped using after their channel failed (a ring closed, or corrupt),
and when to open a new channel to each: pure bookkeeping, so it is tested without processes.

A failure backs off exponentially (a runner that keeps failing is not retried in a loop),
and only the first failures and then every hundredth are worth a log line, with the count:
a broken link must not fill the disk with the same sentence.
"""

from __future__ import annotations

from dataclasses import dataclass

FIRST_DELAY_S = 0.5
MAX_DELAY_S = 30.0
LOGGED_FIRST = 3  # failures in a row logged one by one; after that, every LOG_EVERY-th
LOG_EVERY = 100


@dataclass(slots=True)
class _Link:
    tries: int = 0  # failures in a row
    retry_at: float | None = None  # when to open a new channel; None: one is being opened


class RunnerLinks:
    def __init__(self) -> None:
        self._links: dict[str, _Link] = {}

    def failed(self, runner: str, now: float) -> float:
        """The runner's channel failed (or could not be opened): the delay before the next try."""
        link = self._links.setdefault(runner, _Link())
        link.tries += 1
        delay = min(MAX_DELAY_S, FIRST_DELAY_S * 2.0 ** min(link.tries - 1, 16))
        link.retry_at = now + delay
        return delay

    def due(self, now: float) -> list[str]:
        """Runners whose retry time has come; each is handed out once per failure."""
        ready = [r for r, link in self._links.items() if link.retry_at is not None and link.retry_at <= now]
        for runner in ready:
            self._links[runner].retry_at = None
        return ready

    def joined(self, runner: str) -> None:
        """A channel to the runner works again: forget its failures."""
        self._links.pop(runner, None)

    def tries(self, runner: str) -> int:
        link = self._links.get(runner)
        return link.tries if link is not None else 0

    def should_log(self, runner: str) -> bool:
        tries = self.tries(runner)
        return tries <= LOGGED_FIRST or tries % LOG_EVERY == 0

    @property
    def dropped(self) -> list[str]:
        return sorted(self._links)
