"""MemorySettings: the [memory] section of the instance config, as the memory server
receives it (servers/settings.py), with `block_bytes` and `weights_bytes` resolved for the
model by the supervisor. The one place its keys, defaults and checks live."""

from __future__ import annotations

from dataclasses import dataclass

from llmos.microkernel.kernel import parse_size
from llmos.servers.settings import ConfigError


@dataclass(slots=True, frozen=True)
class MemorySettings:
    """[memory]: the arena's KV pages and segments, and the memory server's settings."""

    # Bytes of KV blocks. "auto": room for AUTO_PAGE_BLOCKS float32 blocks of the model (twice
    # as many float16 ones), at least 16M (stories260K: 16M, 13k tokens; Gemma 3 270M: 288M,
    # 8192 tokens, 16384 with [model] kv_dtype = "f16").
    pages: str = "auto"
    segments: str = "16M"  # bytes for client tensors and shared weights
    block_tokens: int = 16  # token slots per KV block
    block_bytes: int = 0  # bytes per KV block; 0: computed from the model's header ([model] path)
    # A segment reserved at start for the instance (owner 0), meant for weights runners would
    # share; no runner maps it yet (each maps the model file and widens what it must itself),
    # so 0 by default. -1: the bytes the model's dequantised/widened tensors need.
    weights_bytes: int = 0
    # KV blocks one client may hold at once; 0 = unlimited. For generation a client is a
    # tenant (an API key's) or a libllm connection: a prompt too long for it is refused (HTTP
    # 429), a request that reaches it ends with finish_reason "length", and a tenant at its
    # quota waits for its own requests' blocks, never taking others'. Blocks a client
    # allocates from the memory server itself count the same way there.
    quota_blocks: int = 0
    quota_segment_bytes: int = 0  # bytes of segments per client; 0 = unlimited
    sweep_interval_s: float = 5.0  # seconds between sweeps that reclaim what exited clients held

    def __post_init__(self) -> None:
        for name in ("pages", "segments"):
            if name == "pages" and self.pages == "auto":
                continue
            try:
                parse_size(getattr(self, name))
            except ValueError:
                raise ConfigError(f"memory.{name} = {getattr(self, name)!r} is not a size (e.g. 16M)") from None
        if self.block_tokens < 1 or self.block_bytes < 0 or self.quota_blocks < 0 or self.quota_segment_bytes < 0:
            raise ConfigError("memory: block_tokens must be >= 1; block_bytes and quotas >= 0")
        if self.sweep_interval_s <= 0:
            raise ConfigError("memory.sweep_interval_s must be positive")
