from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tools.cli import main


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


@pytest.mark.slow
def test_bench_ipc_quick_reports_every_transport(tmp_path: Path) -> None:
    out = tmp_path / "ipc.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.cli", "bench", "ipc", "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    report = json.loads(out.read_text())
    assert {"ring spin", "ring parked", "C futex (floor)", "mp.Queue", "mp.Pipe"} <= set(report["round_trip_64b"])
    assert report["oneway_64b_records_per_s"]["ring_batched"]
    assert 0 <= report["parked_consumer_cpu_share"] < 1
    assert "faster than mp.Queue" in proc.stdout
