"""`llmos up`, `llmos down` and `llmos status`: thin commands over the supervisor and the
instance's state file. Run in the user's shell."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from llmos import supervisor
from llmos.cleanup import (
    clean_instance,
    failure_path,
    is_same_process,
    lock_path,
    read_state,
    supervisor_alive,
)
from llmos.config import Config, ConfigError, load_config
from llmos.microkernel import instance as I
from llmos.microkernel.endpoint import Endpoint
from llmos.microkernel.errors import LlmosError
from llmos.microkernel.server_key import ENV as SERVER_KEY_ENV
from llmos.microkernel.server_key import hand_key
from llmos.start_progress import StartProgress, parse_forwarded

DOWN_TIMEOUT_S = 60.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def up(instance: str | None, config_path: str | None, detach: bool) -> int:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"llmos: {exc}", file=sys.stderr)
        return 2
    return start(config, instance, detach, ["--config", config_path] if config_path else [])


def start(config: Config, instance: str | None, detach: bool, config_argv: list[str],
          owner_pid: int | None = None, key: str = "") -> int:
    """Bring an instance up with `config` (the detached supervisor reads it again from
    `config_argv`; with `owner_pid`, it stops when that process ends; with `key`, the
    supervisor uses it for the reserved names, so the caller may register one: server_key.py).
    Everything that can be checked before a process starts is, and a failure is one line
    with its cause and exit status 2."""
    name = I.instance_name(instance)
    try:
        check_before_start(config)
    except (ConfigError, ValueError, OSError) as exc:
        # Refused before anything starts: nothing to clean up.
        print(f"llmos: {exc}", file=sys.stderr)
        return 2
    if not detach:
        return supervisor.run(config, name, foreground=True)
    argv = [*supervisor.PYTHON, "-m", "llmos.supervisor", "--instance", name, *config_argv]
    if owner_pid is not None:
        argv += ["--owner-pid", str(owner_pid)]
    # We wait for the supervisor's ready (or error) line. Once up, it logs to supervisor.log
    # with the others' logs; until then its stderr comes to us, to show if it fails.
    env = {k: v for k, v in os.environ.items() if k != SERVER_KEY_ENV}  # ours, not one we were handed
    if key:
        env[SERVER_KEY_ENV] = "1"
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.PIPE if key else subprocess.DEVNULL, text=True, start_new_session=True,
                            env=env)
    assert proc.stdout is not None and proc.stderr is not None
    if proc.stdin is not None:
        hand_key(proc.stdin, key)  # (if it died at once, its error line comes below)
    with StartProgress() as bars:
        while (progress := parse_forwarded(line := proc.stdout.readline())) is not None:
            bars.update(*progress)
    proc.stdout.close()
    if line.startswith("llmos up:"):
        proc.stderr.close()
        print(line.rstrip())
        return 0
    errors = proc.stderr.read()
    proc.stderr.close()
    proc.wait()
    print(line.strip() or errors.strip() or f"llmos: the supervisor exited with code {proc.returncode}",
          file=sys.stderr)
    return 1


def check_before_start(config: Config) -> None:
    """The model can be served and the gateway's port is free (raises with the cause)."""
    from llmos.servers.runner.loaders import check_model

    check_model(config.model.model_path())
    if any(s.module == "llmos.servers.gateway" for s in config.server_specs()) and config.gateway.port:
        host, port = config.gateway.host, config.gateway.port
        try:
            with socket.create_server((host, port)):
                pass
        except OSError as exc:
            why = "the port is in use (another server? choose one with --port, or [gateway] port)" \
                if exc.errno == errno.EADDRINUSE else os.strerror(exc.errno or 0) if exc.errno else str(exc)
            raise ConfigError(f"cannot listen on {host}:{port}: {why}") from None


def down(instance: str | None, purge: bool = False) -> int:
    name = I.instance_name(instance)
    code = _stop(name)
    if purge:
        shutil.rmtree(I.log_dir(name), ignore_errors=True)
    elif I.log_dir(name).exists():
        print(f"its logs are kept in {I.log_dir(name)} (`llmos logs`; `llmos down --purge` removes them)")
    return code


def _stop(name: str) -> int:
    state = read_state(name)
    pid = state.get("supervisor_pid")
    if supervisor_alive(name) and isinstance(pid, int):
        os.kill(pid, 15)
        deadline = time.monotonic() + DOWN_TIMEOUT_S
        ticks = state.get("supervisor_start")
        while is_same_process(pid, ticks) and time.monotonic() < deadline:
            time.sleep(0.05)
        if is_same_process(pid, ticks):
            print(f"llmos: the supervisor (pid {pid}) did not stop in {DOWN_TIMEOUT_S:g} s; killing the instance",
                  file=sys.stderr)
        clean_instance(name)
        lock_path(name).unlink(missing_ok=True)
        print(f"instance {name!r} stopped")
        return 0
    lock_path(name).unlink(missing_ok=True)
    if clean_instance(name):
        print(f"instance {name!r} was not running; cleaned what it left behind")
    else:
        print(f"instance {name!r} is not running")
    return 0


def generate(ns: Any) -> int:
    """`llmos generate`: the prompt and its continuation on stdout."""
    from llmos import libllm

    try:
        with libllm.connect(ns.instance) as session:
            kwargs = dict(max_tokens=ns.max_tokens, temperature=ns.temperature, top_k=ns.top_k, top_p=ns.top_p,
                          seed=ns.seed, priority=ns.priority)
            sys.stdout.write(ns.prompt)
            if ns.stream:
                for piece in session.stream(ns.prompt, **kwargs):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            else:
                sys.stdout.write(session.generate(ns.prompt, **kwargs).text)
            sys.stdout.write("\n")
    except LlmosError as exc:
        print(f"llmos: {exc}", file=sys.stderr)
        return 1
    return 0


def logs(instance: str | None, process: str | None, follow: bool, lines: int) -> int:
    """`llmos logs [PROCESS]`: the last lines of one process's log, or of every log (each
    line names its process), from the running or the last run of the instance; `-f` goes on
    printing what is written until Ctrl-C."""
    name = I.instance_name(instance)
    directory = I.log_dir(name)
    files = sorted(directory.glob("*.log")) if directory.is_dir() else []
    if process is not None:
        files = [f for f in files if f.stem == process]
        if not files:
            known = ", ".join(f.stem for f in sorted(directory.glob("*.log"))) if directory.is_dir() else ""
            print(f"llmos: instance {name!r} has no log of {process!r}" + (f" (it has: {known})" if known else ""),
                  file=sys.stderr)
            return 2
    if not files:
        print(f"llmos: instance {name!r} has no logs in {directory}", file=sys.stderr)
        return 1
    offsets = {}
    for path in files:
        text = path.read_text(errors="replace")
        for line in text.splitlines()[-lines:] if lines else text.splitlines():
            print(line if len(files) == 1 else supervisor.named(path.stem, line))
        offsets[path] = len(text.encode())
    sys.stdout.flush()
    try:
        while follow:
            time.sleep(0.2)
            for path in files:
                with open(path, "rb") as f:
                    f.seek(offsets[path])
                    data = f.read()
                    offsets[path] = f.tell()
                for line in data.decode(errors="replace").splitlines():
                    print(line if len(files) == 1 else supervisor.named(path.stem, line))
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def status_report(instance: str | None) -> dict[str, Any]:
    name = I.instance_name(instance)
    state = read_state(name)
    running = supervisor_alive(name)
    now = time.time()
    processes = [
        {
            "name": p["name"],
            "pid": p["pid"],
            "alive": is_same_process(p["pid"], p.get("start")),
            "uptime_s": round(now - p["started_at"], 1) if p.get("started_at") else 0.0,
            "restarts": p["restarts"],
            "cpu_s": round(cpu_seconds(p["pid"]), 2) if p.get("pid") else 0.0,
        }
        for p in state.get("processes", [])
    ]
    report: dict[str, Any] = {"instance": name, "running": running, "supervisor_pid": state.get("supervisor_pid"),
                              "model": state.get("model"), "url": state.get("url"), "processes": processes}
    if failure_path(name).exists():
        report["last_failure"] = failure_path(name).read_text().strip()
    if running:
        try:
            with Endpoint.connect(name, timeout=5.0) as ep:
                stats = ep.kernel_stats(timeout=5.0)
            report["arena"] = {"size": stats.arena_size, "rings_bytes_used": stats.rings_bytes_used,
                               "rings_bytes_total": stats.rings_bytes_total}
            report["rings"] = [
                {"channel": r.channel_id, "direction": r.direction, "fill": round(r.used_bytes / r.capacity, 4),
                 "records": r.recv_records, "bytes": r.recv_bytes}
                for r in stats.rings
            ]
        except LlmosError as exc:
            report["kernel_error"] = str(exc)
    return report


def status(instance: str | None, as_json: bool) -> int:
    report = status_report(instance)
    if as_json:
        print(json.dumps(report, indent=2))
        return 0 if report["running"] else 1
    if not report["running"]:
        print(f"instance {report['instance']!r} is not running (`llmos up` starts it)")
        if "last_failure" in report:
            print(f"it stopped on its own: {report['last_failure']}")
        return 1
    serving = f"serving {report['model']} at {report['url']}, " if report.get("url") else ""
    print(f"instance {report['instance']!r}, {serving}supervisor pid {report['supervisor_pid']}")
    print(f"{'process':<16}{'pid':>8}{'uptime s':>10}{'restarts':>10}{'cpu s':>8}")
    for p in report["processes"]:
        print(f"{p['name']:<16}{p['pid'] or '-':>8}{p['uptime_s']:>10}{p['restarts']:>10}{p['cpu_s']:>8}")
    if "arena" in report:
        arena = report["arena"]
        print(f"arena {arena['size'] / 2**20:.1f} MiB; rings region {arena['rings_bytes_used'] / 2**20:.2f} of "
              f"{arena['rings_bytes_total'] / 2**20:.1f} MiB used; {len(report['rings'])} rings")
        for r in report["rings"]:
            print(f"  channel {r['channel']:>4} {r['direction']:<8} fill {r['fill']:.1%}  {r['records']} records")
    return 0
