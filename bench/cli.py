"""`longserve bench ...`: benchmarks that print ratios against a peer measured in the same run."""
from __future__ import annotations

import importlib

HELP = "benchmarks: kernels, prefill, serve, passkey, memory, host, ppl, ruler"

BENCHES = {
    "kernels": "longserve.bench.kernels",
    "prefill": "longserve.bench.prefill",
    "serve": "longserve.bench.serve_load",
    "passkey": "longserve.bench.passkey",
    "ruler": "longserve.bench.ruler",
    "memory": "longserve.bench.memory",
    "host": "longserve.bench.host",
    "ppl": "longserve.bench.ppl",
}


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, module_name in BENCHES.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_bench_run=module.run)


def run(args) -> int:
    return args._bench_run(args)
