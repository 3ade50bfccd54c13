"""GatewaySettings: the [gateway] section of the instance config, as the gateway process
receives it (servers/settings.py). The one place its keys, defaults and checks live; the
app (app.py) and the guard (guard.py) read it."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmos.servers.settings import ConfigError


@dataclass(slots=True, frozen=True)
class GatewaySettings:
    """[gateway]: where the HTTP front door listens and who may use it."""

    host: str = "127.0.0.1"  # address to listen on ("0.0.0.0": every interface)
    port: int = 8000  # 0 picks a free port (written to the run dir's gateway.url)
    api_keys: dict[str, str] = field(default_factory=dict)  # key -> tenant; empty: no authentication
    max_body_bytes: int = 1 << 20  # a larger request body is refused (413)
    max_tokens: int = 512  # a larger max_tokens is refused (400); absent: this, or what the context has left
    # Choices at the scheduler at once before it answers 429; also its channel's window (each
    # slot costs ~16 KiB of ring memory, so 1024, the kernel's cap, takes 32 MiB of `rings`).
    max_in_flight: int = 256
    body_timeout_s: float = 30.0  # a request body that takes longer is dropped (408)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535 or min(self.max_body_bytes, self.max_tokens, self.max_in_flight) < 1:
            raise ConfigError("gateway: port in 0..65535; max_body_bytes, max_tokens, max_in_flight >= 1")
        if self.max_in_flight > 1024 or self.body_timeout_s <= 0:
            raise ConfigError("gateway: max_in_flight at most 1024 (the kernel's window cap); body_timeout_s > 0")
