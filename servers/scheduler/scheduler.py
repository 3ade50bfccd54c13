"""Scheduler: continuous batching of sequences into steps, under a token budget and a pool.

Runs in the scheduler process, called by its server loop. Owns the sequences, their block
tables (blocks come from a BlockSource) and the steps in flight. Pure logic: it never does
I/O, never waits, and never reads a clock (the caller passes ``now``).

Cycle: ``add`` sequences; ``schedule(now)`` returns a StepPlan for a free runner (several
may be in flight, one per runner; a sequence is in at most one); when the runner's reply is
back, ``postprocess(plan, sampled)`` applies it and returns TokenEvents and FinishEvents;
``requeue(plan)`` if the runner died instead. ``cancel`` and the deadline checks in
``schedule`` finish sequences outside a reply: their FinishEvents wait in ``pop_events()``.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from typing import Any

from llmos.libllm.protocol import Logprob
from llmos.microkernel.errors import QuotaExceeded
from llmos.servers.scheduler.block_cache import CachedBlocks
from llmos.servers.scheduler.blocks import BlockSource
from llmos.servers.scheduler.config import SchedulerConfig
from llmos.servers.scheduler.events import Event, FinishEvent, PromptLogprobsEvent, TokenEvent
from llmos.servers.scheduler.plan import ChunkPlan, StepPlan, sampled_tokens
from llmos.servers.scheduler.policies import make_policy
from llmos.servers.scheduler.policy import Policy
from llmos.servers.scheduler.prefix import PrefixSharing
from llmos.servers.scheduler.quotas import ClientBlocks
from llmos.servers.scheduler.sequence import FinishReason, SeqStatus, Sequence
from llmos.servers.scheduler.stats import Counters, SchedulerStats, client_label

# A prompt whose every token's Logprob is wanted gets a logits row per token: its chunks are
# at most this long, so a step's logits stay small (32 x Gemma's 262k vocabulary: 34 MB).
PROMPT_LOGPROBS_CHUNK = 32


class Scheduler:
    """Plans steps for a set of sequences; see the module docstring for the cycle.

    Args:
        config: limits (budget, batch size, context, block size).
        blocks: where KV blocks come from and go back to.
        policy: the order of service; by default the one ``config.policy`` names.
    """

    def __init__(
        self, config: SchedulerConfig, blocks: BlockSource, policy: Policy | None = None
    ) -> None:
        self.config = config
        self.blocks = blocks
        self.policy = policy or make_policy(config)
        self._seqs: dict[int, Sequence] = {}  # every unfinished sequence
        self._waiting: list[Sequence] = []  # sorted by policy rank; hold no blocks
        self._running: list[Sequence] = []  # sorted by policy rank; hold blocks
        self._in_flight: dict[int, StepPlan] = {}  # step_id -> plan whose reply is not back
        self._outbox: list[Event] = []
        self._next_step_id = 0
        self._num_arrivals = 0
        self._is_stalled = False
        self._counters = Counters()
        self._quota = ClientBlocks(config.max_blocks_per_client)
        self._short_of_quota = False  # why the last _plan_chunk gave nothing: quota, not room
        self._prefix = (  # prefix caching, with a CachedBlocks source
            PrefixSharing(blocks, config.block_tokens)
            if isinstance(blocks, CachedBlocks) and config.prefix_cache
            else None
        )

    # ------------------------------------------------------------------ queries
    @property
    def waiting(self) -> tuple[Sequence, ...]:
        return tuple(self._waiting)

    @property
    def running(self) -> tuple[Sequence, ...]:
        return tuple(self._running)

    @property
    def num_unfinished(self) -> int:
        return len(self._seqs)

    @property
    def steps_in_flight(self) -> tuple[StepPlan, ...]:
        return tuple(self._in_flight.values())

    @property
    def num_schedulable(self) -> int:
        """Sequences a plan could take now: running ones not in flight nor paused, and
        waiting ones (which may still lack blocks)."""
        running = sum(1 for s in self._running if not (s.is_in_flight or s.is_paused))
        return running + sum(1 for s in self._waiting if not s.is_paused)

    @property
    def is_stalled(self) -> bool:
        """The last ``schedule`` planned nothing, no step is in flight, and unpaused
        sequences are unfinished: only more blocks can unblock them (refill the lease, or
        cancel one that needs more blocks than the source will ever have)."""
        return self._is_stalled

    def get(self, seq_id: int) -> Sequence | None:
        """The unfinished sequence ``seq_id`` (finished ones are forgotten)."""
        return self._seqs.get(seq_id)

    def stats(self) -> SchedulerStats:
        return self._counters.snapshot(
            num_steps=self._next_step_id,
            num_steps_in_flight=len(self._in_flight),
            waiting=self._waiting,
            running=self._running,
            block_tokens=self.config.block_tokens,
        )

    # ------------------------------------------------------------------ requests
    def add(self, seq: Sequence) -> None:
        """Queue a new sequence.

        Raises:
            ValueError: a seq_id in use, a sequence already given to a scheduler, a prompt
                that leaves no room for a token in the context, or a token id outside the
                vocabulary.
        """
        c = self.config
        if seq.seq_id in self._seqs:
            raise ValueError(f"seq_id {seq.seq_id} is already in use")
        if seq.arrival_order != -1 or seq.status is not SeqStatus.WAITING or seq.output_ids:
            raise ValueError(f"sequence {seq.seq_id} was already given to a scheduler")
        if seq.num_prompt_tokens >= c.max_context:
            raise ValueError(
                f"prompt of {seq.num_prompt_tokens} tokens leaves no room in a context of "
                f"{c.max_context}"
            )
        if not all(0 <= t < c.vocab_size for t in seq.prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {c.vocab_size})")
        if seq.num_prompt_tokens >= c.max_tokens_per_seq:
            raise QuotaExceeded(
                f"a prompt of {seq.num_prompt_tokens} tokens does not fit the KV quota of client "
                f"{seq.tenant!r}: {c.max_blocks_per_client} blocks of {c.block_tokens} tokens "
                f"hold at most {c.max_tokens_per_seq - 1} prompt tokens and one more"
            )
        seq.arrival_order = self._num_arrivals
        seq.arrival_step = self._next_step_id
        self._num_arrivals += 1
        self._seqs[seq.seq_id] = seq
        self.policy.on_arrival(seq)
        self._insert(self._waiting, seq)

    def cancel(self, seq_id: int) -> bool:
        """Cancel a sequence: at once if no step has it in flight (FinishEvent in
        ``pop_events()``), else when that step's reply or requeue comes (its token is
        discarded). Returns False when there is nothing to cancel (unknown, finished, or
        already being cancelled)."""
        seq = self._seqs.get(seq_id)
        if seq is None or seq.is_cancel_requested:
            return False
        if seq.is_in_flight:
            seq.is_cancel_requested = True
        else:
            self._outbox.append(self._finish(seq, "cancelled"))
        return True

    def pause(self, seq_id: int) -> bool:
        """Leave ``seq_id`` out of steps (its client is not reading: backpressure). It keeps
        its blocks and its place. Returns False for an unknown or finished sequence."""
        return self._set_paused(seq_id, True)

    def resume(self, seq_id: int) -> bool:
        """Undo ``pause``. Returns False for an unknown or finished sequence."""
        return self._set_paused(seq_id, False)

    def pop_events(self) -> list[Event]:
        """FinishEvents made outside ``postprocess`` (cancel, deadlines, requeue), oldest
        first."""
        events, self._outbox = self._outbox, []
        return events

    # ------------------------------------------------------------------ steps
    def schedule(self, now: float, max_seqs: int | None = None) -> StepPlan | None:
        """Plan one step from the sequences not in flight, or None if there is nothing to do.

        Sequences whose deadline is at or before ``now`` finish first (FinishEvents in
        ``pop_events()``). Running sequences whose turn is over (the policy says so) yield to
        waiting ones, keeping their blocks. A waiting head that outranks a running sequence
        but lacks blocks goes first, taking the blocks of those ranked below it. Then running
        decodes (one token each), then running prefills, then admissions from the waiting
        queue, each in policy order, while the batch and the token budget allow. Each
        chunk's blocks are allocated as it is planned. ``max_seqs`` caps this plan below ``max_batch_size`` (to share work
        between runners).
        """
        self._expire(now)
        if self.policy.is_dynamic:
            self._sort_queues()
        self._yield_turns()
        c = self.config
        limit = c.max_batch_size if max_seqs is None else max(1, min(max_seqs, c.max_batch_size))
        chunks: list[ChunkPlan] = []
        planned: set[int] = set()
        budget = c.token_budget
        ready = [s for s in self._running if not (s.is_in_flight or s.is_paused)]
        # Decodes before prefills, so a long prompt never holds up token streams.
        decodes = [s for s in ready if s.num_remaining == 1]
        prefills = [s for s in ready if s.num_remaining > 1]
        if len(ready) < limit:
            # Leave a token of budget for every decode, so none is dropped for the head.
            head = self._plan_outranking_head(budget - len(decodes), planned)
            if head is not None:
                chunks.append(head)
                budget -= head.num_tokens
        for seq in decodes + prefills:
            if len(chunks) == limit or budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted for a sequence planned earlier in this loop
            chunk = self._plan_chunk(seq, budget, planned)
            if chunk is not None:
                chunks.append(chunk)
                budget -= chunk.num_tokens
        # The head of the queue waits for room and no later sequence passes it (a paused one
        # is passed: it waits for its client, not for room). Those preempted meanwhile are
        # not candidates: they rank below the one they made room for.
        candidates = [s for s in self._waiting if not s.is_paused]
        while candidates:
            if (
                len(chunks) == limit
                or budget == 0
                or len(self._running) >= c.num_running_limit
            ):
                break
            seq = candidates.pop(0)
            chunk, waits_aside = self._plan_admission(seq, budget, planned)
            if waits_aside:
                continue  # for a prefix being computed, or its client's quota: passed meanwhile
            if chunk is None:
                break
            chunks.append(chunk)
            budget -= chunk.num_tokens
            if self.policy.is_dynamic:  # the admission was charged: the order may change
                self._sort_queues()
                candidates.sort(key=self.policy.rank)
        self._is_stalled = (
            not chunks and not self._in_flight and any(not s.is_paused for s in self._seqs.values())
        )
        if not chunks:
            return None
        plan = StepPlan(self._next_step_id, tuple(chunks))
        self._next_step_id += 1
        self._in_flight[plan.step_id] = plan
        for chunk in chunks:
            seq = self._seqs[chunk.seq_id]
            seq.is_in_flight = True
            if seq.first_step == -1:
                seq.first_step = plan.step_id
                self._counters.record_delay(plan.step_id - seq.arrival_step, seq.priority)
        return plan

    def postprocess(
        self, plan: StepPlan, sampled: Mapping[int, Any] | Iterable[Any],
        logprobs: list[list[Logprob]] | None = None,
        prompt_logprobs: list[list[Logprob]] | None = None,
    ) -> list[Event]:
        """Apply the reply of ``plan``: its KV now counts, its sampled tokens join outputs.

        Args:
            plan: a plan from ``schedule`` that is still in flight.
            sampled: per chunk, aligned with ``plan.chunks``, its token or the list of tokens
                a multi-step chunk made (any value where a chunk wants none, e.g. -1), or a
                mapping seq_id -> such a value.
            logprobs: per chunk, the Logprobs of those tokens where the request asked for
                them (the runner's reply), carried on their TokenEvents.
            prompt_logprobs: per chunk, its prompt tokens' Logprobs where asked for (a
                PromptLogprobsEvent each).

        Returns:
            TokenEvents and FinishEvents, in chunk order. Finished sequences' blocks are free.

        Raises:
            ValueError: the plan is not in flight, or ``sampled`` lacks a token or holds one
                outside the vocabulary. Nothing is changed then.
        """
        if self._in_flight.get(plan.step_id) is not plan:
            raise ValueError(f"step {plan.step_id} is not in flight")
        tokens = sampled_tokens(plan, sampled, self.config.vocab_size)
        del self._in_flight[plan.step_id]
        events: list[Event] = []
        for i, (chunk, made) in enumerate(zip(plan.chunks, tokens, strict=True)):
            seq = self._seqs[chunk.seq_id]
            reported = logprobs[i] if logprobs is not None and i < len(logprobs) else ()
            if chunk.prompt_logprobs and prompt_logprobs is not None and i < len(prompt_logprobs):
                wanted = seq.num_prompt_tokens - 1 - chunk.start_pos  # positions start + 1 .. prompt end - 1
                events.append(PromptLogprobsEvent(seq.seq_id, chunk.start_pos + 1, prompt_logprobs[i][:wanted]))
            seq.is_in_flight = False
            if seq.is_cancel_requested:
                events.append(self._finish(seq, "cancelled"))
                continue
            assert seq.num_computed == chunk.start_pos and seq.status is SeqStatus.RUNNING
            # Each token after the first was made by feeding back the one before it, which
            # wrote that one's KV: the last token's KV is still to compute, as after one step.
            seq.num_computed = chunk.end_pos + (len(made) - 1 if made else 0)
            self._counters.num_computed_tokens += seq.num_computed - chunk.start_pos
            num_prompt = min(chunk.end_pos, seq.num_prompt_tokens) - chunk.start_pos
            self._counters.num_prompt_tokens += max(0, num_prompt)
            for j, token in enumerate(made or ()):
                if token in seq.stop_ids:
                    events.append(self._finish(seq, "stop"))
                    break
                seq.output_ids.append(token)
                self._counters.num_generated_tokens += 1
                self.policy.on_tokens(seq, 1)
                events.append(TokenEvent(seq.seq_id, token, seq.num_output_tokens - 1,
                                         reported[j] if j < len(reported) else None))
                if seq.num_output_tokens >= seq.max_tokens:
                    events.append(self._finish(seq, "length"))
                    break
                if seq.num_tokens >= self.config.max_context:
                    events.append(self._finish(seq, "context"))
                    break
                if seq.num_tokens >= self.config.max_tokens_per_seq:  # its client's quota holds no more
                    events.append(self._finish(seq, "length"))
                    break
            else:
                if self._prefix is not None:  # (a finished one published as it let its blocks go)
                    self._prefix.publish(seq)
        return events

    def requeue(self, plan: StepPlan) -> None:
        """Give back a plan whose runner died: its sequences are schedulable again with
        their progress unchanged (KV a lost step may have written does not count; the
        re-run overwrites it in the same blocks). Cancelled ones finish (``pop_events()``).

        Raises:
            ValueError: the plan is not in flight.
        """
        if self._in_flight.get(plan.step_id) is not plan:
            raise ValueError(f"step {plan.step_id} is not in flight")
        del self._in_flight[plan.step_id]
        self._counters.num_steps_requeued += 1
        for chunk in plan.chunks:
            seq = self._seqs[chunk.seq_id]
            seq.is_in_flight = False
            if seq.is_cancel_requested:
                self._outbox.append(self._finish(seq, "cancelled"))

    # ------------------------------------------------------------------ internals
    def _set_paused(self, seq_id: int, is_paused: bool) -> bool:
        seq = self._seqs.get(seq_id)
        if seq is None:
            return False
        seq.is_paused = is_paused
        return True

    def _plan_chunk(self, seq: Sequence, budget: int, planned: set[int]) -> ChunkPlan | None:
        """Size ``seq``'s next chunk and allocate its blocks; None if not one token fits
        (then only lower-ranked sequences it preempted have changed)."""
        bs = self.config.block_tokens
        start = seq.num_computed
        num_new = min(seq.num_remaining, budget)
        if seq.prompt_logprobs and start < seq.num_prompt_tokens:  # a logits row per token: keep them few
            num_new = min(num_new, PROMPT_LOGPROBS_CHUNK)
        assert num_new > 0
        need = max(0, self.config.blocks_needed(start + num_new) - len(seq.block_table))
        if need and not self._quota.fits(seq.client, need):
            self._preempt_for(seq, need, planned, own_client=True)
        # Others' blocks are taken only for room in the pool, never for a client's quota.
        if need and self._quota.fits(seq.client, need) and not self.blocks.can_allocate(need):
            self._preempt_for(seq, need, planned)
        self._short_of_quota = need > 0 and not self._quota.fits(seq.client, need)
        # Cut a prefill to the blocks there are. A new sequence is cut only when nothing
        # runs: otherwise the running ones need those blocks to make progress.
        if (
            need
            and not self._can_take(seq, need)
            and (seq.status is SeqStatus.RUNNING or not self._running)
        ):
            need -= 1
            while need and not self._can_take(seq, need):
                need -= 1
            num_new = min(num_new, (len(seq.block_table) + need) * bs - start)
        if num_new <= 0 or (need and not self._can_take(seq, need)):
            return None
        self._short_of_quota = False
        if need:
            self._take_blocks(seq, need)
        planned.add(seq.seq_id)
        end = start + num_new
        wants_token = end == seq.num_tokens
        in_prompt = seq.prompt_logprobs and start < seq.num_prompt_tokens - 1
        num_steps = self._decode_steps(seq, end) if wants_token and num_new == 1 else 1
        penalised, made = seq.penalty_history() if wants_token and seq.sampling.has_penalties else ((), ())
        return ChunkPlan(
            seq_id=seq.seq_id,
            block_table=tuple(seq.block_table),
            start_pos=start,
            token_ids=seq.token_slice(start, end),
            wants_token=wants_token,
            sampling=seq.sampling,
            num_steps=num_steps,
            prompt_logprobs=in_prompt,
            next_token_id=seq.prompt_ids[end] if in_prompt and end < seq.num_prompt_tokens else -1,
            penalty_prompt_ids=penalised,
            penalty_output_ids=made,
        )

    def _plan_outranking_head(self, budget: int, planned: set[int]) -> ChunkPlan | None:
        """Plan the head of the waiting queue before the running sequences when it outranks
        one of them and the free blocks cannot hold its next chunk: it takes the blocks of
        those ranked below it (a high priority arriving into a full pool). Only for static
        ranks: ranks that move with service would pass blocks back and forth."""
        if (
            self.policy.is_dynamic
            or budget <= 0
            or len(self._running) >= self.config.num_running_limit
        ):
            return None
        head = next((s for s in self._waiting if not s.is_paused), None)
        if head is None or not self._running:
            return None
        if self.policy.rank(self._running[-1]) <= self.policy.rank(head):
            return None  # it outranks no running sequence
        end = head.num_computed + min(head.num_remaining, budget)
        need = self.config.blocks_needed(end) - len(head.block_table)
        if self.blocks.can_allocate(need) or not self._quota.fits(head.client, need):
            return None  # it fits (admitted in turn, after the running ones), or its quota is what it lacks
        return self._plan_admission(head, budget, planned)[0]

    def _plan_admission(
        self, seq: Sequence, budget: int, planned: set[int]
    ) -> tuple[ChunkPlan | None, bool]:
        """Plan a waiting sequence's chunk and admit it, reusing a cached prefix if it holds
        no KV. Returns (None, True) when it should wait, passed by later sequences meanwhile:
        for a prefix another sequence is computing, or for blocks of its own client's quota;
        (None, False) when it does not fit the pool (it then holds no more than before)."""
        fresh = not seq.block_table
        if fresh and self._prefix is not None and not seq.prompt_logprobs:
            if not self._prefix.reuse(seq):
                return None, True
            self._quota.hold(seq.client, seq.block_table)
        chunk = self._plan_chunk(seq, budget, planned)
        if chunk is None:
            short_of_quota = self._short_of_quota
            if fresh:
                self._release(seq)  # give the matched blocks back: it may wait long
            return None, short_of_quota
        if fresh and self._prefix is not None:
            bs = self.config.block_tokens
            reused = seq.num_published * bs
            self._counters.num_reused_tokens += reused
            if seq.num_preemptions == 0:  # H: a request's prompt, as it first arrives
                looked_up = (seq.num_prompt_tokens - 1) // bs * bs
                self._counters.num_prefix_lookup_tokens += looked_up
                self._counters.num_prefix_hit_tokens += min(reused, looked_up)
        self._admit(seq)
        return chunk, False

    def _admit(self, seq: Sequence) -> None:
        self._waiting.remove(seq)
        seq.status = SeqStatus.RUNNING
        self._insert(self._running, seq)
        self.policy.on_admit(seq)
        if self._prefix is not None:
            self._prefix.expect(seq)

    def _decode_steps(self, seq: Sequence, end: int) -> int:
        """How many tokens in a row a decode chunk ending at ``end`` may make: at most
        ``decode_steps``, the tokens ``seq`` may still output, the context, and what the
        blocks already allocated or free now can hold (never preempting for it)."""
        c = self.config
        k = min(c.decode_steps, seq.max_tokens - seq.num_output_tokens, c.max_tokens_per_seq - seq.num_tokens)
        while k > 1:
            extra = c.blocks_needed(end + k - 1) - len(seq.block_table)
            if extra <= 0:
                break
            if self._can_take(seq, extra):
                self._take_blocks(seq, extra)
                break
            k -= 1
        return max(1, k)

    def _preempt_for(self, seq: Sequence, need: int, planned: set[int], *, own_client: bool = False) -> None:
        """Take the blocks of sequences ranked strictly below ``seq``, the lowest first,
        until ``need`` blocks can be allocated (with ``own_client``: only its client's
        sequences, until its quota has room for them): running ones, and waiting ones that
        kept their blocks when they yielded. Never one in flight (a runner is writing its
        blocks) or already in this step. ``seq`` itself is never preempted: if it cannot
        get a block it waits, keeping its KV, and whichever higher-ranked sequence needs
        blocks later preempts it then."""
        rank = self.policy.rank(seq)
        holders = [s for s in self._running if s is not seq]
        holders += [s for s in self._waiting if s.block_table and s is not seq]
        if own_client:
            holders = [s for s in holders if s.client == seq.client]
        holders.sort(key=self.policy.rank)
        for victim in reversed(holders):
            room = self._quota.fits(seq.client, need) if own_client else self.blocks.can_allocate(need)
            if room or self.policy.rank(victim) <= rank:
                return
            if not victim.is_in_flight and victim.seq_id not in planned:
                self._preempt(victim)

    def _preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks: it waits and recomputes its prompt and output later (its
        rank is kept, so fcfs puts it ahead of later arrivals); nothing it made is lost."""
        self._counters.num_preemptions += 1
        self._counters.num_preempted_tokens += seq.num_computed
        seq.num_preemptions += 1
        self._release(seq)
        if seq.status is SeqStatus.RUNNING:
            self._running.remove(seq)
            seq.status = SeqStatus.WAITING
            self._insert(self._waiting, seq)

    def _yield_turns(self) -> None:
        """Deschedule running sequences whose turn the policy says is over, as many as there
        are unpaused sequences waiting, the best-ranked first. They keep their blocks and
        KV (resuming costs no recomputation) and queue by their new rank."""
        num_waiting = sum(1 for s in self._waiting if not s.is_paused)
        for seq in list(self._running):
            if num_waiting == 0:
                return
            if seq.is_in_flight or seq.is_paused or not self.policy.wants_yield(seq):
                continue
            self._running.remove(seq)
            seq.status = SeqStatus.WAITING
            seq.num_yields += 1
            self._counters.num_yields += 1
            self.policy.on_yield(seq)
            self._insert(self._waiting, seq)
            num_waiting -= 1

    def _expire(self, now: float) -> None:
        for seq in [*self._running, *self._waiting]:
            if seq.deadline is not None and now >= seq.deadline and not seq.is_in_flight:
                self._outbox.append(self._finish(seq, "deadline"))

    def _finish(self, seq: Sequence, reason: FinishReason) -> FinishEvent:
        assert not seq.is_in_flight
        if seq.status is SeqStatus.RUNNING:
            self._running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self._waiting.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        del self._seqs[seq.seq_id]
        self.policy.on_finish(seq)
        self._counters.record_finish(seq.priority, client_label(seq.tenant))
        return FinishEvent(seq.seq_id, reason, seq.num_prompt_tokens, seq.num_output_tokens)

    def _release(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks; its KV is gone (but full blocks stay cached, named, until
        recycled), so it starts over from position 0, reusing what is still cached."""
        if self._prefix is not None:
            self._prefix.release(seq)
        if seq.block_table:
            self._quota.let_go(seq.client, seq.block_table)
            self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0
        seq.num_published = 0

    def _can_take(self, seq: Sequence, num_blocks: int) -> bool:
        """Are there ``num_blocks`` new blocks for ``seq``, in the pool and its client's quota?"""
        return self.blocks.can_allocate(num_blocks) and self._quota.fits(seq.client, num_blocks)

    def _take_blocks(self, seq: Sequence, num_blocks: int) -> None:
        taken = self.blocks.allocate(num_blocks)
        self._quota.hold(seq.client, taken)
        seq.block_table.extend(taken)

    def _insert(self, queue: list[Sequence], seq: Sequence) -> None:
        bisect.insort(queue, seq, key=self.policy.rank)

    def _sort_queues(self) -> None:
        # Stable, and the lists are nearly sorted already: about linear.
        self._waiting.sort(key=self.policy.rank)
        self._running.sort(key=self.policy.rank)
