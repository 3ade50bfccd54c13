"""The pure half of `llmos top`: two samples of an instance in, the rows to show out, as
plain text (for a pipe) or as rich tables (for the live view). No I/O, no clock: the
samples carry their own monotonic timestamps, so rates are deltas over the time between
them (a first frame with no earlier sample shows rates as "-").

A sample holds what `libllm.Session.stats()` returns ("kernel", "scheduler", "memory"; any
of them None when that server did not answer) and the `processes` list of `llmos status
--json`.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table as RichTable
from rich.text import Text

NONE = "-"


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # time.monotonic() when taken
    instance: str
    processes: list[dict[str, Any]]  # tools.lifecycle.status_report()["processes"]
    kernel: dict[str, Any] | None = None  # KernelStats as builtins
    scheduler: dict[str, Any] | None = None  # SCHED_STATS reply
    memory: dict[str, Any] | None = None  # MemoryStatsReply as builtins
    notes: tuple[str, ...] = ()  # what could not be read, said plainly


@dataclass(frozen=True, slots=True)
class Table:
    title: str
    columns: tuple[str, ...]  # a name starting with ">" is right-aligned (the ">" not shown)
    rows: list[tuple[str, ...]]
    empty: str = ""  # shown when there are no rows
    drop: tuple[str, ...] = ()  # columns left out, first to last, where the screen is too narrow

    def fitted(self, width: int | None) -> Table:
        """This table without the columns it drops first until its text is `width` wide."""
        table = self
        for name in (*self.drop, None):
            if width is None or table.text_width() <= width or name is None:
                return table
            keep = [i for i, c in enumerate(table.columns) if c.lstrip(">") != name]
            table = Table(table.title, tuple(table.columns[i] for i in keep),
                          [tuple(row[i] for i in keep) for row in table.rows], table.empty, table.drop)
        return table

    def text_width(self) -> int:
        names = [c.lstrip(">") for c in self.columns]
        return sum(max([len(n), *(len(row[i]) for row in self.rows)]) for i, n in enumerate(names)) + 2 * (
            len(names) - 1)


# The seed's symbols, said once at the bottom of every frame.
LEGEND = ("T_s: steps a request waited before its first step; H: share of prompt tokens found in "
          "the prefix cache; F: share of KV (or segment) space allocated but unused; L_s: a "
          "message's time on its ring; L_r: share of messages lost (must be 0)")


@dataclass(frozen=True, slots=True)
class View:
    title: str
    lines: list[str]  # the one-line figures: batch, tokens/s, KV, H, F, arena
    tables: list[Table] = field(default_factory=list)  # processes, queues, rings


# -- numbers ------------------------------------------------------------------------------


def rate(cur: float, prev: float | None, dt: float) -> float | None:
    """Per second between two readings of a counter; None without an earlier reading, with
    no time between them, or when the counter went back (its process restarted)."""
    if prev is None or dt <= 0 or cur < prev:
        return None
    return (cur - prev) / dt


def fmt_rate(value: float | None, unit: str = "") -> str:
    return NONE if value is None else f"{human(value)}{unit}"


def human(value: float) -> str:
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.1f}{suffix}"
    return f"{value:.1f}" if abs(value) < 10 and value % 1 else f"{value:.0f}"


def pct(value: float | None) -> str:
    return NONE if value is None else f"{100 * value:.1f}%"


def ns(value: int, count: int) -> str:
    if not count:
        return NONE
    return f"{value / 1e3:.1f}us" if value < 10**6 else f"{value / 1e6:.1f}ms"


# -- the view -----------------------------------------------------------------------------


def build_view(prev: Sample | None, cur: Sample, *, self_pid: int = 0) -> View:
    """What `top` shows for `cur`, with rates over the time since `prev` (None: no rates).
    `self_pid` marks top's own connection in the ring labels."""
    dt = cur.at - prev.at if prev is not None else 0.0
    span = f"rates over {dt:.2f} s" if prev is not None else "rates after the next refresh"
    kernel = cur.kernel
    up = f", kernel up {kernel['uptime_s']:.0f} s" if kernel else ""
    view = View(f"llmos top: instance {cur.instance!r}{up}; {span}", [])
    view.tables.append(_processes(prev, cur, dt))
    view.lines.extend(_scheduler_lines(prev.scheduler if prev else None, cur.scheduler, dt))
    view.lines.extend(_memory_lines(cur.memory, cur.scheduler))
    if kernel:
        view.lines.append(
            f"rings region {kernel['rings_bytes_used'] / 2**20:.2f} of {kernel['rings_bytes_total'] / 2**20:.1f} "
            f"MiB used; {len(kernel['rings'])} rings, {len(kernel['endpoints'])} endpoints")
    view.lines.extend(f"note: {note}" for note in cur.notes)
    view.tables.append(_queues(cur.scheduler))
    view.tables.append(_rings(prev.kernel if prev else None, kernel, dt, self_pid))
    return view


def _processes(prev: Sample | None, cur: Sample, dt: float) -> Table:
    before = {(p["name"], p["pid"]): p for p in prev.processes} if prev else {}
    registered = {e["name"] for e in cur.kernel["endpoints"]} if cur.kernel else set()
    rows: list[tuple[str, ...]] = []
    for p in cur.processes:
        old = before.get((p["name"], p["pid"]))
        cpu = rate(p["cpu_s"], old["cpu_s"] if old else None, dt)
        if not p["alive"]:
            state = "down"
        elif p["name"] == "kernel" or p["name"] in registered or cur.kernel is None:
            state = "up"
        else:
            state = "starting"
        rows.append((p["name"], str(p["pid"] or NONE), pct(cpu), str(p["restarts"]), state,
                     f"{p['uptime_s']:.0f}"))
    return Table("processes", ("name", ">pid", ">cpu", ">restarts", "state", ">uptime s"), rows,
                 "(no processes: is the supervisor up?)")


def _scheduler_lines(prev: dict[str, Any] | None, s: dict[str, Any] | None, dt: float) -> list[str]:
    if s is None:
        return ["scheduler: no answer"]

    def per_s(key: str) -> float | None:
        return rate(s[key], prev[key] if prev else None, dt)

    steps = per_s("num_steps")
    computed = per_s("num_computed_tokens")
    per_step = computed / steps if computed is not None and steps else None
    busy = per_s("runner_busy_s")
    util = busy / s["num_runners"] if busy is not None and s["num_runners"] else None
    return [
        f"batch: {s['num_running']} running sequences, {s['num_waiting']} waiting "
        f"({s['num_waiting_with_kv']} holding KV); {s['num_steps_in_flight']} steps in flight on "
        f"{s['num_runners']} runners; {fmt_rate(per_step)} tokens/step",
        f"throughput: {fmt_rate(per_s('num_generated_tokens'))} tokens/s generated, "
        f"{fmt_rate(computed)} computed/s, {fmt_rate(per_s('num_finished'))} requests/s, "
        f"runners busy {pct(util)}; {s['num_finished']} finished, {s['num_preemptions']} preemptions",
        f"T_s (steps): p50 {s['delay_p50_steps']}, p99 {s['delay_p99_steps']}, max {s['max_delay_steps']}",
    ]


def _memory_lines(m: dict[str, Any] | None, s: dict[str, Any] | None) -> list[str]:
    if m is None:
        return ["KV: the memory server did not answer"]
    lease = (f"; {s['num_free_blocks']} idle in the scheduler's lease, {s['num_cached_blocks']} of them "
             f"cached prefixes" if s else "")
    # H and paged F are the scheduler's: its cache is the prefix cache, and it knows how full
    # the blocks its sequences hold are.
    hit, paged = (s["prefix_hit_rate"], s["paged_fragmentation"]) if s else (None, None)
    evictions = f"; {s['num_prefix_evictions']} evictions" if s else ""
    return [
        f"KV blocks: used {m['num_used_blocks']}, lent to the scheduler {m['num_leased_blocks']}, "
        f"free {m['num_free_blocks']} of {m['num_blocks']}{lease}",
        f"H (prefix hit rate) {pct(hit)}; F paged {pct(paged)}, "
        f"segments {pct(m['external_fragmentation'])} ({m['segment_bytes_used'] / 2**20:.1f} of "
        f"{m['segment_bytes_total'] / 2**20:.1f} MiB used){evictions}",
    ]


def _queues(s: dict[str, Any] | None) -> Table:
    rows: list[tuple[str, ...]] = []
    if s is not None:
        for kind, key in (("priority", "priority"), ("client", "client")):
            waiting, running = s[f"num_waiting_by_{key}"], s[f"num_running_by_{key}"]
            for k in sorted({*waiting, *running}, key=str):
                label = str(k) if str(k) else "(none)"
                rows.append((f"{kind} {label}", str(waiting.get(k, 0)), str(running.get(k, 0))))
    return Table("queues", ("queue", ">waiting", ">running"), rows, "(nothing waiting or running)")


def endpoint_labels(kernel: dict[str, Any], self_pid: int = 0) -> dict[int, str]:
    """endpoint id -> its registered name, "top" for this process, else "pid N"."""
    return {e["endpoint_id"]: e["name"] or ("top" if e["pid"] == self_pid else f"pid {e['pid']}")
            for e in kernel["endpoints"]}


def _rings(prev: dict[str, Any] | None, kernel: dict[str, Any] | None, dt: float, self_pid: int) -> Table:
    rows: list[tuple[str, ...]] = []
    if kernel is not None:
        labels = endpoint_labels(kernel, self_pid)
        before = {(r["channel_id"], r["direction"]): r for r in prev["rings"]} if prev else {}
        for r in sorted(kernel["rings"], key=lambda r: (r["channel_id"], r["direction"] != "request")):
            client, server = labels.get(r["client_id"], "?"), labels.get(r["server_id"], "?")
            flow = f"{client} -> {server}" if r["direction"] == "request" else f"{server} -> {client}"
            old = before.get((r["channel_id"], r["direction"]))
            msgs = rate(r["sent_records"], old["sent_records"] if old else None, dt)
            nbytes = rate(r["sent_bytes"], old["sent_bytes"] if old else None, dt)
            expected = r["latency_count"] + r["seq_gaps"]
            rows.append((str(r["channel_id"]), r["direction"], flow, pct(r["used_bytes"] / r["capacity"]),
                         fmt_rate(msgs), fmt_rate(nbytes, "B"), ns(r["latency_p50_ns"], r["latency_count"]),
                         ns(r["latency_p99_ns"], r["latency_count"]),
                         pct(r["seq_gaps"] / expected if expected else None)))
    return Table("rings", (">ch", "dir", "flow", ">fill", ">msg/s", ">bytes/s", ">L_s p50", ">L_s p99", ">L_r"),
                 rows, "(no kernel stats)", drop=("L_s p99", "bytes/s", "dir", "ch", "L_r"))


# -- rendering ----------------------------------------------------------------------------


def render_text(view: View, width: int | None = None) -> str:
    """The view as plain aligned text, for a pipe; with `width`, lines wrap to it and tables
    drop their least needed columns to fit it."""
    def wrapped(line: str) -> list[str]:
        return textwrap.wrap(line, width, subsequent_indent="  ") if width else [line]

    out = [line for text in (view.title, *view.lines) for line in wrapped(text)]
    for table in (t.fitted(width) for t in view.tables):
        out.append("")
        out.append(table.title.upper())
        names = tuple(c.lstrip(">") for c in table.columns)
        widths = [max([len(n), *(len(row[i]) for row in table.rows)]) for i, n in enumerate(names)]
        right = [c.startswith(">") for c in table.columns]
        out.extend(_aligned(row, widths, right) for row in (names, *table.rows))
        if not table.rows:
            out.append(f"  {table.empty}")
    out.extend(["", *wrapped(LEGEND)])
    return "\n".join(out) + "\n"


def _aligned(cells: tuple[str, ...], widths: list[int], right: list[bool]) -> str:
    return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)).rstrip()


def render_rich(view: View, max_rows: int | None = None, width: int | None = None) -> RenderableType:
    """The view as rich tables, for the live screen; the last table (rings) keeps at most
    `max_rows` rows (the busiest first) so the frame fits the terminal, and tables drop
    their least needed columns to fit `width`."""
    parts: list[RenderableType] = [Text(view.title, style="bold"), *(Text(line) for line in view.lines)]
    for i, table in enumerate(t.fitted(width) for t in view.tables):
        rows = table.rows
        caption = None
        if max_rows is not None and i == len(view.tables) - 1 and len(rows) > max_rows:
            rows = sorted(rows, key=lambda row: -_busy(row[4]))[:max(max_rows, 1)]
            caption = f"{len(table.rows) - len(rows)} quieter rings not shown"
        rich_table = RichTable(title=table.title, title_justify="left", caption=caption, expand=False,
                               show_edge=False, pad_edge=False, box=None, header_style="bold")
        for column in table.columns:
            rich_table.add_column(column.lstrip(">"), justify="right" if column.startswith(">") else "left")
        for row in rows:
            rich_table.add_row(*row)
        if not rows:
            rich_table.add_row(table.empty, *([""] * (len(table.columns) - 1)))
        parts.append(rich_table)
    parts.append(Text(LEGEND, style="dim"))
    parts.append(Text("q or Ctrl-C quits", style="dim"))
    return Group(*parts)


def _busy(cell: str) -> float:
    """A human() figure read back, for sorting (\"-\" is 0)."""
    scale = {"k": 1e3, "M": 1e6, "G": 1e9}
    if cell == NONE:
        return 0.0
    if cell[-1] in scale:
        return float(cell[:-1]) * scale[cell[-1]]
    return float(cell)

