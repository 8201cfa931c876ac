"""The `longserve` entry point.

Each subcommand lives in its own module exposing `HELP`, `add_arguments(parser)` and
`run(args) -> int`; those modules import only the standard library at module level, so
`longserve plan` works without torch and `longserve --help` is instant. Heavy imports happen
inside `run`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "plan": "longserve.operator.plan_cli",
    "render": "longserve.operator.render_cli",
    "operator": "longserve.operator.main",
    "serve": "longserve.server.serve_cli",
    "download": "longserve.server.download_cli",
    "bench": "longserve.bench.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longserve",
        description="Serve 1M-token-context LLMs: VRAM planning, the engine, the Kubernetes operator.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from importlib.metadata import PackageNotFoundError, version
        try:
            print(version("longserve"))
        except PackageNotFoundError:
            print("unknown")
        return 0
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
