"""`nanok2 train --recipe agent-tiny`: the whole recipe of nanok2-agent-tiny, from nothing to an INT4 K2 checkpoint.

    worlds (seeds 1..N)  ->  tokenizer (world documents + gold conversations)
                         ->  pre-training shards (documents)  and  SFT shards (gold trajectories cut into
                             the views the agent loop shows, agent_data.py)
    pre-train (MuonClip) ->  SFT with INT4 QAT on the routed experts (MuonClip)  ->  INT4 checkpoint
                             (compressed-tensors, K2-Thinking's layout) with tokenizer, chat template and
                             generation defaults

Each stage writes its own folder under `out` and is skipped when already done, so `--resume` after a
crash (or `kill -9`) continues with the stage that was running, training stages from their last
checkpoint. The seeds stay below 1000: evaluation worlds start at 1000 (agent_cli.DEFAULT_EVAL_SEED).
"""
from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from nanok2.errors import NanoK2Error

AGENT_TINY_MODEL = dict(
    hidden_size=192, intermediate_size=576, num_hidden_layers=4, num_attention_heads=3,
    q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
    first_k_dense_replace=1, n_routed_experts=16, num_experts_per_tok=2, n_shared_experts=1,
    moe_intermediate_size=192, max_position_embeddings=2048, rope_scaling=None)
MAX_CHECKPOINT_BYTES = 25 * 10**6
PRETRAIN_ORDERS = ("linked", "corpus")


@dataclass
class AgentTinyConfig:
    out: str = "runs/agent-tiny"
    # --- worlds and data
    first_seed: int = 1
    worlds: int = 40                 # training worlds: seeds first_seed .. first_seed + worlds - 1
    world_size: int = 10_000
    pretrain_worlds: int = 6         # worlds whose documents are the pre-training text
    tokenizer_worlds: int = 2
    vocab_size: int = 3072           # base tokens; 256 special ids follow
    # These defaults reproduce the embedded model (models/nanok2-agent-tiny): 40 worlds, single-digit tokens,
    # first-fit SFT packing, documents alone in pre-training with a copy per 16 tokens, tool results trained,
    # "restate" gold thinking, 3,000 SFT steps (with a copy per 32 tokens in pre-training, 850 of them left it
    # answering nothing, 1,500 and 2,400 fewer multi-hop answers: README).
    split_digits: bool = True        # every digit its own token (no digit-digit merges; K2's pattern kept)
    # a capitalised word never merges with the space or quote before it, so a name from a question or a page
    # encodes the same inside a JSON argument (tokenizer.train_hf_bpe). One run with it copied worse in
    # pre-training and broke the long trails (README, "Agent model"): off.
    split_before_capitals: bool = False
    # gold conversations of other tasks of the training worlds (not SFT's), rendered in the chat format,
    # in the pre-training text: TaskMix's counts per world times this factor (0: documents only). 1.0
    # held the long trails back (the model card's "What was separated").
    pretrain_conversations: float = 0.0
    # the order of each pre-training world's documents: "linked" lays them out as walks along their mentions
    # (world/reading_order.py), so a window's next article is about a name the one before it wrote;
    # "corpus" keeps the docid order, where neighbours are unrelated
    pretrain_order: str = "corpus"
    # the share of each pre-training world's entity articles framed as the agent reads them (purpose line,
    # article, the quoted sentence and what it gives: world/reading_notes.py); 0 leaves the documents bare
    pretrain_reading_notes: float = 0.0
    context: int = 2048              # the model's context (max_position_embeddings), prompt and reply
    reply_tokens: int = 256          # max tokens of one model turn (generation_config.json)
    # --- model
    model: dict = field(default_factory=lambda: dict(AGENT_TINY_MODEL))
    # --- pre-training on documents, with the copying curriculum (curriculum.py): windows growing from 32
    # tokens to pretrain_seq_len at 2,048 tokens a step, a span copied forward per pretrain_copy_every tokens.
    # 16 (the embedded model) against 32: held-out loss 1.95 against 1.85 on plain documents, but copies at
    # 192 tokens cost 1.59 nats a token (2.00 in an earlier run with 32), SFT's held-out loss drops by step
    # 300 instead of 1,100, and 58.5% of 200 multi-hop questions are answered against 52.0% (README, "Agent
    # model")
    pretrain_steps: int = 2400
    pretrain_seq_len: int = 512
    pretrain_batch: int = 4
    pretrain_windows: list = field(default_factory=lambda: [[32, 300], [64, 900], [128, 1500], [256, 2000]])
    pretrain_copy_every: int = 16
    pretrain_lr: float = 1e-2
    # --- SFT on agent views, with INT4 QAT
    sft_steps: int = 3000
    sft_batch: int = 2
    sft_lr: float = 2e-3
    sft_first_fit: bool = True       # pack SFT windows first-fit (less padding) instead of in order
    # integer loss weights (0-255) of [the assistant's turns, the tools' results]: [4, 1] also trains the
    # documents the tools return, in the agent's own format (a name in them is often copied from the query)
    sft_loss_weights: list = field(default_factory=lambda: [4, 1])
    # the gold thinking's wording (world/tasks.py GOLD_STYLES): "restate" carries what is still sought from
    # step to step; "compare" also writes each constraint verdict after the two values (not better: README);
    # "compute" has the python tool compute each constraint verdict (not better either); it changes the SFT
    # data and any pre-training conversations
    gold_style: str = "restate"
    qat: str | None = "int4"
    # Muon's Newton–Schulz in both trainings: "fp32" (the embedded model) or "bf16" (0.08 s a step instead of
    # 0.19 on the CPU of those runs; a whole bf16 run with 3,600 SFT steps took 74.7 minutes and answered
    # fewer multi-hop questions: README, "Agent model"). On a CPU without bf16 arithmetic it is 20x slower
    # than fp32 (a 192 x 576 matrix: 0.19 s against 0.008 s on an AVX2-only EPYC)
    ns_dtype: str = "fp32"
    seed: int = 0
    progress: bool = True

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def apply_overrides(cfg: AgentTinyConfig, overrides: list[str]) -> AgentTinyConfig:
    """`key=value` (and `model.key=value`) on the recipe; unknown keys list the known ones."""
    from nanok2.agent_data import check_loss_weights
    from nanok2.recipes import apply_overrides as apply_config_overrides
    from nanok2.world.tasks import GOLD_STYLES

    cfg = apply_config_overrides(cfg, overrides, what="agent-tiny recipe")
    if cfg.first_seed + cfg.worlds > 1000:
        raise NanoK2Error("training worlds must have seeds below 1000 (evaluation worlds start at 1000)")
    if min(cfg.pretrain_worlds, cfg.tokenizer_worlds) > cfg.worlds or min(cfg.worlds, cfg.tokenizer_worlds) < 1:
        raise NanoK2Error("need 1 <= tokenizer_worlds, pretrain_worlds <= worlds")
    try:
        check_loss_weights(cfg.sft_loss_weights)
    except NanoK2Error as e:
        raise NanoK2Error(f"sft_loss_weights: {e}") from None
    if cfg.gold_style not in GOLD_STYLES:
        raise NanoK2Error(f"gold_style={cfg.gold_style!r}; known: {', '.join(GOLD_STYLES)}")
    if not 0.0 <= cfg.pretrain_reading_notes <= 1.0:
        raise NanoK2Error(f"pretrain_reading_notes={cfg.pretrain_reading_notes} is a share of articles: 0 to 1")
    if cfg.pretrain_order not in PRETRAIN_ORDERS:
        raise NanoK2Error(f"pretrain_order={cfg.pretrain_order!r}; known: {', '.join(PRETRAIN_ORDERS)}")
    return cfg


# ---- stages ----------------------------------------------------------------------------------------

SPECIAL_RE = re.compile(r"<\|[a-z_]+\|>")


def _log(msg: str) -> None:
    print(f"[agent-tiny {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _done(folder: Path) -> bool:
    return (folder / "DONE").exists()


def _mark_done(folder: Path, info: dict) -> None:
    (folder / "DONE").write_text(json.dumps(info, indent=2) + "\n")


def _fresh(folder: Path) -> Path:
    """An empty folder for a stage that did not finish (what a killed stage left is its own scratch)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def _worlds(cfg: AgentTinyConfig, n: int):
    from nanok2.world import Toolbox, build_world

    for seed in range(cfg.first_seed, cfg.first_seed + n):
        world = build_world(seed, cfg.world_size)
        yield world, Toolbox(world.corpus)


def stage_text(cfg: AgentTinyConfig, out: Path) -> dict:
    """Pre-training documents (JSONL) and the tokenizer's text: documents plus gold conversations."""
    from nanok2.chat import render
    from nanok2.world import make_tasks
    from nanok2.world.reading_notes import noted_documents
    from nanok2.world.reading_order import linked_order
    from nanok2.world.tools import SCHEMAS

    folder = _fresh(out / "text")
    docs = chars = 0
    with open(folder / "docs.jsonl", "w", encoding="utf-8") as f_docs, \
            open(folder / "tokenizer.txt", "w", encoding="utf-8") as f_tok:
        for k, (world, toolbox) in enumerate(_worlds(cfg, max(cfg.pretrain_worlds, cfg.tokenizer_worlds))):
            if k < cfg.pretrain_worlds:
                ordered = (linked_order(world.corpus.docs, random.Random(f"agent-tiny:order:{cfg.seed}:{world.seed}"))
                           if cfg.pretrain_order == "linked" else world.corpus.docs)
                text = {d.docid: d.text for d in world.corpus.docs}
                if cfg.pretrain_reading_notes > 0:
                    rng = random.Random(f"agent-tiny:notes:{cfg.seed}:{world.seed}")
                    text = dict(zip(text, noted_documents(world, rng, cfg.pretrain_reading_notes)))
                for d in ordered:
                    f_docs.write(json.dumps({"text": text[d.docid]}, ensure_ascii=False) + "\n")
                docs += len(ordered)
            if k < cfg.tokenizer_worlds:
                for d in world.corpus.docs:
                    f_tok.write(d.text + "\n\n")
                    chars += len(d.text)
                for family, hops in (("multihop", 2), ("multihop", 3), ("constraint", 3), ("trail", 8),
                                     ("arithmetic", 2)):
                    try:
                        tasks = make_tasks(world, toolbox, family, hops, 10, cfg.gold_style)
                    except NanoK2Error:  # a small world: fewer tasks of this kind
                        tasks = []
                    for task in tasks:
                        text = SPECIAL_RE.sub("\n", render(task.messages, SCHEMAS))
                        f_tok.write(text + "\n\n")
                        chars += len(text)
    conversations = _pretrain_conversations(cfg, folder / "conversations.jsonl")
    info = {"pretrain_documents": docs, "pretrain_conversations": conversations, "tokenizer_chars": chars}
    _mark_done(folder, info)
    return info


def _pretrain_conversations(cfg: AgentTinyConfig, path: Path) -> int:
    """Whole gold conversations for pre-training: per training world and (family, hops) of TaskMix, the
    tasks that follow the ones SFT uses (make_tasks is a stable sequence, so they never overlap), and
    trails of the same lengths SFT draws. -> how many were written."""
    from nanok2.agent_data import TaskMix
    from nanok2.world import make_tasks
    from nanok2.world.tasks import make_trail
    from nanok2.world.tools import SCHEMAS

    mix, n = TaskMix(), 0
    rng = random.Random(f"agent-tiny:pretrain:{cfg.seed}")
    with open(path, "w", encoding="utf-8") as f:
        if cfg.pretrain_conversations <= 0:
            return 0
        for world, toolbox in _worlds(cfg, cfg.worlds):
            tasks = []
            for family in ("multihop", "constraint", "arithmetic"):
                for hops, sft_n in getattr(mix, family).items():
                    extra = round(sft_n * cfg.pretrain_conversations)
                    try:
                        tasks += make_tasks(world, toolbox, family, hops, sft_n + extra, cfg.gold_style)[sft_n:]
                    except NanoK2Error:   # a small world: fewer tasks of this kind
                        continue
            depths = sorted(set(world.rendered.trails.depth))
            short = [d for d in depths if d <= 12] or depths
            for _ in range(round(mix.trail_short * cfg.pretrain_conversations)):
                tasks.append(make_trail(world, toolbox, rng.choice(short), rng))
            for task in tasks:
                f.write(json.dumps({"messages": task.messages, "tools": SCHEMAS}, ensure_ascii=False) + "\n")
            n += len(tasks)
    return n


def stage_tokenizer(cfg: AgentTinyConfig, out: Path) -> dict:
    from nanok2.chat import own_chat_template
    from nanok2.tokenizer import train as train_tokenizer

    folder = _fresh(out / "tokenizer")
    tok = train_tokenizer([str(out / "text" / "tokenizer.txt")], cfg.vocab_size, cfg.split_digits,
                           cfg.split_before_capitals)
    tok.save(folder, chat_template=own_chat_template())
    info = {"n_vocab": tok.n_vocab}
    _mark_done(folder, info)
    return info


def stage_sft_data(cfg: AgentTinyConfig, out: Path) -> dict:
    """Every training world's tasks, cut into agent views (agent_data.world_examples)."""
    from nanok2.agent_data import TaskMix, prompt_limit, world_examples, write_examples
    from nanok2.agent_backends import prompt_tokens, reply_tokens
    from nanok2.tokenizer import Tokenizer
    from nanok2.world.tools import SCHEMAS

    folder = _fresh(out / "sft-data")
    tok = Tokenizer.load(out / "tokenizer")
    limit = prompt_limit(cfg.context, cfg.reply_tokens)

    def count(messages: list[dict]) -> int:  # as the agent's EngineBackend counts a prompt
        return prompt_tokens(messages, tok, SCHEMAS)

    rng = random.Random(f"agent-tiny:{cfg.seed}")
    used_total: dict[str, int] = {}
    n = 0
    for world, toolbox in _worlds(cfg, cfg.worlds):
        examples, used = world_examples(world, toolbox, count, limit, TaskMix(), rng, style=cfg.gold_style,
                                        reply_limit=cfg.reply_tokens,
                                        turn_tokens=lambda messages: reply_tokens(messages, tok, SCHEMAS))
        n += write_examples(folder / "sft.jsonl", examples, SCHEMAS)
        for k, v in used.items():
            used_total[k] = used_total.get(k, 0) + v
        _log(f"world {world.seed}: {len(examples)} examples from {sum(used.values())} tasks")
    info = {"examples": n, "tasks": used_total, "prompt_limit": limit}
    _mark_done(folder, info)
    return info


def stage_shards(cfg: AgentTinyConfig, out: Path) -> dict:
    from nanok2.data import tokenize_files

    folder = _fresh(out / "shards")
    tok = str(out / "tokenizer")
    pre = tokenize_files(tok, [str(out / "text" / "docs.jsonl"), str(out / "text" / "conversations.jsonl")],
                         str(folder / "pretrain"))   # conversations.jsonl is empty unless pretrain_conversations
    sft = tokenize_files(tok, [str(out / "sft-data" / "sft.jsonl")], str(folder / "sft"), sft=True,
                         align=cfg.context, first_fit=cfg.sft_first_fit, sft_weights=tuple(cfg.sft_loss_weights))
    info = {"pretrain_tokens": pre["tokens"], "sft_tokens": sft["tokens"], "sft_padding": sft.get("padding")}
    _mark_done(folder, info)
    return info


def _train_stage(cfg: AgentTinyConfig, out: Path, name: str, resume: bool, **fields) -> dict:
    from nanok2.recipes import TrainConfig
    from nanok2.train import train
    from nanok2.train_state import latest_checkpoint
    from nanok2.tokenizer import Tokenizer

    folder = out / name
    if (folder / "final" / "config.json").exists():
        return {"skipped": True}
    if not (resume and latest_checkpoint(folder) is not None):
        shutil.rmtree(folder, ignore_errors=True)  # a stage killed before its first checkpoint starts over
    model = {**cfg.model, "vocab_size": Tokenizer.load(out / "tokenizer").n_vocab}
    tc = TrainConfig(preset="tiny", model=model, tokenizer=str(out / "tokenizer"), out=str(folder),
                     seed=cfg.seed, progress=cfg.progress, **fields)
    history = train(tc, resume=folder.exists())
    last = history[-1] if history else {}
    info = {k: last.get(k) for k in ("step", "loss", "eval_loss", "max_logit", "balance", "tok_per_s")}
    info["copy_probe"] = _copy_probe(cfg, out, folder / "final")
    return info


def _copy_probe(cfg: AgentTinyConfig, out: Path, checkpoint: Path) -> dict:
    """Does the trained model copy from its context (copy_probe.py)? On documents of an evaluation world."""
    from nanok2.agent_cli import DEFAULT_EVAL_SEED
    from nanok2.checkpoint import load_model
    from nanok2.copy_probe import model_probe, world_texts
    from nanok2.tokenizer import Tokenizer

    model = load_model(checkpoint, dtype="float32")
    texts = world_texts(DEFAULT_EVAL_SEED, min(cfg.world_size, 2000))
    tokenizer = Tokenizer.load(out / "tokenizer")
    result = {}
    for length in sorted({min(n, cfg.context) for n in (64, 192, 512)}):   # copies 16-500 tokens back
        probe = model_probe(model, tokenizer, texts, length=length).to_json()
        result[str(length)] = {k: round(probe[k], 3) for k in ("first", "repeat", "gain")}
    return result


def stage_quantize(cfg: AgentTinyConfig, out: Path) -> dict:
    import torch

    from nanok2.checkpoint import load_model
    from nanok2.quant import copy_extra_files, quantize_model, save_quantized

    src, folder = out / "sft" / "final", out / "model"
    tmp = _fresh(out / ".tmp-model")
    model = load_model(src, dtype="bfloat16")
    with torch.no_grad():
        quantize_model(model, targets="experts", group_size=32)
    save_quantized(model, tmp)
    copy_extra_files(src, tmp)
    # K2-Thinking recommends temperature 1.0 for its own model; a model this small is greedy
    (tmp / "generation_config.json").write_text(json.dumps(
        {"do_sample": False, "max_new_tokens": cfg.reply_tokens}, indent=2) + "\n")
    for stage in ("pretrain", "sft"):    # the loss curves, for the model card
        if (out / stage / "loss.png").exists():
            shutil.copy2(out / stage / "loss.png", tmp / f"{stage}_loss.png")
    size = sum(f.stat().st_size for f in tmp.iterdir())
    if size > MAX_CHECKPOINT_BYTES:
        raise NanoK2Error(f"the INT4 checkpoint is {size / 1e6:.1f} MB, over the {MAX_CHECKPOINT_BYTES / 1e6:.0f} MB "
                          "the recipe allows; make the model smaller")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    info = {"bytes": size}
    _mark_done(folder, info)
    return info


def run_pipeline(cfg: AgentTinyConfig, resume: bool = False) -> dict:
    out = Path(cfg.out)
    saved = out / "recipe_config.json"
    if out.exists() and any(out.iterdir()):
        if not resume:
            raise NanoK2Error(f"{out} already holds a run; pass --resume to continue it, or choose another "
                              "out=DIR (nothing was changed)")
        if saved.exists() and json.loads(saved.read_text()) != json.loads(json.dumps(cfg.to_json())):
            raise NanoK2Error(f"{out} was started with another configuration ({saved}); use the same "
                              "overrides to resume, or another out=DIR")
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(cfg.to_json(), indent=2) + "\n")
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() and resume else {}
    stages = [
        ("text", lambda: stage_text(cfg, out)),
        ("tokenizer", lambda: stage_tokenizer(cfg, out)),
        ("sft-data", lambda: stage_sft_data(cfg, out)),
        ("shards", lambda: stage_shards(cfg, out)),
        ("pretrain", lambda: _train_stage(
            cfg, out, "pretrain", resume, data=str(out / "shards" / "pretrain"), seq_len=cfg.pretrain_seq_len,
            batch_size=cfg.pretrain_batch, steps=cfg.pretrain_steps, lr=cfg.pretrain_lr, schedule="wsd",
            warmup=20, eval_every=100, ckpt_every=50, window_schedule=cfg.pretrain_windows,
            copy_every=cfg.pretrain_copy_every, ns_dtype=cfg.ns_dtype)),
        ("sft", lambda: _train_stage(
            cfg, out, "sft", resume, data=str(out / "shards" / "sft"), seq_len=cfg.context,
            batch_size=cfg.sft_batch, steps=cfg.sft_steps, lr=cfg.sft_lr, schedule="wsd", warmup=30,
            init_from=str(out / "pretrain" / "final"), qat=cfg.qat, eval_every=100, ckpt_every=50,
            eval_sequences=8, ns_dtype=cfg.ns_dtype)),
        ("model", lambda: stage_quantize(cfg, out)),
    ]
    for name, run in stages:
        if name in summary and (_done(out / name) or (out / name / "final" / "config.json").exists()):
            _log(f"{name}: done before, skipped")
            continue
        _log(f"{name}: start")
        t0 = time.perf_counter()
        info = run()
        info["seconds"] = round(time.perf_counter() - t0, 1)
        summary[name] = info
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        _log(f"{name}: {json.dumps(info)}")
    summary["total_seconds"] = round(sum(v.get("seconds", 0) for v in summary.values() if isinstance(v, dict)), 1)
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    _log(f"done in {summary['total_seconds'] / 60:.1f} min -> {out / 'model'}")
    return summary
