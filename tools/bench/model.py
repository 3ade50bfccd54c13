"""`llmos bench model`: generated tokens/s of the runner's model vs a plain numpy loop.

Runs in the user's shell, one process, no servers. Owns its KV pools. For each batch size it
decodes B sequences from position 0 to --max-pos with the runner's batch-invariant kernels
(paged KV, one Model.step per token) and with servers/runner/reference.py's numpy model
(contiguous KV, matmul attention), interleaving the two, and reports medians and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# One BLAS thread, as the supervisor gives every server process (DESIGN.md): the baseline is
# a single-process, single-threaded numpy loop. Set before numpy loads its BLAS; an
# explicit environment setting wins.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from servers.runner._kernels import simd_level  # noqa: E402
from servers.runner.model import Model, SeqChunk  # noqa: E402
from servers.runner.reference import NumpyLlama  # noqa: E402
from servers.runner.sampling import GREEDY  # noqa: E402


def first_tokens(batch: int) -> list[int]:
    # BOS for the first stream, other single-token prompts for the rest, so the streams
    # differ (the work per token does not depend on the text).
    return [1] + [259 + i % 253 for i in range(1, batch)]


def run_ours(model: Model, batch: int, max_pos: int) -> tuple[float, list[int]]:
    """Seconds to decode ``batch`` streams through positions 0..max_pos-1, and stream 0."""
    per_seq = model.blocks_needed(max_pos)
    kv = model.new_kv_pool(batch * per_seq)
    tables = [np.arange(i * per_seq, (i + 1) * per_seq, dtype=np.int32) for i in range(batch)]
    tokens = first_tokens(batch)
    stream = [tokens[0]]
    start = time.perf_counter()
    for pos in range(max_pos):
        out = model.step(
            [SeqChunk(tables[i], pos, (tokens[i],), sampling=GREEDY) for i in range(batch)], kv
        )
        tokens = out.token_ids.tolist()
        stream.append(tokens[0])
    return time.perf_counter() - start, stream


def run_numpy(model: Model, batch: int, max_pos: int) -> tuple[float, list[int]]:
    ref = NumpyLlama(model.loaded, batch=batch, max_pos=max_pos)
    tokens = np.array(first_tokens(batch))
    stream = [int(tokens[0])]
    start = time.perf_counter()
    for pos in range(max_pos):
        tokens = ref.forward(tokens, pos).argmax(axis=1)
        stream.append(int(tokens[0]))
    return time.perf_counter() - start, stream


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llmos bench model", description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", type=Path, default=None, help="model file (default: shipped stories260K)"
    )
    p.add_argument("--batches", default="1,8,32,64", help="comma-separated batch sizes")
    p.add_argument("--max-pos", type=int, default=256, help="decode positions 0..N-1 per stream")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repetitions per batch size")
    p.add_argument("--no-baseline", action="store_true", help="skip the numpy baseline")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    ns = p.parse_args(argv)
    ns.batches = [int(b) for b in ns.batches.split(",") if b]
    if not ns.batches or min(ns.batches) <= 0 or ns.max_pos <= 0 or ns.repeats <= 0:
        p.error("batches, --max-pos and --repeats must be positive")
    return ns


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: list[str]) -> int:
    ns = parse_args(argv)
    model = Model.load(ns.model)
    if ns.max_pos > model.config.seq_len:
        print(
            f"--max-pos {ns.max_pos} exceeds the model's context {model.config.seq_len}",
            file=sys.stderr,
        )
        return 2
    run_ours(model, 4, 16)  # warm up code paths and allocators
    results: list[dict[str, Any]] = []
    for batch in ns.batches:
        ours, base, ratios = [], [], []
        for _ in range(ns.repeats):
            seconds, stream = run_ours(model, batch, ns.max_pos)
            ours.append(batch * ns.max_pos / seconds)
            if not ns.no_baseline:
                seconds, ref_stream = run_numpy(model, batch, ns.max_pos)
                base.append(batch * ns.max_pos / seconds)
                ratios.append(ours[-1] / base[-1])
        row: dict[str, Any] = {"batch": batch, "ours_tok_s": summary(ours), "ours_runs": ours}
        if base:
            row |= {
                "numpy_tok_s": summary(base),
                "numpy_runs": base,
                "ratio": summary(ratios),
                "same_greedy_text": stream == ref_stream,
            }
        results.append(row)
        print_row(row, header=len(results) == 1)
    if ns.json:
        ns.json.write_text(
            json.dumps(
                {
                    "benchmark": "model",
                    "model": str(model.loaded.path),
                    "max_pos": ns.max_pos,
                    "repeats": ns.repeats,
                    "block_size": model.block_size,
                    "cpus": os.cpu_count(),
                    "machine": platform.machine(),
                    "python": platform.python_version(),
                    "numpy": np.__version__,
                    "simd": simd_level(),
                    "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
                    "results": results,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


def print_row(row: dict[str, Any], *, header: bool) -> None:
    if header:
        print(f"{'batch':>5}  {'ours tok/s':>11}  {'numpy tok/s':>11}  {'ratio (min-max)':>20}")
    ours = row["ours_tok_s"]["median"]
    if "ratio" in row:
        r = row["ratio"]
        print(
            f"{row['batch']:>5}  {ours:>11,.0f}  {row['numpy_tok_s']['median']:>11,.0f}  "
            f"{r['median']:>6.2f}x ({r['min']:.2f}-{r['max']:.2f})",
            flush=True,
        )
    else:
        print(f"{row['batch']:>5}  {ours:>11,.0f}  {'-':>11}  {'-':>20}", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
