"""`llmos serve [MODEL]`: serve a model over HTTP with one command, as `vllm serve MODEL` or
`llama-server -m FILE --port N` do. The flags override the config file (or the defaults);
the instance is the same as `llmos up` starts. Runs in the user's shell."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import msgspec

from llmos.config import Config, ConfigError, config_from_dict, load_config
from llmos.servers.scheduler.settings import POLICIES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="a GGUF or llama2.c file (default: the built-in stories260K)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default 8000; 0: a free one)")
    p.add_argument("--api-key", action="append", metavar="KEY[=TENANT]",
                   help="accept this key (repeatable); with keys, requests need 'Authorization: Bearer KEY'")
    p.add_argument("--runners", type=int, help="runner processes (default: chosen for the machine and model)")
    p.add_argument("--threads", type=int, help="threads per runner step (default: chosen likewise)")
    p.add_argument("--policy", choices=POLICIES, help="scheduling policy")
    p.add_argument("--max-batch-size", type=int, help="sequences per runner per step")
    p.add_argument("--context", type=int, help="positions a sequence may hold (default: the model's)")
    p.add_argument("--kv-dtype", choices=("f32", "f16"), help="what KV pages hold (f16: twice the tokens)")
    p.add_argument("--instance", help="instance name (default: $LLMOS_INSTANCE or 'default')")
    p.add_argument("--detach", action="store_true", help="return once everything is ready")
    p.add_argument("--config", help="TOML config the flags override")


def config_for(ns: argparse.Namespace) -> Config:
    """The config file (or the defaults) with the flags applied, validated again."""
    config = load_config(ns.config)
    model = config.model
    if ns.model is not None:
        model = replace(model, path=str(Path(ns.model).expanduser().resolve()))
    for flag in ("runners", "threads", "context", "kv_dtype"):
        if getattr(ns, flag) is not None:
            model = replace(model, **{flag: getattr(ns, flag)})
    gateway = config.gateway
    if ns.host is not None:
        gateway = replace(gateway, host=ns.host)
    if ns.port is not None:
        gateway = replace(gateway, port=ns.port)
    if ns.api_key:
        keys = dict(key.split("=", 1) if "=" in key else (key, "default") for key in ns.api_key)
        if any(not key for key in keys):
            raise ConfigError("--api-key needs a key (KEY or KEY=TENANT)")
        gateway = replace(gateway, api_keys=keys)
    scheduler = config.scheduler
    if ns.policy is not None:
        scheduler = replace(scheduler, policy=ns.policy)
    if ns.max_batch_size is not None:
        scheduler = replace(scheduler, max_batch_size=ns.max_batch_size)
    servers = config.servers
    if servers and not any(s.module == "llmos.servers.gateway" for s in servers):
        raise ConfigError("the config's [[servers]] have no gateway to serve HTTP with; drop them or add one")
    if servers and ns.runners is not None:
        raise ConfigError("--runners and the config's [[servers]] disagree: drop one of them")
    # Through the dict form, so every section's checks run on the flags' values too.
    whole = replace(config, model=model, gateway=gateway, scheduler=scheduler)
    return config_from_dict(msgspec.to_builtins(whole), "llmos serve")


def main(ns: argparse.Namespace) -> int:
    from llmos import lifecycle

    try:
        config = config_for(ns)
    except (ConfigError, ValueError) as exc:
        print(f"llmos: {exc}", file=sys.stderr)
        return 2
    # The detached supervisor gets the same config, whole, rather than re-reading the flags.
    as_json = json.dumps(msgspec.to_builtins(config))
    return lifecycle.start(config, ns.instance, ns.detach, ["--config-json", as_json])
