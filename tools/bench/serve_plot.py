"""PNG charts of `llmos bench serve` (`--plot DIR`), drawn from its JSON report:
latency distributions per priority class, throughput per policy, KV use over time.
matplotlib (the `bench` and `dev` extras) is imported only here, with the Agg backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PANELS = (("ttft_s", "stream_ttft_s", "time to first token (ms)", 1000.0),
          ("per_token_s", "stream_per_token_s", "time per output token (ms)", 1000.0),
          ("e2e_s", "e2e_s", "end-to-end latency (s)", 1.0))


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def require() -> Any:
    """matplotlib.pyplot on the Agg backend, or PlotUnavailable saying how to get it."""
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib: pip install 'llmos[bench]' (or matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _records(policy: dict[str, Any]) -> list[dict[str, Any]]:
    table = policy["records"]
    return [dict(zip(table["fields"], row, strict=True)) for row in table["rows"]]


def latency_by_class(plt: Any, report: dict[str, Any], path: Path) -> None:
    policies = report["policies"]
    fig, axes = plt.subplots(len(policies), len(PANELS), figsize=(5 * len(PANELS), 3.2 * len(policies)),
                             squeeze=False)
    for row, (name, policy) in zip(axes, policies.items(), strict=True):
        records = _records(policy)
        classes = sorted({r["priority"] for r in records})
        for ax, (field, fallback, label, scale) in zip(row, PANELS, strict=True):
            for cls in classes:
                values = sorted(
                    (r[field] if r[field] is not None else r[fallback]) * scale for r in records
                    if r["priority"] == cls and (r[field] is not None or r[fallback] is not None))
                if values:
                    ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post",
                            label=f"class {cls} ({len(values)})")
            ax.set_xlabel(label)
            ax.set_ylabel("share of requests")
            ax.set_title(f"{name}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
    fig.suptitle("Latency per priority class (cumulative distributions)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def throughput(plt: Any, report: dict[str, Any], path: Path) -> None:
    names = ["in-process"] + (["naive"] if report["naive"] else []) + list(report["policies"])
    values = [report["in_process"]["tokens_per_s"]] + ([report["naive"]["tokens_per_s"]] if report["naive"] else [])
    values += [p["tokens_per_s"] for p in report["policies"].values()]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4))
    bars = ax.bar(names, values, color=["#888888"] * (len(names) - len(report["policies"]))
                  + ["#3b75af"] * len(report["policies"]))
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize="small")
    ax.set_ylabel("generated tokens/s")
    ax.set_title(f"Throughput, {report['config']['workers']} workers, same workload")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def kv_use(plt: Any, report: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, policy in report["policies"].items():
        timeline = policy["kv_timeline"]
        ax.plot([x["t_s"] for x in timeline], [100 * x["kv_share"] for x in timeline], marker=".", label=name)
    ax.set_xlabel("seconds since the start of the run")
    ax.set_ylabel("KV blocks held (% of the pool)")
    ax.set_title("KV use over time")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(report: dict[str, Any], directory: str) -> list[Path]:
    """Write the three charts into `directory` (made if missing); returns their paths."""
    plt = require()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "latency_by_class.png", out / "throughput.png", out / "kv_use.png"]
    for draw, path in zip((latency_by_class, throughput, kv_use), paths, strict=True):
        draw(plt, report, path)
    return paths
