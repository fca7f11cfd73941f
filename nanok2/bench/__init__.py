"""`nanok2 bench …`: benchmarks that compare side by side in one run, print a table, then one JSON line.

Each benchmark is its own module with `register(bench_subparsers)`; this file only gathers them.
"""
import importlib

BENCH_MODULES = [
    "nanok2.bench.moe_scaling",   # bench moe-scaling
    "nanok2.bench.decode",        # bench decode
    "nanok2.bench.optim",         # bench optim
    "nanok2.bench.quant",         # bench quant
    "nanok2.bench.qat",           # bench qat
    "nanok2.bench.copy",          # bench copy
    "nanok2.bench.train_step",    # bench train-step
]


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: a table, then one JSON line")
    bench_sub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name in BENCH_MODULES:
        importlib.import_module(name).register(bench_sub)
