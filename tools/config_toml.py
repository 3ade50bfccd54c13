"""A Config written back as the TOML `llmos up --config` reads (for `llmos tune`, which
writes the config it chose, and the config reference, which shows every default). Only the
types a Config holds: strings, numbers, booleans, tables of those, the [[servers]] list.
The standard library reads TOML but does not write it; this is small enough not to need a
dependency."""

from __future__ import annotations

import json
import math
from dataclasses import fields, is_dataclass
from typing import Any

from llmos.config import Config


def string_toml(text: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's, but characters past U+FFFF stay whole
    (TOML has no surrogate pairs) and DEL, which JSON leaves bare, is escaped."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def value_toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} has no place in a config")
        return repr(value)
    if isinstance(value, str):
        return string_toml(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{string_toml(k)} = {value_toml(v)}" for k, v in value.items()) + " }" \
            if value else "{}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(value_toml(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def config_toml(config: Config, *, changed_only: bool = False) -> str:
    """`config` as TOML: every key, or (`changed_only`) those that differ from the defaults."""
    default = Config()
    top, sections, servers = [], [], []
    for f in fields(Config):
        value, base = getattr(config, f.name), getattr(default, f.name)
        if f.name == "servers":
            for spec in value:
                servers.append("[[servers]]\n" + _keys(spec, None, False))
        elif is_dataclass(value):
            body = _keys(value, base, changed_only)
            if body or not changed_only:
                sections.append(f"[{f.name}]\n{body}")
        elif not changed_only or value != base:
            top.append(f"{f.name} = {value_toml(value)}\n")
    return "\n".join(part for part in ("".join(top), *sections, *servers) if part)


def _keys(section: Any, default: Any, changed_only: bool) -> str:
    lines = []
    for f in fields(section):
        value = getattr(section, f.name)
        if changed_only and value == getattr(default, f.name):
            continue
        if f.name == "args" and not value:
            continue
        lines.append(f"{f.name} = {value_toml(value)}\n")
    return "".join(lines)
