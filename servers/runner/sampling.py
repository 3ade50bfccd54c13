"""Token sampling: greedy, temperature, top-k and top-p over one row of logits.

Runs inside a runner process after each step. Owns nothing. The random draw for a token is
a pure function of (seed, position) through splitmix64, so a request's text never depends on
its batch-mates, its runner or a resume after a crash; never Python's hash() or a global RNG.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from libllm.sampling import GREEDY as GREEDY
from libllm.sampling import SamplingParams as SamplingParams

MASK64 = (1 << 64) - 1




def splitmix64(x: int) -> int:
    """One step of Vigna's splitmix64 finaliser: a well-mixed 64-bit function of x."""
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def uniform(seed: int, position: int) -> float:
    """The draw for the token at ``position`` of a request seeded ``seed``: a float in [0, 1)
    with 53 random bits, a pure function of its two arguments."""
    return (splitmix64(splitmix64(seed & MASK64) ^ (position & MASK64)) >> 11) * 2.0**-53


def sample(logits: np.ndarray, params: SamplingParams, position: int) -> int:
    """Pick the token at ``position`` from one row of logits.

    The candidates are ordered by logit, ties by id (a stable sort), then cut by top-k and
    top-p; the cumulative probabilities are summed in that order in float64, so the result is
    a function of the row, the params and the position only.
    """
    row = np.asarray(logits, dtype=np.float32).reshape(-1)
    if params.is_greedy:
        return int(np.argmax(row))  # first index of the maximum
    order = np.argsort(-row, kind="stable")
    if 0 < params.top_k < order.size:
        order = order[: params.top_k]
    z = row[order].astype(np.float64) / params.temperature
    probs = np.exp(z - z[0])  # z[0] is the maximum: order is descending
    cumulative = np.cumsum(probs)
    total = float(cumulative[-1])
    if params.top_p < 1.0:
        # Keep the shortest prefix whose mass reaches top_p of the total (at least one).
        keep = int(np.searchsorted(cumulative, params.top_p * total, side="left")) + 1
        keep = min(keep, cumulative.size)
        cumulative = cumulative[:keep]
        total = float(cumulative[-1])
    target = uniform(params.seed, position) * total
    index = int(np.searchsorted(cumulative, target, side="right"))
    return int(order[min(index, cumulative.size - 1)])


def sample_rows(
    logits: np.ndarray, params: Sequence[SamplingParams], positions: Sequence[int]
) -> np.ndarray:
    """Sample one token per row; all-greedy batches take one vectorised argmax."""
    out = np.empty(len(params), dtype=np.int32)
    if all(p.is_greedy for p in params):
        out[:] = np.argmax(logits, axis=1)
        return out
    for i, (p, pos) in enumerate(zip(params, positions, strict=True)):
        out[i] = sample(logits[i], p, pos)
    return out
