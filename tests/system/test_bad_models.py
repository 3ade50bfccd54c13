"""A model file that cannot be served is refused before anything starts: one line naming the
file and what is wrong, exit status 2, nothing running and nothing in /dev/shm."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from llmos.servers.runner.loaders import check_model, default_model_path, load_model
from tests.servers.runner.helpers import STORIES_GGUF, rewrite_gguf, write_gguf_of_architecture
from tests.system.cli import Cli

TINY = STORIES_GGUF


def f32(name: str, data: np.ndarray) -> int:
    return 0


def variant(tmp_path: Path, name: str, transform: Callable[[str, np.ndarray], np.ndarray | None],
            extra: dict[str, np.ndarray] | None = None) -> Path:
    return rewrite_gguf(TINY, tmp_path / f"{name}.gguf", f32, transform, extra)


def bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the one line must say)."""
    whole = TINY.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(whole[: len(whole) * 2 // 3])
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(whole[:4000])
    text = tmp_path / "notes.gguf"
    text.write_text("these are my notes, not a model\n" * 4)
    lonely = tmp_path / "lonely" / "model.bin"  # a llama2.c checkpoint without its tokenizer.bin
    lonely.parent.mkdir()
    lonely.write_bytes(default_model_path().read_bytes())
    return {
        "missing tensor": (
            variant(tmp_path, "missing", lambda n, d: None if n == "blk.1.ffn_up.weight" else d),
            "missing tensor blk.1.ffn_up.weight",
        ),
        "misshapen tensor": (
            variant(tmp_path, "misshapen", lambda n, d: d[:-8] if n == "blk.0.attn_q.weight" else d),
            "tensor blk.0.attn_q.weight has shape",
        ),
        "a tensor of another family": (
            variant(tmp_path, "biased", lambda n, d: d, {"blk.0.attn_q.bias": np.zeros(64, np.float32)}),
            "tensor blk.0.attn_q.bias is not part of a llama model",
        ),
        "truncated data": (truncated, "runs past the end of the file"),
        "truncated header": (header_only, "truncated GGUF header"),
        "not a model": (text, "not a model file"),
        "no such file": (tmp_path / "nowhere.gguf", "no such model file"),
        "no vocabulary": (lonely, "its vocabulary is expected in"),
    }


def test_each_bad_file_is_refused_by_the_loader_with_its_cause(tmp_path: Path) -> None:
    for what, (path, message) in bad_files(tmp_path).items():
        with pytest.raises(ValueError) as info:
            check_model(path)
        assert str(path) in str(info.value) and message in str(info.value), what
        if path.exists() and path.suffix == ".gguf":
            with pytest.raises(ValueError, match=message):
                load_model(path)


def test_an_architecture_we_do_not_run_is_named(tmp_path: Path) -> None:
    path = write_gguf_of_architecture(tmp_path / "mamba.gguf", "mamba")
    with pytest.raises(ValueError, match=r"mamba.gguf: architecture 'mamba' is not supported \(supported: gemma3, llama, qwen2, qwen3\)"):
        check_model(path)


def test_llmos_up_refuses_a_bad_model_and_leaves_nothing(tmp_path: Path, cli: Cli) -> None:
    shm_before = set(os.listdir("/dev/shm"))
    for what, (path, message) in bad_files(tmp_path).items():
        config = cli.config(f'[model]\npath = "{path}"\n')
        proc = cli("up", "--detach", "--instance", "badmodel", "--config", config, check=False)
        assert proc.returncode == 2, (what, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0] and message in lines[0], (what, proc.stderr)
        assert not cli.status("badmodel")["processes"], what
    assert set(os.listdir("/dev/shm")) <= shm_before
