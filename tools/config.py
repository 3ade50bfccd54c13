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

from llmos.microkernel.kernel import parse_size
from llmos.servers.gateway.settings import GatewaySettings
from llmos.servers.memory.settings import MemorySettings
from llmos.servers.runner.settings import LARGE_MODEL_BYTES, ModelSettings
from llmos.servers.scheduler.settings import SchedulerSettings
from llmos.servers.settings import ConfigError

__all__ = [
    "LARGE_MODEL_BYTES",
    "Config",
    "ConfigError",
    "GatewaySettings",
    "MemorySettings",
    "ModelSettings",
    "SchedulerSettings",
    "ServerSpec",
    "config_from_dict",
    "load_config",
]


@dataclass(slots=True, frozen=True)
class ServerSpec:
    """One server process: `python -m module --instance NAME args...`, registered as `name`."""

    name: str  # what it registers as: memory, scheduler, gateway, runner.N, or a name of yours
    module: str  # the Python module it runs (`python -m MODULE`), e.g. llmos.servers.runner
    args: tuple[str, ...] = ()  # more command-line arguments for it

    def __post_init__(self) -> None:
        if not self.name or not self.module:
            raise ConfigError("every [[servers]] entry needs a name and a module")
        if self.module.split(".")[0] in ("servers", "microkernel", "tools"):  # before everything moved under llmos
            raise ConfigError(f"[[servers]] {self.name!r}: module {self.module!r} is now {'llmos.' + self.module!r}")


def servers_toml(num_runners: int, *, scheduler: bool = True, gateway: bool = False) -> str:
    """The `[[servers]]` tables of an instance: the memory server, `num_runners` runners,
    then the scheduler and the gateway if asked (for tests, benchmarks and examples)."""
    specs = [("memory", "llmos.servers.memory"), *((f"runner.{i}", "llmos.servers.runner") for i in range(num_runners))]
    specs += [("scheduler", "llmos.servers.scheduler")] if scheduler else []
    specs += [("gateway", "llmos.servers.gateway")] if gateway else []
    return "".join(f'[[servers]]\nname = "{name}"\nmodule = "{module}"\n' for name, module in specs)


def standard_servers(num_runners: int) -> tuple[ServerSpec, ...]:
    """The whole system: the memory server, the runners, the scheduler, the gateway."""
    runners = [ServerSpec(f"runner.{i}", "llmos.servers.runner") for i in range(num_runners)]
    return (ServerSpec("memory", "llmos.servers.memory"), *runners, ServerSpec("scheduler", "llmos.servers.scheduler"),
            ServerSpec("gateway", "llmos.servers.gateway"))


AUTO_PAGE_BLOCKS = 512  # KV blocks `pages = "auto"` makes room for


def resolved_pages(memory: MemorySettings, model_path: Path) -> int:
    """Bytes of the KV region (see pages): the same with float16 pages, which then hold
    twice the blocks."""
    if memory.pages != "auto":
        return parse_size(memory.pages)
    return max(16 << 20, AUTO_PAGE_BLOCKS * resolved_block_bytes(memory, model_path))


def resolved_weights_bytes(memory: MemorySettings, model_path: Path) -> int:
    """Bytes of the instance's weights segment (see weights_bytes)."""
    if memory.weights_bytes >= 0:
        return memory.weights_bytes
    from llmos.servers.runner.loaders import dequantised_nbytes

    return dequantised_nbytes(model_path)


def resolved_block_bytes(memory: MemorySettings, model_path: Path, kv_bytes: int = 4) -> int:
    """A block holds K and V of every layer for `block_tokens` tokens, of kv_bytes each."""
    if memory.block_bytes:
        return memory.block_bytes
    from llmos.servers.runner.loaders import read_config

    model = read_config(model_path)
    kv_dim = model.n_kv_heads * model.head_size
    return model.n_layers * 2 * kv_dim * memory.block_tokens * kv_bytes


@dataclass(slots=True, frozen=True)
class Config:
    """The instance: arena sizes, the supervisor's watch, and the sections below."""

    rings: str = "32M"  # arena bytes for rings and doorbells
    window: int = 8  # requests in flight per channel
    # Channels one client (a process that is not a server) may hold at once; clients also may
    # not take the last eighth of `rings`, which is kept for the servers.
    max_client_channels: int = 64
    # Rings the clients of one process may hold together (a session holds 2: its control ring
    # and its channel), so a process that leaks sessions is refused before it fills `rings`.
    max_process_rings: int = 256
    blas_threads: int = 1  # BLAS threads per server process, set explicitly
    heartbeat_timeout_s: float = 5.0  # a server silent this long is hung: killed and restarted
    max_restarts: int = 5  # crashes of one server within restart_window_s before the instance stops
    restart_window_s: float = 30.0  # the window max_restarts counts crashes in
    restart_backoff_s: float = 0.5  # first restart delay, doubled per crash up to 8 s
    start_timeout_s: float = 60.0  # how long a process may take to say it is ready
    model: ModelSettings = field(default_factory=ModelSettings)
    memory: MemorySettings = field(default_factory=MemorySettings)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    # The processes; none listed: the standard ones (standard_servers), with [model]'s runners.
    servers: tuple[ServerSpec, ...] = ()

    def __post_init__(self) -> None:
        try:
            parse_size(self.rings)
        except ValueError:
            raise ConfigError(f"rings = {self.rings!r} is not a size (e.g. 32M)") from None
        if self.window < 1 or self.blas_threads < 1 or self.max_restarts < 0 or self.max_client_channels < 2:
            raise ConfigError("window and blas_threads must be >= 1, max_restarts >= 0, max_client_channels >= 2 "
                              "(a session opens two)")
        if self.max_process_rings < 2:
            raise ConfigError("max_process_rings must be >= 2 (a session holds two)")
        if self.heartbeat_timeout_s < 2.0 or self.restart_window_s <= 0 or self.restart_backoff_s < 0:
            raise ConfigError("heartbeat_timeout_s must be >= 2 s; restart windows must be positive")
        if self.start_timeout_s < 1.0:
            raise ConfigError("start_timeout_s must be >= 1 s (a runner loads its model in it)")
        names = [s.name for s in self.servers]
        if len(set(names)) != len(names):
            raise ConfigError(f"server names must be unique: {names}")

    @property
    def rings_bytes(self) -> int:
        return parse_size(self.rings)

    def server_specs(self) -> tuple[ServerSpec, ...]:
        return self.servers or standard_servers(self.model.layout()[0])

    def runner_threads(self) -> int:
        """Threads per runner step: [model] threads, else the cores shared by the runners."""
        if self.model.threads or not self.servers:
            return self.model.layout()[1]
        runners = sum(s.module == "llmos.servers.runner" for s in self.servers)
        return max(1, (os.cpu_count() or 1) // max(1, runners))


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """Validate keys (unknown ones are an error) and types, then the values."""
    _refuse_moved_keys(data, source)
    known = {f.name for f in fields(Config)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    sections = (("model", ModelSettings), ("memory", MemorySettings), ("scheduler", SchedulerSettings),
                ("gateway", GatewaySettings))
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


def _refuse_moved_keys(data: dict[str, Any], source: str) -> None:
    """Keys of earlier versions, with what to write instead."""
    memory, runner = data.get("memory"), data.get("runner")
    if isinstance(memory, dict) and "model" in memory:
        raise ConfigError(f"{source}: [memory] model has moved: write [model] path = {json.dumps(memory['model'])}")
    if isinstance(runner, dict):
        moved = "".join(f"{key} = {json.dumps(value)}" for key, value in runner.items() if key == "threads")
        raise ConfigError(f"{source}: [runner] has moved into [model]: write [model] {moved or 'threads = N'}")


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
