"""The baselines of `llmos bench serve`, on the same workload and the same model code.

- In-process: the model in this process with no operating system around it, a small
  continuous batcher: up to `batch` sequences at once, each prompt prefilled in the step
  it joins, every step decoding one token for each of the others, a finished sequence's
  place refilled at once. The ideal the system is compared with.
- Naive server: one process serving requests one at a time (batch 1) with the same Model,
  fed through a multiprocessing.Queue and answering on one queue per client.

Both sample like the runners ((seed, position) draws, the tokenizer's stop ids), so each
request makes exactly the tokens it makes through llmos.
"""

from __future__ import annotations

import os
import signal
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmos.bench.e2e import CTX
from llmos.bench.serve_clients import ClientSpec, Record
from llmos.bench.serve_harness import Harness
from llmos.bench.serve_workload import WorkItem, digest
from llmos.libllm.sampling import SamplingParams
from llmos.lifecycle import cpu_seconds
from llmos.microkernel.lifeline import exit_with_parent
from llmos.servers.runner.model import Model, SeqChunk


def stop_ids_of(model: Model) -> frozenset[int]:
    """The ids a runner stops at: those of the model's tokenizer."""
    from llmos.libllm.tokenizer import load_tokenizer
    from llmos.servers.runner.loaders import tokenizer_path_for

    return frozenset(load_tokenizer(tokenizer_path_for(model.loaded.path)).stop_ids)


@dataclass(slots=True)
class _Seq:
    item: WorkItem
    slot: int
    params: SamplingParams
    feed: tuple[int, ...]  # what the next step computes: the prompt, then the last token
    pos: int = 0
    made: list[int] = field(default_factory=list)


@dataclass(slots=True, frozen=True)
class InProcessResult:
    wall_s: float
    generated_tokens: int
    digests: dict[int, int]  # request index -> digest of its output
    output_tokens: dict[int, int]

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s else 0.0

    @property
    def requests_per_s(self) -> float:
        return len(self.digests) / self.wall_s if self.wall_s else 0.0


def in_process(model: Model, items: Sequence[WorkItem], batch: int, stop_ids: Collection[int],
               progress: Callable[[int], None] | None = None) -> InProcessResult:
    """Serve `items` in order with a continuous batch of at most `batch` sequences.
    `progress(n)` is called with the number of requests finished, now and then."""
    per_seq = model.blocks_needed(model.config.seq_len)
    kv = model.new_kv_pool(batch * per_seq)
    tables = [np.arange(i * per_seq, (i + 1) * per_seq, dtype=np.int32) for i in range(batch)]
    queue = deque(items)
    free = list(range(batch - 1, -1, -1))
    active: list[_Seq] = []
    digests: dict[int, int] = {}
    lengths: dict[int, int] = {}
    start = time.perf_counter()
    while queue or active:
        while free and queue:
            item = queue.popleft()
            params = SamplingParams(temperature=item.temperature, seed=item.seed)
            active.append(_Seq(item, free.pop(), params, item.prompt_ids))
        chunks = [SeqChunk(tables[s.slot], s.pos, s.feed, sampling=s.params) for s in active]
        tokens = model.step(chunks, kv).token_ids.tolist()
        running = []
        for seq, token in zip(active, tokens, strict=True):
            seq.pos += len(seq.feed)
            if token not in stop_ids:
                seq.made.append(token)
            if token in stop_ids or len(seq.made) >= seq.item.max_tokens:
                digests[seq.item.index] = digest(seq.made)
                lengths[seq.item.index] = len(seq.made)
                free.append(seq.slot)
                if progress is not None:
                    progress(len(digests))
            else:
                seq.feed = (token,)
                running.append(seq)
        active = running
    wall = time.perf_counter() - start
    return InProcessResult(wall, sum(lengths.values()), digests, lengths)


def generate_one(model: Model, kv: np.ndarray, item: WorkItem, stop_ids: Collection[int]) -> tuple[list[int], float]:
    """One request alone: prefill, then one token per step. Returns the output and the
    time of its first token (time.monotonic())."""
    params = SamplingParams(temperature=item.temperature, seed=item.seed)
    table = np.arange(model.blocks_needed(model.config.seq_len), dtype=np.int32)
    token = int(model.step([SeqChunk(table, 0, item.prompt_ids, sampling=params)], kv).token_ids[0])
    first = time.monotonic()
    pos = item.prompt_tokens
    made: list[int] = []
    while token not in stop_ids:
        made.append(token)
        if len(made) >= item.max_tokens:
            break
        token = int(model.step([SeqChunk(table, pos, (token,), sampling=params)], kv).token_ids[0])
        pos += 1
    return made, first


def naive_server(items: Sequence[WorkItem], requests: Any, replies: Sequence[Any], parent_pid: int) -> None:
    """The naive server's process: (slot, request index, sent) from `requests`, the answer to
    `replies[slot]` as (made, received, first_token, finished) times; None stops it."""
    exit_with_parent(parent_pid, signal.SIGKILL)  # fork copied the parent's SIGTERM handler
    model = Model.load()
    stop_ids = stop_ids_of(model)
    kv = model.new_kv_pool(model.blocks_needed(model.config.seq_len))
    by_index = {item.index: item for item in items}
    while (job := requests.get()) is not None:
        slot, index, _sent = job
        received = time.monotonic()
        made, first = generate_one(model, kv, by_index[index], stop_ids)
        replies[slot].put((made, received, first, time.monotonic()))


@dataclass(slots=True, frozen=True)
class NaiveResult:
    records: list[Record]
    wall_s: float
    server_cpu_s: float

    @property
    def generated_tokens(self) -> int:
        return sum(r.output_tokens for r in self.records)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s else 0.0

    @property
    def requests_per_s(self) -> float:
        return len(self.records) / self.wall_s if self.wall_s else 0.0


def run_naive(items: Sequence[WorkItem], num_workers: int, open_loop: bool,
              progress: Callable[[int], None]) -> NaiveResult:
    """The naive server in a process of its own, `num_workers` clients sending it `items`."""

    requests = CTX.Queue()
    replies = [CTX.Queue() for _ in range(num_workers)]
    server = CTX.Process(target=naive_server, args=(items, requests, replies, os.getpid()), daemon=True)
    server.start()
    try:
        with Harness(ClientSpec("naive", open_loop=open_loop), items, num_workers, (requests, replies)) as harness:
            harness.ready()
            assert server.pid is not None
            cpu0 = cpu_seconds(server.pid)
            harness.go()
            records, _cpu = harness.collect(progress)
            cpu = cpu_seconds(server.pid) - cpu0
    finally:
        requests.put(None)
        server.join(10.0)
        if server.is_alive():
            server.kill()
            server.join(5.0)
    return NaiveResult(records, max(r.start_s + r.e2e_s for r in records), cpu)
