"""Backpressure: a client whose replies pile up pauses its own sequences, nobody else's.

Pure: given each channel's backlog of unsent replies, says which sequences to pause and
which to resume; the server loop tells the Scheduler.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sized


class Backpressure:
    """The channels whose clients are not reading, and what changes when their backlogs do."""

    def __init__(self) -> None:
        self.paused_channels: set[int] = set()

    def is_paused(self, channel_id: int) -> bool:
        """A new request of a client still not reading starts paused."""
        return channel_id in self.paused_channels

    def update(self, backlogs: Mapping[int, Sized], limit: int,
               requests: Iterable[tuple[int, int]]) -> tuple[list[int], list[int]]:
        """(seq_ids to pause, seq_ids to resume): a channel pauses once its backlog reaches
        `limit` and resumes once it is empty (a gone channel has none). `requests` yields
        (seq_id, channel_id) and is read only when a channel changes state, not on every
        pass of the loop."""
        pause = {c for c, b in backlogs.items() if len(b) >= limit} - self.paused_channels
        resume = {c for c in self.paused_channels if not backlogs.get(c)}
        if not pause and not resume:
            return [], []
        to_pause, to_resume = [], []
        for seq_id, channel_id in requests:
            if channel_id in pause:
                to_pause.append(seq_id)
            elif channel_id in resume:
                to_resume.append(seq_id)
        self.paused_channels = (self.paused_channels | pause) - resume
        return to_pause, to_resume
