"""A session on a Ray cluster of llmos instances: one front door, requests that survive a node.

    with libllm.cluster.connect("auto") as session:        # after `llmos cluster up`
        print(session.generate("Once upon a time", max_tokens=50).text)

Runs in the client's process, as a Ray driver (needs the `ray` extra). The instances are
the cluster's NodeInstance actors (llmos/cluster/node.py), found by name and used once they
answer. Each request is tokenised here, routed by libllm.routing (prefix affinity under a
load bound, each tenant spread evenly), and sent as one actor call whose tokens come back in
batches. When its instance or its node dies, the request is resubmitted on another with
the tokens it already has (libllm.request_table.resubmission): (seed, position) sampling and
batch-invariant kernels make the text go on exactly as it would have; a stream sees a gap.
The same keyword arguments and Request handles as `Session`; `libllm.cluster_aio` is its
asyncio flavour (the cluster's HTTP front door runs on it). An instance whose model file is
not the first one's (sha256) is never used: the nodes must serve one model.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import msgspec

from llmos.libllm import chat
from llmos.libllm import protocol as P
from llmos.libllm.connection import ServerGone
from llmos.libllm.options import Options, check_options, options_of, prompt_ids_of, submit_of
from llmos.libllm.request import Completion, Pending, Request
from llmos.libllm.request_table import resubmission
from llmos.libllm.routing import Router
from llmos.libllm.tokenizer import IncrementalDecoder, Tokenizer, load_tokenizer
from llmos.microkernel import errors
from llmos.microkernel.errors import Closed, KernelUnavailable, LlmosError, RemoteError

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from llmos.libllm.options import RequestArgs

NAMESPACE = "llmos"  # the Ray namespace `llmos cluster up` names its actors in
ACTOR_PREFIX = "llmos.node."  # a node's NodeInstance is named this plus its Ray node id
REFRESH_S = 1.0  # the instance list is looked at again this often (nodes join and leave)
FAILOVER_TIMEOUT_S = 120.0  # how long a request waits for some instance to take it over
CONNECT_TIMEOUT_S = 120.0
MAX_FAILOVERS = 8  # a request that has failed over this many times ends with the last failure
WAIT_S = 0.2  # while no instance is live, a request looks again this often
log = logging.getLogger("llmos.cluster")


class ClusterSession:
    """Requests routed over every instance of a Ray cluster. Use `libllm.cluster.connect()`."""

    def __init__(self, timeout: float = CONNECT_TIMEOUT_S) -> None:
        import ray

        self._ray = ray
        self._lock = threading.Lock()
        self._actors: dict[str, Any] = {}  # instance name (its actor's) -> handle, once it answered
        self._probes: dict[str, tuple[Any, Any]] = {}  # name -> (handle, info ref) not answered yet
        self.refused: dict[str, str] = {}  # instances never used, and why (another model)
        self._model: P.ModelInfo | None = None  # the first instance's: every other must serve the same file
        self._refreshed = 0.0
        self.router = Router(1)  # which instances are live; its block size is the model's, below
        # Requests look at the instance list as they are sent (at most every REFRESH_S); the
        # asyncio session turns this off and refreshes from a worker thread (a GCS call).
        self.refresh_on_send = True
        self.closed = False
        self.num_failovers = 0
        deadline = time.monotonic() + timeout
        while not self._actors:
            self._refresh(force=True)
            if self._actors:
                break
            if time.monotonic() > deadline:
                raise KernelUnavailable(f"no llmos instance answered on the Ray cluster within {timeout:g} s "
                                        "(start them with `llmos cluster up`)")
            time.sleep(WAIT_S)
        self.info: P.ModelInfo = self._cluster_model()
        self.tokenizer: Tokenizer = load_tokenizer(self.info.tokenizer_path)  # the same model file on every node
        self.router.block_tokens = self.info.block_tokens

    # -- the instances ------------------------------------------------------------------

    def _refresh(self, force: bool = False) -> None:
        """Follow the cluster: new actors are probed, and used once they answer; gone ones are
        dropped; the router follows (lock held, or at creation)."""
        now = time.monotonic()
        if not force and now - self._refreshed < REFRESH_S:
            return
        self._refreshed = now
        ray = self._ray
        listed = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a.get("namespace") == NAMESPACE and a["name"].startswith(ACTOR_PREFIX)}
        for name in set(self._actors) - listed:
            del self._actors[name]
        for name in set(self.refused) - listed:
            del self.refused[name]
        for name in listed - set(self._actors) - set(self._probes) - set(self.refused):
            try:
                handle = ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                continue  # gone between the listing and now
            self._probes[name] = (handle, handle.info.remote())
        if self._probes:
            refs = [ref for _, ref in self._probes.values()]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            for name, (handle, ref) in list(self._probes.items()):
                if ref in ready:
                    del self._probes[name]
                    try:
                        answer = ray.get(ref)
                    except ray.exceptions.RayError:
                        continue  # it failed to start: probed again at the next refresh
                    if self._admits(name, msgspec.json.decode(answer["model_info"], type=P.ModelInfo)):
                        self._actors[name] = handle
        self.router.set_instances(self._actors)

    def _cluster_model(self) -> P.ModelInfo:
        assert self._model is not None  # (an instance answered)
        return self._model

    def _admits(self, name: str, model: P.ModelInfo) -> bool:
        """The first instance's model is the cluster's; one serving another file is refused."""
        if self._model is None:
            self._model = model
        elif model.model_sha256 != self._model.model_sha256:
            self.refused[name] = (f"serves {model.model_path} (sha256 {model.model_sha256[:12]}), not the "
                                  f"cluster's {self._model.model_path} ({self._model.model_sha256[:12]})")
            log.warning("instance %s is not used: it %s", name, self.refused[name])
            return False
        return True

    def _mark_down(self, name: str) -> None:
        """An instance failed a request: unused until it answers a probe again (lock held)."""
        handle = self._actors.pop(name, None)
        self.router.set_instances(self._actors)
        if handle is not None:
            self._probes[name] = (handle, handle.info.remote())

    def instances(self) -> list[str]:
        with self._lock:
            self._refresh()
            return sorted(self._actors)

    def refused_instances(self) -> dict[str, str]:
        """Instances listed but never used, and why (another model file)."""
        with self._lock:
            return dict(self.refused)

    def placements(self) -> dict[str, dict[str, int]]:
        """Per live instance: requests routed to it, of which by prefix affinity, and open now."""
        with self._lock:
            self._refresh()
            return {name: {"routed": load.routed, "affine": load.affine, "open": load.requests}
                    for name, load in self.router.loads.items()}

    def stats(self, timeout: float = 30.0) -> dict[str, dict[str, Any]]:
        """Each instance's scheduler figures (steps, tokens, prefix_hit_rate, ...)."""
        with self._lock:
            actors = dict(self._actors)
        refs = {name: handle.stats.remote() for name, handle in actors.items()}
        return {name: self._ray.get(ref, timeout=timeout) for name, ref in refs.items()}

    # -- requests -----------------------------------------------------------------------

    def generate(self, prompt: str | Sequence[int], **options: Unpack[RequestArgs]) -> Completion:
        """As `Session.generate`, on the instance the router chooses."""
        return self.start(prompt, options_of(options), stream=False).result()

    def submit(self, prompt: str | Sequence[int], **options: Unpack[RequestArgs]) -> ClusterRequest:
        return self.start(prompt, options_of(options), stream=False)

    def stream(self, prompt: str | Sequence[int], **options: Unpack[RequestArgs]) -> ClusterRequest:
        return self.start(prompt, options_of(options), stream=True)

    def chat_ids(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                 **template_kwargs: Any) -> list[int]:
        """As `Session.chat_ids`: a conversation's prompt ids, through the model's chat template."""
        return chat.prompt_ids(self.tokenizer, messages, add_generation_prompt=add_generation_prompt,
                               **template_kwargs)

    def start(self, prompt: str | Sequence[int], options: Options, *, stream: bool) -> ClusterRequest:
        request = self._request(prompt, options)
        request.routed.send()
        return request

    async def start_async(self, prompt: str | Sequence[int], options: Options) -> ClusterRequest:
        """As `start`, awaiting (never blocking) while no instance is live (libllm.cluster_aio)."""
        request = self._request(prompt, options)
        await request.routed.send_async()
        return request

    def _request(self, prompt: str | Sequence[int], options: Options) -> ClusterRequest:
        """The checked request, not sent yet."""
        if self.closed:
            raise Closed("this session is closed")
        check_options(options)
        prompt_ids = prompt_ids_of(self.tokenizer, self.info, prompt)
        seed = options.seed if options.seed is not None else secrets.randbits(63)
        # Always streamed between node and client (in batches): what a failover resubmits from.
        submit = submit_of(options, prompt_ids, seed, True)
        routed = RoutedRequest(self, Pending(0, submit), options.tenant)
        deadline = None if options.timeout is None else time.monotonic() + options.timeout
        return ClusterRequest(routed, self.tokenizer.decoder(prompt_ids), list(options.stop or ()), deadline)

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> ClusterSession:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class ClusterRequest(Request):
    """A Request on the cluster; `routed` is its life there (what libllm.cluster_aio awaits)."""

    def __init__(self, routed: RoutedRequest, decoder: IncrementalDecoder, stop: list[str],
                 deadline: float | None) -> None:
        super().__init__(routed, routed.pending, decoder, stop, deadline)
        self.routed = routed


class RoutedRequest:
    """One request's life on the cluster: the instance it runs on, its stream of token
    batches, and the resubmission when that instance goes (a Request's RequestOwner).
    Each step has a blocking flavour (`send`, `pump`) and an awaiting one (`send_async`,
    `pump_async`); what they do between the waits is shared."""

    def __init__(self, session: ClusterSession, pending: Pending, tenant: str) -> None:
        self.session = session
        self.pending = pending
        self.tenant = tenant
        self.key = uuid.uuid4().hex  # names it at its instance, for cancel
        self.instance = ""
        self.batches: Any = None
        self.outstanding = 0  # tokens counted at its instance's load and not done yet
        self.counted = False  # it is counted at its instance's load (from routing to its end or cancel)
        self.resumed_from = 0
        self.num_failovers = 0
        self.last_failure: BaseException | None = None

    # -- sending ------------------------------------------------------------------------

    def send(self) -> None:
        """Start the request on an instance; waits for one to be live, up to FAILOVER_TIMEOUT_S."""
        deadline = time.monotonic() + FAILOVER_TIMEOUT_S
        while not self._try_send():
            _check_wait(deadline)
            time.sleep(WAIT_S)

    async def send_async(self) -> None:
        deadline = time.monotonic() + FAILOVER_TIMEOUT_S
        while not self._try_send():
            _check_wait(deadline)
            await asyncio.sleep(WAIT_S)

    def _try_send(self) -> bool:
        """Start it on the instance the router chooses, with the tokens it has after a
        failover; False when no instance is live now."""
        session, pending = self.session, self.pending
        submit = pending.submit if not pending.token_ids else resubmission(pending)
        if submit is None:
            return True  # it had made every token: only its end was lost (`pending` is finished)
        cost = len(submit.prompt_ids) + submit.max_tokens
        with session._lock:
            if session.refresh_on_send:
                session._refresh()
            try:
                name = session.router.choose(submit.prompt_ids, cost, self.tenant)
            except LookupError:
                return False
            handle = session._actors[name]
        self.instance, self.outstanding, self.resumed_from = name, cost, len(pending.token_ids)
        self.counted = True
        self.batches = handle.run.options(num_returns="streaming").remote(P.pack(submit), self.key)
        return True

    # -- receiving ----------------------------------------------------------------------

    def pump(self, request: Pending, deadline: float | None) -> None:
        """Receive the next batch (or the end); fail over when the instance is gone."""
        ray = self.session._ray
        while request.finished is None and request.error is None:
            try:
                batch = ray.get(next(self.batches))
            except StopIteration:
                batch = None  # ended without its end: the instance went as it finished
            except ray.exceptions.RayError as exc:
                batch, self.last_failure = None, exc
            if batch is None:
                if self._failed():
                    try:
                        self.send()
                    except LlmosError as exc:
                        request.error = exc
            elif self._take(batch):
                return

    async def pump_async(self, request: Pending) -> None:
        ray = self.session._ray
        while request.finished is None and request.error is None:
            try:
                batch = await (await self.batches.__anext__())
            except StopAsyncIteration:
                batch = None
            except ray.exceptions.RayError as exc:
                batch, self.last_failure = None, exc
            if batch is None:
                if self._failed():
                    try:
                        await self.send_async()
                    except LlmosError as exc:
                        request.error = exc
            elif self._take(batch):
                return

    def _take(self, batch: tuple[int, list[int], bytes | None, str | None]) -> bool:
        """File a batch in the request; True when it brought news (tokens or the end)."""
        request = self.pending
        offset, ids, finished, error = batch
        if offset != len(request.token_ids) - self.resumed_from:  # never: batches are in order
            request.error = RemoteError(f"instance {self.instance} sent tokens from {offset}, expected "
                                        f"{len(request.token_ids) - self.resumed_from}")
            self._ended()
            return True
        self._done(len(ids))
        request.token_ids.extend(ids)
        request.fresh.extend(ids)
        if error is not None:
            request.error = _error_of(error)
        elif finished is not None:
            end = P.unpack(finished, P.Finished)
            request.finished = msgspec.structs.replace(end, num_prompt_tokens=len(request.submit.prompt_ids),
                                                       num_output_tokens=len(request.token_ids))
        ended = request.finished is not None or request.error is not None
        if ended:
            self._ended()
        return bool(ids) or ended

    def cancel(self, request: Pending) -> None:
        """Stop it at its instance; it counts no more at that instance's load from now (whether
        or not anyone reads its end: a client that went away reads nothing)."""
        if request.finished is None and request.error is None and self.instance:
            handle = self.session._actors.get(self.instance)
            if handle is not None:
                handle.cancel.remote(self.key)
            self._ended()

    # -- failing over -------------------------------------------------------------------

    def _failed(self) -> bool:
        """Its instance failed it: that one is out of the router until it answers again.
        False when the request has failed over too often (its error is set then)."""
        session = self.session
        with session._lock:
            session._mark_down(self.instance)
            session.num_failovers += 1
        self._ended()
        self.num_failovers += 1
        if self.num_failovers > MAX_FAILOVERS:  # not the instances: the request itself fails them
            self.pending.error = ServerGone(f"the request failed on {MAX_FAILOVERS} instances; the last said: "
                                            f"{self.last_failure}")
            return False
        return True

    def _done(self, tokens: int) -> None:
        done = min(tokens, self.outstanding) if self.counted else 0
        if done:
            with self.session._lock:
                self.session.router.progress(self.instance, self.tenant, done)
            self.outstanding -= done

    def _ended(self) -> None:
        """It counts no more at its instance's load (once, however many ways it ends)."""
        if self.counted:
            self.counted = False
            with self.session._lock:
                self.session.router.ended(self.instance, self.tenant, self.outstanding)
        self.outstanding = 0


def _check_wait(deadline: float) -> None:
    if time.monotonic() > deadline:
        raise ServerGone(f"no llmos instance took the request within {FAILOVER_TIMEOUT_S:g} s")


def _error_of(what: str) -> LlmosError:
    """The instance's error ("Type: message") as the same libllm exception."""
    name, _, message = what.partition(": ")
    kind = getattr(errors, name, None)
    if isinstance(kind, type) and issubclass(kind, LlmosError):
        return kind(message)
    return RemoteError(what)


def connect(address: str = "auto", *, timeout: float = CONNECT_TIMEOUT_S) -> ClusterSession:
    """A session over every llmos instance of the Ray cluster at `address` ("auto": the one
    this machine is in; "ray://host:10001" through Ray Client), once one answers.

    Raises:
        KernelUnavailable: no instance answered within `timeout` (`llmos cluster up` starts them).
    """
    init_ray(address)
    return ClusterSession(timeout)


def init_ray(address: str) -> None:
    """Join the Ray cluster at `address` as a driver in llmos's namespace (once per process)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, namespace=NAMESPACE, logging_level=logging.ERROR, log_to_driver=False)
