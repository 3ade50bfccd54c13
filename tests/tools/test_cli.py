from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmos.cli import main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("llmos ")


def test_unknown_benchmark_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "nonsense"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_a_reader_that_goes_away_is_no_traceback(tmp_path: Path) -> None:
    """`llmos status | head`: the pipe closes before the output is written."""
    tmp_path.chmod(0o700)
    proc = subprocess.Popen([sys.executable, "-m", "llmos.cli", "status", "--instance", "nowhere"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "LLMOS_RUNTIME_DIR": str(tmp_path)})
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the child can write a byte
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(60) == 141 and err == b""


@pytest.mark.slow
def test_bench_ipc_quick_reports_every_transport(tmp_path: Path) -> None:
    out = tmp_path / "ipc.json"
    proc = subprocess.run(
        [sys.executable, "-m", "llmos.cli", "bench", "ipc", "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    report = json.loads(out.read_text())
    assert {"ring spin", "ring parked", "C futex (floor)", "mp.Queue", "mp.Pipe", "POSIX message queue"} <= set(
        report["round_trip_64b"])
    assert report["oneway_64b_records_per_s"]["ring_batched"]
    assert 0 <= report["parked_consumer_cpu_share"] < 1
    assert "faster than mp.Queue" in proc.stdout
