"""Token sampling: greedy, temperature, top-k and top-p; `sample` defines it over one row
of logits, `sample_rows` computes it for a whole batch at once (the runner's path).

Runs inside a runner process after each step. Owns nothing. The random draw for a token is
a pure function of (seed, position) through splitmix64, so a request's text never depends on
its batch-mates, its runner or a resume after a crash; never Python's hash() or a global RNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from llmos.libllm.protocol import Logprob
from llmos.libllm.sampling import GREEDY as GREEDY
from llmos.libllm.sampling import SamplingParams as SamplingParams
from llmos.servers.runner._kernels import threads as _threads  # the step's thread count

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

    The candidates are ordered by logit, ties by id, then cut by top-k and top-p; their
    weights exp((z - z_max) / T) are summed in that order in float64, and the draw
    ``uniform(seed, position)`` times the kept mass picks the first candidate whose running
    sum passes it. The kept mass is the running sum at the cut, or, with no top-k, the sum
    of every weight in id order (numpy's pairwise sum of the row). So the pick is a function
    of the row, the params and the position only.

    Only as much of the order is computed as the pick needs: the first CANDIDATES ids (a
    partial selection), and the whole sorted vocabulary only when the draw or the top-p cut
    falls past them (with probability the mass beyond them). On a 262k vocabulary this is
    what makes sampling cost a fraction of a step instead of most of it.
    """
    row = np.asarray(logits, dtype=np.float32).reshape(-1)
    if params.is_greedy:
        return int(np.argmax(row))  # first index of the maximum
    vocab = row.size
    keep_k = params.top_k if 0 < params.top_k < vocab else vocab
    z = row.astype(np.float64)
    z /= params.temperature
    z_max = float(z.max())
    weights = None  # exp(z - z_max) of every id, when the whole mass is needed anyway
    if keep_k == vocab:
        weights = z - z_max
        np.exp(weights, out=weights)
    total_k = float(weights.sum()) if weights is not None else 0.0
    draw = uniform(params.seed, position)
    size = keep_k if keep_k < vocab else min(CANDIDATES, vocab)
    while True:
        order = top_order(row, size)
        cumulative = np.cumsum(weights[order] if weights is not None else np.exp(z[order] - z_max))
        total = float(cumulative[-1]) if keep_k < vocab else total_k
        keep = keep_k
        if params.top_p < 1.0:
            # Keep the shortest prefix whose mass reaches top_p of the total (at least one).
            keep = min(int(np.searchsorted(cumulative, params.top_p * total, side="left")) + 1, keep_k)
            if keep > size:
                size = vocab  # the cut lies past the candidates: the whole order
                continue
            total = float(cumulative[keep - 1])
        index = int(np.searchsorted(cumulative[: min(keep, size)], draw * total, side="right"))
        if keep <= size or index < size:
            return int(order[min(index, keep - 1)])
        size = vocab  # the draw lies past the candidates: the whole order


CANDIDATES = 1024  # ids ordered before the whole vocabulary is (see `sample`)


def top_order(row: np.ndarray, size: int) -> np.ndarray:
    """The first ``size`` ids of ``row`` by descending logit, ties by id: the prefix of the
    full order, found by a partial selection (O(vocab)) and a sort of those alone."""
    if size >= row.size:
        whole: np.ndarray = _descending_order(row[None, :])[0]
        return whole
    threshold = np.partition(row, row.size - size)[row.size - size]  # the size-th largest value
    above = np.flatnonzero(row > threshold)
    ids = np.concatenate([above, np.flatnonzero(row == threshold)[: size - above.size]])
    picked: np.ndarray = ids[_descending_order(row[ids][None, :])[0]]
    return picked


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


def penalised(row: np.ndarray, params: SamplingParams, prompt_ids: Sequence[int],
              output_ids: Sequence[int]) -> np.ndarray:
    """A new row: ``row`` with ``params``' penalties applied in vLLM's order and float32
    arithmetic: the repetition penalty on every id in the prompt or made (a positive logit
    divided by it, a negative one multiplied), then frequency times each made id's count
    plus presence subtracted. A function of the row and the ids only (batch invariance)."""
    z = np.array(row, dtype=np.float32, copy=True)
    made = np.asarray(output_ids, dtype=np.intp)
    if params.repetition_penalty != 1.0:
        seen = np.unique(np.concatenate([np.asarray(prompt_ids, dtype=np.intp), made]))
        r = np.float32(params.repetition_penalty)
        values = z[seen]
        z[seen] = np.where(values > 0, values / r, values * r)
    if made.size and (params.frequency_penalty or params.presence_penalty):
        ids, counts = np.unique(made, return_counts=True)
        z[ids] -= np.float32(params.frequency_penalty) * counts.astype(np.float32) + np.float32(params.presence_penalty)
    return z


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
    # A few rows: numpy's per-call cost dominates; a large vocabulary: `sample` orders only
    # the candidates it needs, where the batched form sorts every row whole.
    if rows.size and logits.shape[1] > CANDIDATES and _threads() > 1 and rows.size > 1:
        # Rows are independent and numpy's big loops let go of the GIL: one row per thread.
        picks = _pool().map(lambda i: sample(logits[i], params[i], positions[i]), rows.tolist())
        out[rows] = list(picks)
    elif 0 < rows.size < BATCHED_FROM_ROWS or (rows.size and logits.shape[1] > CANDIDATES):
        for i in rows.tolist():
            out[i] = sample(logits[i], params[i], positions[i])
    elif rows.size:
        drawn = [params[i] for i in rows.tolist()]
        out[rows] = _sample_batch(np.asarray(logits[rows], dtype=np.float32), drawn,
                                  [positions[i] for i in rows.tolist()])
    return out


_POOL: dict[int, ThreadPoolExecutor] = {}  # by size: the step's thread count, made on first use


def _pool() -> ThreadPoolExecutor:
    size = _threads()
    if size not in _POOL:
        _POOL[size] = ThreadPoolExecutor(max_workers=size, thread_name_prefix="llmos-sample")
    return _POOL[size]


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
    unsorted = logits.astype(np.float64) / temperature[:, None]
    z = np.take_along_axis(unsorted, order, axis=1)
    cumulative = np.cumsum(np.exp(z - z[:, :1]), axis=1)
    columns = np.arange(vocab)
    rows = np.arange(num_rows)
    # top_k: the first k candidates (k = vocab when 0 or beyond it).
    keep = np.array([p.top_k if 0 < p.top_k < vocab else vocab for p in params], dtype=np.int64)
    # The kept mass: the running sum at the top-k cut, or every weight summed in id order
    # (each row's own pairwise sum, as `sample` takes it).
    whole = np.array([np.exp(r - r.max()).sum() for r in unsorted])
    total = np.where(keep == vocab, whole, cumulative[rows, keep - 1])
    # top_p: the shortest prefix whose mass reaches top_p of the kept total (at least one).
    top_p = np.array([p.top_p for p in params], dtype=np.float64)
    cut = top_p < 1.0
    if cut.any():
        below = (cumulative < (top_p * total)[:, None]) & (columns[None, :] < keep[:, None])
        keep = np.where(cut, np.minimum(below.sum(axis=1) + 1, keep), keep)
        total = np.where(cut, cumulative[rows, keep - 1], total)
    draws = uniform_many([p.seed for p in params], positions)
    target = draws * total
    index = ((cumulative <= target[:, None]) & (columns[None, :] < keep[:, None])).sum(axis=1)
    index = np.minimum(index, keep - 1)
    picked: np.ndarray = order[np.arange(num_rows), index]
    return picked
