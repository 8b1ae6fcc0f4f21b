"""`python -m bench NAME [--quick]`: run one benchmark; each prints a table, then one JSON line."""

from __future__ import annotations

import importlib
import sys

BENCHES = {
    "syscall": "bench.syscall",
    "durability": "bench.durability",
    "fairness": "bench.fairness",
    "batching": "bench.batching",
    "stack": "bench.stack",
    "locomo": "bench.locomo_stack",
    "ingest": "bench.ingest",
    "kernel_load": "bench.kernel_load",
    "fuzz": "bench.fuzz",
    "soak": "bench.soak",
    "chaos": "bench.chaos",
    "noisy_neighbour": "bench.noisy_neighbour",
    "trust_claims": "bench.trust_claims",
    "trust_latency": "bench.trust_latency",
    "trust": "bench.trust",
    "routing": "bench.routing",
    "cascade": "bench.cascade",
    "adapt": "bench.adapt",
    "engine": "bench.engine",
    "gateway": "bench.gateway",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHES:
        print("usage: python -m bench {" + ",".join(BENCHES) + "} [--quick] [options]\n"
              "Each bench measures VFMOS and a baseline in the same run and prints a table,\n"
              "then its figures as one JSON object on the last line.", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return importlib.import_module(BENCHES[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
