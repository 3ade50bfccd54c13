"""`python -m servers.scheduler`: the scheduler process (see servers/scheduler/server.py)."""

from __future__ import annotations

import argparse
import json
import sys

from servers.base import configure_logging
from servers.scheduler.server import DECODE_STEPS, PIPELINE_DEPTH, SchedulerServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m servers.scheduler")
    parser.add_argument("--instance", default=None)
    parser.add_argument("--name", default="scheduler")
    parser.add_argument("--runners", required=True, help="comma-separated runner names")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--token-budget", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=DECODE_STEPS, help="tokens per decode step (multi-step)")
    parser.add_argument("--policy", default="fcfs", choices=["fcfs", "priority", "rr", "fair"])
    parser.add_argument("--aging-steps", type=int, default=64)
    parser.add_argument("--quantum", type=int, default=16)
    parser.add_argument("--weights", default="{}", help='fair: JSON {"tenant": weight}')
    parser.add_argument("--no-prefix-cache", action="store_true", help="compute every prompt in full")
    parser.add_argument("--pipeline-depth", type=int, default=PIPELINE_DEPTH, help="steps in flight per runner")
    ns = parser.parse_args(argv)
    configure_logging(ns.name)
    server = SchedulerServer(ns.instance, runners=[r for r in ns.runners.split(",") if r],
                             max_batch_size=ns.max_batch_size, token_budget=ns.token_budget,
                             decode_steps=ns.decode_steps, policy=ns.policy, aging_steps=ns.aging_steps,
                             quantum=ns.quantum, weights=json.loads(ns.weights),
                             prefix_caching=not ns.no_prefix_cache, name=ns.name,
                             pipeline_depth=ns.pipeline_depth)
    server.install_signal_handlers()
    print(f"llmos {ns.name} ready endpoint {server.endpoint.endpoint_id}", flush=True)
    return server.run()


if __name__ == "__main__":
    sys.exit(main())
