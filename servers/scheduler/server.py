"""The scheduler process: a thin loop around `Scheduler`.

Registers as "scheduler". Owns requests, sequences and their block tables; holds a lease
of KV blocks from the memory server; sends each idle runner a step and streams the new
tokens to their clients (WAKE for streaming clients; others are woken at finish). Never
blocks: every call to a runner or the memory server is a request with a callback, and a
client that stops reading only pauses its own sequences. What to send whom (requests.py),
backpressure (backpressure.py) and the lease (lease.py) are decided by pure objects; this
loop does their I/O.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from collections.abc import Hashable
from functools import partial

import msgspec

from llmos.libllm import protocol as P
from llmos.libllm.protocol import runner as R
from llmos.microkernel import control as C
from llmos.microkernel.endpoint import Channel, Message, raise_for_status
from llmos.microkernel.errors import ErrorCode, InvalidRequest, LlmosError, RemoteError
from llmos.microkernel.messages import Header, MsgType
from llmos.microkernel.server_key import TENANT_NAMERS
from llmos.servers.base import EndpointSource, Server
from llmos.servers.scheduler.backpressure import Backpressure
from llmos.servers.scheduler.block_cache import CachedBlocks
from llmos.servers.scheduler.config import SchedulerConfig
from llmos.servers.scheduler.events import Event
from llmos.servers.scheduler.lease import LEASE_CHUNK, Lease
from llmos.servers.scheduler.plan import StepPlan
from llmos.servers.scheduler.prompts import PromptFetch, PromptFetches, read_prompt
from llmos.servers.scheduler.requests import FINAL, Request, Requests
from llmos.servers.scheduler.runner_links import RunnerLinks
from llmos.servers.scheduler.scheduler import Scheduler
from llmos.servers.scheduler.sequence import Sampling, Sequence
from llmos.servers.scheduler.settings import SchedulerSettings

log = logging.getLogger("llmos.scheduler")
STARTUP_TIMEOUT_S = 60.0
RECONNECT_TIMEOUT_S = 5.0  # a kernel call from the loop: the kernel answers at once, or is hung
# Steps in flight per runner (settings.pipeline_depth): with two, the runner computes one
# half of the batch while this loop handles the other half's reply, so the scheduler's work
# hides behind compute. That pays where steps are short (a small model); where they are long,
# one step with the whole batch computes faster than two halves (the supervisor resolves 0 to
# 1 for large models: Gemma 3 270M over HTTP, 32 clients, 266 against 229 tokens/s).


class SchedulerServer(Server):
    name = "scheduler"

    def __init__(self, endpoint: EndpointSource, settings: SchedulerSettings, *, runners: list[str],
                 max_blocks_per_client: int | None = None) -> None:
        super().__init__(endpoint, handlers={
            MsgType.SCHED_SUBMIT: self.handle_submit,
            MsgType.SCHED_CANCEL: self.handle_cancel,
            MsgType.SCHED_MODEL_INFO: self.handle_model_info,
            MsgType.SCHED_STATS: self.handle_stats,
        })
        if not runners:
            raise ValueError("the scheduler needs at least one runner")
        self.memory = self.endpoint.open_channel("memory", wait=True, timeout=STARTUP_TIMEOUT_S)
        self.runner_names = list(runners)
        self.runners: dict[str, Channel] = {}
        self.links = RunnerLinks()  # runners dropped after a channel failure, and when to retry
        self.fencing: dict[int, str] = {}  # a new channel to a dropped runner -> it, until FENCE answers
        self.pipeline_depth = pipeline_depth = settings.depth_for(large_model=False)
        self.busy: dict[str, list[StepPlan]] = {}  # runner -> its steps in flight (at most pipeline_depth)
        for runner in runners:
            self._connect_runner(runner)
        info = self.runners[runners[0]].call(MsgType.RUNNER_MODEL_INFO, timeout=STARTUP_TIMEOUT_S)
        self.info: P.ModelInfo = P.unpack(info.payload, P.ModelInfo)
        self.blocks = CachedBlocks([])
        self._lease_sync(min(self.info.num_kv_blocks, 4 * LEASE_CHUNK))
        tenant_weights: dict[Hashable, float] = dict(settings.weights.items())
        self.scheduler = Scheduler(SchedulerConfig(
            max_context=self.info.context_length, vocab_size=self.info.vocab_size,
            block_tokens=self.info.block_tokens, max_batch_size=max(1, settings.max_batch_size // pipeline_depth),
            token_budget=settings.token_budget, max_running=settings.max_batch_size * len(runners),
            decode_steps=settings.decode_steps, policy=settings.policy, aging_steps=settings.aging_steps,
            quantum=settings.quantum, tenant_weights=tenant_weights, prefix_cache=settings.prefix_cache,
            max_blocks_per_client=max_blocks_per_client),
            self.blocks)
        self.requests = Requests()  # by seq_id and by (channel, txid); the latency histograms
        self.prompt_fetches = PromptFetches()  # long prompts: submits waiting to learn where their ids lie
        self._next_seq_id = 1
        self.lease = Lease()
        self.backpressure = Backpressure()  # clients whose sequences wait for them to read
        self.runner_busy_s = 0.0  # sum of the runners' compute time (U = this / wall / runners)
        self.started = time.monotonic()

    # -- startup (blocking calls are allowed before the loop starts) -----------------------

    def _connect_runner(self, runner: str) -> None:
        channel = self.endpoint.open_channel(runner, wait=True, timeout=STARTUP_TIMEOUT_S)
        # FENCE: the runner answers once no step of an earlier scheduler is in flight, so no
        # old step can write KV that a step of ours uses.
        channel.call(MsgType.RUNNER_FENCE, timeout=STARTUP_TIMEOUT_S)
        self.runners[runner] = channel
        self.links.joined(runner)

    def _lease_sync(self, num_blocks: int) -> None:
        while num_blocks > 0:
            n = min(num_blocks, LEASE_CHUNK)
            reply = self.memory.call(MsgType.MEM_ALLOC_BLOCKS, P.pack(P.AllocBlocks(n, lease=True)),
                                     timeout=STARTUP_TIMEOUT_S)
            self.blocks.add(P.unpack(reply.payload, P.BlockIds).block_ids)
            num_blocks -= n

    # -- client messages --------------------------------------------------------------------

    def handle_model_info(self, channel: Channel, message: Message) -> bytes:
        return P.pack(self.info)

    def handle_stats(self, channel: Channel, message: Message) -> bytes:
        stats = msgspec.to_builtins(self.scheduler.stats())
        stats["num_free_blocks"] = self.blocks.num_free
        stats["num_leased_blocks"] = self.blocks.num_total
        stats["num_cached_blocks"] = self.blocks.num_cached  # prefix blocks no one holds
        stats["num_prefix_evictions"] = self.blocks.num_evictions
        stats["runner_busy_s"] = self.runner_busy_s
        stats["ttft_us_log2_hist"] = self.requests.ttft_hist
        stats["time_per_token_us_log2_hist"] = self.requests.tpot_hist
        stats["uptime_s"] = time.monotonic() - self.started
        stats["num_runners"] = len(self.runners)
        return msgspec.msgpack.encode(stats)

    def handle_submit(self, channel: Channel, message: Message) -> None:
        try:
            submit: P.Submit = P.unpack(message.payload, P.Submit)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise InvalidRequest(f"bad Submit payload: {exc}") from None
        if submit.prompt_segment is not None:  # a long prompt: first ask where its ids lie (prompts.py)
            self.prompt_fetches.add(channel, message, submit, self.info.context_length)
            self.prompt_fetches.ask(self.memory, self._on_prompt_segment)
            return None
        if submit.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be >= 1, got {submit.max_tokens}")
        if not -P.MAX_PRIORITY <= submit.priority <= P.MAX_PRIORITY:
            raise InvalidRequest(f"priority must be in [-{P.MAX_PRIORITY}, {P.MAX_PRIORITY}], got {submit.priority}")
        seed = submit.seed if submit.seed is not None else secrets.randbits(63)
        try:
            sampling = Sampling(submit.temperature, submit.top_k, submit.top_p, seed, submit.num_logprobs,
                                submit.presence_penalty, submit.frequency_penalty, submit.repetition_penalty)
            if not 0 <= submit.num_resumed_ids < len(submit.prompt_ids):
                raise ValueError(f"num_resumed_ids must be in [0, {len(submit.prompt_ids)}), got "
                                 f"{submit.num_resumed_ids}")
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        now = time.monotonic()
        try:
            seq = Sequence(self._next_seq_id, submit.prompt_ids, max_tokens=submit.max_tokens,
                           sampling=sampling,
                           stop_ids=tuple(self.info.stop_ids), priority=submit.priority,
                           tenant=self._tenant_of(channel, submit),
                           deadline=None if submit.timeout_s is None else now + submit.timeout_s,
                           prompt_logprobs=submit.prompt_logprobs, num_resumed=submit.num_resumed_ids)
            self.scheduler.add(seq)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        self._next_seq_id += 1
        if self.backpressure.is_paused(channel.channel_id):  # its client is still not reading
            self.scheduler.pause(seq.seq_id)
        self.requests.add(seq.seq_id, Request(channel.channel_id, message.header.txid, submit.stream, seed, now))
        return None  # answered as tokens come

    def _on_prompt_segment(self, fetch: PromptFetch, header: Header, payload: bytes) -> None:
        """The memory server said where a long prompt lies: copy its ids out and admit the
        request as if they had come inline; a bad handle is answered with an error."""
        try:
            ids = read_prompt(fetch, header, payload, self.endpoint.arena, self.info.vocab_size)
            inline = msgspec.structs.replace(fetch.submit, prompt_ids=ids, prompt_segment=None, num_prompt_ids=0)
            self.handle_submit(fetch.channel, Message(fetch.message.header, P.pack(inline)))
            return
        except RemoteError as exc:
            code, text = exc.code, str(exc)
        except Exception as exc:  # a bug here must not take the scheduler down
            log.exception("admitting a long prompt failed")
            code, text = ErrorCode.INTERNAL, f"internal error: {exc}"
        self._error(fetch.channel, self.backlogs.setdefault(fetch.channel.channel_id, deque()), fetch.message.header,
                    code, text)

    @staticmethod
    def _tenant_of(channel: Channel, submit: P.Submit) -> str:
        """Whose share a request counts against under "fair": the tenant the gateway (or a
        cluster node's actor) names, the only peers trusted to name one; else the sending
        endpoint itself."""
        if channel.info.client_name in TENANT_NAMERS and submit.tenant:
            return submit.tenant
        return f"endpoint-{channel.info.client_id}"

    def handle_cancel(self, channel: Channel, message: Message) -> bytes | None:
        try:
            cancel: P.Cancel = P.unpack(message.payload, P.Cancel)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise InvalidRequest(f"bad Cancel payload: {exc}") from None
        seq_id = self.requests.seq_of(channel.channel_id, cancel.txid)
        if seq_id is not None:
            self.scheduler.cancel(seq_id)
            self._deliver(self.scheduler.pop_events())
        elif (fetch := self.prompt_fetches.cancel(channel.channel_id, cancel.txid)) is not None:
            submit = fetch.submit  # not admitted yet: it ends here
            finished = P.Finished("cancelled", submit.num_prompt_ids, 0, submit.seed or 0, 0.0, 0.0, 0.0)
            self._queue(channel, self.backlogs.setdefault(channel.channel_id, deque()),
                        channel.encode_message(MsgType.SCHED_SUBMIT, P.pack(finished), flags=FINAL, txid=cancel.txid))
        return b"" if message.header.txid else None

    def on_peer_gone(self, event: C.PeerGoneEvent) -> None:
        super().on_peer_gone(event)
        self.lease.reset()  # someone left: the pool may have blocks again
        for runner, channel in list(self.runners.items()):
            if channel.channel_id == event.channel_id:
                # Alive, it dropped the channel (a corrupt ring): a new one later. Dead, it
                # registers again once restarted (on_name_registered).
                self._drop_runner(runner, "it dropped the channel" if event.endpoint_alive else "it is gone",
                                  reconnect=event.endpoint_alive)
                return
        if event.channel_id in self.fencing:  # a new channel to a dropped runner, lost before its FENCE answered
            self._retry_later(self.fencing.pop(event.channel_id), None, "the new channel closed")
            return
        if event.channel_id == self.memory.channel_id:
            log.warning("the memory server is gone; the lease stays ours and it rebuilds")
            self.prompt_fetches.ask_again()  # once it is back
            return
        self.prompt_fetches.drop_channel(event.channel_id)
        for seq_id in self.requests.drop_channel(event.channel_id):  # a client left: drop its work
            self.scheduler.cancel(seq_id)
        self.scheduler.pop_events()

    def on_name_registered(self, event: C.NameRegistered) -> None:
        if event.name in self.runner_names and event.name not in self.runners:
            try:
                self._connect_runner(event.name)
                log.info("%s is back", event.name)
            except LlmosError as exc:
                log.warning("could not reconnect %s: %s", event.name, exc)
        elif event.name == "memory":
            try:
                self.memory = self.endpoint.open_channel("memory", wait=True, timeout=STARTUP_TIMEOUT_S)
                self.lease.lost()  # a request in flight went with the old channel
            except LlmosError as exc:
                log.warning("could not reconnect the memory server: %s", exc)

    # -- the loop's work ----------------------------------------------------------------

    def on_idle(self) -> None:
        if self.prompt_fetches.has_unasked:
            self.prompt_fetches.ask(self.memory, self._on_prompt_segment)
        self._deliver(self.scheduler.pop_events())
        self._apply_backpressure()
        self._reconnect_runners()
        self._dispatch()
        self._refill_lease()

    def _dispatch(self) -> None:
        """Give every free runner slot a step, the least busy runner first, splitting the
        ready sequences evenly over the free slots (a step never waits on a busy runner
        while another is idle, and every runner keeps its pipeline full)."""
        slots = [(len(self.busy.setdefault(r, [])), r) for r in self.runners]
        free = sum(self.pipeline_depth - n for n, _ in slots if n < self.pipeline_depth)
        for _, runner in sorted(slots):
            channel = self.runners[runner]
            in_flight = self.busy[runner]
            if len(in_flight) >= self.pipeline_depth or free <= 0:
                continue
            share = -(-self.scheduler.num_schedulable // free)
            free -= 1
            plan = self.scheduler.schedule(time.monotonic(), max_seqs=share)
            self._deliver(self.scheduler.pop_events())
            if plan is None:
                return
            self.requests.stepped((c.seq_id for c in plan.chunks), time.monotonic())
            step = R.Step(plan.step_id, [
                R.StepChunk(c.seq_id, list(c.block_table), c.start_pos, list(c.token_ids), c.wants_token,
                            c.sampling.temperature, c.sampling.top_k, c.sampling.top_p, c.sampling.seed,
                            c.num_steps, c.sampling.num_logprobs, c.prompt_logprobs, c.next_token_id,
                            c.sampling.presence_penalty, c.sampling.frequency_penalty,
                            c.sampling.repetition_penalty, list(c.penalty_prompt_ids),
                            list(c.penalty_output_ids))
                for c in plan.chunks])
            in_flight.append(plan)
            try:
                channel.request(MsgType.RUNNER_STEP, P.pack(step),
                                on_reply=partial(self._on_step_done, runner, plan))
            except (LlmosError, ValueError) as exc:  # the runner's ring is gone or corrupt, or the step too big
                in_flight.remove(plan)
                self.scheduler.requeue(plan)
                self._deliver(self.scheduler.pop_events())
                if isinstance(exc, ValueError):
                    log.error("could not send step %d to %s: %s", plan.step_id, runner, exc)
                    self._fail(plan, f"step too large for a message: {exc}")
                else:
                    self._drop_runner(runner, f"could not send step {plan.step_id}: {exc}")
                return

    def on_channel_corrupt(self, channel: Channel) -> None:
        for runner, ours in list(self.runners.items()):
            if ours is channel:  # its replies cannot be trusted: as if a send had failed
                self._drop_runner(runner, f"its reply ring on channel {channel.channel_id} is corrupt")

    def _drop_runner(self, runner: str, why: str, *, reconnect: bool = True) -> None:
        """Stop using a runner whose channel failed (closed, or corrupt: a ring that cannot be
        trusted again): drop the channel (the kernel tells the runner; a no-op if it is gone
        already), requeue its steps on the others (its KV does not count), and with
        `reconnect` open a new channel after a backoff (runner_links.py)."""
        channel = self.runners.pop(runner, None)
        if channel is not None:
            self.endpoint.drop_channel(channel.channel_id)
        for plan in self.busy.pop(runner, []):
            self.scheduler.requeue(plan)
        self._deliver(self.scheduler.pop_events())
        if reconnect:
            delay = self.links.failed(runner, time.monotonic())
            log.warning("%s dropped (%s); its steps were requeued; a new channel in %.1f s", runner, why, delay)
        else:
            log.warning("%s is gone; its steps were requeued", runner)

    def _retry_later(self, runner: str, channel: Channel | None, why: object) -> None:
        """A new channel to a dropped runner failed: drop it, and try again after the backoff."""
        if channel is not None:
            self.endpoint.drop_channel(channel.channel_id)
        delay = self.links.failed(runner, time.monotonic())
        if self.links.should_log(runner):
            log.warning("could not reopen %s: %s (%d tries; next in %.1f s)", runner, why,
                        self.links.tries(runner), delay)

    def _reconnect_runners(self) -> None:
        """Open a channel to each dropped runner that is due; it is used once its FENCE answers."""
        for runner in self.links.due(time.monotonic()):
            channel = None
            try:
                channel = self.endpoint.open_channel(runner, timeout=RECONNECT_TIMEOUT_S)
                channel.request(MsgType.RUNNER_FENCE, b"", on_reply=partial(self._on_fenced, runner, channel))
                self.fencing[channel.channel_id] = runner
            except LlmosError as exc:  # not registered (restarting), or the kernel refused: later
                self._retry_later(runner, channel, exc)

    def _on_fenced(self, runner: str, channel: Channel, header: Header, payload: bytes) -> None:
        self.fencing.pop(channel.channel_id, None)
        try:
            raise_for_status(Message(header, payload))
        except LlmosError as exc:
            self._retry_later(runner, channel, exc)
            return
        if runner in self.runners:  # it re-registered meanwhile and is connected already
            self.endpoint.drop_channel(channel.channel_id)
            return
        self.runners[runner] = channel
        self.links.joined(runner)
        log.info("%s is back on channel %d", runner, channel.channel_id)
        self._dispatch()

    def _on_step_done(self, runner: str, plan: StepPlan, header: Header, payload: bytes) -> None:
        in_flight = self.busy.get(runner, [])
        if plan in in_flight:
            in_flight.remove(plan)
        try:
            raise_for_status(Message(header, payload))
            result: R.StepResult = P.unpack(payload, R.StepResult)
            events = self.scheduler.postprocess(plan, [list(t) for t in result.token_ids], result.logprobs or None,
                                                result.prompt_logprobs or None)
            self.runner_busy_s += result.compute_s
        except (LlmosError, ValueError, msgspec.ValidationError, msgspec.DecodeError) as exc:
            log.error("%s: step %d failed: %s", runner, plan.step_id, exc)
            self.scheduler.requeue(plan)
            self._deliver(self.scheduler.pop_events())
            if isinstance(exc, InvalidRequest):  # it would fail again: end those requests
                self._fail(plan, str(exc))
            return
        self._deliver(events)
        self._dispatch()

    def _fail(self, plan: StepPlan, why: str) -> None:
        """End the requests of a plan that can never run, with the reason, freeing their blocks."""
        for chunk in plan.chunks:
            self.scheduler.cancel(chunk.seq_id)
            request = self.requests.pop(chunk.seq_id)
            channel = None if request is None else self.endpoint.channels.get(request.channel_id)
            if request is not None and channel is not None:
                raw = channel.encode_error(Header(MsgType.SCHED_SUBMIT, txid=request.txid),
                                           ErrorCode.INTERNAL, f"the runner cannot compute this request: {why}")
                self._queue(channel, self.backlogs.setdefault(channel.channel_id, deque()), raw)
        self.scheduler.pop_events()

    def _deliver(self, events: list[Event]) -> None:
        """Send what the requests' bookkeeping says these events mean (requests.py), to
        clients still connected."""
        if not events:
            return
        channels = self.endpoint.channels
        for send in self.requests.deliver(events, time.monotonic()):
            channel = channels.get(send.channel_id)
            if channel is None or channel.closed:
                continue
            raw = channel.encode_message(MsgType.SCHED_SUBMIT, send.payload, flags=send.flags, txid=send.txid)
            self._queue(channel, self.backlogs.setdefault(channel.channel_id, deque()), raw)

    def _apply_backpressure(self) -> None:
        """Pause the sequences of clients whose replies pile up, resume them once read (backpressure.py)."""
        pause, resume = self.backpressure.update(self.backlogs, self.max_backlog // 2, self.requests.channels())
        for seq_id in pause:
            self.scheduler.pause(seq_id)
        for seq_id in resume:
            self.scheduler.resume(seq_id)

    def _refill_lease(self) -> None:
        """Keep free blocks on hand; only admission waits for memory, and not on a reply (lease.py)."""
        n = self.lease.to_ask(self.blocks.num_free, self.blocks.num_total, self.info.num_kv_blocks,
                              stalled=self.scheduler.is_stalled)
        if not n:
            return
        self.lease.asked()
        try:
            self.memory.request(MsgType.MEM_ALLOC_BLOCKS, P.pack(P.AllocBlocks(n, lease=True)),
                                on_reply=self._on_lease)
        except LlmosError:
            self.lease.lost()

    def _on_lease(self, header: Header, payload: bytes) -> None:
        self.lease.answered(granted=not header.status)
        if not header.status:
            self.blocks.add(P.unpack(payload, P.BlockIds).block_ids)
