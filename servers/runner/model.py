"""The model a runner computes with (any family of architectures.py): batched prefill and
decode steps over a paged KV pool.

Runs inside a runner process. Owns its weights (memory-mapped or in a dequant buffer) and
scratch; the KV pool belongs to the caller (the scheduler's blocks in the arena, or a test's
numpy array) and a step only writes the slots of the tokens it computes. It never allocates
KV blocks and never depends on batch-mates: every row is summed in a fixed order (_kernels).

KV pool layout: float32 ``(num_blocks, n_layers, 2, n_kv_heads, head_size * block_tokens)``,
C-contiguous (float16 with ``kv_dtype="f16"``: half the bytes; each element rounded to the
nearest half when written, read back exactly). Token position ``p`` of a sequence lives in block ``block_table[p // block_tokens]``,
slot ``s = p % block_tokens``. ``[b, l, 0, h]`` holds KV head ``h``'s keys dimension-major
(dimension ``d`` of slot ``s`` at ``d * block_tokens + s``: four slots' scores are one vector
op); ``[b, l, 1, h]`` its values slot-major (at ``s * head_size + d``). One block thus holds
every layer of ``block_tokens`` tokens; ``Model.read_kv`` turns pages back into (K, V).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from llmos.libllm.protocol import Logprob
from llmos.servers.runner._kernels import Engine, pack_chunks, set_threads
from llmos.servers.runner.architectures import RopeLayout
from llmos.servers.runner.loaders import LoadedModel, ModelConfig, default_model_path, load_model
from llmos.servers.runner.sampling import SamplingParams, logprob_of, penalised, sample_rows
from llmos.servers.runner.weights import Progress

DEFAULT_BLOCK_TOKENS = 16


@dataclass(slots=True, frozen=True, eq=False)
class SeqChunk:
    """One sequence's share of a step: ``token_ids`` at positions ``start_pos, start_pos+1...``.

    A decode is a chunk of one token; a prefill is one or more chunks of many. The chunk's
    K/V go to the slots its block table names; positions below ``start_pos`` must have been
    written by earlier steps. Only the table entries for positions below ``end_pos`` are
    read (later ones may be anything, e.g. -1 padding). ``sampling`` (with ``wants_logits``)
    asks for a sampled token at position ``end_pos``, drawn with (seed, ``end_pos``).
    """

    block_table: Sequence[int] | np.ndarray
    start_pos: int
    token_ids: Sequence[int] | np.ndarray
    wants_logits: bool = True
    sampling: SamplingParams | None = None
    # Also the log-probability of each next token at every row (a prompt's, for echo):
    # ``token_ids[1:]`` then ``next_token_id`` (the token after the chunk; -1: none known).
    prompt_logprobs: bool = False
    next_token_id: int = -1
    # What ``sampling``'s penalties count (when it has any): the request's prompt and the
    # tokens it has made before this chunk.
    penalty_prompt_ids: Sequence[int] = ()
    penalty_output_ids: Sequence[int] = ()

    @property
    def end_pos(self) -> int:
        """One past the last position this chunk writes."""
        return self.start_pos + len(self.token_ids)


@dataclass(slots=True, frozen=True, eq=False)
class StepOutput:
    """Per chunk, in input order: logits of its last token (NaN rows where not asked for),
    the sampled token id (-1 where not asked for) and its Logprob (None where not asked)."""

    logits: np.ndarray  # (n_chunks, vocab_size) float32
    token_ids: np.ndarray  # (n_chunks,) int32
    logprobs: list[Logprob | None]
    # Per chunk that asked (``prompt_logprobs``): the Logprob of the token after each of its
    # rows, for positions start_pos + 1 ...; [] for the others.
    prompt_logprobs: list[list[Logprob]] = field(default_factory=list)


def rope_tables(
    config: ModelConfig, freq_divisors: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of ``pos * theta**(-2j/head_size)``, shape (n_tables, seq_len, head_size // 2).

    Table 0 serves the global layers (``rope_theta``, times ``rope_freq_scale``, divided by
    the file's ``rope_freqs`` when it has them: llama3's scaling); table 1, present when the
    model has sliding-window layers, serves those (``rope_theta_local``, unscaled), as
    llama.cpp does. As llama2.c's run.c: a float32 frequency times a float32 position, then
    cos/sin. The transcendentals run in float64 and round once to float32, so the table does
    not depend on which SIMD variant of a float32 cos numpy picks on a machine.
    """
    half = config.head_size // 2
    exponent = np.arange(half, dtype=np.float64) * 2.0 / config.head_size
    positions = np.arange(config.seq_len, dtype=np.float32)[:, None]

    def table(theta: float, scale: float, divisors: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        freq = 1.0 / np.power(float(theta), exponent) * scale
        if divisors is not None:
            freq = freq / divisors.astype(np.float64)
        angles64 = (positions * freq.astype(np.float32)[None, :]).astype(np.float64)
        return np.cos(angles64).astype(np.float32), np.sin(angles64).astype(np.float32)

    tables = [table(config.rope_theta, config.rope_freq_scale, freq_divisors)]
    if config.swa_pattern:
        tables.append(table(config.rope_theta_local, 1.0, None))
    return np.stack([c for c, _ in tables]), np.stack([s for _, s in tables])


# What KV pages may hold: "f16" halves the bytes of a block (twice the tokens in the same pages).
KV_DTYPES: dict[str, type[np.floating[Any]]] = {"f32": np.float32, "f16": np.float16}


class Model:
    """A loaded model plus its compiled kernels. ``step`` is the whole compute API."""

    def __init__(
        self, loaded: LoadedModel, *, block_tokens: int = DEFAULT_BLOCK_TOKENS, threads: int | None = None,
        context: int | None = None, kv_dtype: str = "f32",
    ) -> None:
        if block_tokens <= 0:
            raise ValueError(f"block_tokens must be positive, got {block_tokens}")
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
        self.kv_dtype: type[np.floating[Any]] = KV_DTYPES[kv_dtype]
        if context is not None and context < 2:
            raise ValueError(f"context must be at least 2, got {context}")
        if threads is not None:
            set_threads(threads)  # per process: a runner computes one model
        self.loaded = loaded
        self.config: ModelConfig = loaded.config
        if context is not None and context < self.config.seq_len:
            # Fewer positions than the file allows: smaller rope tables and score rows too.
            self.config = replace(self.config, seq_len=context)
        self.block_tokens = block_tokens
        cos, sin = rope_tables(self.config, loaded.weights.rope_freqs)
        self._engine = Engine(self.config, loaded.weights, cos, sin, kv_f16=kv_dtype == "f16")
        # Logits rows reused across steps that do not keep them (run_steps): a fresh array of
        # B x vocab floats each step is fresh pages the kernel zeroes (12% of a Gemma decode).
        self._scratch = np.empty((0, self.config.vocab_size), np.float32)

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        *,
        block_tokens: int = DEFAULT_BLOCK_TOKENS,
        buffer: Any = None,
        fill: bool = True,
        rope_layout: RopeLayout | None = None,
        threads: int | None = None,
        context: int | None = None,
        kv_dtype: str = "f32",
        progress: Progress | None = None,
    ) -> Model:
        """Load ``path`` (default: the shipped stories260K); see loaders.load_model.
        ``threads`` sets this process's threads per step (None: leave as is); ``context``
        caps the positions a sequence may hold (None: the file's context length)."""
        loaded = load_model(
            path or default_model_path(), buffer=buffer, fill=fill, rope_layout=rope_layout, progress=progress
        )
        return cls(loaded, block_tokens=block_tokens, threads=threads, context=context, kv_dtype=kv_dtype)

    def kv_pool_shape(self, num_blocks: int) -> tuple[int, int, int, int, int]:
        c = self.config
        return (num_blocks, c.n_layers, 2, c.n_kv_heads, c.head_size * self.block_tokens)

    def read_kv(
        self, kv: np.ndarray, block_table: Sequence[int], num_tokens: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values of a sequence's first ``num_tokens`` positions, each of shape
        (n_layers, num_tokens, kv_dim) (RoPE already applied to the keys)."""
        c, bs = self.config, self.block_tokens
        pages = kv[np.asarray(block_table[: self.blocks_needed(num_tokens)], dtype=np.intp)]
        # pages: (blocks, L, 2, heads, hs*bs) -> per kind (L, blocks, bs, heads, hs)
        k = pages[:, :, 0].reshape(-1, c.n_layers, c.n_kv_heads, c.head_size, bs)
        v = pages[:, :, 1].reshape(-1, c.n_layers, c.n_kv_heads, bs, c.head_size)
        keys = k.transpose(1, 0, 4, 2, 3).reshape(c.n_layers, -1, c.kv_dim)[:, :num_tokens]
        values = v.transpose(1, 0, 3, 2, 4).reshape(c.n_layers, -1, c.kv_dim)[:, :num_tokens]
        return keys, values

    def new_kv_pool(self, num_blocks: int) -> np.ndarray:
        """A zeroed pool for tests and benchmarks (the runner's lives in the arena)."""
        return np.zeros(self.kv_pool_shape(num_blocks), dtype=self.kv_dtype)

    @property
    def kv_block_bytes(self) -> int:
        """Bytes of one KV block (every layer's K and V of block_tokens tokens)."""
        return int(np.prod(self.kv_pool_shape(1))) * np.dtype(self.kv_dtype).itemsize

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_tokens)

    def _rows(self, n: int, keep: bool) -> np.ndarray:
        if keep:
            return np.empty((n, self.config.vocab_size), np.float32)
        if self._scratch.shape[0] < n:
            self._scratch = np.empty((n, self.config.vocab_size), np.float32)
        return self._scratch[:n]

    def step(self, chunks: Sequence[SeqChunk], kv: np.ndarray, *, keep_logits: bool = True) -> StepOutput:
        """Compute one batched step.

        Args:
            chunks: the sequences in this step; a sequence appears at most once.
            kv: the KV pool (see the module docstring), written in place.

        Returns:
            StepOutput with a row per chunk. With ``keep_logits`` False its logits live in a
            buffer the next such step overwrites (the tokens and logprobs are the caller's).

        Raises:
            ValueError: a malformed chunk (token or block out of range, a block table too
                short, a position beyond the context, two rows writing one KV slot) or pool.

        One step at a time per Model: the kernels' scratch is shared and the GIL is
        released while they run.
        """
        c = self.config
        bs = self.block_tokens
        n_chunks = len(chunks)
        if kv.dtype != self.kv_dtype or not kv.flags.c_contiguous or not kv.flags.writeable:
            raise ValueError(f"kv pool must be a writable C-contiguous {np.dtype(self.kv_dtype)} array")
        if kv.ndim != 5 or kv.shape[1:] != self.kv_pool_shape(0)[1:]:
            raise ValueError(
                f"kv pool shape {kv.shape} does not match (N, *{self.kv_pool_shape(0)[1:]})"
            )
        if n_chunks == 0:
            return StepOutput(np.empty((0, c.vocab_size), np.float32), np.empty(0, np.int32), [])
        tokens, positions, row_seq, tables, logit_rows, wants = pack_chunks(
            list(chunks), bs, kv.shape[0], c.vocab_size, c.seq_len
        )
        spans = _prompt_spans(chunks)
        if spans:  # every row of those chunks gets logits too, after the chunks' last rows
            every = [np.arange(first, first + n, dtype=np.int32) for _, first, n in spans]
            logit_rows = np.concatenate([logit_rows, *every])
        # One array for the forward's rows; the chunks' rows are its first ones when every
        # chunk asked, else copied out of it (the scratch holds both, in that order).
        out = self._rows(len(logit_rows) + (0 if len(wants) == n_chunks else n_chunks), keep_logits)
        logits = out[:n_chunks] if len(wants) == n_chunks else out[len(logit_rows):]
        out = out[: len(logit_rows)]
        self._engine.forward(
            tokens, positions, row_seq, tables, kv.reshape(-1).view(np.uint8), bs, logit_rows, out
        )
        if len(wants) != n_chunks:
            logits.fill(np.nan)
            logits[wants] = out[: len(wants)]
        prompt_logprobs = _prompt_logprobs(chunks, spans, out[len(wants):]) if spans else []

        token_ids = np.full(n_chunks, -1, dtype=np.int32)
        to_sample = [i for i in wants.tolist() if chunks[i].sampling is not None]
        if to_sample:
            params = [p for i in to_sample if (p := chunks[i].sampling) is not None]
            penalties = any(p.has_penalties for p in params)
            if not penalties and to_sample == list(range(n_chunks)):
                rows = logits  # every row, in order: no copy of B x vocab floats
            else:
                rows = logits[to_sample]  # a copy: penalties change it, never the logits reported
            for k, i in enumerate(to_sample):
                if params[k].has_penalties:
                    rows[k] = penalised(rows[k], params[k], chunks[i].penalty_prompt_ids,
                                        chunks[i].penalty_output_ids)
            token_ids[to_sample] = sample_rows(rows, params, [chunks[i].end_pos for i in to_sample])
        logprobs: list[Logprob | None] = [None] * n_chunks
        for i in to_sample:
            top = chunks[i].sampling.num_logprobs
            if top >= 0:
                logprobs[i] = logprob_of(logits[i], int(token_ids[i]), top)
        return StepOutput(logits=logits, token_ids=token_ids, logprobs=logprobs, prompt_logprobs=prompt_logprobs)


def _prompt_spans(chunks: Sequence[SeqChunk]) -> list[tuple[int, int, int]]:
    """(chunk index, first row, rows) of the chunks that asked for prompt logprobs."""
    spans, row = [], 0
    for i, chunk in enumerate(chunks):
        if chunk.prompt_logprobs:
            spans.append((i, row, len(chunk.token_ids)))
        row += len(chunk.token_ids)
    return spans


def _prompt_logprobs(chunks: Sequence[SeqChunk], spans: list[tuple[int, int, int]],
                     rows: np.ndarray) -> list[list[Logprob]]:
    out: list[list[Logprob]] = [[] for _ in chunks]
    at = 0
    for i, _, n in spans:
        chunk = chunks[i]
        top = max(0, chunk.sampling.num_logprobs) if chunk.sampling is not None else 0
        following = [int(t) for t in chunk.token_ids[1:]] + [chunk.next_token_id]
        out[i] = [logprob_of(rows[at + j], t, top) for j, t in enumerate(following) if t >= 0]
        at += n
    return out


def run_steps(
    model: Model,
    chunks: Sequence[SeqChunk],
    num_steps: Sequence[int],
    kv: np.ndarray,
    stop_ids: Collection[int],
    between: Callable[[], None] | None = None,
    logprobs: list[list[Logprob]] | None = None,
    prompt_logprobs: list[list[Logprob]] | None = None,
) -> list[list[int]]:
    """One scheduler step: compute ``chunks``, then keep decoding each chunk that asked for
    ``num_steps`` > 1 tokens, feeding back its last token, until it has that many or samples
    a stop id (kept as its last token). Returns the tokens per chunk ([] where none wanted),
    and fills ``logprobs`` (when given) with their Logprobs, per chunk, where asked for, and
    ``prompt_logprobs`` with the chunks' prompt Logprobs (see StepOutput).
    ``between`` runs after every inner step (the runner heartbeats there).

    Each inner step is an ordinary batched step, so every token is bit-identical to what
    one-token steps would give (batch invariance, (seed, position) sampling).
    """
    first = model.step(chunks, kv, keep_logits=False)
    made = [[int(t)] if c.wants_logits else [] for c, t in zip(chunks, first.token_ids, strict=True)]
    reported: list[list[Logprob]] = [[lp] if lp is not None else [] for lp in first.logprobs]
    alive = [i for i, c in enumerate(chunks) if made[i] and num_steps[i] > 1 and made[i][0] not in stop_ids]
    while alive:
        if between is not None:
            between()
        step = [
            SeqChunk(chunks[i].block_table, chunks[i].end_pos + len(made[i]) - 1, (made[i][-1],),
                     sampling=chunks[i].sampling, penalty_prompt_ids=chunks[i].penalty_prompt_ids,
                     penalty_output_ids=_made_so_far(chunks[i], made[i]))
            for i in alive
        ]
        out = model.step(step, kv, keep_logits=False)
        for i, token, lp in zip(alive, out.token_ids, out.logprobs, strict=True):
            made[i].append(int(token))
            if lp is not None:
                reported[i].append(lp)
        alive = [i for i in alive if len(made[i]) < num_steps[i] and made[i][-1] not in stop_ids]
    if logprobs is not None:
        logprobs[:] = reported
    if prompt_logprobs is not None:
        prompt_logprobs[:] = first.prompt_logprobs
    return made


def _made_so_far(chunk: SeqChunk, made: list[int]) -> Sequence[int]:
    """What a penalised chunk's next inner step counts as made; nothing to count without
    penalties (no history copied every inner step)."""
    if chunk.sampling is None or not chunk.sampling.has_penalties:
        return ()
    return (*chunk.penalty_output_ids, *made)


def generate(
    model: Model,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    sampling: SamplingParams | None = None,
    *,
    stop_ids: Sequence[int] = (),
    chunk_size: int | None = None,
    kv: np.ndarray | None = None,
) -> list[int]:
    """Generate for one sequence alone (tests, benchmarks, a local `generate`).

    The prompt is prefilled in chunks of ``chunk_size`` tokens (all at once by default),
    then decoded one token per step. Returns the new ids, ending at the first stop id.
    """
    if not prompt_ids:
        raise ValueError("the prompt needs at least one token (e.g. BOS)")
    params = sampling or SamplingParams()
    total = min(len(prompt_ids) + max_new_tokens, model.config.seq_len)
    if kv is None:
        kv = model.new_kv_pool(model.blocks_needed(total))
    table = list(range(model.blocks_needed(total)))
    step = chunk_size or len(prompt_ids)
    out: list[int] = []
    pos = 0
    last = None
    while pos < len(prompt_ids):
        chunk = list(prompt_ids[pos : pos + step])
        is_last = pos + len(chunk) == len(prompt_ids)
        last = model.step(
            [
                SeqChunk(
                    table, pos, chunk, wants_logits=is_last, sampling=params if is_last else None,
                    penalty_prompt_ids=prompt_ids,
                )
            ],
            kv,
        )
        pos += len(chunk)
    assert last is not None
    token = int(last.token_ids[0])
    stops = set(stop_ids)
    while len(out) < max_new_tokens and token not in stops:
        out.append(token)
        if len(out) >= max_new_tokens or pos >= total:
            break  # never step for a token nobody will read
        decode = SeqChunk(table, pos, [token], sampling=params, penalty_prompt_ids=prompt_ids,
                          penalty_output_ids=out)
        token = int(model.step([decode], kv).token_ids[0])
        pos += 1
    return out
