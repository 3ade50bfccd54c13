"""`llmos serve` driven as a user drives it: a subprocess, the official openai client against
the URL it prints, `status`, `down`, `logs`; and the start-ups that must fail in one line with their
cause and exit status 2 (a busy port, a bad file, a config of an earlier version), leaving
nothing behind."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from llmos.supervisor import LineReader
from tests.conftest import unique_instance
from tests.microkernel.procs import wait_until
from tests.system.cli import WAIT, Cli

pytestmark = pytest.mark.slow


def test_serve_prints_its_url_and_model_and_answers_the_openai_client(cli: Cli) -> None:
    import openai

    instance = unique_instance("serve")
    up = cli("serve", "--port", "0", "--runners", "1", "--threads", "1", "--api-key", "k1=alice",
             "--instance", instance, "--detach")
    found = re.search(r"serving (\S+) at (http://\S+);", up.stdout)
    assert found, up.stdout
    model, url = found.groups()
    assert model == "stories260K"
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k1", timeout=WAIT)
        done = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
        assert done.choices[0].text and done.usage is not None and done.usage.completion_tokens == 8
        assert httpx.get(f"{url}/v1/models", timeout=WAIT).status_code == 401  # the key is asked for
        status = cli("status", "--instance", instance).stdout
        assert f"serving stories260K at {url}" in status
        names = [p["name"] for p in cli.status(instance)["processes"]]
        assert names == ["kernel", "memory", "runner.0", "scheduler", "gateway"]
    finally:
        cli("down", "--instance", instance)
    assert not Path(f"/dev/shm/llmos.{instance}").exists()
    # The logs outlive the instance, with a line per HTTP request; --purge removes them.
    access = cli("logs", "gateway", "--instance", instance).stdout
    assert "POST /v1/completions 200 tokens=8" in access and "tenant=alice" in access
    assert "GET /v1/models 401" in access
    every = cli("logs", "--instance", instance, "-n", "0").stdout
    assert " kernel[" in every and " runner.0[" in every
    cli("down", "--instance", instance, "--purge")
    assert cli("logs", "--instance", instance, check=False).returncode != 0


def refused(cli: Cli, *args: str) -> str:
    """`llmos serve ARGS` fails before anything starts: its one line."""
    instance = unique_instance("refused")
    shm_before = set(os.listdir("/dev/shm"))
    proc = cli("serve", *args, "--instance", instance, "--detach", check=False)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert not cli.status(instance)["processes"]
    assert set(os.listdir("/dev/shm")) <= shm_before
    return lines[0]


def test_a_busy_port_is_one_line(cli: Cli) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        line = refused(cli, "--port", str(port))
    assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in line


def test_a_file_that_is_not_a_model_is_one_line(cli: Cli, tmp_path: Path) -> None:
    notes = tmp_path / "notes.gguf"
    notes.write_text("not weights\n" * 10)
    assert f"{notes}: not a model file" in refused(cli, str(notes))
    assert "no such model file" in refused(cli, str(tmp_path / "nowhere.gguf"))


def test_a_config_of_an_earlier_version_says_what_to_write(cli: Cli) -> None:
    old = cli.config('[memory]\nmodel = "my.gguf"\n')
    assert '[memory] model has moved: write [model] path = "my.gguf"' in refused(cli, "--config", old)


def test_float16_kv_pages_hold_twice_the_blocks_and_give_the_models_text(cli: Cli) -> None:
    """`--kv-dtype f16`: the memory server and the runners agree on the smaller blocks (the
    same pages hold twice as many), and the text is what the model makes alone with them."""
    from llmos import libllm
    from llmos.servers.runner.model import Model, generate

    instance = unique_instance("kvh")
    cli("serve", "--port", "0", "--runners", "1", "--kv-dtype", "f16", "--instance", instance, "--detach")
    try:
        with libllm.connect(instance) as session:
            done = session.generate("Once upon a time", max_tokens=40)
            prompt = session.tokenizer.encode("Once upon a time")
            blocks = session.info.num_kv_blocks  # the runner's count
            memory_blocks = session.stats()["memory"]["num_blocks"]
            stops = session.info.stop_ids
        half = Model.load(kv_dtype="f16")
        assert done.token_ids == generate(half, prompt, 40, stop_ids=stops)[: len(done.token_ids)]
        pages = max(16 << 20, 512 * Model.load().kv_block_bytes)  # the default pages (config.py)
        assert blocks == memory_blocks == pages // half.kv_block_bytes == 2 * (pages // Model.load().kv_block_bytes)
    finally:
        cli("down", "--instance", instance, "--purge")


def test_a_start_that_fails_counts_as_a_crash_and_the_next_start_serves(cli: Cli) -> None:
    """The gateway's port is taken after the checks `llmos up` makes (here: the supervisor is
    started without them): its first start fails, which counts against max_restarts like a
    crash, with backoff; once the port is free the restart serves, and the rest kept running."""
    instance = unique_instance("re")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        # The backoff leaves the time to see the failure and free the port before the restart.
        config = cli.config(f"restart_backoff_s = 2.0\n[model]\nrunners = 1\nthreads = 1\n[gateway]\nport = {port}\n")
        supervisor = subprocess.Popen([sys.executable, "-m", "llmos.supervisor", "--instance", instance,
                                       "--config", config], env=cli.env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)
        assert supervisor.stdout is not None and supervisor.stderr is not None
        log = cli.runtime / f"{instance}.logs" / "supervisor.log"
        wait_until(lambda: log.exists() and "gateway did not start" in log.read_text(), "the gateway's failed start")
    ready = LineReader(supervisor.stdout.fileno(), time.monotonic() + WAIT)
    try:
        while not (line := ready.readline()).startswith("llmos up:"):
            assert line and "llmos error" not in line, line
        assert f"http://127.0.0.1:{port}" in line
        restarts = {p["name"]: p["restarts"] for p in cli.status(instance)["processes"]}
        assert restarts.pop("gateway") >= 1 and restarts == {"kernel": 0, "memory": 0, "runner.0": 0, "scheduler": 0}
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=WAIT).status_code == 200
    finally:
        supervisor.stdout.close()
        supervisor.stderr.close()
        cli("down", "--instance", instance, "--purge")
        supervisor.wait(WAIT)
