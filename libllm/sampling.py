"""Sampling parameters: the one validated value both ends of a request share.

Pure; used by libllm, the scheduler (which carries them in its plans) and the runner
(which draws with them, see servers/runner/sampling.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """How to pick the next token. ``temperature == 0`` is greedy (the other fields unused).

    ``top_k == 0`` keeps every token; ``top_p == 1.0`` keeps the whole distribution.
    ``seed`` is any integer (taken modulo 2**64). ``num_logprobs`` >= 0 asks the runner to
    report the picked token's log-probability and that many top tokens with it (it changes
    nothing in the pick; it travels with the sampling because it is about the pick).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    num_logprobs: int = -1
    # Penalties on the logits before anything else (vLLM's definitions, as OpenAI's API):
    # presence subtracts once from every token made so far, frequency once per time it was
    # made; repetition divides a positive logit (multiplies a negative one) of every token in
    # the prompt or made so far. 0, 0 and 1: none.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not -1 <= self.num_logprobs <= 20:
            raise ValueError(f"num_logprobs must be in -1..20, got {self.num_logprobs}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise ValueError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = SamplingParams()
