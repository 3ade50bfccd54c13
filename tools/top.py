"""`llmos top`: a live view of a running instance, refreshed every `interval` seconds; `q` or
Ctrl-C quits. Runs in the user's shell; what it shows is built by tools/top_view.py.

Over a pipe (stdout not a terminal) it prints one plain-text snapshot and exits: it takes
two samples `interval` apart, so the rates (tokens/s, CPU, ring messages/s and bytes/s)
are real figures, not "-".

It reads the instance the way `llmos status` and `libllm.Session.stats()` do (the
supervisor's state file for the processes; KERNEL_STATS, SCHED_STATS and MEM_STATS for
the rest) but over its own endpoint with plain channels, not a Session, so a server that
restarts shows as "no answer" for a refresh instead of ending the view.
"""

from __future__ import annotations

import os
import select
import sys
import termios
import time
import tty
from typing import Any

import msgspec
from rich.console import Console, RenderableType

from llmos.libllm import protocol as P
from llmos.lifecycle import status_report
from llmos.microkernel import instance as I
from llmos.microkernel.endpoint import Channel, Endpoint
from llmos.microkernel.errors import LlmosError
from llmos.microkernel.messages import MsgType
from llmos.top_view import Sample, View, build_view, render_rich, render_text

CALL_TIMEOUT_S = 5.0


class InstanceStopped(Exception):
    """The instance's supervisor is gone: there is nothing left to watch."""


class Collector:
    """Takes samples of one instance over one endpoint, reconnecting when the kernel or a
    server restarts."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.endpoint: Endpoint | None = None
        self.channels: dict[str, Channel] = {}

    def sample(self) -> Sample:
        report = status_report(self.instance)
        if not report["running"]:
            raise InstanceStopped(report.get("last_failure", "its supervisor is gone"))
        notes: list[str] = []
        kernel: dict[str, Any] | None = None
        scheduler: dict[str, Any] | None = None
        memory: dict[str, Any] | None = None
        try:
            if self.endpoint is None:
                self.endpoint = Endpoint.connect(self.instance, timeout=CALL_TIMEOUT_S)
            self.endpoint.poll_control()  # the kernel's events: drained, never needed
            if (reply := self._call("scheduler", MsgType.SCHED_STATS, notes)) is not None:
                scheduler = msgspec.msgpack.decode(reply)
            if (reply := self._call("memory", MsgType.MEM_STATS, notes)) is not None:
                memory = msgspec.to_builtins(P.unpack(reply, P.MemoryStatsReply))
            # Last, so the rings of our own channels are in every sample (and have rates).
            kernel = msgspec.to_builtins(self.endpoint.kernel_stats(CALL_TIMEOUT_S))
        except LlmosError as exc:  # the kernel went away: the supervisor restarts the instance
            notes.append(f"kernel: {exc}")
            self.close()
        return Sample(time.monotonic(), self.instance, report["processes"], kernel, scheduler, memory,
                      tuple(notes))

    def _call(self, server: str, type_: int, notes: list[str]) -> bytes | None:
        assert self.endpoint is not None
        try:
            channel = self.channels.get(server)
            if channel is None:
                channel = self.channels[server] = self.endpoint.open_channel(server, timeout=CALL_TIMEOUT_S)
            return channel.call(type_, b"", timeout=CALL_TIMEOUT_S).payload
        except LlmosError as exc:  # not (yet) registered, restarting, busy, or an error reply
            notes.append(f"{server}: {exc}")
            channel = self.channels.pop(server, None)
            if channel is not None:
                self.endpoint.drop_channel(channel.channel_id)
            return None

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()
        self.endpoint = None
        self.channels.clear()


def main(instance: str | None, interval: float) -> int:
    name = I.instance_name(instance)
    if not interval > 0:
        print("llmos top: --interval must be a positive number of seconds", file=sys.stderr)
        return 2
    if not status_report(name)["running"]:
        print(f"llmos top: instance {name!r} is not running; start it with `llmos up --instance {name}`",
              file=sys.stderr)
        return 1
    collector = Collector(name)
    try:
        if not sys.stdout.isatty():
            first = collector.sample()
            time.sleep(interval)
            sys.stdout.write(render_text(build_view(first, collector.sample(), self_pid=os.getpid())))
            return 0
        return _live(collector, interval)
    except InstanceStopped as exc:
        print(f"llmos top: instance {name!r} stopped: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        collector.close()


def _live(collector: Collector, interval: float) -> int:
    """Redraw every `interval` s until `q` (read in cbreak mode when stdin is a terminal)
    or Ctrl-C; the terminal's mode and screen are restored however it ends."""
    from rich.live import Live

    stdin = sys.stdin.fileno() if sys.stdin.isatty() else None
    saved: list[Any] | None = None
    if stdin is not None:
        saved = termios.tcgetattr(stdin)
        tty.setcbreak(stdin)
    console = Console()
    prev: Sample | None = None
    try:
        with Live(console=console, screen=True, auto_refresh=False, transient=True) as live:
            while True:
                deadline = time.monotonic() + interval
                cur = collector.sample()
                view = build_view(prev, cur, self_pid=os.getpid())
                live.update(_fit(console, view), refresh=True)
                prev = cur
                if _wait_for_q(stdin, deadline):
                    return 0
    finally:
        if stdin is not None and saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)


def _fit(console: Console, view: View) -> RenderableType:
    """The frame, with as many ring rows (the busiest) as the terminal has lines for."""
    def height(frame: RenderableType) -> int:
        return len(console.render_lines(frame, console.options.update(height=None), pad=False))

    frame = render_rich(view, width=console.width)
    if height(frame) <= console.height:
        return frame
    room = console.height - (height(render_rich(view, max_rows=1, width=console.width)) - 1)
    return render_rich(view, max_rows=max(room, 1), width=console.width)


def _wait_for_q(stdin: int | None, deadline: float) -> bool:
    """Wait until `deadline`; True as soon as `q` is typed."""
    while (left := deadline - time.monotonic()) > 0:
        if stdin is None:
            time.sleep(left)
            return False
        ready, _, _ = select.select([stdin], [], [], left)
        if ready:
            keys = os.read(stdin, 64)
            if not keys or keys.lower().count(b"q"):
                return True  # q, or end of input: nobody can type q any more
    return False
