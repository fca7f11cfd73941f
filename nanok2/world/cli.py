"""`nanok2 world build` and `nanok2 world tasks`: make a world (or index a folder) and print its tasks."""
from __future__ import annotations

import json
import time
from pathlib import Path

from nanok2.context import overflow_views
from nanok2.errors import NanoK2Error
from nanok2.world.corpus import Corpus
from nanok2.world.tasks import FAMILIES, GOLD_STYLES, make_tasks
from nanok2.world.tools import Toolbox
from nanok2.world.world import DEFAULT_SIZE, build_world, load_world, save_world


def register(subparsers) -> None:
    world = subparsers.add_parser("world", help="offline research world: corpus, tools, tasks")
    sub = world.add_subparsers(dest="world_command", metavar="SUBCOMMAND", required=True)

    build = sub.add_parser("build", help="generate a world (or index --corpus DIR) and save it to --out")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--size", type=int, default=DEFAULT_SIZE, help="number of documents")
    build.add_argument("--corpus", type=Path, help="index this folder of .txt/.md files instead of generating")
    build.add_argument("--out", type=Path, required=True)
    build.set_defaults(func=run_build)

    tasks = sub.add_parser("tasks", help="print tasks with gold trajectories, one per line")
    tasks.add_argument("--seed", type=int, default=0)
    tasks.add_argument("--size", type=int, default=DEFAULT_SIZE, help="documents in the generated world")
    tasks.add_argument("--world", type=Path, help="a world saved by `nanok2 world build` (instead of --seed/--size)")
    tasks.add_argument("--family", choices=FAMILIES, required=True)
    tasks.add_argument("--hops", type=int, help="difficulty: documents, conditions, notes or facts")
    tasks.add_argument("--n", type=int, default=1)
    tasks.add_argument("--style", choices=GOLD_STYLES, default="plain",
                       help="the gold thinking's wording: restate carries what is still sought from step to step; "
                            "compare also writes each constraint verdict after the two values it compares; "
                            "compute has the python tool compute it")
    tasks.add_argument("--json", action="store_true", help="one JSON object per line")
    tasks.add_argument("--context-chars", type=int,
                       help="also give `views`: the contexts seen when tool outputs overflow this many characters")
    tasks.add_argument("--keep-last", type=int, default=0, help="tool outputs kept in those views")
    tasks.set_defaults(func=run_tasks)


def run_build(args) -> int:
    start = time.perf_counter()
    if args.corpus:
        corpus = Corpus.from_folder(args.corpus)
        corpus.save(args.out, {"kind": "corpus", "source": str(args.corpus.resolve())})
        what = f"{len(corpus.docs)} documents from {args.corpus}"
    else:
        world = build_world(args.seed, args.size)
        save_world(world, args.out)
        what = f"world {args.seed}: {len(world.corpus.docs)} documents, {len(world.graph.entities)} entities"
    print(f"{what} -> {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


def run_tasks(args) -> int:
    if args.n < 1:
        raise NanoK2Error(f"--n {args.n}: ask for at least one task")
    world = load_world(args.world) if args.world else build_world(args.seed, args.size)
    for task in make_tasks(world, Toolbox(world.corpus), args.family, args.hops, args.n, args.style):
        record = task.to_json()
        if args.context_chars:
            record["views"] = [{"messages": view, "train_from": start} for view, start in
                               overflow_views(task.messages, args.context_chars, args.keep_last)]
        if args.json:
            print(json.dumps(record, ensure_ascii=False))
        else:
            calls = sum(len(m.get("tool_calls") or []) for m in task.messages)
            print(f"[{task.family}, {task.hops} hops, {calls} tool calls] {task.question}\n    answer: {task.answer}")
    return 0
