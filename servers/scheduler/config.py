"""SchedulerConfig: the limits one scheduler plans steps under.

Read by the scheduler process (pure logic, no I/O). The model facts (``max_context``,
``vocab_size``) come from the runners' MODEL_INFO; the rest from the instance's config.
"""

from __future__ import annotations

from dataclasses import dataclass

POLICIES = ("fcfs",)  # "priority", "rr" and "fair" plug in through policy.py


@dataclass(slots=True, frozen=True, kw_only=True)
class SchedulerConfig:
    """Limits for planning steps.

    Args:
        max_context: the model's context length; a sequence never holds more tokens.
        vocab_size: the model's vocabulary; prompt ids outside it are refused at ``add``.
        block_size: tokens per KV block (must match the runners' pool layout).
        max_batch_size: sequences (chunks) in one step.
        token_budget: tokens in one step across its chunks; prefill chunks are cut to fit.
        max_running: sequences admitted (holding blocks) at once, across all steps in
            flight; ``None`` means ``max_batch_size`` (one runner). With N runners, N times.
        policy: which sequence goes first; only "fcfs" for now.
        decode_steps: tokens a runner makes in a row for a decoding sequence in one step
            (multi-step decoding: the scheduler's work per token divides by it; the runner
            samples with the same (seed, position) draws and stops at a stop id).
    """

    max_context: int
    vocab_size: int
    block_size: int = 16
    max_batch_size: int = 64
    token_budget: int = 512
    max_running: int | None = None
    policy: str = "fcfs"
    decode_steps: int = 1

    def __post_init__(self) -> None:
        for name in ("max_context", "vocab_size", "block_size", "max_batch_size", "token_budget", "decode_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.max_context < 2:
            raise ValueError(
                f"max_context must be >= 2 (a prompt and a token), got {self.max_context}"
            )
        if self.max_running is None:
            object.__setattr__(self, "max_running", self.max_batch_size)  # frozen: set once here
        elif not isinstance(self.max_running, int) or self.max_running <= 0:
            raise ValueError(f"max_running must be a positive int, got {self.max_running!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")

    @property
    def num_running_limit(self) -> int:
        """``max_running`` resolved (never None after construction)."""
        assert self.max_running is not None
        return self.max_running

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold the KV of ``num_tokens`` positions."""
        return -(-num_tokens // self.block_size)
