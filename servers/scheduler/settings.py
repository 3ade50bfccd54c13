"""SchedulerSettings: the [scheduler] section of the instance config, as the scheduler
process receives it (servers/settings.py). The one place its keys, defaults and checks live;
docs/config.md is generated from the comments here."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmos.servers.settings import ConfigError

POLICIES = ("fcfs", "priority", "rr", "fair")  # made by policies.make_policy
# Steps in flight per runner where the config leaves it to the model (pipeline_depth 0).
SMALL_MODEL_PIPELINE_DEPTH = 2
LARGE_MODEL_PIPELINE_DEPTH = 1


@dataclass(slots=True, frozen=True)
class SchedulerSettings:
    """[scheduler]: the policy and its parameters, and the step limits."""

    policy: str = "fcfs"  # "fcfs", "priority", "rr" or "fair"
    aging_steps: int = 64  # priority: a waiting request gains one level per this many steps
    quantum: int = 16  # rr: tokens a sequence makes before it yields to waiting ones
    weights: dict[str, float] = field(default_factory=dict)  # fair: share per tenant
    max_batch_size: int = 64  # sequences per runner per step (split over the pipeline)
    token_budget: int = 512  # tokens per step
    # Tokens a runner makes in a row per decoding sequence: the scheduler's work per token
    # divides by it, at the price of tokens arriving in bursts and a cancel taking effect up
    # to that many tokens late.
    decode_steps: int = 16
    prefix_cache: bool = True  # reuse the KV blocks of prompt prefixes already computed
    # Steps in flight per runner; 0: 2 for a small model (the next step is planned while one
    # computes), 1 for a large one (its batch is not split in halves: one step of 32
    # sequences computes faster than two of 16).
    pipeline_depth: int = 0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"scheduler.policy must be one of {', '.join(POLICIES)}; got {self.policy!r}")
        for name in ("aging_steps", "quantum", "max_batch_size", "token_budget", "decode_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"scheduler.{name} must be >= 1")
        if not 0 <= self.pipeline_depth <= 8:
            raise ConfigError("scheduler.pipeline_depth must be in 0..8 (0: chosen for the model)")
        if any(not w > 0 for w in self.weights.values()):
            raise ConfigError("scheduler.weights must be positive")

    def depth_for(self, large_model: bool) -> int:
        """pipeline_depth, resolved for the model."""
        if self.pipeline_depth:
            return self.pipeline_depth
        return LARGE_MODEL_PIPELINE_DEPTH if large_model else SMALL_MODEL_PIPELINE_DEPTH
