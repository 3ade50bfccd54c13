"""Per-client limits on KV blocks and segment bytes, and the check that enforces them.

Runs inside the memory server. Owns only the configuration; the allocators count usage
and call `check_*` before they change anything, so a refusal leaves every table as it was.
Client 0 is the instance itself (the weights, uncharged work) and is never limited.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from llmos.microkernel.errors import QuotaExceeded

INSTANCE_ID = 0  # owner/client 0: the instance; never limited, never reclaimed


@dataclass(slots=True, frozen=True)
class ClientQuota:
    """Limits for one client; None means unlimited."""

    max_blocks: int | None = None
    max_segment_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_blocks", "max_segment_bytes"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise ValueError(f"{name} must be a non-negative int or None, got {value!r}")


UNLIMITED = ClientQuota()


@dataclass(slots=True, frozen=True)
class QuotaConfig:
    """`default` applies to every client without an entry in `per_client`."""

    default: ClientQuota = UNLIMITED
    per_client: Mapping[int, ClientQuota] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for client_id, quota in self.per_client.items():
            if isinstance(client_id, bool) or not isinstance(client_id, int) or client_id < 0:
                raise ValueError(
                    f"per_client keys must be client ids (int >= 0), got {client_id!r}"
                )
            if not isinstance(quota, ClientQuota):
                raise ValueError(
                    f"quota for client {client_id} must be a ClientQuota, got {quota!r}"
                )
        # A read-only copy: the config is shared by both allocators and must not drift.
        object.__setattr__(self, "per_client", MappingProxyType(dict(self.per_client)))

    def for_client(self, client_id: int) -> ClientQuota:
        if client_id == INSTANCE_ID:
            return UNLIMITED
        return self.per_client.get(client_id, self.default)

    def can_use_blocks(self, client_id: int, num_used: int, num_more: int) -> bool:
        limit = self.for_client(client_id).max_blocks
        return limit is None or num_used + num_more <= limit

    def check_blocks(self, client_id: int, num_used: int, num_more: int) -> None:
        """Raises QuotaExceeded if `num_more` blocks would take the client past its limit."""
        if not self.can_use_blocks(client_id, num_used, num_more):
            raise QuotaExceeded(
                f"client {client_id} is over its KV block quota: {num_used} held + {num_more} "
                f"requested > limit of {self.for_client(client_id).max_blocks} blocks"
            )

    def can_use_segment_bytes(self, client_id: int, num_used: int, num_more: int) -> bool:
        limit = self.for_client(client_id).max_segment_bytes
        return limit is None or num_used + num_more <= limit

    def check_segment_bytes(self, client_id: int, num_used: int, num_more: int) -> None:
        """Raises QuotaExceeded if `num_more` bytes would take the client past its limit."""
        if not self.can_use_segment_bytes(client_id, num_used, num_more):
            raise QuotaExceeded(
                f"client {client_id} is over its segment quota: {num_used} bytes held + "
                f"{num_more} requested > limit of {self.for_client(client_id).max_segment_bytes} bytes"
            )
