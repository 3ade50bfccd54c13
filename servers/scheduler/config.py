"""SchedulerConfig: the limits one scheduler plans steps under.

Read by the scheduler process (pure logic, no I/O). The model facts (``max_context``,
``vocab_size``) come from the runners' MODEL_INFO; the rest from the instance's config
(SchedulerSettings, whose defaults these are too).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from llmos.servers.scheduler.settings import POLICIES, SchedulerSettings

DEFAULTS = SchedulerSettings()


@dataclass(slots=True, frozen=True, kw_only=True)
class SchedulerConfig:
    """Limits for planning steps.

    Args:
        max_context: the model's context length; a sequence never holds more tokens.
        vocab_size: the model's vocabulary; prompt ids outside it are refused at ``add``.
        block_tokens: tokens per KV block (must match the runners' pool layout).
        max_batch_size: sequences (chunks) in one step.
        token_budget: tokens in one step across its chunks; prefill chunks are cut to fit.
        max_running: sequences admitted (holding blocks) at once, across all steps in
            flight; ``None`` means ``max_batch_size`` (one runner). With N runners, N times.
        policy: which sequence goes first: "fcfs" (arrival order), "priority" (higher
            ``Sequence.priority`` first, aged by ``aging_steps``), "rr" (round robin, a
            quantum of ``quantum`` tokens) or "fair" (weighted per-client virtual token
            counters). See policies.py for each one's bound.
        decode_steps: tokens a runner makes in a row for a decoding sequence in one step
            (multi-step decoding: the scheduler's work per token divides by it; the runner
            samples with the same (seed, position) draws and stops at a stop id).
        aging_steps: "priority": a waiting request gains one priority level per this many
            steps, so none starves (bound in policies.Priority).
        quantum: "rr": output tokens a sequence makes after each (re)admission before it
            yields its place to a waiting one (keeping its KV blocks).
        tenant_weights: "fair": share weight per ``Sequence.tenant`` (a tenant);
            clients not named get ``default_weight``.
        default_weight: "fair": the weight of a client not in ``tenant_weights``.
        prefix_cache: reuse the KV blocks of a prompt's longest computed prefix (when the
            scheduler's BlockSource is a CachedBlocks), and let a request wait until a prefix
            block another running request is computing is done, instead of computing it twice.
        max_blocks_per_client: KV blocks the sequences of one client (``Sequence.client``)
            may hold at once; ``None`` means unlimited. A prompt that cannot fit is refused
            (QuotaExceeded), a sequence whose own KV would pass it finishes ("length"), and a
            client at its quota preempts its own lower-ranked sequences or waits (quotas.py).
    """

    max_context: int
    vocab_size: int
    block_tokens: int = 16
    max_batch_size: int = DEFAULTS.max_batch_size
    token_budget: int = DEFAULTS.token_budget
    max_running: int | None = None
    policy: str = DEFAULTS.policy
    decode_steps: int = DEFAULTS.decode_steps
    aging_steps: int = DEFAULTS.aging_steps
    quantum: int = DEFAULTS.quantum
    tenant_weights: Mapping[Hashable, float] = field(default_factory=dict, hash=False)
    default_weight: float = 1.0
    prefix_cache: bool = DEFAULTS.prefix_cache
    max_blocks_per_client: int | None = None

    def __post_init__(self) -> None:
        positive_ints = (
            "max_context", "vocab_size", "block_tokens", "max_batch_size", "token_budget",
            "decode_steps", "aging_steps", "quantum",
        )
        for name in positive_ints:
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
        quota = self.max_blocks_per_client
        if quota is not None and (not isinstance(quota, int) or isinstance(quota, bool) or quota <= 0):
            raise ValueError(f"max_blocks_per_client must be a positive int or None, got {quota!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        weights = dict(self.tenant_weights)
        for client, weight in [*weights.items(), ("default_weight", self.default_weight)]:
            if not _is_weight(weight):
                raise ValueError(f"weight of {client!r} must be finite and > 0, got {weight!r}")
        # Read-only, so a config shared by a policy and its caller cannot drift.
        object.__setattr__(self, "tenant_weights", MappingProxyType(weights))

    @property
    def num_running_limit(self) -> int:
        """``max_running`` resolved (never None after construction)."""
        assert self.max_running is not None
        return self.max_running

    @property
    def max_tokens_per_seq(self) -> int:
        """Tokens one sequence may hold: the context, or what its client's quota holds."""
        if self.max_blocks_per_client is None:
            return self.max_context
        return min(self.max_context, self.max_blocks_per_client * self.block_tokens)

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold the KV of ``num_tokens`` positions."""
        return -(-num_tokens // self.block_tokens)


def _is_weight(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )
