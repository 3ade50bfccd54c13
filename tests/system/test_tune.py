"""`llmos tune` as a user runs it: real instances measured one after another, a table of what
each did, and a config written that `llmos serve --config` takes; bad options refused in one
line before anything starts."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from llmos.config import load_config
from llmos.serve import config_for
from tests.system.cli import Cli
from tests.tools.test_config import serve_args

pytestmark = pytest.mark.slow

ROW = re.compile(r"^(\d+) x (\d+)  kv (f32|f16)  batch +(\d+)  steps +(\d+) +([\d.]+) +\d+ms +\d+ms( +<- chosen)?$",
                 re.M)


def test_tune_measures_each_candidate_and_writes_a_config_serve_takes(cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "tuned.toml"
    shm_before = set(os.listdir("/dev/shm"))
    base = cli.config("[model]\nrunners = 2\nthreads = 1\n")  # the starting layout, whatever the cores
    done = cli("tune", "--config", base, "--concurrency", "4", "--requests", "8", "--prompt-len", "16", "--output-len", "16",
               "--layouts", "1x1,2x1", "--kv-dtypes", "f32,f16", "--batch-sizes", "4", "--decode-steps", "16",
               "--out", str(out))
    rows = ROW.findall(done.stdout)
    # The starting point (2 x 1), the other layout, f16 KV, batch 4: each
    # once, whatever was chosen on the way (steps 16 is the default, measured already).
    assert len(rows) == 4, done.stdout
    assert len({row[:5] for row in rows}) == 4
    assert all(float(row[5]) > 0 for row in rows)
    chosen = [row for row in rows if row[6]]
    assert len(chosen) == 1, done.stdout
    runners, threads, kv, batch, steps = chosen[0][:5]

    config = load_config(out)
    assert (config.model.runners, config.model.threads) == (int(runners), int(threads))
    assert config.model.kv_dtype == kv and config.scheduler.max_batch_size == int(batch)
    assert config.scheduler.decode_steps == int(steps)
    assert out.read_text().startswith("# Written by `llmos tune`")
    assert config_for(serve_args("--config", str(out))).model == config.model
    # Every measured instance is gone.
    assert {n for n in set(os.listdir("/dev/shm")) - shm_before if n.startswith("llmos.")} == set()


@pytest.mark.parametrize(("args", "says"), [
    (("--layouts", "2by1"), "--layouts: expected RUNNERSxTHREADS"),
    (("--kv-dtypes", "f8"), "--kv-dtypes: f32 and/or f16"),
    (("--batch-sizes", "0"), "--batch-sizes: expected numbers >= 1"),
    (("--prompt-len", "400", "--output-len", "200"), "the model holds 512 positions"),
    (("/no/such/model.gguf",), "/no/such/model.gguf"),
])
def test_tune_refuses_bad_options_in_one_line(cli: Cli, tmp_path: Path, args: tuple[str, ...], says: str) -> None:
    out = tmp_path / "tuned.toml"
    proc = cli("tune", *args, "--out", str(out), check=False)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not out.exists()
