"""The instance configuration `llmos up --config FILE` reads: TOML, every key optional,
defaults built in, unknown keys a clear error. Runs in the supervisor only."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

import msgspec

from microkernel.kernel import parse_size


class ConfigError(ValueError):
    """The configuration file is unreadable or says something we do not accept."""


@dataclass(slots=True, frozen=True)
class ServerSpec:
    """One server process: `python -m module --instance NAME args...`, registered as `name`."""

    name: str
    module: str
    args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name or not self.module:
            raise ConfigError("every [[servers]] entry needs a name and a module")


def servers_toml(num_runners: int, *, scheduler: bool = True, gateway: bool = False) -> str:
    """The `[[servers]]` tables of an instance: the memory server, `num_runners` runners,
    then the scheduler and the gateway if asked (for tests, benchmarks and examples)."""
    specs = [("memory", "servers.memory"), *((f"runner.{i}", "servers.runner") for i in range(num_runners))]
    specs += [("scheduler", "servers.scheduler")] if scheduler else []
    specs += [("gateway", "servers.gateway")] if gateway else []
    return "".join(f'[[servers]]\nname = "{name}"\nmodule = "{module}"\n' for name, module in specs)


def default_servers() -> tuple[ServerSpec, ...]:
    """The whole system: the memory server, one runner per core, the scheduler, the gateway."""
    runners = [ServerSpec(f"runner.{i}", "servers.runner") for i in range(max(1, os.cpu_count() or 1))]
    return (ServerSpec("memory", "servers.memory"), *runners, ServerSpec("scheduler", "servers.scheduler"),
            ServerSpec("gateway", "servers.gateway"))


@dataclass(slots=True, frozen=True)
class MemorySection:
    """[memory]: the arena's KV pages and segments, and the memory server's settings."""

    pages: str = "16M"  # bytes of KV blocks
    segments: str = "16M"  # bytes for client tensors and shared weights
    block_tokens: int = 16  # token slots per KV block
    block_bytes: int = 0  # bytes per KV block; 0: computed from the model's header
    model: str = ""  # model file whose header sizes a block ("" = the built-in model)
    # A segment reserved at start for the instance (owner 0), meant for weights runners would
    # share; no runner maps it yet (each maps the model file and widens what it must itself),
    # so 0 by default. -1: the bytes the model's dequantised/widened tensors need.
    weights_bytes: int = 0
    quota_blocks: int = 0  # per client; 0 = unlimited
    quota_segment_bytes: int = 0
    sweep_interval_s: float = 5.0

    def __post_init__(self) -> None:
        for name in ("pages", "segments"):
            try:
                parse_size(getattr(self, name))
            except ValueError:
                raise ConfigError(f"memory.{name} = {getattr(self, name)!r} is not a size (e.g. 16M)") from None
        if self.block_tokens < 1 or self.block_bytes < 0 or self.quota_blocks < 0 or self.quota_segment_bytes < 0:
            raise ConfigError("memory: block_tokens must be >= 1; block_bytes and quotas >= 0")
        if self.sweep_interval_s <= 0:
            raise ConfigError("memory.sweep_interval_s must be positive")

    def resolved_weights_bytes(self) -> int:
        """Bytes of the instance's weights segment (see weights_bytes)."""
        if self.weights_bytes >= 0:
            return self.weights_bytes
        from servers.runner.loaders import default_model_path, dequantised_nbytes

        return dequantised_nbytes(self.model or default_model_path())

    def resolved_block_bytes(self) -> int:
        """A block holds K and V of every layer for `block_tokens` tokens, in float32."""
        if self.block_bytes:
            return self.block_bytes
        from servers.runner.loaders import default_model_path, read_config

        model = read_config(self.model or default_model_path())
        kv_dim = model.n_kv_heads * model.head_size
        return model.n_layers * 2 * kv_dim * self.block_tokens * 4


@dataclass(slots=True, frozen=True)
class SchedulerSection:
    """[scheduler]: the policy and its parameters, and the step limits."""

    policy: str = "fcfs"  # "fcfs", "priority", "rr" or "fair"
    aging_steps: int = 64  # priority: a waiting request gains one level per this many steps
    quantum: int = 16  # rr: tokens a sequence makes before it yields to waiting ones
    weights: dict[str, float] = field(default_factory=dict)  # fair: share per tenant
    max_batch_size: int = 64  # sequences per runner per step (split over the pipeline)
    token_budget: int = 512  # tokens per step
    decode_steps: int = 16  # tokens a runner makes in a row per decoding sequence
    prefix_cache: bool = True  # reuse the KV blocks of prompt prefixes already computed

    def __post_init__(self) -> None:
        if self.policy not in ("fcfs", "priority", "rr", "fair"):
            raise ConfigError(f"scheduler.policy must be fcfs, priority, rr or fair; got {self.policy!r}")
        for name in ("aging_steps", "quantum", "max_batch_size", "token_budget", "decode_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"scheduler.{name} must be >= 1")
        if any(not w > 0 for w in self.weights.values()):
            raise ConfigError("scheduler.weights must be positive")

    def args(self) -> list[str]:
        return [f"--policy={self.policy}", f"--aging-steps={self.aging_steps}", f"--quantum={self.quantum}",
                f"--weights={json.dumps(self.weights)}", f"--max-batch-size={self.max_batch_size}",
                f"--token-budget={self.token_budget}", f"--decode-steps={self.decode_steps}",
                *([] if self.prefix_cache else ["--no-prefix-cache"])]


@dataclass(slots=True, frozen=True)
class RunnerSection:
    """[runner]: how each runner process computes."""

    # Threads per runner step. Results are the same bits for any count. One runner per core
    # with one thread each keeps every core busy under load with no handoffs; more threads
    # per runner make one stream (and prefill) faster at the same core count.
    threads: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.threads <= 64:
            raise ConfigError(f"runner.threads must be in 1..64, got {self.threads}")

    def args(self) -> list[str]:
        return [f"--threads={self.threads}"]


@dataclass(slots=True, frozen=True)
class GatewaySection:
    """[gateway]: where the HTTP front door listens and who may use it."""

    host: str = "127.0.0.1"
    port: int = 8000  # 0 picks a free port (written to the run dir's gateway.url)
    api_keys: dict[str, str] = field(default_factory=dict)  # key -> tenant; empty: no authentication
    max_body_bytes: int = 1 << 20
    max_tokens: int = 512
    # Choices at the scheduler at once before it answers 429; also its channel's window (each
    # slot costs ~16 KiB of ring memory, so 1024, the kernel's cap, takes 32 MiB of `rings`).
    max_in_flight: int = 256
    body_timeout_s: float = 30.0  # a request body that takes longer is dropped (408)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535 or min(self.max_body_bytes, self.max_tokens, self.max_in_flight) < 1:
            raise ConfigError("gateway: port in 0..65535; max_body_bytes, max_tokens, max_in_flight >= 1")
        if self.max_in_flight > 1024 or self.body_timeout_s <= 0:
            raise ConfigError("gateway: max_in_flight at most 1024 (the kernel's window cap); body_timeout_s > 0")

    def args(self) -> list[str]:
        return [f"--host={self.host}", f"--port={self.port}", f"--api-keys={json.dumps(self.api_keys)}",
                f"--max-body-bytes={self.max_body_bytes}", f"--max-tokens={self.max_tokens}",
                f"--max-in-flight={self.max_in_flight}", f"--body-timeout={self.body_timeout_s}"]


@dataclass(slots=True, frozen=True)
class Config:
    rings: str = "32M"  # arena bytes for rings and doorbells
    window: int = 8  # requests in flight per channel
    blas_threads: int = 1  # BLAS threads per server process, set explicitly
    heartbeat_timeout_s: float = 5.0  # a server silent this long is hung: killed and restarted
    max_restarts: int = 5  # crashes of one server allowed within restart_window_s ...
    restart_window_s: float = 30.0  # ... before the whole instance stops
    restart_backoff_s: float = 0.5  # first restart delay, doubled per crash up to 8 s
    start_timeout_s: float = 60.0  # how long a process may take to say it is ready
    memory: MemorySection = field(default_factory=MemorySection)
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    runner: RunnerSection = field(default_factory=RunnerSection)
    gateway: GatewaySection = field(default_factory=GatewaySection)
    servers: tuple[ServerSpec, ...] = field(default_factory=default_servers)

    def __post_init__(self) -> None:
        try:
            parse_size(self.rings)
        except ValueError:
            raise ConfigError(f"rings = {self.rings!r} is not a size (e.g. 32M)") from None
        if self.window < 1 or self.blas_threads < 1 or self.max_restarts < 0:
            raise ConfigError("window and blas_threads must be >= 1, max_restarts >= 0")
        if self.heartbeat_timeout_s < 2.0 or self.restart_window_s <= 0 or self.restart_backoff_s < 0:
            raise ConfigError("heartbeat_timeout_s must be >= 2 s; restart windows must be positive")
        names = [s.name for s in self.servers]
        if len(set(names)) != len(names):
            raise ConfigError(f"server names must be unique: {names}")

    @property
    def rings_bytes(self) -> int:
        return parse_size(self.rings)


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """Validate keys (unknown ones are an error) and types, then the values."""
    known = {f.name for f in fields(Config)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    sections = (("memory", MemorySection), ("scheduler", SchedulerSection), ("runner", RunnerSection),
                ("gateway", GatewaySection))
    for section, cls in sections:
        table = data.get(section, {})
        if isinstance(table, dict):
            extra = sorted(set(table) - {f.name for f in fields(cls)})
            if extra:
                raise ConfigError(f"{source}: [{section}] has unknown key(s) {', '.join(extra)}")
    for i, entry in enumerate(data.get("servers", [])):
        extra = sorted(set(entry) - {f.name for f in fields(ServerSpec)}) if isinstance(entry, dict) else []
        if extra:
            raise ConfigError(f"{source}: servers[{i}] has unknown key(s) {', '.join(extra)}")
    try:
        return msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config(path: str | Path | None) -> Config:
    if path is None:
        return Config()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from None
    return config_from_dict(data, str(path))
