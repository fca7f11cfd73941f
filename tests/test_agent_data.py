"""Agent training data: every trained turn's context is exactly the prompt the agent loop shows at that
step (checked by running the real loop on the gold turns), masks train only what they should, packed
conversations never straddle a window, and the agent-tiny recipe runs end to end at toy size."""
import copy
import json
import random

import numpy as np
import pytest

from nanok2.agent import Agent, AgentConfig
from nanok2.agent_backends import reply_tokens
from nanok2.agent_data import (TaskMix, agent_views, encode_example, forced_ending, longest_reply, prompt_limit,
                               world_examples)
from nanok2.chat import StreamParser, render, render_ids
from nanok2.data import ShardWriter, TokenDataset
from nanok2.errors import NanoK2Error
from nanok2.tokenizer import Tokenizer
from nanok2.world import SYSTEM_PROMPT, Toolbox, build_world, make_tasks
from nanok2.world.tools import SCHEMAS


def raw_turn(message: dict) -> str:
    """A gold assistant message as the raw K2 text a model writes."""
    text = f"<think>{message.get('reasoning_content', '')}</think>{message.get('content') or ''}"
    if message.get("tool_calls"):
        text += "<|tool_calls_section_begin|>" + "".join(
            f"<|tool_call_begin|>{c['id']}<|tool_call_argument_begin|>{c['function']['arguments']}<|tool_call_end|>"
            for c in message["tool_calls"]) + "<|tool_calls_section_end|>"
    return text + "<|im_end|>"


class GoldReplay:
    """A backend that writes the gold trajectory's turns in order and records every prompt it is given.
    Tokens are characters of the K2 rendering."""

    name = "gold-replay"

    def __init__(self, turns: list[dict], context_tokens: int):
        self.turns, self.context_tokens, self.max_tokens = turns, context_tokens, 0
        self.prompts = []

    def count_tokens(self, messages, tools):
        return len(render(messages, tools, add_generation_prompt=True))

    def complete(self, messages, tools, tool_choice="auto", on_event=None):
        self.prompts.append(copy.deepcopy(messages))
        parser = StreamParser()
        parser.feed(raw_turn(self.turns[len(self.prompts) - 1]))
        parser.flush()
        return {**parser.finish(), "usage": {}}


def count_chars(messages):
    return len(render(messages, SCHEMAS, add_generation_prompt=True))


@pytest.fixture(scope="module")
def world():
    return build_world(11, 1200)


@pytest.fixture(scope="module")
def toolbox(world):
    return Toolbox(world.corpus)


def trained_prompts(examples) -> list[list[dict]]:
    """The context of each trained assistant turn, in order."""
    return [ex.messages[:i] for ex in examples for i in range(ex.train_from, len(ex.messages))
            if ex.messages[i]["role"] == "assistant"]


def strip(messages):
    """What the loop keeps of a message that the gold one also has (the loop adds no extra keys we compare)."""
    keep = ("role", "content", "tool_call_id")
    out = []
    for m in messages:
        d = {k: m.get(k) for k in keep}
        d["content"] = d["content"] or ""
        if m.get("role") == "assistant":
            d["reasoning"] = m.get("reasoning_content") or ""
            d["calls"] = [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
                          for c in m.get("tool_calls") or []]
        out.append(d)
    return out


@pytest.mark.parametrize("family,hops,share", [("trail", None, 0.35), ("constraint", 3, 0.5), ("multihop", 3, 0.6)])
def test_each_trained_turn_sees_exactly_the_prompt_the_loop_builds(world, toolbox, family, hops, share):
    if family == "trail":
        hops = max(world.rendered.trails.depth)  # the longest trail: hiding, then keep-last-K
    task = make_tasks(world, toolbox, family, hops, 1)[0]
    limit = int(count_chars(task.messages) * share)
    config = AgentConfig(keep_last_steps=3)
    examples = agent_views(task.messages, count_chars, limit, config)
    gold_turns = [m for m in task.messages if m["role"] == "assistant"]
    backend = GoldReplay(gold_turns, context_tokens=limit)
    result = Agent(backend, toolbox, config).run(task.question, system_prompt=SYSTEM_PROMPT)
    assert result.answer == task.answer and result.steps == len(gold_turns)
    expected = trained_prompts(examples)
    assert len(expected) == len(backend.prompts)
    for step, (mine, loop) in enumerate(zip(expected, backend.prompts)):
        assert strip(mine) == strip(loop), f"step {step + 1}"
    # every view fits, and the long ones really were cut
    assert all(count_chars(p) <= limit for p in expected)
    assert len(examples) > 1
    if family == "trail":
        # a full prompt at step s holds 2 + 2s messages; keep-last-K drops whole steps
        assert any(len(p) < 2 + 2 * s for s, p in enumerate(expected))


def test_a_forced_final_answer_is_trained_in_the_loops_view(world, toolbox):
    task = make_tasks(world, toolbox, "trail", 6, 1)[0]
    n_calls = sum(len(m.get("tool_calls") or []) for m in task.messages)
    messages = forced_ending(task.messages)
    limit = 10**6
    examples = agent_views(messages, count_chars, limit)
    backend = GoldReplay([m for m in messages if m["role"] == "assistant"], context_tokens=limit)
    result = Agent(backend, toolbox, AgentConfig(max_steps=n_calls)).run(task.question, system_prompt=SYSTEM_PROMPT)
    assert result.stop_reason == "budget" and result.answer == task.answer
    assert [strip(p) for p in trained_prompts(examples)] == [strip(p) for p in backend.prompts]
    with pytest.raises(NanoK2Error):
        forced_ending(messages[:-1])


def test_prompt_limit_is_the_loops():
    backend = GoldReplay([], context_tokens=2048)
    backend.max_tokens = 256
    assert Agent(backend, None).context_limit() == prompt_limit(2048, 256) == 1792


def test_tasks_with_a_reply_over_the_limit_are_left_out(world, toolbox, byte_tokenizer):
    """A gold turn longer than one reply could not be written by the agent: such tasks stay out of SFT. A turn
    counts as generated, reasoning included, the final answer too (whose reasoning a prompt would drop)."""
    def turn_tokens(messages):
        return reply_tokens(messages, byte_tokenizer, SCHEMAS)

    task = make_tasks(world, toolbox, "constraint", 3, 1, style="restate")[0]
    final = task.messages[-1]
    ids, mask = render_ids(task.messages, byte_tokenizer, SCHEMAS)
    generated = len(ids) - len(render_ids(task.messages[:-1], byte_tokenizer, SCHEMAS, add_generation_prompt=True)[0])
    assert turn_tokens(task.messages) == generated == sum(1 for m in mask[-generated:] if m)
    assert generated > len(final["reasoning_content"].encode()) + len(final["content"].encode())
    turns = [turn_tokens(task.messages[:i + 1]) for i, m in enumerate(task.messages) if m["role"] == "assistant"]
    assert longest_reply(task.messages, turn_tokens) == max(turns)
    mix = TaskMix(multihop={2: 3}, constraint={3: 3}, arithmetic={}, trail_short=0, trail_medium=0, trail_long=0)
    lengths = sorted(longest_reply(t.messages, turn_tokens)
                     for family, hops in (("multihop", 2), ("constraint", 3))
                     for t in make_tasks(world, toolbox, family, hops, 3, style="restate"))
    cut = lengths[2]   # between the shortest and the longest: some tasks fit, some do not
    _, used = world_examples(world, toolbox, count_chars, 10**6, mix, random.Random(0), style="restate",
                             reply_limit=cut, turn_tokens=turn_tokens)
    fit = sum(n <= cut for n in lengths)
    assert used.get("multihop", 0) + used.get("constraint", 0) == fit
    assert used["over_reply_limit"] == len(lengths) - fit > 0
    _, used = world_examples(world, toolbox, count_chars, 10**6, mix, random.Random(0), style="restate")
    assert used["multihop"] + used["constraint"] == 6 and "over_reply_limit" not in used
    with pytest.raises(NanoK2Error, match="reply_limit needs turn_tokens"):
        world_examples(world, toolbox, count_chars, 10**6, mix, random.Random(0), reply_limit=cut)


@pytest.fixture(scope="module")
def byte_tokenizer():
    return Tokenizer({bytes([i]): i for i in range(256)})


def test_train_from_masks_the_earlier_turns(world, toolbox, byte_tokenizer):
    task = make_tasks(world, toolbox, "multihop", 2, 1)[0]
    messages = task.messages
    full_ids, full_mask = encode_example({"messages": messages, "tools": SCHEMAS}, byte_tokenizer)
    assert full_ids == render_ids(messages, byte_tokenizer, SCHEMAS)[0]
    last_call = max(i for i, m in enumerate(messages) if m.get("tool_calls"))
    ids, mask = encode_example({"messages": messages, "tools": SCHEMAS, "train_from": last_call}, byte_tokenizer)
    assert ids == full_ids
    prefix = render_ids(messages[:last_call], byte_tokenizer, SCHEMAS, add_generation_prompt=True)[0]
    assert not any(mask[:len(prefix)]) and mask[len(prefix):] == full_mask[len(prefix):]
    trained = byte_tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert trained.startswith("<think>" + messages[last_call]["reasoning_content"])
    assert trained.count("<|im_end|>") == len(messages) - last_call - (len(messages) - last_call) // 2
    with pytest.raises(NanoK2Error, match="train_from=1"):
        encode_example({"messages": messages, "tools": SCHEMAS, "train_from": 1}, byte_tokenizer)


def test_loss_weights_can_also_train_the_tool_results(world, toolbox, byte_tokenizer):
    """`weights` = (assistant, tool results): the assistant's tokens get the first, and every tool result,
    from its `## Return of` header to the text's end, the second; nothing else is trained. With train_from,
    only the tool results after that point are trained, like the assistant's turns."""
    task = make_tasks(world, toolbox, "multihop", 2, 1)[0]
    row = {"messages": task.messages, "tools": SCHEMAS}
    plain_ids, plain = encode_example(row, byte_tokenizer)
    ids, mask = encode_example(row, byte_tokenizer, (4, 1))
    assert ids == plain_ids and set(mask) == {0, 1, 4}
    assert [m == 4 for m in mask] == [m == 1 for m in plain]
    tool_text = byte_tokenizer.decode([i for i, m in zip(ids, mask) if m == 1])
    results = [m for m in task.messages if m["role"] == "tool"]
    assert tool_text == "".join(f"## Return of {m['tool_call_id']}\n{m['content']}" for m in results)
    last_call = max(i for i, m in enumerate(task.messages) if m.get("tool_calls"))
    _, late = encode_example({**row, "train_from": last_call}, byte_tokenizer, (4, 1))
    assert byte_tokenizer.decode([i for i, m in zip(ids, late) if m == 1]) == \
        f"## Return of {results[-1]['tool_call_id']}\n{results[-1]['content']}"
    for bad in ((0, 1), (1, 256), (2, -1)):
        with pytest.raises(NanoK2Error, match="loss weights"):
            encode_example(row, byte_tokenizer, bad)


@pytest.mark.parametrize("first_fit", [False, True])
def test_aligned_packing_keeps_each_document_in_one_window(tmp_path, first_fit):
    """In order, or first fit: the 3-token document fills the gap after the first 5-token one; no
    document is cut either way."""
    w = ShardWriter(tmp_path / "d", vocab_size=100, kind="sft", align=8, pad_id=99, first_fit=first_fit)
    docs = [list(range(1, 6)), list(range(10, 15)), list(range(20, 28)), [30, 31, 32]]
    for d in docs:
        w.add(d, [1] * len(d))
    w.close()
    data = TokenDataset(tmp_path / "d", seq_len=8)
    windows = [data._window(*win) for win in data.train_windows]
    # first fit closes windows as they fill (the 8-token one at once), the rest at close()
    expected = [docs[2], docs[0] + docs[3], docs[1]] if first_fit else docs
    padding = json.loads((tmp_path / "d" / "manifest.json").read_text())["padding"]
    assert len(windows) == len(expected) and padding == 8 * len(expected) - sum(map(len, docs)) + 1
    for d, (ids, mask) in zip(expected, windows):
        ids, mask = ids[:8], mask[:8]  # a window's last token is the next one's first (a shifted target)
        assert list(ids[:len(d)]) == d and mask[:len(d)].all() and not mask[len(d):].any()
        assert all(t == 99 for t in ids[len(d):])
    with pytest.raises(NanoK2Error, match="more than a window"):
        ShardWriter(tmp_path / "e", vocab_size=100, kind="sft", align=4).add([1] * 5, [1] * 5)


def test_aligned_packing_wastes_little_and_loses_nothing(tmp_path):
    """First fit, many documents of random lengths across several shards: each appears once, whole, inside
    one window, and first fit leaves under 8% padding where packing in order would leave 36% (lengths of
    100-1,499 tokens in 2,048-token windows)."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(100, 1500, 400)
    w = ShardWriter(tmp_path / "d", vocab_size=3000, kind="sft", align=2048, pad_id=0, shard_tokens=100_000,
                    first_fit=True)
    for k, n in enumerate(lengths):
        w.add(np.full(n, k + 1), np.ones(n))
    w.close()
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert len(manifest["shards"]) > 1 and manifest["padding"] < 0.08 * lengths.sum()
    data = TokenDataset(tmp_path / "d", seq_len=2048)
    seen = {}
    for win in data.train_windows:
        ids, _ = data._window(*win)
        for k in np.unique(ids[:2048]):
            if k:
                assert k not in seen, "a document is split across windows"
                seen[int(k)] = int((ids[:2048] == k).sum())
    assert seen == {k + 1: int(n) for k, n in enumerate(lengths)}


def test_agent_tiny_recipe_end_to_end_at_toy_size(tmp_path, capsys):
    """The whole pipeline on one small world and a few steps: an INT4 K2 checkpoint the agent loads;
    a second call resumes (skips what is done); a stray run folder and bad overrides are refused."""
    from nanok2.agent_recipe import AgentTinyConfig, apply_overrides, run_pipeline
    from nanok2.checkpoint import load_model

    out = tmp_path / "run"
    cfg = apply_overrides(AgentTinyConfig(), [
        f"out={out}", "worlds=1", "world_size=400", "pretrain_worlds=1", "tokenizer_worlds=1", "vocab_size=600",
        "pretrain_steps=2", "pretrain_batch=2", "pretrain_seq_len=64", "pretrain_windows=[[32,1]]", "sft_steps=2", "sft_batch=1",
        "context=2048", "progress=false", "model.hidden_size=64", "model.num_hidden_layers=2",
        "split_digits=true", "pretrain_conversations=1", "sft_first_fit=true", "pretrain_order=linked",
        "sft_loss_weights=[3,1]", "gold_style=restate"])
    summary = run_pipeline(cfg)
    model_dir = out / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    for name in ("tiktoken.model", "tokenizer_config.json", "generation_config.json", "pretrain_loss.png",
                 "sft_loss.png"):
        assert (model_dir / name).is_file()
    assert json.loads((model_dir / "generation_config.json").read_text())["do_sample"] is False
    model = load_model(model_dir)
    assert model.args.vocab_size == Tokenizer.load(model_dir).n_vocab
    assert summary["sft"]["step"] == 2 and summary["model"]["bytes"] < 25e6
    for stage in ("pretrain", "sft"):        # each trained model's copying, measured on an unseen world
        probes = summary[stage]["copy_probe"]
        assert sorted(probes, key=int) == ["64", "192", "512"]
        for probe in probes.values():
            assert probe["gain"] == pytest.approx(probe["first"] - probe["repeat"], abs=2e-3)
    # pre-training followed its window schedule (32-token windows, then 64) with copies in the text
    rows = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["seq_len"] for r in rows] == [32, 64]
    manifest = json.loads((out / "shards" / "sft" / "manifest.json").read_text())
    assert manifest["align"] == 2048
    weights = np.fromfile(out / "shards" / "sft" / manifest["shards"][0]["mask"], dtype=np.uint8)
    assert set(np.unique(weights)) == {0, 1, 3}       # sft_loss_weights: assistant 3, tool results 1
    sft_text = "".join(p.read_text() for p in (out / "sft-data").glob("*.jsonl"))
    assert "Now the question asks for the " in sft_text         # gold_style=restate
    # the options: pre-training text holds whole conversations in the chat format, digits are single tokens
    tok = Tokenizer.load(model_dir)
    assert summary["text"]["pretrain_conversations"] > 0
    texts = [json.loads(line)["text"] for line in (out / "text" / "docs.jsonl").read_text().splitlines()]
    world_texts = [d.text for d in build_world(1, 400).corpus.docs]
    assert sorted(texts) == sorted(world_texts) and texts != world_texts   # every document once, re-ordered
    pretrain = json.loads((out / "shards" / "pretrain" / "manifest.json").read_text())
    ids = np.fromfile(out / "shards" / "pretrain" / pretrain["shards"][0]["file"], dtype=pretrain["dtype"])
    assert (ids == tok.id_of("<|tool_call_begin|>")).sum() > 0
    assert [tok.decode([i]) for i in tok.encode("d0006 1847")] == ["d", "0", "0", "0", "6", " ", "1", "8", "4", "7"]
    with pytest.raises(NanoK2Error, match="already holds a run"):
        run_pipeline(cfg)
    capsys.readouterr()
    again = run_pipeline(cfg, resume=True)
    assert "done before, skipped" in capsys.readouterr().out
    assert again["model"] == summary["model"]
    with pytest.raises(NanoK2Error, match="another configuration"):
        run_pipeline(apply_overrides(cfg, ["sft_steps=3"]), resume=True)
    with pytest.raises(NanoK2Error, match="unknown agent-tiny recipe key 'stepz'"):
        apply_overrides(cfg, ["stepz=3"])
    for bad in ("[0,1]", "[1]", "[1.5,1]", "[1,300]"):
        with pytest.raises(NanoK2Error, match="sft_loss_weights"):
            apply_overrides(cfg, [f"sft_loss_weights={bad}"])
    with pytest.raises(NanoK2Error, match="gold_style='terse'; known: plain, restate"):
        apply_overrides(cfg, ["gold_style=terse"])
    with pytest.raises(NanoK2Error, match="below 1000"):
        apply_overrides(cfg, ["first_seed=990", "worlds=20"])
