"""The `nanok2` command: one argparse tree, each concern registers its own sub-commands.

Every module listed in COMMAND_MODULES defines `register(subparsers)`, which adds its sub-commands and
sets `func` on each parser. Modules are imported only when the command line is parsed, so that
`nanok2 --help` stays fast and one concern never imports another it does not need.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from nanok2.errors import NanoK2Error

# module -> registers these top-level commands (one line each; keep sorted by concern)
COMMAND_MODULES = [
    "nanok2.info",          # info
    "nanok2.bench",         # bench moe-scaling | decode | quant | optim
    "nanok2.world.cli",  # world build | tasks
    "nanok2.tokenizer",  # tokenizer train
    "nanok2.train",  # train
    "nanok2.data",  # data tokenize
    "nanok2.cost",  # cost
    "nanok2.agent_cli",  # agent | eval
    "nanok2.quant_cli",  # quantize
    "nanok2.generate_cli",  # generate | chat
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanok2", description="Kimi K2 Thinking, small enough to read.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except NanoK2Error as e:
        print(f"nanok2 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
