"""llama.cpp's own benchmarks on the same file and thread count, for `llmos bench model
--llama-cpp DIR` (DIR: a llama.cpp build's bin/, e.g. what tools/fixtures/build_llama_cpp.sh
prints).

Runs llama-bench (prefill pp512, decode tg128 of one stream) and llama-batched-bench (decode
with B parallel streams after a short prompt: S_TG) as subprocesses and reads their JSON.
Weight repacking is off (--repack 0 / --no-repack): on this machine kind the CPU reports AMX,
the VM does not allow it, and llama.cpp's repacked path dies with SIGILL.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

TIMEOUT_S = 1800.0


def _run(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{Path(argv[0]).name} failed ({proc.returncode}): {' / '.join(tail)}")
    return proc.stdout


def llama_bench(bin_dir: Path, model: Path, threads: int, n_prompt: int, n_gen: int) -> dict[str, float]:
    """{"prefill": pp tok/s, "decode": tg tok/s} from one llama-bench repetition."""
    out = _run([str(bin_dir / "llama-bench"), "-m", str(model), "-t", str(threads), "-p", str(n_prompt),
                "-n", str(n_gen), "-r", "1", "--repack", "0", "-o", "json"])
    rows = json.loads(out)
    prefill = next(r["avg_ts"] for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0)
    decode = next(r["avg_ts"] for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0)
    return {"prefill": float(prefill), "decode": float(decode)}


def batched_bench(bin_dir: Path, model: Path, threads: int, batches: list[int], n_prompt: int,
                  n_gen: int) -> dict[int, float]:
    """Decode tok/s (S_TG) per number of parallel streams."""
    context = max(batches) * (n_prompt + n_gen) + 16
    out = _run([str(bin_dir / "llama-batched-bench"), "-m", str(model), "-t", str(threads),
                "-tb", str(threads), "-c", str(context), "-b", "2048", "-ub", "512",
                "-npp", str(n_prompt), "-ntg", str(n_gen), "-npl", ",".join(map(str, batches)),
                "--no-repack", "--output-format", "jsonl"])
    speeds: dict[int, float] = {}
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("{") and '"speed_tg"' in line:
            row = json.loads(line)
            speeds[int(row["pl"])] = float(row["speed_tg"])
    missing = [b for b in batches if b not in speeds]
    if missing:
        raise RuntimeError(f"llama-batched-bench gave no result for {missing} streams")
    return speeds
