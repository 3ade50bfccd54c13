"""The scheduler's bookkeeping of runners dropped after a channel failure (pure)."""

from __future__ import annotations

from llmos.servers.scheduler.runner_links import FIRST_DELAY_S, MAX_DELAY_S, RunnerLinks


def test_failures_back_off_and_each_retry_is_handed_out_once() -> None:
    links = RunnerLinks()
    delays = [links.failed("runner.0", 100.0) for _ in range(12)]
    assert delays[:3] == [FIRST_DELAY_S, 2 * FIRST_DELAY_S, 4 * FIRST_DELAY_S]
    assert delays == sorted(delays) and delays[-1] == MAX_DELAY_S
    assert links.due(100.0 + MAX_DELAY_S - 0.01) == []
    assert links.due(100.0 + MAX_DELAY_S) == ["runner.0"]
    assert links.due(1e9) == []  # being retried: not handed out again until it fails again
    assert links.tries("runner.0") == 12 and links.dropped == ["runner.0"]


def test_a_runner_that_joins_again_is_forgotten() -> None:
    links = RunnerLinks()
    links.failed("runner.1", 0.0)
    links.joined("runner.1")
    assert links.due(1e9) == [] and links.tries("runner.1") == 0 and links.dropped == []
    assert links.failed("runner.1", 5.0) == FIRST_DELAY_S  # a new failure starts the backoff anew


def test_only_the_first_failures_and_then_every_hundredth_are_logged() -> None:
    links = RunnerLinks()
    logged = []
    for _ in range(1000):
        links.failed("runner.0", 0.0)
        logged.append(links.should_log("runner.0"))
    assert sum(logged) == 3 + 10 and all(logged[:3])
