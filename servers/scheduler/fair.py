"""Fair: weighted fair share between clients through virtual token counters (VTC).

Runs in the scheduler process, behind the Policy seam. In the spirit of VTC (Sheng et al.,
"Fairness in Serving Large Language Models", OSDI 2024): each client (a tenant, or a
connection) has a counter of the service it received divided by its weight, and the
client with the smallest counter goes first.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

from llmos.servers.scheduler.policy import Policy, Rank
from llmos.servers.scheduler.sequence import OwnClient, Sequence


class Fair(Policy):
    """The client with the least weighted service goes first; within a client, arrival order.

    Service is counted in tokens: a request's prompt when it is first admitted (recomputing
    it after a preemption is not charged again) and each output token as it is made. The
    counter of client ``k`` grows by ``tokens / w_k``. A client that becomes active (a
    request arrives while it has none unfinished) is lifted to the smallest counter of the
    active clients (or, with none, to where the last one left off), so idle time banks no
    credit. Counters never decrease.

    Bound. Let ``D_k`` be the most tokens that requests of client ``k`` running at once are
    charged in total, divided by ``w_k`` (at most ``max_running * max_context / w_k``), and
    ``D = max(D_A, D_B)``. A request of A is admitted only when A's counter is the smallest
    of the clients with a request waiting, and after A's last admission its counter grows
    only by what its requests running then are charged. So whenever B had a request waiting
    at A's last admission, ``c_A - c_B <= D_A``. For two clients backlogged (each with a
    request waiting, not paused) since they started level, e.g. both arriving together,
    ``|c_A - c_B| <= D`` throughout: their weighted services ``S_A / w_A`` and ``S_B / w_B``
    differ by at most ``D``, and over any interval within by at most ``2 * D``, whatever
    the rates at which they send requests. (A client that becomes backlogged behind the
    other first waits until the other catches up, as VTC intends.)

    Victims under memory pressure: the latest request of the client with the most weighted
    service.
    """

    name = "fair"
    is_dynamic = True  # counters grow with every reply

    def __init__(
        self, weights: Mapping[Hashable, float] | None = None, default_weight: float = 1.0
    ) -> None:
        self.weights = dict(weights or {})
        self.default_weight = default_weight
        for client, weight in [*self.weights.items(), (None, default_weight)]:
            if not weight > 0:
                raise ValueError(f"the weight of {client!r} must be positive, got {weight!r}")
        self._counters: dict[Hashable, float] = {}  # client -> service / weight
        self._num_unfinished: dict[Hashable, int] = {}  # active clients only
        self._level = 0.0  # where the last active client left off

    def client(self, seq: Sequence) -> Hashable:
        return seq.client

    def weight(self, client: Hashable) -> float:
        return self.weights.get(client, self.default_weight)

    def counter(self, client: Hashable) -> float:
        """``client``'s weighted service so far (its lifted level once it is active)."""
        return self._counters.get(client, self._level)

    def rank(self, seq: Sequence) -> Rank:
        return (self._counters[self.client(seq)], seq.arrival_order)

    def on_arrival(self, seq: Sequence) -> None:
        client = self.client(seq)
        num = self._num_unfinished.get(client, 0)
        if num == 0:
            level = min((self._counters[c] for c in self._num_unfinished), default=self._level)
            self._counters[client] = max(self._counters.get(client, 0.0), level)
        self._num_unfinished[client] = num + 1

    def on_admit(self, seq: Sequence) -> None:
        if seq.first_step == -1:  # first admission: the prompt is charged once
            self._charge(seq, seq.num_prompt_tokens)

    def on_tokens(self, seq: Sequence, num_tokens: int) -> None:
        self._charge(seq, num_tokens)

    def on_finish(self, seq: Sequence) -> None:
        client = self.client(seq)
        num = self._num_unfinished.pop(client) - 1
        if num:
            self._num_unfinished[client] = num
            return
        if not self._num_unfinished:
            self._level = self._counters[client]
        if isinstance(client, OwnClient):
            del self._counters[client]  # a request of its own never comes back
        elif len(self._counters) > 2 * len(self._num_unfinished) + 64:
            self._forget_idle()

    def _charge(self, seq: Sequence, num_tokens: int) -> None:
        client = self.client(seq)
        self._counters[client] += num_tokens / self.weight(client)

    def _forget_idle(self) -> None:
        """Drop idle clients at or below the level a returning client is lifted to anyway
        (the level never decreases), so the counters stay about as many as active clients."""
        level = min((self._counters[c] for c in self._num_unfinished), default=self._level)
        idle = [
            c for c, v in self._counters.items() if c not in self._num_unfinished and v <= level
        ]
        for c in idle:
            del self._counters[c]
