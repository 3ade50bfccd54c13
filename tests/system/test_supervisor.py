"""`llmos up / down / status` and the supervisor, through real processes: boot and stop,
restarts after kill -9, restart intensity, a killed supervisor or kernel, a hung server,
two instances side by side. Every wait is on an observable event, with a long timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llmos.microkernel.endpoint import Endpoint
from llmos.microkernel.errors import InvalidRequest
from llmos.microkernel.messages import MsgType
from tests.conftest import unique_instance
from tests.microkernel.procs import wait_until
from tests.system.cli import Cli

pytestmark = pytest.mark.slow
WAIT = 60.0


ECHO_CONFIG = """
rings = "8M"
heartbeat_timeout_s = 2.0
[[servers]]
name = "echo-a"
module = "llmos.servers.echo"
[[servers]]
name = "echo-b"
module = "llmos.servers.echo"
"""


def echo_works(instance: str, server: str) -> bool:
    with Endpoint.connect(instance) as ep:
        return ep.open_channel(server, wait=True).call(MsgType.TEST_ECHO, b"ping", timeout=WAIT).payload == b"ping"


def assert_nothing_left(instance: str, runtime: Path, pids: list[int]) -> None:
    assert not Path(f"/dev/shm/llmos.{instance}").exists()
    assert not (runtime / instance).exists()
    for pid in pids:
        wait_until(lambda pid=pid: not Path(f"/proc/{pid}").exists() or _zombie(pid), f"pid {pid} to exit")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_boot_status_and_down_leave_nothing(cli: Cli) -> None:
    instance = unique_instance("sup")
    out = cli("up", "--detach", "--instance", instance, "--config", cli.config(ECHO_CONFIG)).stdout
    assert "ready" in out and "kernel.sock" in out
    report = cli.status(instance)
    assert report["running"]
    assert [p["name"] for p in report["processes"]] == ["kernel", "echo-a", "echo-b"]
    assert all(p["alive"] and p["pid"] > 0 and p["restarts"] == 0 for p in report["processes"])
    assert report["arena"]["size"] > 0
    assert echo_works(instance, "echo-a") and echo_works(instance, "echo-b")
    human = cli("status", "--instance", instance).stdout
    assert "echo-a" in human and "restarts" in human
    pids = [report["supervisor_pid"], *cli.pids(instance).values()]
    assert "stopped" in cli("down", "--instance", instance).stdout
    assert_nothing_left(instance, cli.runtime, pids)
    assert "not running" in cli("status", "--instance", instance, check=False).stdout


def test_kill_9_of_each_server_and_of_the_kernel_comes_back(cli: Cli) -> None:
    instance = unique_instance("sup")
    cli("up", "--detach", "--instance", instance, "--config", cli.config(ECHO_CONFIG))
    for name in ("echo-a", "echo-b", "kernel"):
        old = cli.pids(instance)
        os.kill(old[name], signal.SIGKILL)
        wait_until(lambda old=old, name=name: cli.pids(instance).get(name, old[name]) != old[name],
                   f"{name} to be restarted")
        if name == "kernel":  # the whole instance restarts with it
            wait_until(lambda old=old: all(cli.pids(instance).get(n, 0) not in (0, old[n])
                                           for n in ("echo-a", "echo-b")), "the servers to restart too")
        assert echo_works(instance, "echo-a") and echo_works(instance, "echo-b")
    restarts = {p["name"]: p["restarts"] for p in cli.status(instance)["processes"]}
    assert restarts == {"kernel": 1, "echo-a": 2, "echo-b": 2}
    cli("down", "--instance", instance)
    assert_nothing_left(instance, cli.runtime, [])


def test_a_squatter_cannot_take_a_servers_name_and_the_server_comes_back(cli: Cli) -> None:
    """Only the processes the supervisor starts may register the configured names and the
    built-in ones; the refusal names the reason and the kernel logs it; other names stay free."""
    instance = unique_instance("sup")
    cli("up", "--detach", "--instance", instance, "--config", cli.config(ECHO_CONFIG))
    try:
        old = cli.pids(instance)["echo-a"]
        os.kill(old, signal.SIGKILL)
        for name in ("echo-a", "gateway", "scheduler", "runner.3"):  # echo-a: free or not, it is not ours to take
            with pytest.raises(InvalidRequest, match=f"name {name!r} is reserved"):
                Endpoint.connect(instance, name=name)
        with Endpoint.connect(instance, name="my-own-server") as mine:
            assert mine.name == "my-own-server"
        wait_until(lambda: cli.pids(instance).get("echo-a", old) != old, "echo-a to be restarted")
        assert echo_works(instance, "echo-a")
        assert {p["name"]: p["restarts"] for p in cli.status(instance)["processes"]}["echo-a"] == 1
        kernel_log = (cli.runtime / f"{instance}.logs" / "kernel.log").read_text()
        assert "refused name 'gateway'" in kernel_log and "refused name 'echo-a'" in kernel_log
    finally:
        cli("down", "--instance", instance)


def test_too_many_crashes_stop_the_instance_with_a_message(cli: Cli) -> None:
    instance = unique_instance("sup")
    config = cli.config(ECHO_CONFIG.replace('rings = "8M"', 'rings = "8M"\nmax_restarts = 2\nrestart_backoff_s = 0.1'))
    cli("up", "--detach", "--instance", instance, "--config", config)
    supervisor = cli.status(instance)["supervisor_pid"]
    for crash in range(3):
        pid = cli.pids(instance).get("echo-a")
        if pid is None:
            break
        os.kill(pid, signal.SIGKILL)
        if crash < 2:
            wait_until(lambda pid=pid: cli.pids(instance).get("echo-a", pid) != pid, "echo-a to come back")
    wait_until(lambda: not cli.status(instance)["running"], "the instance to stop")
    report = cli.status(instance)
    assert "echo-a crashed 3 times" in report["last_failure"]
    assert "stopped on its own" in cli("status", "--instance", instance, check=False).stdout
    assert_nothing_left(instance, cli.runtime, [supervisor])
    cli("down", "--instance", instance)
    assert not (cli.runtime / f"{instance}.failure").exists()


def test_kill_9_of_the_supervisor_then_up_cleans_and_boots(cli: Cli) -> None:
    instance = unique_instance("sup")
    config = cli.config(ECHO_CONFIG)
    cli("up", "--detach", "--instance", instance, "--config", config)
    report = cli.status(instance)
    old = [report["supervisor_pid"], *cli.pids(instance).values()]
    os.kill(report["supervisor_pid"], signal.SIGKILL)
    wait_until(lambda: not cli.status(instance)["running"], "the supervisor to be gone")
    cli("up", "--detach", "--instance", instance, "--config", config)
    for pid in old:
        wait_until(lambda pid=pid: not Path(f"/proc/{pid}").exists() or _zombie(pid), f"old pid {pid} to be gone")
    assert echo_works(instance, "echo-b")
    cli("down", "--instance", instance)
    assert_nothing_left(instance, cli.runtime, [])


def test_a_hung_server_is_killed_and_restarted(cli: Cli) -> None:
    instance = unique_instance("sup")
    cli("up", "--detach", "--instance", instance, "--config", cli.config(ECHO_CONFIG))
    hung = cli.pids(instance)["echo-b"]
    os.kill(hung, signal.SIGSTOP)  # alive but silent: only missed heartbeats can tell
    wait_until(lambda: cli.pids(instance).get("echo-b", hung) != hung, "the hung server to be replaced")
    assert echo_works(instance, "echo-b")
    cli("down", "--instance", instance)
    assert_nothing_left(instance, cli.runtime, [hung])


def test_a_hung_kernel_restarts_the_instance(cli: Cli) -> None:
    """A kernel that is alive but answers nothing (SIGSTOP) is killed like a hung server, and
    the instance restarts as it does when the kernel dies."""
    instance = unique_instance("sup")
    cli("up", "--detach", "--instance", instance, "--config", cli.config(ECHO_CONFIG))
    old = cli.pids(instance)
    os.kill(old["kernel"], signal.SIGSTOP)
    try:
        wait_until(lambda: all(cli.pids(instance).get(n, old[n]) != old[n] for n in old), "a new kernel and servers")
        assert echo_works(instance, "echo-a") and echo_works(instance, "echo-b")
        assert {p["name"]: p["restarts"] for p in cli.status(instance)["processes"]}["kernel"] == 1
        assert "kernel did not answer" in (cli.runtime / f"{instance}.logs" / "supervisor.log").read_text()
    finally:
        if Path(f"/proc/{old['kernel']}").exists():
            os.kill(old["kernel"], signal.SIGCONT)  # a failed wait must not leave it stopped
        cli("down", "--instance", instance)
    assert_nothing_left(instance, cli.runtime, [old["kernel"]])


def test_two_instances_side_by_side(cli: Cli) -> None:
    first, second = unique_instance("one"), unique_instance("two")
    config = cli.config(ECHO_CONFIG)
    cli("up", "--detach", "--instance", first, "--config", config)
    env_second = {**cli.env, "LLMOS_INSTANCE": second}
    proc = subprocess.run([sys.executable, "-m", "llmos.cli", "up", "--detach", "--config", config], env=env_second,
                          capture_output=True, text=True, timeout=WAIT * 2, check=False)
    assert proc.returncode == 0, proc.stderr
    assert cli.status(first)["running"] and cli.status(second)["running"]
    assert set(cli.pids(first).values()).isdisjoint(cli.pids(second).values())
    assert echo_works(first, "echo-a") and echo_works(second, "echo-a")
    cli("down", "--instance", first)
    assert cli.status(second)["running"]
    cli("down", "--instance", second)
    assert_nothing_left(first, cli.runtime, [])
    assert_nothing_left(second, cli.runtime, [])


def test_up_twice_is_refused_and_changes_nothing(cli: Cli) -> None:
    instance = unique_instance("sup")
    config = cli.config(ECHO_CONFIG)
    cli("up", "--detach", "--instance", instance, "--config", config)
    before = cli.pids(instance)
    again = cli("up", "--detach", "--instance", instance, "--config", config, check=False)
    assert again.returncode == 1 and "already up" in again.stderr
    assert cli.pids(instance) == before
    cli("down", "--instance", instance)


@pytest.mark.parametrize(("body", "message"), [
    ("colour = 'blue'\n", "unknown key(s) colour"),
    ("window = 'many'\n", "Expected `int`"),
    ("[[servers]]\nname = 'x'\nmodule = 'llmos.servers.echo'\nport = 1\n", "unknown key(s) port"),
    ("rings = '100000G'\n", "/dev/shm has only"),
])
def test_bad_config_or_too_small_shm_is_a_clear_error(cli: Cli, body: str, message: str) -> None:
    instance = unique_instance("bad")
    proc = cli("up", "--detach", "--instance", instance, "--config", cli.config(body), check=False)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert_nothing_left(instance, cli.runtime, [])


def test_foreground_up_shows_logs_and_stops_in_order_on_ctrl_c(cli: Cli) -> None:
    instance = unique_instance("fg")
    proc = subprocess.Popen([sys.executable, "-m", "llmos.cli", "up", "--instance", instance, "--config",
                             cli.config(ECHO_CONFIG)], env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    assert "ready" in proc.stdout.readline()
    assert echo_works(instance, "echo-a")
    pids = list(cli.pids(instance).values())
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, err
    assert " kernel[" in err and "echo-a registered" in err  # the processes' logs, each line naming its own
    assert "kernel | " not in err  # once, not twice
    assert_nothing_left(instance, cli.runtime, pids)
