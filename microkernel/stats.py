"""Statistics value objects read from ring and doorbell headers (L_s, L_r, B).

Pure data, importable by any process; the ring fills them, `stats()`, `/metrics` and
`top` read them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class DoorbellStats:
    parks: int  # futex_wait calls by the owner's waiters
    wakes: int  # futex_wake calls by ringers
    sleepers: int  # waiters parked right now


@dataclass(slots=True, frozen=True)
class RingStats:
    capacity: int
    generation: int
    sent_records: int
    sent_bytes: int
    recv_records: int
    recv_bytes: int
    used_bytes: int  # bytes in flight, padding included
    producer_closed: bool
    consumer_closed: bool
    want_space: bool
    seq_gaps: int  # messages missing by per-ring seq, as seen by the Endpoint layer
    latency_count: int
    latency_sum_ns: int
    latency_max_ns: int
    latency_hist: tuple[int, ...]  # bucket i: latencies in [2**i, 2**(i+1)) ns
    consumer_bell: DoorbellStats
    producer_bell: DoorbellStats

    @property
    def fill(self) -> float:
        """Share of the data area in use, 0..1."""
        return self.used_bytes / self.capacity if self.capacity else 0.0

    @property
    def loss_rate(self) -> float:
        """L_r: messages missing by seq over messages that should have arrived."""
        expected = self.latency_count + self.seq_gaps
        return self.seq_gaps / expected if expected else 0.0

    def latency_percentile_ns(self, q: float) -> int:
        """Upper bound of the histogram bucket holding quantile `q` (0..1); 0 if empty."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {q}")
        if self.latency_count == 0:
            return 0
        rank = max(1, round(q * self.latency_count))
        seen = 0
        for bucket, count in enumerate(self.latency_hist):
            seen += count
            if seen >= rank:
                return int(2 ** (bucket + 1))
        return self.latency_max_ns
