"""`llmos top`: one snapshot over a pipe, the live view under a pseudo-terminal (left with
`q` and with SIGINT, the terminal restored), the error without an instance, and the pure
view's rates from two hand-made samples. One instance for the module."""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from typing import Any

import pytest

from llmos import libllm
from llmos.config import servers_toml
from llmos.top_view import Sample, build_view, render_rich, render_text
from tests.system.cli import Cli, running_instance

pytestmark = pytest.mark.slow
WAIT = 60.0
CONFIG = """
rings = "16M"
[memory]
pages = "8M"
segments = "1M"
""" + servers_toml(1)
NAMES = ("kernel", "memory", "runner.0", "scheduler")


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_instance(tmp_path_factory, CONFIG, "top") as name:
        with libllm.connect(name) as session:
            for i in range(3):
                session.generate("Once upon a time", max_tokens=20, seed=i)
        yield name


def top_argv(instance: str, *more: str) -> list[str]:
    return [sys.executable, "-m", "llmos.cli", "top", "--instance", instance, *more]


def test_one_snapshot_over_a_pipe(instance: str) -> None:
    proc = subprocess.run(top_argv(instance, "--interval", "0.5"), capture_output=True, text=True, timeout=WAIT,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "\x1b" not in out  # plain text, no terminal codes
    lines = out.splitlines()
    for name in NAMES:
        assert any(line.split()[:1] == [name] for line in lines), f"no process line for {name}:\n{out}"
    assert any(line.startswith("KV blocks: used ") for line in lines), out
    finished = re.search(r"(\d+) finished", out)
    assert finished and int(finished.group(1)) >= 3, out
    for flow in ("scheduler -> runner.0", "runner.0 -> scheduler", "scheduler -> memory", "top -> scheduler"):
        assert any(flow in line for line in lines), f"no ring line for {flow}:\n{out}"
    # Our own channel's rings exist in both samples, so they have a rate (one call per sample).
    own = next(line for line in lines if "top -> scheduler" in line)
    assert own.split()[6:8] != ["-", "-"]


def test_no_instance_is_a_one_line_error(cli: Cli) -> None:
    proc = cli("top", "--instance", "nothing-here", check=False)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "llmos up" in proc.stderr


class Pty:
    """A pseudo-terminal whose slave is a child's stdin and stdout; the master is read."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 60, 160, 0, 0))
        self.output = b""

    def read_until(self, text: bytes, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + WAIT
        while text not in self.output:
            assert proc.poll() is None, f"top exited ({proc.returncode}) before {text!r}: {self.output[-2000:]!r}"
            assert time.monotonic() < deadline, f"no {text!r} on the terminal: {self.output[-2000:]!r}"
            self.drain(0.1)

    def drain(self, timeout: float) -> None:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            self.output += os.read(self.master, 1 << 16)

    def wait(self, proc: subprocess.Popen[bytes]) -> int:
        """Keep reading (so the child never blocks on a full terminal) until it exits."""
        deadline = time.monotonic() + WAIT
        while proc.poll() is None:
            assert time.monotonic() < deadline, "top did not exit"
            self.drain(0.05)
        return proc.returncode

    def close(self) -> None:
        os.close(self.master)
        os.close(self.slave)


@pytest.mark.parametrize("how", ["q", "sigint"])
def test_live_view_quits_cleanly(instance: str, how: str) -> None:
    term = Pty()
    try:
        before = termios.tcgetattr(term.slave)
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "160", "LINES": "60"}
        with subprocess.Popen(top_argv(instance, "--interval", "0.2"), stdin=term.slave, stdout=term.slave,
                              stderr=subprocess.PIPE, env=env) as proc:
            try:
                term.read_until(b"q or Ctrl-C quits", proc)
                for name in NAMES:
                    assert name.encode() in term.output
                term.output = b""
                term.read_until(b"q or Ctrl-C quits", proc)  # a second frame: the loop goes on
                if how == "q":
                    os.write(term.master, b"q")
                else:
                    proc.send_signal(signal.SIGINT)
                code = term.wait(proc)
            finally:
                if proc.poll() is None:
                    proc.kill()
            assert proc.stderr is not None
            errors = proc.stderr.read().decode()
        assert code == 0, errors
        assert "Traceback" not in errors
        after = termios.tcgetattr(term.slave)
        assert after[3] == before[3], "local modes (ICANON, ECHO) not restored"
        assert after[6] == before[6], "control characters (VMIN, VTIME) not restored"
    finally:
        term.close()


# -- the pure view ---------------------------------------------------------------------------


def ring(channel: int, direction: str, sent: int, nbytes: int, *, gaps: int = 0) -> dict[str, Any]:
    return {"channel_id": channel, "direction": direction, "offset": 0, "capacity": 4096, "sent_records": sent,
            "sent_bytes": nbytes, "recv_records": sent, "recv_bytes": nbytes, "used_bytes": 1024, "seq_gaps": gaps,
            "latency_count": sent - gaps, "latency_p50_ns": 2048, "latency_p99_ns": 2 << 20,
            "client_id": 1, "server_id": 2}  # the scheduler's channel to runner.0


def sample(at: float, tokens: int, cpu: float, sent: int, nbytes: int) -> Sample:
    scheduler = {
        "num_steps": 10 * tokens, "num_steps_in_flight": 1, "num_waiting": 2, "num_running": 3,
        "num_computed_tokens": 2 * tokens, "num_generated_tokens": tokens, "num_preemptions": 0,
        "num_finished": tokens // 10, "num_waiting_with_kv": 0, "delay_p50_steps": 1, "delay_p99_steps": 4,
        "max_delay_steps": 5, "runner_busy_s": tokens / 1000, "num_runners": 2, "num_free_blocks": 7,
        "num_cached_blocks": 4, "num_prefix_evictions": 3, "prefix_hit_rate": 0.25, "paged_fragmentation": 0.125,
        "num_waiting_by_priority": {0: 2}, "num_running_by_priority": {0: 1, 5: 2},
        "num_waiting_by_client": {"endpoint-9": 2}, "num_running_by_client": {"endpoint-9": 1, "": 2},
    }
    memory = {"num_blocks": 100, "num_free_blocks": 60, "num_used_blocks": 40, "num_leased_blocks": 25,
              "external_fragmentation": 0.5, "segment_bytes_used": 1 << 20, "segment_bytes_total": 4 << 20}
    kernel = {
        "uptime_s": 12.0, "rings_bytes_used": 1 << 20, "rings_bytes_total": 16 << 20,
        "endpoints": [{"endpoint_id": 1, "name": "scheduler", "pid": 11, "channels": [3]},
                      {"endpoint_id": 2, "name": "runner.0", "pid": 12, "channels": [3]}],
        "rings": [ring(3, "request", sent, nbytes, gaps=1), ring(3, "reply", sent, nbytes)],
    }
    processes = [{"name": "runner.0", "pid": 12, "alive": True, "uptime_s": 12.0, "restarts": 1, "cpu_s": cpu},
                 {"name": "gateway", "pid": 13, "alive": False, "uptime_s": 0.0, "restarts": 2, "cpu_s": 0.0}]
    return Sample(at, "x", processes, kernel, scheduler, memory)


def test_rates_are_deltas_between_two_samples() -> None:
    first, second = sample(100.0, 1000, 3.0, 50, 4000), sample(102.0, 1400, 4.0, 250, 24000)
    text = render_text(build_view(first, second))
    assert "rates over 2.00 s" in text
    assert "200 tokens/s generated, 400 computed/s, 20 requests/s, runners busy 10.0%" in text
    assert "0.2 tokens/step" in text  # 800 computed tokens over 4000 steps
    lines = text.splitlines()
    assert lines[lines.index("PROCESSES") + 2].split() == ["runner.0", "12", "50.0%", "1", "up", "12"]
    assert lines[lines.index("PROCESSES") + 3].split()[-3:] == ["2", "down", "0"]
    request = next(line for line in lines if "scheduler -> runner.0" in line).split()
    assert request[5:] == ["25.0%", "100", "10.0kB", "2.0us", "2.1ms", "0.4%"]  # 1 gap in 250 expected
    reply = next(line for line in lines if "runner.0 -> scheduler" in line).split()
    assert reply[5:8] == ["25.0%", "100", "10.0kB"] and reply[-1] == "0.0%"
    assert ("KV blocks: used 40, lent to the scheduler 25, free 60 of 100; 7 idle in the scheduler's lease, "
            "4 of them cached prefixes") in text
    assert "H (prefix hit rate) 25.0%; F paged 12.5%, segments 50.0% (1.0 of 4.0 MiB used); 3 evictions" in text
    assert re.search(r"priority 5 +0 +2", text) and re.search(r"client \(none\) +0 +2", text)
    assert re.search(r"client endpoint-9 +2 +1", text)


def test_an_80_column_screen_gets_tables_that_drop_columns_not_wrap() -> None:
    first, second = sample(100.0, 1000, 3.0, 50, 4000), sample(102.0, 1400, 4.0, 250, 24000)
    for ep in second.kernel["endpoints"]:  # long names, as real flows have
        ep["name"] = f"{ep['name']}-with-a-long-name"
    text = render_text(build_view(first, second), width=80)
    assert all(len(line) <= 80 for line in text.splitlines()), text
    header = text.splitlines()[text.splitlines().index("RINGS") + 1].split()
    assert "flow" in header and "fill" in header and "p99" not in header  # the least needed went first
    assert "T_s: steps a request waited" in text and "L_r: share of messages lost" in text  # the legend
    assert max(len(line) for line in render_text(build_view(first, second)).splitlines()) > 80  # a pipe: whole


def test_no_rates_without_an_earlier_sample_or_after_a_restart() -> None:
    text = render_text(build_view(None, sample(1.0, 1000, 3.0, 50, 4000)))
    assert "- tokens/s generated" in text and "rates after the next refresh" in text
    # A counter that went back (its process restarted) gives no rate, not a negative one.
    text = render_text(build_view(sample(1.0, 1000, 3.0, 50, 4000), sample(2.0, 10, 0.1, 5, 400)))
    assert "- tokens/s generated" in text
    assert next(line for line in text.splitlines() if "scheduler -> runner.0" in line).split()[6:8] == ["-", "-"]
    # No server answered: the view says so instead of failing.
    bare = Sample(1.0, "x", [])
    text = render_text(build_view(None, bare))
    assert "scheduler: no answer" in text and "(no kernel stats)" in text
    render_rich(build_view(None, bare), max_rows=1)
    # The memory server answered, the scheduler did not: its H and paged F are unknown.
    memory_only = Sample(1.0, "x", [], memory=sample(1.0, 1000, 3.0, 50, 4000).memory)
    lines = render_text(build_view(None, memory_only)).splitlines()
    assert "KV blocks: used 40, lent to the scheduler 25, free 60 of 100" in lines
    assert "H (prefix hit rate) -; F paged -, segments 50.0% (1.0 of 4.0 MiB used)" in lines
