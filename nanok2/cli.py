"""The `nanok2` command: one argparse tree, each concern registers its own sub-commands.

Every module in COMMANDS defines `register(subparsers)`, which adds its sub-commands and sets `func` on
each parser. Only the module of the command being run is imported (the others appear in `--help` by
their one-line summary), so `nanok2 --help` and light commands start without importing torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from nanok2.errors import NanoK2Error

# top-level command -> (the module that registers it, its one-line summary in `nanok2 --help`)
COMMANDS = {
    "info": ("nanok2.info", "parameters, bytes and KV cache of a preset or checkpoint"),
    "tokenizer": ("nanok2.tokenizer", "train K2-format tokenizers"),
    "world": ("nanok2.world.cli", "offline research world: corpus, tools, tasks"),
    "data": ("nanok2.data", "make training data: token shards"),
    "train": ("nanok2.train", "pre-train or fine-tune from a named recipe (torchrun for FSDP2)"),
    "quantize": ("nanok2.quant_cli", "write an INT4 checkpoint as K2-Thinking ships (compressed-tensors)"),
    "generate": ("nanok2.generate_cli", "continue a prompt, streaming the text"),
    "chat": ("nanok2.generate_cli", "an interactive chat that streams thinking and the answer"),
    "agent": ("nanok2.agent_cli", "run the agent on a question over a world or your documents"),
    "eval": ("nanok2.agent_cli", "evaluate the agent, or a model's copying from its context"),
    "cost": ("nanok2.cost", "training FLOPs, GPU-hours and dollars for a preset and a token count"),
    "bench": ("nanok2.bench", "benchmarks: a table, then one JSON line"),
}
COMMAND_MODULES = sorted({module for module, _ in COMMANDS.values()})


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with `command` fully registered and every other command as its summary."""
    parser = argparse.ArgumentParser(prog="nanok2", description="Kimi K2 Thinking, small enough to read.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    if command in COMMANDS:
        importlib.import_module(COMMANDS[command][0]).register(sub)
    for name, (_, summary) in COMMANDS.items():
        if name not in sub.choices:
            sub.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
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
