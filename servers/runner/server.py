"""The runner process: loads the model once and computes the steps the scheduler sends.

Registers as "runner.N". KV pages live in the arena's PAGES region (the scheduler's
blocks); a step names the blocks it reads and writes. The runner never allocates or owns
arena memory. A step is computed inside its handler, so when FENCE is handled no step of
this runner is in flight.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from llmos.libllm import protocol as P
from llmos.libllm.protocol import runner as R
from llmos.libllm.tokenizer import load_tokenizer
from llmos.microkernel import layout as L
from llmos.microkernel.endpoint import Channel, Message
from llmos.microkernel.errors import InvalidRequest
from llmos.microkernel.messages import MsgType
from llmos.servers.base import EndpointSource, Server
from llmos.servers.runner.loaders import tokenizer_path_for
from llmos.servers.runner.model import Model, SeqChunk, run_steps
from llmos.servers.runner.sampling import SamplingParams
from llmos.servers.start_progress import StageProgress

log = logging.getLogger("llmos.runner")


class RunnerServer(Server):
    name = "runner.0"

    def __init__(self, endpoint: EndpointSource, model_path: Path, *, block_tokens: int,
                 threads: int = 1, context: int | None = None, kv_dtype: str = "f32") -> None:
        # Load first, register after (`endpoint` is then a factory): once the name is taken,
        # the scheduler may send steps.
        # Progress lines on stdout until the ready line: the supervisor shows them (start_progress).
        self.model = Model.load(model_path, block_tokens=block_tokens, threads=threads, context=context,
                                kv_dtype=kv_dtype, progress=StageProgress("weights"))
        super().__init__(endpoint, handlers={
            MsgType.RUNNER_MODEL_INFO: self.handle_model_info,
            MsgType.RUNNER_STEP: self.handle_step,
            MsgType.RUNNER_FENCE: self.handle_fence,
        })
        config = self.model.config
        pages = self.endpoint.arena.region(L.RegionKind.PAGES)
        # The memory server's blocks are this size too: the supervisor sizes both from one config.
        self.num_blocks = pages.size // self.model.kv_block_bytes
        self.kv: np.ndarray[Any, Any] = self.endpoint.arena.ndarray(
            pages.offset, self.model.kv_pool_shape(self.num_blocks), self.model.kv_dtype)
        tokenizer_path = tokenizer_path_for(model_path)
        tokenizer_progress = StageProgress("tokenizer")
        tokenizer_progress(0, 1)
        tokenizer = load_tokenizer(tokenizer_path)
        tokenizer_progress(1, 1)
        self.info = P.ModelInfo(
            model_path=str(model_path), model_sha256=_sha256(model_path), tokenizer_path=str(tokenizer_path),
            context_length=config.seq_len, vocab_size=config.vocab_size, bos_id=tokenizer.bos_id,
            stop_ids=sorted(tokenizer.stop_ids), block_tokens=block_tokens, num_kv_blocks=self.num_blocks)
        self.num_steps = 0
        self.busy_s = 0.0
        log.info("%s: %s, %d KV blocks of %d tokens", self.name, model_path.name, self.num_blocks, block_tokens)

    def handle_model_info(self, channel: Channel, message: Message) -> bytes:
        return P.pack(self.info)

    def handle_fence(self, channel: Channel, message: Message) -> bytes:
        return b""  # steps run inside their handler: none is in flight now

    def handle_step(self, channel: Channel, message: Message) -> bytes:
        try:
            step: R.Step = P.unpack(message.payload, R.Step)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise InvalidRequest(f"bad Step payload: {exc}") from None
        chunks = [self._chunk(c) for c in step.chunks]
        started = time.perf_counter()
        logprobs: list[list[P.Logprob]] = []
        prompt_logprobs: list[list[P.Logprob]] = []
        made = run_steps(self.model, chunks, [c.num_steps for c in step.chunks], self.kv, self.stop_ids,
                         between=self.heartbeat_if_due, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        elapsed = time.perf_counter() - started
        self.num_steps += 1
        self.busy_s += elapsed
        return P.pack(R.StepResult(step.step_id, made, elapsed, logprobs if any(logprobs) else [],
                                   prompt_logprobs if any(prompt_logprobs) else []))

    def _chunk(self, c: R.StepChunk) -> SeqChunk:
        """Check everything a chunk names before the model touches the KV pool."""
        if not c.token_ids:
            raise InvalidRequest(f"sequence {c.seq_id}: a chunk needs at least one token")
        if not 1 <= c.num_steps <= self.info.context_length:
            raise InvalidRequest(f"sequence {c.seq_id}: num_steps must be in 1..{self.info.context_length}")
        if c.num_steps > 1 and not c.wants_token:
            raise InvalidRequest(f"sequence {c.seq_id}: num_steps > 1 needs wants_token")
        # The last token made is fed at end + num_steps - 2; its KV is written by a later step.
        end = c.start_pos + len(c.token_ids) + c.num_steps - 1
        if c.start_pos < 0 or end > self.info.context_length:
            raise InvalidRequest(f"sequence {c.seq_id}: positions {c.start_pos}..{end} outside the context "
                                 f"of {self.info.context_length}")
        needed = self.model.blocks_needed(end)
        if len(c.block_table) < needed or any(not 0 <= b < self.num_blocks for b in c.block_table[:needed]):
            raise InvalidRequest(f"sequence {c.seq_id}: block table must name {needed} blocks in 0..{self.num_blocks - 1}")
        if any(not 0 <= t < self.info.vocab_size for t in c.token_ids):
            raise InvalidRequest(f"sequence {c.seq_id}: token id outside the vocabulary of {self.info.vocab_size}")
        try:
            sampling = SamplingParams(c.temperature, c.top_k, c.top_p, c.seed, c.num_logprobs, c.presence_penalty,
                                      c.frequency_penalty, c.repetition_penalty)
        except ValueError as exc:
            raise InvalidRequest(f"sequence {c.seq_id}: {exc}") from None
        if not -1 <= c.next_token_id < self.info.vocab_size:
            raise InvalidRequest(f"sequence {c.seq_id}: next_token_id outside the vocabulary")
        if any(not 0 <= t < self.info.vocab_size for t in (*c.penalty_prompt_ids, *c.penalty_output_ids)):
            raise InvalidRequest(f"sequence {c.seq_id}: a penalty's token id outside the vocabulary")
        return SeqChunk(c.block_table[:needed], c.start_pos, c.token_ids, c.wants_token, sampling,
                        c.prompt_logprobs, c.next_token_id, c.penalty_prompt_ids, c.penalty_output_ids)

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset(self.info.stop_ids)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
