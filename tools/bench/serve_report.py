"""The terminal output of `llmos bench serve`, made from its JSON report (one source of
truth: every figure printed is in the JSON under the same name): a `vllm bench serve`
summary per policy (or for the --base-url server), the detailed tables with --verbose.
Pure text."""

from __future__ import annotations

from typing import Any

from llmos.bench.report import table
from llmos.bench.serve_summary import render_summary

GOAL_IN_PROCESS = 0.85  # aggregate throughput at least this share of in-process batched
GOAL_OUTSIDE_CPU = 0.15  # CPU outside the runners at most this share of the runners'


def _ms(summary: dict[str, float] | None, scale: float = 1000.0, digits: int = 1) -> str:
    if not summary:
        return "-"
    return f"{summary['p50'] * scale:.{digits}f} / {summary['p99'] * scale:.{digits}f}"


def _ratio(r: dict[str, float] | None) -> str:
    if not r:
        return "-"
    if r["low"] == r["high"]:
        return f"{r['median']:.3f}x"
    return f"{r['median']:.3f}x [{r['low']:.3f}-{r['high']:.3f}]"


def _share(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def throughput_table(report: dict[str, Any]) -> str:
    workers = report["config"]["workers"]
    ip, naive = report["in_process"], report["naive"]
    rows = [[f"in-process, batch {workers}", f"{ip['requests_per_s']:,.1f}", f"{ip['tokens_per_s']:,.0f}", "1x",
             _ratio(ip.get("tokens_per_s_over_naive")), "-"]]
    if naive:
        rows.append([f"naive server ({naive['requests']} requests)", f"{naive['requests_per_s']:,.1f}",
                     f"{naive['tokens_per_s']:,.0f}", _ratio(naive["tokens_per_s_over_in_process"]), "1x",
                     _share(naive["outputs_match_in_process"])])
    for name, p in report["policies"].items():
        rows.append([f"llmos {name}", f"{p['requests_per_s']:,.1f}", f"{p['tokens_per_s']:,.0f}",
                     _ratio(p["tokens_per_s_over_in_process"]), _ratio(p.get("tokens_per_s_over_naive")),
                     _share(p["outputs_match_in_process"])])
    return table(["configuration", "req/s", "gen tok/s (Q)", "vs in-process", "vs naive",
                  "same tokens as in-process"], rows)


def latency_table(report: dict[str, Any]) -> str:
    stream = report["config"]["stream"]
    headers = ["policy", "class", "requests", "TTFT ms p50/p99", "TPOT ms p50/p99", "E2E s p50/p99",
               "T_s steps p50/p99", "T_s ms p50/p99"]
    if stream:
        headers[3:3] = ["stream TTFT ms", "stream TPOT ms"]
    if report["config"]["open_loop"]:
        headers.append("late ms p50/p99")
    rows = []
    for name, p in report["policies"].items():
        for cls, lat in p["latency"].items():
            t_s = p["T_s"] if cls == "all" else p["T_s"]["by_priority"].get(cls)
            steps = f"{t_s['p50_steps']} / {t_s['p99_steps']}" if t_s else "-"
            t_ms = f"{t_s['p50_s'] * 1000:.1f} / {t_s['p99_s'] * 1000:.1f}" if t_s and t_s["p50_s"] is not None else "-"
            row = [name, cls, lat["requests"], _ms(lat["ttft_s"]), _ms(lat["per_token_s"], digits=3),
                   _ms(lat["e2e_s"], 1.0, 2), steps, t_ms]
            if stream:
                row[3:3] = [_ms(lat["stream_ttft_s"]), _ms(lat["stream_per_token_s"], digits=3)]
            if report["config"]["open_loop"]:
                row.append(_ms(lat["late_s"]))
            rows.append(row)
    naive = report["naive"]
    if naive:
        for cls, lat in naive["latency"].items():
            row = ["naive", cls, lat["requests"], _ms(lat["ttft_s"]), _ms(lat["per_token_s"], digits=3),
                   _ms(lat["e2e_s"], 1.0, 2), "-", _ms(lat["queue_s"])]
            if stream:
                row[3:3] = ["-", "-"]
            if report["config"]["open_loop"]:
                row.append(_ms(lat["late_s"]))
            rows.append(row)
    return table(headers, rows)


def system_table(report: dict[str, Any]) -> str:
    rows = []
    for name, p in report["policies"].items():
        rows.append([name, f"{p['Q']['requests_per_s']:,.1f}", f"{p['Q']['tokens_per_s']:,.0f}",
                     _share(p["U"]["runners"]), f"{_share(p['U']['kv_mean'])} / {_share(p['U']['kv_peak'])}",
                     _share(p["F"]["paged"]), _share(p["F"]["segments"]), _share(p["H"]["hit_rate"]),
                     f"{p['L_s']['p50_us']:.1f} / {p['L_s']['p99_us']:.0f}", f"{p['L_r']:.3g}",
                     f"{p['B']['messages_per_s']:,.0f}", f"{p['B']['bytes_per_s'] / 1e6:.2f}",
                     p["preemptions"]])
    return table(["policy", "Q req/s", "Q tok/s", "U runners", "U KV mean/peak", "F paged", "F segments", "H",
                  "L_s us p50/p99", "L_r", "B msg/s", "B MB/s", "preemptions"], rows)


def links_table(report: dict[str, Any]) -> str:
    rows = []
    for name, p in report["policies"].items():
        for link, b in p["B"]["by_link"].items():
            lat = p["L_s"]["by_link"][link]
            rows.append([name, link, b["rings"], f"{b['messages_per_s']:,.0f}", f"{b['bytes_per_s'] / 1e6:.3f}",
                         f"{lat['p50_us']:.1f} / {lat['p99_us']:.0f}"])
    return table(["policy", "link", "rings", "B msg/s", "B MB/s", "L_s us p50/p99"], rows)


def cpu_table(report: dict[str, Any]) -> str:
    names = sorted({k for p in report["policies"].values() for k in p["cpu"]["by_process_s"]
                    if not k.startswith("runner.")})
    rows = []
    for name, p in report["policies"].items():
        c = p["cpu"]
        o = p["outside_over_runners"]
        spread = f" [{o['low']:.1%}-{o['high']:.1%}]" if o["low"] != o["high"] else ""
        rows.append([name, f"{c['runners_s']:.2f}", f"{c['outside_runners_s']:.2f}",
                     _share(o["median"]) + spread, f"{c['outside_us_per_token']:.1f}",
                     *(f"{c['by_process_s'].get(n, 0.0):.2f}" for n in names), f"{c['clients_us_per_token']:.1f}"])
    return table(["policy", "runners cpu-s", "outside cpu-s", "outside/runners", "outside us/tok",
                  *(f"{n} cpu-s" for n in names), "clients (libllm) us/tok"], rows)


def goals(report: dict[str, Any]) -> str:
    lines = []
    for name, g in report["goals"].items():
        lines.append(
            f"{name}: throughput {g['tokens_per_s_over_in_process']:.3f}x in-process (goal >= {GOAL_IN_PROCESS}: "
            f"{'met' if g['in_process_met'] else 'NOT met'}); CPU outside the runners "
            f"{g['outside_over_runners']:.1%} of the runners' (goal <= {GOAL_OUTSIDE_CPU:.0%}: "
            f"{'met' if g['outside_cpu_met'] else 'NOT met'})"
            + (f"; {g['tokens_per_s_over_naive']:.3f}x the naive server" if g["tokens_per_s_over_naive"] else ""))
    return "\n".join(lines)


def _head(report: dict[str, Any], over: str) -> str:
    c, w = report["config"], report["workload"]
    mode = f"open loop at {c['rate']:g} req/s" if c["open_loop"] else "closed loop"
    return (f"llmos bench serve: {w['requests']} requests, {mode}, {c['workers']} workers {over}, seed {c['seed']}\n"
            f"workload: prompts {c['prompt_len']} ({w['prompt_tokens'] / w['requests']:.0f} tokens on average), "
            f"outputs {c['output_len']} (max_tokens {w['max_output_tokens'] / w['requests']:.0f} on average), "
            f"classes {c['priorities']}, shared prefix {w['shared_prefix_requests']} requests, "
            f"temperature {c['temperature']:g}")


def summaries(report: dict[str, Any]) -> str:
    c = report["config"]
    blocks = [f"llmos {name}\n{render_summary(p['summary'])}" for name, p in report["policies"].items()]
    if not c["stream"]:
        blocks.append("note: not streamed, so TTFT and TPOT are the server's timings"
                      + (" (none over HTTP)" if c["http"] else "") + " and ITL is not measured (--stream)")
    return "\n\n".join(blocks)


def render(report: dict[str, Any], verbose: bool = False) -> str:
    c = report["config"]
    over = (f"over {'HTTP' if c['http'] else 'libllm'}, {'streaming' if c['stream'] else 'non-streaming'}, "
            f"{c['runners']} runner(s), {c['reps']} repetition(s)")
    parts = [_head(report, over)]
    if verbose:
        parts += ["Throughput (generated tokens/s; ratios per repetition: median [range])",
                  throughput_table(report),
                  "Latency per policy and priority class (server timings; T_s: scheduling delay; "
                  "the last repetition)",
                  latency_table(report), "The seed's metrics per policy (the last repetition)", system_table(report),
                  "Rings per link (B over the run; L_s: log2-histogram bounds)", links_table(report),
                  "CPU over the run (outside = every instance process but the runners: the operating system's "
                  "cost; outside/runners: median [range] over the repetitions, the rest: the last one)",
                  cpu_table(report)]
    parts += [summaries(report), "Goals", goals(report)]
    notes = []
    if c["open_loop"]:
        notes.append("open loop: throughput follows --rate, while the baselines run flat out")
    if c["http"]:
        notes.append("over HTTP: non-streaming answers carry no server timings")
    if not verbose:
        notes.append("--verbose for latency per class, the seed's metrics, rings and CPU")
    parts.append("\n".join(f"note: {n}" for n in notes))
    return "\n\n".join(parts)


def render_external(report: dict[str, Any]) -> str:
    """A --base-url run: what was sent where, and the summary."""
    c = report["config"]
    counted = report["output_tokens_from"]
    how = ("the server's usage" if set(counted) == {"usage"} else
           "streamed chunks with text (the server sent no usage)" if set(counted) == {"chunks"} else
           f"usage for {counted.get('usage', 0)} requests, chunks for {counted.get('chunks', 0)}")
    head = _head(report, f"to {c['base_url']} (model {c['model']}), streaming /v1/completions")
    notes = ["priority classes are not sent (OpenAI's API has none)"]
    if counted:
        notes.append(f"output tokens counted from {how}")
    return "\n\n".join([head, render_summary(report["summary"]), "\n".join(f"note: {n}" for n in notes)])
