"""`llmos bench model`: the runner's prefill and decode tokens/s on a model file, beside a
plain numpy loop and, with --llama-cpp DIR, llama.cpp on the same file and thread count.

Runs in the user's shell, one process, no servers. Owns its KV pools. Prefill: one
--prefill-token prompt in one step. Decode: for each batch size, B streams each after a
--prompt-token prompt, then --max-pos tokens each, one Model.step per token (paged KV,
batch-invariant kernels). The numpy model (servers/runner/reference.py) decodes the same
way from position 0; llama.cpp runs llama-bench (pp, tg) and llama-batched-bench (S_TG).
Repetitions interleave the engines; figures are medians with their range, and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

# One BLAS thread, as the supervisor gives every server process (docs/design.md): the baseline is
# a single-process, single-threaded numpy loop. Set before numpy loads its BLAS; an
# explicit environment setting wins.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from llmos.servers.runner._kernels import simd_level  # noqa: E402
from llmos.servers.runner.model import Model, SeqChunk  # noqa: E402
from llmos.servers.runner.reference import NumpyLlama  # noqa: E402
from llmos.servers.runner.sampling import GREEDY  # noqa: E402


def first_tokens(batch: int) -> list[int]:
    # BOS for the first stream, other single-token prompts for the rest, so the streams
    # differ (the work per token does not depend on the text).
    return [1] + [259 + i % 253 for i in range(1, batch)]


def run_ours(model: Model, batch: int, max_pos: int, prompt: int = 0) -> tuple[float, list[int]]:
    """Seconds to decode ``batch`` streams through ``max_pos`` positions after a ``prompt``-
    token prompt each (prefilled in one untimed step), and stream 0's tokens."""
    per_seq = model.blocks_needed(prompt + max_pos)
    kv = model.new_kv_pool(batch * per_seq)
    tables = [np.arange(i * per_seq, (i + 1) * per_seq, dtype=np.int32) for i in range(batch)]
    tokens = first_tokens(batch)
    if prompt:
        prompts = [[(t + k) % model.config.vocab_size for k in range(prompt)] for t in tokens]
        out = model.step([SeqChunk(tables[i], 0, prompts[i], sampling=GREEDY) for i in range(batch)], kv)
        tokens = out.token_ids.tolist()
    stream = [tokens[0]]
    start = time.perf_counter()
    for pos in range(prompt, prompt + max_pos):
        out = model.step(
            [SeqChunk(tables[i], pos, (tokens[i],), sampling=GREEDY) for i in range(batch)], kv
        )
        tokens = out.token_ids.tolist()
        stream.append(tokens[0])
    return time.perf_counter() - start, stream


def run_prefill(model: Model, n: int) -> float:
    """Prompt tokens/s of one ``n``-token prompt computed in one step."""
    kv = model.new_kv_pool(model.blocks_needed(n))
    ids = [(7 + 13 * k) % model.config.vocab_size for k in range(n)]
    start = time.perf_counter()
    model.step([SeqChunk(list(range(kv.shape[0])), 0, ids, sampling=GREEDY)], kv)
    return n / (time.perf_counter() - start)


def weight_bytes(model: Model) -> int:
    """Bytes of weights a step reads (as the engine holds them: float32 or 8-bit blocks)."""
    w = model.loaded.weights
    tensors = [w.tok_embeddings, w.rms_final, *([] if w.wcls is w.tok_embeddings else [w.wcls])]
    tensors += [t for lw in w.layers for f in fields(lw) if (t := getattr(lw, f.name)) is not None]
    return sum(int(getattr(t, "blocks", t).nbytes) for t in tensors)


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_numpy(model: Model, batch: int, max_pos: int, prompt: int = 0) -> tuple[float, list[int]]:
    """As run_ours, with the numpy model (the prompt fed token by token, untimed)."""
    ref = NumpyLlama(model.loaded, batch=batch, max_pos=prompt + max_pos)
    tokens = np.array(first_tokens(batch))
    if prompt:
        prompts = np.array([[(t + k) % model.config.vocab_size for k in range(prompt)] for t in tokens])
        for pos in range(prompt):
            logits = ref.forward(prompts[:, pos], pos)
        tokens = logits.argmax(axis=1)
    stream = [int(tokens[0])]
    start = time.perf_counter()
    for pos in range(prompt, prompt + max_pos):
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
    p.add_argument("--threads", type=int, default=1, help="threads per step (ours and llama.cpp's)")
    p.add_argument("--kv-dtype", default="f32", choices=["f32", "f16"], help="what our KV pages hold")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens per stream before decoding")
    p.add_argument("--prefill", type=int, default=512, help="prompt length for prefill tok/s (0: skip)")
    p.add_argument("--llama-cpp", type=Path, default=None, metavar="DIR",
                   help="a llama.cpp build's bin/: run llama-bench and llama-batched-bench beside ours")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    ns = p.parse_args(argv)
    ns.batches = [int(b) for b in ns.batches.split(",") if b]
    if not ns.batches or min(ns.batches) <= 0 or ns.max_pos <= 0 or ns.repeats <= 0 or ns.threads <= 0:
        p.error("batches, --max-pos, --repeats and --threads must be positive")
    if ns.prompt < 0 or ns.prefill < 0:
        p.error("--prompt and --prefill must be >= 0")
    if ns.llama_cpp is not None and not (ns.llama_cpp / "llama-bench").is_file():
        p.error(f"--llama-cpp {ns.llama_cpp}: no llama-bench there")
    return ns


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: list[str]) -> int:
    ns = parse_args(argv)
    model = Model.load(ns.model, threads=ns.threads, kv_dtype=ns.kv_dtype)
    if ns.prompt + ns.max_pos > model.config.seq_len or ns.prefill > model.config.seq_len:
        print(f"--prompt + --max-pos and --prefill must fit the model's context {model.config.seq_len}",
              file=sys.stderr)
        return 2
    run_ours(model, 4, 4, ns.prompt)  # warm up code paths and allocators
    path = Path(model.loaded.path)
    # metric -> engine -> one figure per repetition
    runs: dict[str, dict[str, list[float]]] = {}
    same_text: dict[int, bool] = {}

    def record(metric: str, engine: str, value: float) -> None:
        runs.setdefault(metric, {}).setdefault(engine, []).append(value)

    for _ in range(ns.repeats):
        if ns.prefill:
            record(f"prefill {ns.prefill}", "ours", run_prefill(model, ns.prefill))
        for batch in ns.batches:
            seconds, stream = run_ours(model, batch, ns.max_pos, ns.prompt)
            record(f"decode B={batch}", "ours", batch * ns.max_pos / seconds)
            if not ns.no_baseline:
                seconds, ref_stream = run_numpy(model, batch, ns.max_pos, ns.prompt)
                record(f"decode B={batch}", "numpy", batch * ns.max_pos / seconds)
                same_text[batch] = stream == ref_stream
        if ns.llama_cpp is not None:
            from llmos.bench.model_peers import batched_bench, llama_bench

            single = llama_bench(ns.llama_cpp, path, ns.threads, ns.prefill or 512, ns.max_pos)
            if ns.prefill:
                record(f"prefill {ns.prefill}", "llama.cpp", single["prefill"])
            for batch, speed in batched_bench(ns.llama_cpp, path, ns.threads, ns.batches, ns.prompt,
                                              ns.max_pos).items():
                record(f"decode B={batch}", "llama.cpp", speed)
            record("decode B=1 (llama-bench tg)", "llama.cpp", single["decode"])
    results = [row_for(metric, engines) for metric, engines in runs.items()]
    print(f"{path.name}: {model.config.arch}, {weight_bytes(model) / 2**20:,.0f} MiB of weights as computed "
          f"({path.stat().st_size / 2**20:,.0f} MiB file), {ns.threads} thread(s), {simd_level()}, "
          f"KV {ns.kv_dtype}, "
          f"median of {ns.repeats} interleaved runs [range]")
    print_table(results)
    print(f"peak RSS {peak_rss_bytes() / 2**20:,.0f} MiB")
    if ns.json:
        ns.json.write_text(json.dumps({
            "benchmark": "model", "model": str(path), "arch": model.config.arch,
            "weight_bytes": weight_bytes(model), "file_bytes": path.stat().st_size,
            "peak_rss_bytes": peak_rss_bytes(), "threads": ns.threads, "prompt": ns.prompt,
            "max_pos": ns.max_pos, "prefill": ns.prefill, "repeats": ns.repeats,
            "block_tokens": model.block_tokens, "cpus": os.cpu_count(), "machine": platform.machine(),
            "python": platform.python_version(), "numpy": np.__version__, "simd": simd_level(),
            "same_greedy_text_as_numpy": same_text, "results": results,
        }, indent=2) + "\n")
    return 0


def row_for(metric: str, engines: dict[str, list[float]]) -> dict[str, Any]:
    row: dict[str, Any] = {"metric": metric}
    for engine, values in engines.items():
        row[engine] = summary(values) | {"runs": values}
    ours = engines.get("ours")
    for peer in ("llama.cpp", "numpy"):
        theirs = engines.get(peer)
        if ours and theirs and len(ours) == len(theirs):
            row[f"ours_over_{peer}"] = summary([a / b for a, b in zip(ours, theirs, strict=True)])
    return row


def print_table(results: list[dict[str, Any]]) -> None:
    def cell(row: dict[str, Any], key: str) -> str:
        if key not in row:
            return "-"
        v = row[key]
        if key.startswith("ours_over_"):
            return f"{v['median']:.2f}x [{v['min']:.2f}-{v['max']:.2f}]"
        return f"{v['median']:,.0f}"

    columns = ("ours", "llama.cpp", "ours_over_llama.cpp", "numpy", "ours_over_numpy")
    heads = ("ours tok/s", "llama.cpp", "ours/llama.cpp", "numpy", "ours/numpy")
    print(f"{'':28}" + "".join(f"{h:>22}" for h in heads))
    for row in results:
        print(f"{row['metric']:28}" + "".join(f"{cell(row, c):>22}" for c in columns), flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
