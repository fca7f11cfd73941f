"""`nanok2 agent "QUESTION"` and `nanok2 eval world`: the agent loop from the command line.

`nanok2 agent` runs the embedded model (models/nanok2-agent-tiny) on a generated world out of the box,
prints the run live and logs it as JSONL; `--world`/`--corpus` change the documents, `--model` the
checkpoint, `--base-url` sends the same loop to an OpenAI-compatible server instead. `nanok2 eval
world` runs it on generated tasks and scores exact answers; its last line is one JSON object.

Nothing heavy (torch, the engine, the model) is imported until a command runs.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from nanok2.errors import NanoK2Error
from nanok2.world.tasks import FAMILIES, GOLD_STYLES  # light: already imported by `nanok2 world`'s registration
from nanok2.world.world import DEFAULT_SIZE

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "nanok2-agent-tiny"
DEFAULT_EVAL_SEED = 1000  # eval worlds: seeds a training run is not meant to use


def _backend_args(p) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                   help="a nanok2/K2 checkpoint folder (config.json, safetensors, tiktoken.model); "
                        "default: the embedded models/nanok2-agent-tiny")
    g.add_argument("--context", type=int, help="context tokens, prompt and reply (default: the model's, at most 8192)")
    g.add_argument("--max-tokens", type=int,
                   help="tokens per model turn, reasoning included (default: the model's generation_config.json, "
                        "else 1024)")
    g.add_argument("--temperature", type=float,
                   help="default: the model's generation_config.json (0 = greedy when it sets do_sample false), "
                        "else 1.0, which K2-Thinking recommends")
    g.add_argument("--sample-seed", type=int, help="seed of the sampler (default: fresh randomness)")
    g.add_argument("--thinking-budget", type=int, help="reasoning tokens per turn before </think> is forced")
    g.add_argument("--base-url", help="run on an OpenAI-compatible server (e.g. http://localhost:8000/v1) instead")
    g.add_argument("--api-model", help="the model name on that server")


def _loop_args(p) -> None:
    g = p.add_argument_group("loop")
    g.add_argument("--max-steps", type=int, default=300, help="tool-calling turns before the answer is forced")
    g.add_argument("--keep-last", type=int, default=4, help="steps kept when hiding tool outputs is not enough")
    g.add_argument("--tool-timeout", type=float, default=60.0, help="seconds for the calls of one turn")
    g.add_argument("--exact-search", action="store_true",
                   help="search matches words exactly (default: a misspelt word matches the indexed words within "
                        "1-2 edits, as Elasticsearch's fuzziness AUTO)")


def register(subparsers) -> None:
    agent = subparsers.add_parser("agent", help="run the agent on a question over a world or your documents")
    agent.add_argument("question", nargs="?", help="the question (or --task to draw one from the world)")
    docs = agent.add_argument_group("documents")
    docs.add_argument("--world", default="0", help="a world seed, or a folder saved by `nanok2 world build`")
    docs.add_argument("--size", type=int, default=DEFAULT_SIZE, help="documents of a generated world")
    docs.add_argument("--corpus", type=Path, help="a folder of .txt/.md files (or one indexed by `nanok2 world build`)")
    agent.add_argument("--task", choices=FAMILIES, help="ask a generated task of this family and score the answer")
    agent.add_argument("--hops", type=int, help="the task's difficulty (trail: notes to follow, up to 300)")
    agent.add_argument("--log", type=Path, help="trajectory JSONL (default: runs/agent-TIME.jsonl)")
    agent.add_argument("--quiet", action="store_true", help="no live view; print the answer only")
    _backend_args(agent)
    _loop_args(agent)
    agent.set_defaults(func=run_agent)

    ev = subparsers.add_parser("eval", help="evaluate the agent (world), a model's copying from context (copy) "
                                            "or its pick of the sentence to quote (quote)")
    sub = ev.add_subparsers(dest="eval_command", metavar="SUITE", required=True)
    world = sub.add_parser("world", help="exact-answer accuracy on generated tasks of an unseen world")
    world.add_argument("--seed", type=int, default=DEFAULT_EVAL_SEED, help="the world (use seeds not trained on)")
    world.add_argument("--size", type=int, default=DEFAULT_SIZE, help="documents in the world")
    world.add_argument("--family", choices=FAMILIES, required=True)
    world.add_argument("--hops", type=int, help="difficulty (default: the family's)")
    world.add_argument("--n", type=int, default=20, help="number of tasks (in each world)")
    world.add_argument("--worlds", type=int, default=1,
                       help="evaluate on K worlds, seeds S .. S+K-1: the long trails of one world share most of "
                            "their notes, so independent 300-note runs need one world each")
    world.add_argument("--json", action="store_true", help="one JSON object per task")
    world.add_argument("--log-dir", type=Path, help="write each trajectory to DIR/task-NNN.jsonl")
    world.add_argument("--live", action="store_true", help="show every run live")
    _backend_args(world)
    _loop_args(world)
    world.set_defaults(func=run_eval_world)

    copy = sub.add_parser("copy", help="does a model copy from its context? loss on a repeated span vs its first time")
    copy.add_argument("--model", type=Path, required=True, help="a checkpoint folder with its tokenizer")
    copy.add_argument("--world", type=int, default=DEFAULT_EVAL_SEED, help="text: this world's documents (unseen)")
    copy.add_argument("--size", type=int, default=2000, help="documents of that world")
    copy.add_argument("--text", type=Path, help="text instead: a .txt file (one text per line) or .jsonl with 'text'")
    copy.add_argument("--n", type=int, default=48, help="windows")
    copy.add_argument("--span", type=int, default=8, help="tokens copied")
    copy.add_argument("--length", type=int, default=192, help="tokens per window")
    copy.add_argument("--seed", type=int, default=0)
    copy.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")
    copy.set_defaults(func=run_eval_copy)

    quote = sub.add_parser("quote", help="does a model quote the page sentence it opened the page for? "
                                         "teacher-forced on gold multi-hop trajectories")
    quote.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                       help="a checkpoint folder with its tokenizer (default: the embedded model)")
    quote.add_argument("--world", type=int, default=DEFAULT_EVAL_SEED, help="the world of the tasks (unseen)")
    quote.add_argument("--size", type=int, default=DEFAULT_SIZE, help="documents of that world")
    quote.add_argument("--hops", type=int, default=2, help="multi-hop tasks of this many hops")
    quote.add_argument("--n", type=int, default=50, help="tasks (each quotes once per hop)")
    quote.add_argument("--style", choices=GOLD_STYLES, default="restate",
                       help="the gold thinking's wording (the one the model was trained on)")
    quote.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")
    quote.set_defaults(func=run_eval_quote)


# ---- building the parts ----------------------------------------------------------------------------

def make_backend(args):
    """The model the command line names: a local checkpoint on nanok2's Engine, or a server."""
    from nanok2.agent_backends import EngineBackend, OpenAIBackend
    from nanok2.sampling import SamplingParams

    def sampling(defaults: dict) -> SamplingParams:
        temperature = args.temperature
        if temperature is None:
            temperature = 0.0 if defaults.get("do_sample") is False else float(defaults.get("temperature", 1.0))
        max_tokens = args.max_tokens or int(defaults.get("max_new_tokens") or 1024)
        params = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=args.sample_seed,
                                thinking_budget=args.thinking_budget)
        params.validate()
        return params

    if args.base_url:
        if not args.api_model:
            raise NanoK2Error("--base-url needs --api-model NAME (the model's name on that server)")
        return OpenAIBackend(args.base_url, args.api_model, params=sampling({}), context_tokens=args.context)
    path = args.model
    if not (path / "config.json").is_file():
        if path == DEFAULT_MODEL:
            raise NanoK2Error(f"the embedded agent model is not there: {path} does not exist yet (it is trained "
                              "by the project's agent recipe). Pass --model PATH to a nanok2 or K2 checkpoint folder "
                              "(config.json, *.safetensors, tiktoken.model), or --base-url/--api-model for a server")
        raise NanoK2Error(f"--model {path}: no config.json there; expected a checkpoint folder "
                          "(config.json, *.safetensors, tiktoken.model)")
    if not (path / "tiktoken.model").is_file():
        raise NanoK2Error(f"--model {path}: no tiktoken.model beside the weights; the agent needs the tokenizer")
    from nanok2.checkpoint import load_model
    from nanok2.engine import Engine
    from nanok2.tokenizer import Tokenizer

    defaults = {}
    if (path / "generation_config.json").is_file():
        try:
            defaults = json.loads((path / "generation_config.json").read_text())
        except ValueError as e:
            raise NanoK2Error(f"{path / 'generation_config.json'}: not JSON ({e})") from None
    params = sampling(defaults)
    model = load_model(path)
    context = args.context or min(model.args.max_position_embeddings, 8192)
    engine = Engine(model, Tokenizer.load(path), max_batch=1, max_seq=context, cpu_kernels=True)
    return EngineBackend(engine, params, name=f"engine:{path}")


def make_config(args, at_least_steps: int = 0):
    from nanok2.agent import AgentConfig

    return AgentConfig(max_steps=max(args.max_steps, at_least_steps), keep_last_steps=args.keep_last,
                       tool_timeout_s=args.tool_timeout)


def _documents(args):
    """(corpus, world or None) from --corpus or --world."""
    from nanok2.world import Corpus, build_world, load_world

    if args.corpus:
        is_index = (args.corpus / "docs.jsonl").is_file()
        return (Corpus.load(args.corpus) if is_index else Corpus.from_folder(args.corpus)), None
    if args.world.isdigit():
        world = build_world(int(args.world), args.size)
    elif Path(args.world).is_dir():
        world = load_world(Path(args.world))
    else:
        raise NanoK2Error(f"--world {args.world}: neither a seed nor a folder saved by `nanok2 world build`")
    return world.corpus, world


# ---- the commands ----------------------------------------------------------------------------------

def run_agent(args) -> int:
    if bool(args.question) == bool(args.task):
        raise NanoK2Error("give a QUESTION, or --task FAMILY to draw one from the world (not both)")
    if args.hops is not None and not args.task:
        raise NanoK2Error("--hops sets the difficulty of --task")
    backend = make_backend(args)  # first: a missing model is the likeliest mistake, and the quickest to report
    from nanok2.agent import Agent
    from nanok2.agent_view import TerminalView
    from nanok2.eval_world import is_correct
    from nanok2.world import SYSTEM_PROMPT, Toolbox, make_tasks

    corpus, world = _documents(args)
    toolbox = Toolbox(corpus, fuzzy_search=not args.exact_search)
    task, question, gold_calls = None, args.question, 0
    if args.task:
        if world is None:
            raise NanoK2Error("--task draws from a generated world; it cannot be used with --corpus")
        task = make_tasks(world, toolbox, args.task, args.hops, 1)[0]
        question = task.question
        # the demo of a long chain must not be cut by the budget before the chain ends
        gold_calls = sum(len(m.get("tool_calls") or []) for m in task.messages)
    log = args.log or Path("runs") / f"agent-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    agent = Agent(backend, toolbox, make_config(args, gold_calls + 1), view=None if args.quiet else TerminalView())
    result = agent.run(question, system_prompt=SYSTEM_PROMPT, log_path=log)
    if args.quiet:
        print(result.answer if result.answer is not None else "(no answer)")
    if task is not None:
        verdict = "correct" if is_correct(result.answer, task.answer) else "wrong"
        print(f"gold answer: {task.answer} ({verdict}; the gold trajectory makes {gold_calls} tool calls)")
    print(f"log: {log}")
    return 0


def run_eval_copy(args) -> int:
    from nanok2.copy_probe import run_eval_copy as run

    return run(args)


def run_eval_quote(args) -> int:
    from nanok2.quote_probe import run_eval_quote as run

    return run(args)


def run_eval_world(args) -> int:
    if args.n < 1:
        raise NanoK2Error(f"--n {args.n}: evaluate at least one task")
    if args.worlds < 1:
        raise NanoK2Error(f"--worlds {args.worlds}: evaluate on at least one world")
    backend = make_backend(args)
    from nanok2.agent import Agent
    from nanok2.agent_view import TerminalView
    from nanok2.eval_world import evaluate, summarize
    from nanok2.world import SYSTEM_PROMPT, Toolbox, build_world, make_tasks

    seeds = list(range(args.seed, args.seed + args.worlds))
    total = args.n * len(seeds)

    def show(row: dict) -> None:
        if args.json:
            print(json.dumps(row, ensure_ascii=False), flush=True)
            return
        mark = "✓" if row["correct"] else "✗"
        print(f"[{row['task'] + 1}/{total}] {mark} {row['steps']} steps, {row['tool_calls']} calls "
              f"({row['valid_tool_calls']} valid), {row['prompt_tokens']:,}+{row['completion_tokens']:,} tokens, "
              f"{row['seconds']:.1f} s, {row['stop_reason']}; gold documents opened in order "
              f"{row['evidence_followed']}/{row['evidence_docs']}"
              + (f", sentences quoted {row['evidence_quoted']}/{row['evidence_sentences']}" if "evidence_quoted" in row
                 else "") + f"; answer {row['answer']!r}, gold {row['gold']!r}"
              + (f" (world {row['seed']})" if len(seeds) > 1 else ""), flush=True)

    start, rows, hops = time.perf_counter(), [], None
    for seed in seeds:
        world = build_world(seed, args.size)
        toolbox = Toolbox(world.corpus, fuzzy_search=not args.exact_search)
        tasks = make_tasks(world, toolbox, args.family, args.hops, args.n)
        hops = tasks[0].hops
        agent = Agent(backend, toolbox, make_config(args), view=TerminalView() if args.live else None)
        done = evaluate(agent, tasks, SYSTEM_PROMPT, args.log_dir, first=len(rows),
                        on_task=lambda row: show({**row, "seed": seed}))   # called within this iteration
        rows += [{**row, "seed": seed} for row in done]
    where = f"world {args.seed}" if len(seeds) == 1 else f"worlds {seeds[0]}-{seeds[-1]}"
    summary = {"suite": "world", "seed": args.seed, "worlds": len(seeds), "family": args.family, "hops": hops,
               "backend": getattr(backend, "name", ""),
               "search": "exact" if args.exact_search else "fuzzy", **summarize(rows, time.perf_counter() - start)}
    if not args.json:
        rate = summary["valid_tool_call_rate"]
        print(f"accuracy {summary['accuracy']:.1%} ± {summary['ci95']:.1%} over {summary['n']} {args.family} tasks "
              f"({summary['hops']} hops, {where}); answered {summary['completed']:.0%}; "
              f"{summary['mean_steps']:.1f} steps and {summary['mean_tool_calls']:.1f} tool calls per task "
              f"(gold {summary['mean_gold_tool_calls']:.1f}); gold documents opened in order "
              f"{summary['evidence_followed']:.0%} (median {summary['median_evidence_followed']:g} of "
              f"{summary['median_evidence_docs']:g}); "
              + (f"gold sentences quoted {summary['evidence_quoted']:.0%}; " if "evidence_quoted" in summary else "")
              + "wrong runs: " + (", ".join(f"{k.replace('_', ' ')} {v}" for k, v in summary["wrong"].items())
                                  or "none") + "; valid calls "
              + (f"{rate:.1%}" if rate is not None else "n/a (no calls)")
              + f"; {summary['prompt_tokens']:,} prompt ({summary['cached_tokens']:,} cached) + "
              f"{summary['completion_tokens']:,} generated tokens; {summary['seconds']:.1f} s")
    print(json.dumps(summary, ensure_ascii=False))
    return 0
