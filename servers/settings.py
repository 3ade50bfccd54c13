"""How a server gets its settings: one dataclass per server, validated once, encoded once.

Each server package defines its settings (e.g. servers/scheduler/settings.py): the fields,
their one set of defaults and the checks. The supervisor reads them as the sections of the
instance's TOML config (tools/config.py) and hands each server process its section as JSON
(`--settings`); the server decodes it into the same class, so what was validated is what
runs. Shared by every server (tests/servers/test_isolation.py).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, TypeVar

import msgspec

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting (or the configuration file holding it) says something we do not accept."""


def encode_settings(settings: Any) -> str:
    """The `--settings` argument for a server: its settings dataclass as JSON."""
    return msgspec.json.encode(settings).decode()


def decode_settings(text: str, cls: type[T]) -> T:
    """The settings a server was started with; defaults for keys absent, an error for bad ones."""
    try:
        data = msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise ConfigError(f"--settings is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--settings must be a JSON object of {cls.__name__}'s fields")
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})  # type: ignore[arg-type]
    if unknown:  # a supervisor of another version
        raise ConfigError(f"--settings has unknown key(s) for {cls.__name__}: {', '.join(unknown)}")
    try:
        return msgspec.convert(data, cls)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"bad --settings for {cls.__name__}: {exc}") from None


def add_settings_argument(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    parser.add_argument("--settings", default="{}", help=f"{cls.__name__} as JSON (the supervisor passes it)")
