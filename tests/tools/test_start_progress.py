"""The progress lines a server prints while it starts, and their forwarded form (pure)."""

from __future__ import annotations

import io

from llmos.servers.start_progress import StageProgress, parse_progress, progress_line
from llmos.start_progress import forwarded_line, parse_forwarded


def test_a_stage_prints_at_most_one_line_per_step_and_always_its_end() -> None:
    out = io.StringIO()
    stage = StageProgress("weights", out, steps=50)
    for done in range(0, 10_001, 7):
        stage(done, 10_000)
    stage(10_000, 10_000)
    lines = [parse_progress(line + "\n") for line in out.getvalue().splitlines()]
    assert 2 <= len(lines) <= 51
    assert lines[-1] == ("weights", 10_000, 10_000)
    assert all(p is not None and p[0] == "weights" for p in lines)


def test_lines_round_trip_and_anything_else_is_not_progress() -> None:
    assert parse_progress(progress_line("tokenizer", 1, 1)) == ("tokenizer", 1, 1)
    assert parse_forwarded(forwarded_line("runner.0", "weights", 5, 10)) == ("runner.0", "weights", 5, 10)
    for junk in ("llmos runner.0 ready\n", "progress weights five 10\n", "progress\n", "", "progress a b c d e\n"):
        assert parse_progress(junk) is None
    for junk in ("progress weights 5 10\n", "progress runner.0 weights 5\n", "llmos up: ready\n"):
        assert parse_forwarded(junk) is None
