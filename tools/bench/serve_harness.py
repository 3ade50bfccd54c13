"""The worker processes of `llmos bench serve` (the Harness).

Runs in the benchmark's process and in its forked workers. Each worker connects (a
serve_clients client), waits on a barrier, then takes the next request of the shared
list until none are left: at once when its last one finished (closed loop), or at the
request's arrival time (open loop; a worker that is late records by how much). It returns
one Record per request and its CPU time, then keeps its connection open until the parent
has read the instance's figures (so its rings are still there to count), and exits.
"""

from __future__ import annotations

import os
import queue
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from llmos.bench.e2e import CTX
from llmos.bench.instances import WAIT
from llmos.bench.serve_clients import Client, ClientSpec, Record, connect
from llmos.bench.serve_workload import WorkItem
from llmos.microkernel.lifeline import exit_with_parent


class BenchError(RuntimeError):
    """The benchmark could not run (a worker failed, the instance did not answer)."""


class Harness:
    """N worker processes over one shared list of requests. Use as a context manager:
    `ready()` once they are connected, `go()` to start them, `collect()` for the results;
    leaving releases the workers (they disconnect) and reaps them."""

    def __init__(self, spec: ClientSpec, items: Sequence[WorkItem], num_workers: int,
                 naive: tuple[Any, Sequence[Any]] | None = None) -> None:
        self.spec, self.items, self.num_workers = spec, items, num_workers
        self.barrier = CTX.Barrier(num_workers + 1)
        self.started, self.release = CTX.Event(), CTX.Event()
        self.t0 = CTX.Value("d", 0.0)
        self.next_index = CTX.Value("q", 0)
        self.completed = CTX.Value("q", 0)
        self.out: Any = CTX.Queue()
        self.naive = naive
        self.parent_pid = os.getpid()
        self.procs = [CTX.Process(target=self._work, args=(slot,), daemon=True) for slot in range(num_workers)]

    def __enter__(self) -> Harness:
        for proc in self.procs:
            proc.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release.set()
        if exc is not None:
            self.barrier.abort()
            self.started.set()
        deadline = time.monotonic() + (5.0 if exc is not None else WAIT)
        for proc in self.procs:
            proc.join(max(0.1, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
        self.out.close()
        self.out.join_thread()

    # -- parent side -----------------------------------------------------------------------

    def ready(self) -> None:
        """Wait until every worker has connected."""
        try:
            self.barrier.wait(WAIT)
        except Exception:
            raise BenchError(self._first_error() or "a worker did not connect in time") from None

    def go(self) -> float:
        """Start the run now; returns its start time (time.monotonic())."""
        self.t0.value = start = time.monotonic()
        self.started.set()
        return start

    def collect(self, tick: Callable[[int], None], tick_s: float = 0.25) -> tuple[list[Record], list[float]]:
        """Wait for every worker's records; `tick(requests finished)` runs every `tick_s`.
        Returns the records in workload order and each worker's CPU seconds."""
        results: dict[int, tuple[float, list[Record]]] = {}
        while len(results) < self.num_workers:
            try:
                slot, cpu, records, error = self.out.get(timeout=tick_s)
            except queue.Empty:
                tick(int(self.completed.value))
                dead = [p for i, p in enumerate(self.procs) if i not in results and p.exitcode is not None]
                if dead:
                    raise BenchError(f"worker pid {dead[0].pid} exited with code {dead[0].exitcode}") from None
                continue
            if error:
                raise BenchError(f"worker {slot} failed: {error}")
            results[slot] = (cpu, records)
        tick(int(self.completed.value))
        records = sorted((r for _, rs in results.values() for r in rs), key=lambda r: r.index)
        return records, [cpu for cpu, _ in results.values()]

    def _first_error(self) -> str:
        try:
            while True:
                _slot, _cpu, _records, error = self.out.get(timeout=0.5)
                if error:
                    return str(error)
        except queue.Empty:
            return ""

    # -- worker side (after fork) ------------------------------------------------------------

    def _connect(self, slot: int) -> Client:
        def start() -> float:
            return float(self.t0.value)

        return connect(self.spec, start, slot, self.naive)

    def _take(self) -> int:
        with self.next_index.get_lock():
            index = int(self.next_index.value)
            self.next_index.value = index + 1
        return index

    def _work(self, slot: int) -> None:
        exit_with_parent(self.parent_pid, signal.SIGKILL)  # a benchmark killed outright leaves no worker behind
        records: list[Record] = []
        cpu = 0.0
        client = None
        try:
            client = self._connect(slot)
            self.barrier.wait(WAIT)
            self.started.wait(WAIT)
            t0 = float(self.t0.value)
            cpu0 = time.process_time()
            while (index := self._take()) < len(self.items):
                item = self.items[index]
                late = 0.0
                if self.spec.open_loop:
                    wait = t0 + item.arrival_s - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    late = max(0.0, -wait)
                records.append(client.send(item, late))
                with self.completed.get_lock():
                    self.completed.value += 1
            cpu = time.process_time() - cpu0
            self.out.put((slot, cpu, records, ""))
        except BaseException as exc:  # reported to the parent, which stops the run
            self.out.put((slot, cpu, records, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"))
            self.barrier.abort()
        finally:
            self.release.wait(WAIT)
            if client is not None:
                client.close()
