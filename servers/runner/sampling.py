"""Token sampling: greedy, temperature, top-k and top-p; `sample` defines it over one row
of logits, `sample_rows` computes it for a whole batch at once (the runner's path).

Runs inside a runner process after each step. Owns nothing. The random draw for a token is
a pure function of (seed, position) through splitmix64, so a request's text never depends on
its batch-mates, its runner or a resume after a crash; never Python's hash() or a global RNG.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from libllm.protocol import Logprob
from libllm.sampling import GREEDY as GREEDY
from libllm.sampling import SamplingParams as SamplingParams

MASK64 = (1 << 64) - 1
BATCHED_FROM_ROWS = 8  # below this many sampled rows, `sample` row by row is faster


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


def _splitmix64_array(x: np.ndarray) -> np.ndarray:
    """`splitmix64` over a uint64 array (numpy's uint64 arithmetic wraps, as the mask does)."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    out: np.ndarray = z ^ (z >> np.uint64(31))
    return out


def uniform_many(seeds: Sequence[int], positions: Sequence[int]) -> np.ndarray:
    """`uniform(seed, position)` for many pairs at once (float64, bit for bit the same)."""
    s = np.array([x & MASK64 for x in seeds], dtype=np.uint64)
    p = np.array([x & MASK64 for x in positions], dtype=np.uint64)
    bits = _splitmix64_array(_splitmix64_array(s) ^ p) >> np.uint64(11)
    out: np.ndarray = bits.astype(np.float64) * 2.0**-53
    return out


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


def logprob_of(logits: np.ndarray, token: int, top: int) -> Logprob:
    """``token``'s log-probability under one row of logits (the raw distribution: no
    temperature, no cuts), with the ``top`` most likely tokens, ties by id. Float64, a
    function of the row alone (batch invariance holds for it as for the pick)."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    m = float(z.max())
    log_total = m + float(np.log(np.exp(z - m).sum()))
    if top <= 0:
        return Logprob(float(z[token]) - log_total, [], [])
    top = min(top, z.size)
    threshold = np.partition(z, z.size - top)[z.size - top]  # the top-th largest value
    above = np.flatnonzero(z > threshold)
    ids = np.concatenate([above, np.flatnonzero(z == threshold)[: top - above.size]])
    ids = ids[np.lexsort((ids, -z[ids]))]  # most likely first, ties by id
    return Logprob(float(z[token]) - log_total, ids.tolist(), (z[ids] - log_total).tolist())


def sample_rows(
    logits: np.ndarray, params: Sequence[SamplingParams], positions: Sequence[int]
) -> np.ndarray:
    """Sample one token per row: greedy rows take an argmax, the others the batched form of
    `sample` (one sort, one softmax and one running sum for all of them), which picks
    exactly the token `sample` picks row by row: the same stable order, the same float64
    values summed in the same order, the same cuts."""
    out = np.empty(len(params), dtype=np.int32)
    greedy = np.fromiter((p.is_greedy for p in params), dtype=bool, count=len(params))
    if greedy.any():
        out[greedy] = np.argmax(logits[greedy], axis=1)
    rows = np.flatnonzero(~greedy)
    if 0 < rows.size < BATCHED_FROM_ROWS:  # a few rows: numpy's per-call cost dominates
        for i in rows.tolist():
            out[i] = sample(logits[i], params[i], positions[i])
    elif rows.size:
        drawn = [params[i] for i in rows.tolist()]
        out[rows] = _sample_batch(np.asarray(logits[rows], dtype=np.float32), drawn,
                                  [positions[i] for i in rows.tolist()])
    return out


def _descending_order(logits: np.ndarray) -> np.ndarray:
    """Per row, the ids by descending logit, ties by id: `np.argsort(-row, kind="stable")`,
    three times faster. Each logit maps to an unsigned key that sorts as the float does;
    with the id in the low bits every key is distinct, so any sort gives this one order."""
    bits = (logits + np.float32(0.0)).view(np.uint32)  # + 0.0: -0.0 becomes +0.0, its equal
    ascending = np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000))
    keys = (~ascending).astype(np.uint64) << np.uint64(32)
    keys |= np.arange(logits.shape[1], dtype=np.uint64)[None, :]
    keys.sort(axis=1)
    order: np.ndarray = (keys & np.uint64(0xFFFFFFFF)).astype(np.intp)
    return order


def _sample_batch(logits: np.ndarray, params: Sequence[SamplingParams], positions: Sequence[int]) -> np.ndarray:
    """`sample` for B rows at once (none greedy)."""
    num_rows, vocab = logits.shape
    order = _descending_order(logits)
    temperature = np.array([p.temperature for p in params], dtype=np.float64)
    z = np.take_along_axis(logits, order, axis=1).astype(np.float64) / temperature[:, None]
    cumulative = np.cumsum(np.exp(z - z[:, :1]), axis=1)
    columns = np.arange(vocab)
    # top_k: the first k candidates (k = vocab when 0 or beyond it).
    keep = np.array([p.top_k if 0 < p.top_k < vocab else vocab for p in params], dtype=np.int64)
    # top_p: the shortest prefix whose mass reaches top_p of the kept total (at least one).
    top_p = np.array([p.top_p for p in params], dtype=np.float64)
    cut = top_p < 1.0
    if cut.any():
        total = cumulative[np.arange(num_rows), keep - 1]
        below = (cumulative < (top_p * total)[:, None]) & (columns[None, :] < keep[:, None])
        keep = np.where(cut, np.minimum(below.sum(axis=1) + 1, keep), keep)
    total = cumulative[np.arange(num_rows), keep - 1]
    draws = uniform_many([p.seed for p in params], positions)
    target = draws * total
    index = ((cumulative <= target[:, None]) & (columns[None, :] < keep[:, None])).sum(axis=1)
    index = np.minimum(index, keep - 1)
    picked: np.ndarray = order[np.arange(num_rows), index]
    return picked
