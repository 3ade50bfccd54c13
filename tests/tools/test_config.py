"""The config and `llmos serve`'s flags over it, without processes: the [model] section, the
layout chosen for the machine, the keys that moved, and flags that override a file."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from llmos.config import (
    LARGE_MODEL_BYTES,
    ConfigError,
    ModelSettings,
    config_from_dict,
    load_config,
)
from llmos.serve import add_arguments, config_for


def serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def sparse_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def test_a_small_model_gets_a_runner_per_core_and_a_large_one_one_runner_on_every_core(tmp_path: Path) -> None:
    small = ModelSettings()  # the built-in model
    large = ModelSettings(path=str(sparse_file(tmp_path / "big.gguf", LARGE_MODEL_BYTES)))
    assert small.layout(cores=4) == (4, 1)
    assert large.layout(cores=4) == (1, 4)


def test_runners_or_threads_given_the_other_fills_the_cores() -> None:
    assert ModelSettings(runners=2).layout(cores=8) == (2, 4)
    assert ModelSettings(threads=2).layout(cores=8) == (4, 2)
    assert ModelSettings(runners=3, threads=3).layout(cores=2) == (3, 3)
    assert ModelSettings(threads=4).layout(cores=2) == (1, 4)


def test_the_standard_servers_follow_the_layout() -> None:
    config = config_from_dict({"model": {"runners": 3}})
    names = [s.name for s in config.server_specs()]
    assert names == ["memory", "runner.0", "runner.1", "runner.2", "scheduler", "gateway"]


@pytest.mark.parametrize(("body", "says"), [
    ('[memory]\nmodel = "m.gguf"\n', '[model] path = "m.gguf"'),
    ("[runner]\nthreads = 2\n", "[model] threads = 2"),
    ("[model]\nthreads = 99\n", "runners and threads in 0..64"),
    ("[model]\ncontext = 1\n", "at least 2"),
    ("start_timeout_s = 0\n", "start_timeout_s must be >= 1 s"),
    ('[memory]\npages = "-5M"\n', "is not a size"),
    ('[[servers]]\nname = "e"\nmodule = "servers.echo"\n', "module 'servers.echo' is now 'llmos.servers.echo'"),
])
def test_moved_and_nonsense_keys_say_what_to_write(tmp_path: Path, body: str, says: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(body)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert says in str(info.value)


def test_flags_override_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[gateway]\nport = 9000\nhost = "0.0.0.0"\n[scheduler]\npolicy = "rr"\n[model]\nthreads = 1\n')
    model = sparse_file(tmp_path / "m.gguf", 10)
    config = config_for(serve_args(str(model), "--config", str(path), "--port", "0", "--threads", "2",
                                   "--api-key", "k1=alice", "--api-key", "k2", "--policy", "fair",
                                   "--max-batch-size", "8", "--context", "512"))
    assert config.model.path == str(model.resolve()) and config.model.threads == 2 and config.model.context == 512
    assert config.gateway.port == 0 and config.gateway.host == "0.0.0.0"  # the file's, where no flag
    assert config.gateway.api_keys == {"k1": "alice", "k2": "default"}
    assert config.scheduler.policy == "fair" and config.scheduler.max_batch_size == 8


def test_a_flag_out_of_range_is_refused_like_the_same_key_in_a_file() -> None:
    with pytest.raises(ConfigError, match=r"port in 0\.\.65535"):
        config_for(serve_args("--port", "70000"))
    with pytest.raises(ConfigError, match="max_batch_size must be >= 1"):
        config_for(serve_args("--max-batch-size", "0"))
