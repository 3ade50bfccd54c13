"""A fake runner for the scheduler's logic tests, and a loop that drives a Scheduler with it.

The fake "model" reads a sequence's context back from its own KV pages (one token id per
slot), so a block given to two sequences, or KV counted before it was written, shows up as
a wrong token. The next token is a hash of (context, seed, position): a sequence's output
is the same alone or in any batch, as with the real model.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Hashable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from llmos.servers.scheduler import (
    GREEDY,
    CachedBlocks,
    ChunkPlan,
    FinishEvent,
    FinishReason,
    FreeListBlocks,
    Sampling,
    Scheduler,
    SchedulerConfig,
    SeqStatus,
    Sequence,
    StepPlan,
    TokenEvent,
)

VOCAB = 64
STOP_IDS = frozenset({0})
EMPTY = -1
MASK = (1 << 61) - 1


def next_token(context: Seq[int], sampling: Sampling, position: int) -> int:
    h = (sampling.seed * 1_000_003 + position) & MASK if not sampling.is_greedy else 7
    for t in context:
        h = (h * 31 + t + 1) & MASK
    return (h >> 7) % VOCAB


@dataclass(frozen=True)
class Spec:
    """What a test asks for; ``make`` turns it into a fresh Sequence."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    sampling: Sampling = GREEDY
    deadline: float | None = None
    priority: int = 0
    tenant: Hashable = None

    def make(self, seq_id: int) -> Sequence:
        return Sequence(
            seq_id,
            self.prompt_ids,
            max_tokens=self.max_tokens,
            sampling=self.sampling,
            stop_ids=STOP_IDS,
            deadline=self.deadline,
            priority=self.priority,
            tenant=self.tenant,
        )


def alone(spec: Spec, max_context: int) -> tuple[list[int], FinishReason]:
    """The output of ``spec`` computed by itself, straight from the token function."""
    tokens = list(spec.prompt_ids)
    out: list[int] = []
    while True:
        t = next_token(tokens, spec.sampling, len(tokens))
        if t in STOP_IDS:
            return out, "stop"
        tokens.append(t)
        out.append(t)
        if len(out) >= spec.max_tokens:
            return out, "length"
        if len(tokens) >= max_context:
            return out, "context"


class FakeRunner:
    """Computes plans over a KV pool of token ids: ``kv[block][slot]``."""

    def __init__(self, num_blocks: int, block_tokens: int) -> None:
        self.block_tokens = block_tokens
        self.kv = [[EMPTY] * block_tokens for _ in range(num_blocks)]

    def slot(self, table: Seq[int], pos: int) -> tuple[int, int]:
        return table[pos // self.block_tokens], pos % self.block_tokens

    def write(self, chunk: ChunkPlan) -> None:
        assert len(chunk.block_table) * self.block_tokens >= chunk.end_pos
        for i, t in enumerate(chunk.token_ids):
            b, s = self.slot(chunk.block_table, chunk.start_pos + i)
            self.kv[b][s] = t

    def read(self, table: Seq[int], num_tokens: int) -> list[int]:
        return [self.kv[b][s] for b, s in (self.slot(table, p) for p in range(num_tokens))]

    def step(self, plan: StepPlan) -> list[int]:
        written: set[tuple[int, int]] = set()
        for c in plan.chunks:
            slots = {self.slot(c.block_table, p) for p in range(c.start_pos, c.end_pos)}
            assert not slots & written, "two chunks of one step write one KV slot"
            written |= slots
        out = []
        for c in plan.chunks:
            self.write(c)
            if c.wants_token:
                out.append(next_token(self.read(c.block_table, c.end_pos), c.sampling, c.end_pos))
            else:
                out.append(EMPTY)
        return out

    def scribble(self, plan: StepPlan) -> None:
        """A runner that died mid-step: half-written garbage in the plan's slots."""
        for c in plan.chunks:
            for p in range(c.start_pos, c.end_pos, 2):
                b, s = self.slot(c.block_table, p)
                self.kv[b][s] = VOCAB + 1


Blocks = FreeListBlocks | CachedBlocks


def check_invariants(sched: Scheduler, blocks: Blocks) -> None:
    """Every block is free or in exactly one sequence's table (with a CachedBlocks: in as many
    tables as it has holders); a waiting one holds blocks only when a policy descheduled it
    (then it is not in flight and keeps its KV)."""
    owned = [b for s in (*sched.running, *sched.waiting) for b in s.block_table]
    if isinstance(blocks, CachedBlocks):
        holders = Counter(owned)
        assert all(blocks.refcount(b) == n for b, n in holders.items()), "a reference is lost"
        assert len(holders) == blocks.num_used
    else:
        assert len(owned) == len(set(owned)), "a block is in two tables"
        assert len(owned) == blocks.num_used
    assert blocks.num_used + blocks.num_free == blocks.num_total
    for s in sched.waiting:
        assert s.status is SeqStatus.WAITING and not s.is_in_flight
        assert len(s.block_table) * sched.config.block_tokens >= s.num_computed
        assert s.block_table or s.num_computed == 0
        assert not s.block_table or s.num_yields > 0
    for s in sched.running:
        assert s.status is SeqStatus.RUNNING
        assert len(s.block_table) * sched.config.block_tokens >= s.num_computed
    in_flight = [c.seq_id for p in sched.steps_in_flight for c in p.chunks]
    assert len(in_flight) == len(set(in_flight)), "a sequence is in two steps in flight"
    assert {s.seq_id for s in (*sched.running, *sched.waiting) if s.is_in_flight} == set(in_flight)


def check_plan(plan: StepPlan, config: SchedulerConfig) -> None:
    assert 0 < len(plan.chunks) <= config.max_batch_size
    assert plan.num_tokens <= config.token_budget
    assert len(set(plan.seq_ids)) == len(plan.chunks), "a sequence planned twice in one step"
    for c in plan.chunks:
        assert c.num_tokens > 0
        assert len(c.block_table) * config.block_tokens >= c.end_pos
        assert c.end_pos <= config.max_context


@dataclass
class Outcome:
    """What a drive produced, per seq_id."""

    outputs: dict[int, list[int]] = field(default_factory=dict)
    reasons: dict[int, FinishReason] = field(default_factory=dict)
    chunks: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # (start, end)
    plans: list[StepPlan] = field(default_factory=list)

    def apply(self, events: list[TokenEvent | FinishEvent]) -> None:
        for e in events:
            if isinstance(e, TokenEvent):
                out = self.outputs.setdefault(e.seq_id, [])
                assert e.index == len(out), "a token was lost or repeated"
                out.append(e.token_id)
            else:
                assert e.seq_id not in self.reasons, "finished twice"
                self.reasons[e.seq_id] = e.reason
                assert e.num_output_tokens == len(self.outputs.get(e.seq_id, []))


def check_writes_own_blocks(plan: StepPlan, blocks: Blocks, block_tokens: int) -> None:
    """A step writes KV only into blocks its sequence holds alone (shared ones are read): its
    chunk's positions, and those a multi-step decode feeds its own tokens at."""
    if isinstance(blocks, CachedBlocks):
        for c in plan.chunks:
            last = c.end_pos - 1 + (c.num_steps - 1)
            written = range(c.start_pos // block_tokens, last // block_tokens + 1)
            assert all(blocks.refcount(c.block_table[i]) == 1 for i in written), "wrote a shared block"


def drive(
    sched: Scheduler,
    blocks: Blocks,
    runner: FakeRunner,
    *,
    num_runners: int = 1,
    rng: random.Random | None = None,
    now: float = 0.0,
    max_steps: int = 100_000,
    outcome: Outcome | None = None,
) -> Outcome:
    """Run until every sequence finished: keep up to ``num_runners`` plans in flight and
    complete them in FIFO order (or at random with ``rng``)."""
    out = outcome or Outcome()
    for _ in range(max_steps):
        while len(sched.steps_in_flight) < num_runners:
            plan = sched.schedule(now)
            out.apply(sched.pop_events())
            if plan is None:
                break
            check_plan(plan, sched.config)
            check_writes_own_blocks(plan, blocks, sched.config.block_tokens)
            out.plans.append(plan)
            for c in plan.chunks:
                out.chunks.setdefault(c.seq_id, []).append((c.start_pos, c.end_pos))
        check_invariants(sched, blocks)
        flying = list(sched.steps_in_flight)
        if not flying:
            assert not sched.is_stalled, f"stalled: {sched.running} {sched.waiting}"
            assert sched.num_unfinished == 0
            return out
        plan = rng.choice(flying) if rng else flying[0]
        out.apply(sched.postprocess(plan, runner.step(plan)))
        check_invariants(sched, blocks)
    raise AssertionError("did not finish")


def make(
    num_blocks: int = 256, *, cached: bool = False, **config: object
) -> tuple[Scheduler, Blocks, FakeRunner]:
    """A scheduler over ``num_blocks`` blocks (a CachedBlocks with ``cached``: prefix caching),
    one token per decode unless ``decode_steps`` says otherwise (the tests count steps)."""
    cfg = SchedulerConfig(**{"max_context": 128, "vocab_size": VOCAB, "decode_steps": 1, **config})  # type: ignore[arg-type]
    blocks: Blocks = CachedBlocks(range(num_blocks)) if cached else FreeListBlocks(range(num_blocks))
    return Scheduler(cfg, blocks), blocks, FakeRunner(num_blocks, cfg.block_tokens)
