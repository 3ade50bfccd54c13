"""The supervisor: starts the kernel, then the servers the config names; watches them;
restarts what dies (with backoff and a restart-intensity limit, as an OTP supervisor
does); kills what hangs; stops everything in order. Owns process lifetimes, nothing in
the arena. Run by `llmos up` (in the foreground, or detached as `python -m llmos.supervisor`).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import secrets
import select
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llmos.cleanup import (
    STATE_FILE,
    clean_instance,
    failure_path,
    is_same_process,
    lock_path,
    read_state,
    start_ticks,
)
from llmos.config import (
    Config,
    ServerSpec,
    resolved_block_bytes,
    resolved_pages,
    resolved_weights_bytes,
)
from llmos.microkernel import instance as I
from llmos.microkernel import layout as L
from llmos.microkernel.arena import free_shm_bytes
from llmos.microkernel.endpoint import Endpoint
from llmos.microkernel.errors import LlmosError, Timeout
from llmos.microkernel.kernel import parse_size
from llmos.microkernel.lifeline import ENV as SUPERVISOR_ENV
from llmos.microkernel.server_key import BUILTIN_NAMES, hand_key, server_key
from llmos.microkernel.server_key import ENV as SERVER_KEY_ENV
from llmos.servers.memory.tables import tables_size
from llmos.servers.settings import encode_settings
from llmos.servers.start_progress import parse_progress
from llmos.start_progress import StartProgress, forwarded_line

log = logging.getLogger("llmos.supervisor")
# How llmos starts its own processes: this interpreter. (Everything lives under `llmos`, so a
# checkout's folders in the current directory cannot shadow the installed package.)
PYTHON = [sys.executable]
TICK_S = 0.2
MAX_BACKOFF_S = 8.0


class InstanceFailed(RuntimeError):
    """The instance cannot be (kept) up; the message says why."""


@dataclass
class Child:
    name: str
    argv: list[str]
    ready_line: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    started_wall: float = 0.0
    restarts: int = 0
    crashes: deque[float] = field(default_factory=deque)
    restart_at: float | None = None  # when a crashed child is due to start again

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


class Supervisor:
    def __init__(self, config: Config, instance: str, *, foreground: bool) -> None:
        self.config = config
        self.instance = I.instance_name(instance)
        self.foreground = foreground
        self.run_dir = I.run_dir(self.instance)
        self.log_dir = I.log_dir(self.instance)
        self.children: list[Child] = []
        self.endpoint: Endpoint | None = None
        self._stopping = False
        self._log_offsets: dict[Path, int] = {}
        self.owns_instance = False  # set once we know no other supervisor runs it
        self._lock_fd = -1
        self._kernel_silent = 0  # stats calls in a row the kernel did not answer
        # Lets our children register the reserved names (server_key.py): the key whoever started
        # us handed on stdin (lifecycle.start(key=...)), else a new one.
        self.key = server_key() or secrets.token_hex(16)
        # (name, stage, done, total) of a starting process's progress lines; None: ignored.
        self.on_progress: Callable[[str, str, int, int], None] | None = None

    # -- start ----------------------------------------------------------------------------

    def check_resources(self) -> None:
        need = L.ARENA_HEADER_SIZE + sum(L.align_up(size, L.PAGE_SIZE) for size in self.region_sizes().values())
        free = free_shm_bytes()
        if need > free:
            raise InstanceFailed(
                f"the arena needs {need / 2**20:.1f} MiB but /dev/shm has only {free / 2**20:.1f} MiB free: "
                "free space there, enlarge it (mount -o remount,size=... /dev/shm) or lower `rings` or `memory.pages` "
                "in the config")

    def up(self) -> None:
        # One supervisor per instance: the lock is held for our whole life (the kernel
        # drops it if we die), so two `llmos up` can never both go on.
        I.runtime_base().mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_fd = os.open(lock_path(self.instance), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            state = read_state(self.instance)
            raise InstanceFailed(f"instance {self.instance!r} is already up (supervisor pid "
                                 f"{state.get('supervisor_pid', '?')}); `llmos down` stops it") from None
        self.owns_instance = True
        if clean_instance(self.instance):
            log.warning("cleaned what a crashed instance %r left behind", self.instance)
        self.check_resources()
        I.make_run_dir(self.instance)
        I.make_log_dir(self.instance)
        rotate_logs(self.log_dir)
        self.write_state()  # from now on `llmos status` and `down` know us
        if not self.foreground:
            # Detached: from here on our own log lives in the run dir with the others'.
            log_fd = os.open(self.log_dir / "supervisor.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.dup2(log_fd, 2)
            os.close(log_fd)
        self.children = [self._kernel_child()] + [self._server_child(s) for s in self.config.server_specs()]
        self._start_all()

    def has_memory_server(self) -> bool:
        return any(s.module in ("llmos.servers.memory", "llmos.servers.runner") for s in self.config.server_specs())

    def region_sizes(self) -> dict[str, int]:
        """The arena's regions: rings always; KV pages, their tables and segments when a
        memory server runs (sized from the config and the model's header)."""
        sizes = {"rings": self.config.rings_bytes}
        if self.has_memory_server():
            memory = self.config.memory
            model = self.config.model
            pages = resolved_pages(memory, model.model_path())
            segments = parse_size(memory.segments)
            sizes["tables"] = tables_size(pages, resolved_block_bytes(memory, model.model_path(), model.kv_bytes),
                                          segments)
            sizes["pages"] = pages
            sizes["segments"] = segments
        return sizes

    def _kernel_child(self) -> Child:
        regions = [f"--{name}={size}" for name, size in self.region_sizes().items()]
        # The names only our children may register: every configured server's and the built-in ones.
        reserved = sorted({*BUILTIN_NAMES, *(s.name for s in self.config.server_specs())})
        argv = ["-m", "llmos.microkernel.kernel", "--instance", self.instance, *regions, "--window", str(self.config.window),
                f"--reserved={','.join(reserved)}", f"--max-client-channels={self.config.max_client_channels}",
                f"--max-process-rings={self.config.max_process_rings}"]
        return Child("kernel", argv, "llmos kernel ready", self.log_dir / "kernel.log")

    def _server_child(self, spec: ServerSpec) -> Child:
        argv = ["-m", spec.module, "--instance", self.instance, "--name", spec.name, *self._builtin_args(spec),
                *spec.args]
        return Child(spec.name, argv, f"llmos {spec.name} ready", self.log_dir / f"{spec.name}.log")

    def _builtin_args(self, spec: ServerSpec) -> list[str]:
        """What the built-in servers need: their config section (resolved for the model and
        the machine, encoded once: servers/settings.py) and the instance's layout."""
        model, memory = self.config.model, self.config.memory
        if spec.module == "llmos.servers.memory":
            memory = replace(memory, block_bytes=resolved_block_bytes(memory, model.model_path(), model.kv_bytes),
                             weights_bytes=resolved_weights_bytes(memory, model.model_path()))
            return [f"--settings={encode_settings(memory)}"]
        if spec.module == "llmos.servers.scheduler":
            runners = [s.name for s in self.config.server_specs() if s.module == "llmos.servers.runner"]
            scheduler = self.config.scheduler
            scheduler = replace(scheduler, pipeline_depth=scheduler.depth_for(model.is_large()))
            return [f"--runners={','.join(runners)}", f"--quota-blocks={memory.quota_blocks}",
                    f"--settings={encode_settings(scheduler)}"]
        if spec.module == "llmos.servers.gateway":
            return [f"--settings={encode_settings(self.config.gateway)}"]
        if spec.module == "llmos.servers.runner":
            model = replace(model, threads=self.config.runner_threads())
            return [f"--block-tokens={memory.block_tokens}", f"--settings={encode_settings(model)}"]
        return []

    def _env(self) -> dict[str, str]:
        threads = str(self.config.blas_threads)
        return {
            **os.environ,
            "LLMOS_INSTANCE": self.instance,
            SUPERVISOR_ENV: str(os.getpid()),
            SERVER_KEY_ENV: "1",
            # BLAS threads per process, explicitly: parallelism comes from processes.
            "OMP_NUM_THREADS": threads,
            "OPENBLAS_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads,
        }

    def _start_all(self) -> None:
        for child in self.children:
            self._start_counted(child)
        self.endpoint = Endpoint.connect(self.instance)
        self.write_state()

    def _start_counted(self, child: Child) -> None:
        """Start a process; a start that fails is a crash like any other (it counts against
        max_restarts, with the same backoff), so a transient failure does not stop the
        instance and a lasting one stops it with the reason."""
        while True:
            try:
                self._start(child)
                return
            except InstanceFailed as exc:
                self._crashed(child, str(exc), restart_all=False)
                assert child.restart_at is not None
                time.sleep(max(0.0, child.restart_at - time.monotonic()))
                child.restarts += 1

    def _start(self, child: Child) -> None:
        """Start one process and wait for its ready line (an event, with a timeout)."""
        with open(child.log_path, "a") as log_file:
            proc = subprocess.Popen([*PYTHON, *child.argv], stdout=subprocess.PIPE, stderr=log_file,
                                    stdin=subprocess.PIPE, env=self._env(), start_new_session=True)
        assert proc.stdout is not None and proc.stdin is not None
        hand_key(proc.stdin, self.key)  # (if it died at once, the ready line will not come: we say why below)
        lines = LineReader(proc.stdout.fileno(), time.monotonic() + self.config.start_timeout_s)
        while (line := lines.readline()) and not line.startswith("llmos"):
            # Progress lines are shown; anything else a server prints before its ready line is not ours.
            if (progress := parse_progress(line)) is not None and self.on_progress is not None:
                self.on_progress(child.name, *progress)
        proc.stdout.close()
        if not line.startswith(child.ready_line):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            detail = line.strip() or _tail(child.log_path)
            raise InstanceFailed(f"{child.name} did not start: {detail}")
        child.proc = proc
        child.started = time.monotonic()
        child.started_wall = time.time()
        child.restart_at = None
        log.info("%s started (pid %d)", child.name, proc.pid)

    # -- watch ----------------------------------------------------------------------------

    def stop(self) -> None:
        self._stopping = True

    def monitor(self, owner: tuple[int, int | None] | None = None) -> None:
        """Watch the children until stopped; with `owner` (pid, start ticks), also until that
        process ends (a cluster node's actor: its instance does not outlive it)."""
        last_heartbeat_check = 0.0
        while not self._stopping:
            time.sleep(TICK_S)
            if owner is not None and not is_same_process(*owner):
                log.warning("the process that owns this instance (pid %d) is gone; stopping", owner[0])
                return
            self._echo_logs()
            now = time.monotonic()
            for child in self.children:
                if child.proc is not None and child.proc.poll() is not None:
                    self._crashed(child, f"exited with code {child.proc.returncode}")
                    if child.name == "kernel":
                        break
                elif child.proc is None and child.restart_at is not None and now >= child.restart_at:
                    self._restart(child)
            if now - last_heartbeat_check >= 1.0:
                last_heartbeat_check = now
                self._check_heartbeats()

    def _crashed(self, child: Child, why: str, *, restart_all: bool = True) -> None:
        now = time.monotonic()
        child.proc = None
        child.crashes.append(now)
        while child.crashes and now - child.crashes[0] > self.config.restart_window_s:
            child.crashes.popleft()
        if len(child.crashes) > self.config.max_restarts:
            if why.startswith(f"{child.name} did not start: "):
                raise InstanceFailed(why)  # its own words say more than the log's tail
            raise InstanceFailed(
                f"{child.name} crashed {len(child.crashes)} times within {self.config.restart_window_s:g} s "
                f"(limit {self.config.max_restarts}); stopping instance {self.instance!r}. "
                f"Last log lines:\n{_tail(child.log_path)}")
        delay = min(MAX_BACKOFF_S, self.config.restart_backoff_s * 2 ** (len(child.crashes) - 1))
        log.warning("%s %s; restarting in %.1f s", child.name, why, delay)
        if child.name == "kernel" and restart_all:
            # Every channel died with the kernel: restart the whole instance.
            self._stop_servers()
            for other in self.children:
                other.restart_at = None
        child.restart_at = now + delay

    def _restart(self, child: Child) -> None:
        child.restarts += 1
        if child.name == "kernel":
            if self.endpoint is not None:
                self.endpoint.close()
                self.endpoint = None
            self._start_counted(child)
            self.endpoint = Endpoint.connect(self.instance)
            for server in self.children[1:]:
                server.restarts += 1
                self._start_counted(server)
        else:
            try:
                self._start(child)
            except InstanceFailed as exc:
                self._crashed(child, str(exc))  # due again after its backoff, or the end
        self.write_state()

    def _check_heartbeats(self) -> None:
        if self.endpoint is None or self.children[0].proc is None:
            return
        kernel = self.children[0]
        try:
            stats = self.endpoint.kernel_stats(timeout=self.config.heartbeat_timeout_s)
        except Timeout:
            # The kernel is alive but does not answer: hung (or stopped). Like a hung server it
            # is killed; its exit then restarts the whole instance, as a dead kernel does.
            self._kernel_silent += 1
            if self._kernel_silent >= 2 and kernel.proc is not None:
                log.warning("kernel did not answer for %.0f s: killing it",
                            self._kernel_silent * self.config.heartbeat_timeout_s)
                kernel.proc.kill()
                kernel.proc.wait()
                self._kernel_silent = 0  # the restarted kernel starts with a clean record
            return
        except LlmosError as exc:
            log.warning("kernel stats failed: %s", exc)
            return
        self._kernel_silent = 0
        ages = {e.name: e.heartbeat_age_s for e in stats.endpoints if e.name}
        for child in self.children[1:]:
            age = ages.get(child.name)
            if child.proc is not None and age is not None and age > self.config.heartbeat_timeout_s:
                log.warning("%s missed heartbeats for %.1f s: killing it", child.name, age)
                child.proc.kill()
                child.proc.wait()

    # -- stop -------------------------------------------------------------------------------

    def _stop_servers(self) -> None:
        for child in reversed(self.children[1:]):
            _terminate(child)

    def shutdown(self) -> None:
        """Ordered stop: servers in reverse start order, then the kernel, then the run dir."""
        if not self.owns_instance:
            return  # another supervisor runs this instance: touch nothing
        self._stop_servers()
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None
        if self.children:
            _terminate(self.children[0])
        self._echo_logs()
        clean_instance(self.instance, by_supervisor=True)
        lock_path(self.instance).unlink(missing_ok=True)
        os.close(self._lock_fd)
        log.info("instance %r stopped", self.instance)

    def write_state(self) -> None:
        state = {
            "instance": self.instance,
            "model": self.config.model.model_path().stem,
            "url": self.url(),
            "supervisor_pid": os.getpid(),
            "supervisor_start": start_ticks(os.getpid()),
            "processes": [
                {"name": c.name, "pid": c.pid, "start": start_ticks(c.pid) if c.pid else None,
                 "started_at": c.started_wall, "restarts": c.restarts}
                for c in self.children
            ],
        }
        tmp = self.run_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.run_dir / STATE_FILE)

    def url(self) -> str | None:
        """Where the gateway listens, once it has said so (port 0 picks one)."""
        try:
            return (self.run_dir / "gateway.url").read_text().strip() or None
        except OSError:
            return None

    def _echo_logs(self) -> None:
        """In the foreground, show what the processes log, prefixed with their name."""
        if not self.foreground:
            return
        for child in self.children:
            try:
                with open(child.log_path, "rb") as f:
                    f.seek(self._log_offsets.get(child.log_path, 0))
                    data = f.read()
                    self._log_offsets[child.log_path] = f.tell()
            except FileNotFoundError:
                continue
            for line in data.decode(errors="replace").splitlines():
                sys.stderr.write(named(child.name, line) + "\n")


def named(process: str, line: str) -> str:
    """A log line shown among other processes' lines: log records name their process already
    (they begin with a timestamp); the rest, a traceback's lines, get its name."""
    return line if line[:1].isdigit() else f"{process} | {line}"


KEPT_RUNS = 3  # logs of this many runs of an instance are kept: NAME.log, NAME.log.1, ...


def rotate_logs(log_dir: Path) -> None:
    """A new run's logs start empty; the previous runs' move down one (the oldest goes)."""
    for log_file in log_dir.glob("*.log"):
        for age in range(KEPT_RUNS - 1, 0, -1):
            older = log_file.with_name(f"{log_file.name}.{age}")
            if age == KEPT_RUNS - 1:
                older.unlink(missing_ok=True)
            newer = log_file.with_name(f"{log_file.name}.{age - 1}") if age > 1 else log_file
            if newer.exists():
                newer.replace(older)


def _terminate(child: Child, timeout: float = 10.0) -> None:
    if child.proc is None:
        return
    if child.proc.poll() is None:
        child.proc.terminate()
        try:
            child.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait()
    child.proc = None


class LineReader:
    """Lines from a child's stdout pipe until a deadline. A buffered file would not do: one
    read can take several lines (progress, then ready) into its buffer, and select() then
    reports nothing more to read."""

    def __init__(self, fd: int, deadline: float) -> None:
        self._fd = fd
        self._deadline = deadline
        self._buffer = b""

    def readline(self) -> str:
        """The next line, or "" at end of file or past the deadline."""
        while b"\n" not in self._buffer:
            timeout = self._deadline - time.monotonic()
            if timeout <= 0 or not select.select([self._fd], [], [], timeout)[0]:
                return ""
            chunk = os.read(self._fd, 65536)
            if not chunk:  # end of file: what is left, once
                rest, self._buffer = self._buffer, b""
                return rest.decode(errors="replace")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode(errors="replace") + "\n"


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def forward_to(ready: Any) -> Callable[[str, str, int, int], None]:
    """Progress lines, named, for `llmos up --detach` waiting on our stdout (it shows them)."""
    def forward(name: str, stage: str, done: int, total: int) -> None:
        try:
            ready.write(forwarded_line(name, stage, done, total))
            ready.flush()
        except (BrokenPipeError, ValueError):
            pass  # it has gone (Ctrl-C): the start goes on, as `up --detach` promised

    return forward


def run(config: Config, instance: str, *, foreground: bool, ready: Any = sys.stdout,
        owner_pid: int | None = None) -> int:
    """Bring the instance up, print one ready line, watch it until a signal or a failure (or
    until `owner_pid` ends)."""
    owner = None if owner_pid is None else (owner_pid, start_ticks(owner_pid))
    supervisor = Supervisor(config, instance, foreground=foreground)

    def on_signal(signum: int, frame: Any) -> None:
        supervisor.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = 0
    failure = ""
    try:
        # In the foreground the bars are ours to show; detached, `llmos up` waiting on `ready` shows them.
        with StartProgress() if foreground else contextlib.nullcontext() as bars:
            supervisor.on_progress = bars.update if bars is not None else forward_to(ready)
            supervisor.up()
        supervisor.on_progress = None
        servers = ", ".join(c.name for c in supervisor.children[1:]) or "no servers"
        url = supervisor.url()
        serving = f"serving {supervisor.config.model.model_path().stem} at {url}; " if url else ""
        ready.write(f"llmos up: instance {supervisor.instance!r} ready; {serving}kernel socket "
                    f"{I.socket_path(supervisor.instance)}; {servers}\n")
        ready.flush()
        supervisor.monitor(owner)
    except InstanceFailed as exc:
        log.error("%s", exc)
        failure = str(exc)
        code = 1
    finally:
        supervisor.shutdown()
    if failure:
        if supervisor.owns_instance:
            failure_path(supervisor.instance).write_text(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {failure}\n")
        try:
            ready.write(f"llmos error: {failure}\n")
            ready.flush()
        except (BrokenPipeError, ValueError):
            pass  # `llmos up --detach` has gone; the failure file keeps the reason
    return code


def main(argv: list[str] | None = None) -> int:
    from llmos.config import ConfigError, config_from_dict, load_config

    parser = argparse.ArgumentParser(prog="python -m llmos.supervisor")
    parser.add_argument("--instance", default=None)
    parser.add_argument("--config", default=None)
    parser.add_argument("--config-json", default=None, help="the whole config as JSON (llmos serve)")
    parser.add_argument("--foreground", action="store_true")
    parser.add_argument("--owner-pid", type=int, default=None, help="stop the instance when this process ends")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s supervisor[%(process)d] %(levelname)s %(message)s")
    try:
        config = config_from_dict(json.loads(ns.config_json), "serve") if ns.config_json else load_config(ns.config)
    except ConfigError as exc:
        print(f"llmos error: {exc}", flush=True)
        return 2
    return run(config, I.instance_name(ns.instance), foreground=ns.foreground, owner_pid=ns.owner_pid)


if __name__ == "__main__":
    sys.exit(main())
