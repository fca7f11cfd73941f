"""The quote probe (`nanok2 eval quote`): its quote points, its scoring against known pickers, the command."""
from __future__ import annotations

import json

import pytest
import torch

from nanok2.quote_probe import QUOTE_OPEN, QuotePoint, page_sentences, quote_points, quote_probe, score_candidates
from nanok2.world import Toolbox, build_world, make_tasks
from nanok2.world.tools import SCHEMAS

V = 600


@pytest.fixture(scope="module")
def tasks():
    world = build_world(5, 600)
    return make_tasks(world, Toolbox(world.corpus), "multihop", 2, 4, "restate")


def char_encode(text: str) -> list[int]:
    """One id per character, except that '"T' is one id: a merge across the opening quote mark, as a BPE makes."""
    ids, i = [], 0
    while i < len(text):
        if text.startswith('"T', i):
            ids.append(V - 1)
            i += 2
        else:
            ids.append(min(ord(text[i]), V - 2))
            i += 1
    return ids


def oracle(target: list[int]):
    """A model that predicts `target` token by token wherever the input agrees with it so far."""
    def logits_fn(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*x.shape, V)
        for b, row in enumerate(x.tolist()):
            for t in range(len(row)):
                if t + 1 < len(target) and row[:t + 1] == target[:t + 1]:
                    out[b, t, target[t + 1]] = 20.0
        return out
    return logits_fn


def test_page_sentences_drop_the_header_and_the_more_line():
    page = ("d0042 | Vrekrukle\nThe town of Vrekrukle dates from 1370. Vrekrukle has a population of 2,096,239.\n"
            "The people born in Vrekrukle are Ana Bo and Cy Du.\n(more: open d0042 page 1)")
    assert page_sentences(page) == ["The town of Vrekrukle dates from 1370.",
                                    "Vrekrukle has a population of 2,096,239.",
                                    "The people born in Vrekrukle are Ana Bo and Cy Du."]


def test_quote_points_of_gold_trajectories(tasks):
    for task in tasks:
        points = quote_points(task.messages, SCHEMAS)
        assert len(points) == task.hops                      # one quote per article read
        for p in points:
            assert p.prefix.endswith(QUOTE_OPEN) and "I open it for " in p.prefix
            assert p.prefix.count("<think>") >= 1 and p.prefix.rstrip().endswith('says: "')
            quoted = [m["reasoning_content"] for m in task.messages if QUOTE_OPEN in (m.get("reasoning_content") or "")]
            assert any(f'{QUOTE_OPEN}{p.candidates[p.gold]}"' in q for q in quoted)
            assert len(p.candidates) >= 3


def test_an_oracle_picks_what_it_predicts_even_across_a_merged_quote_mark():
    point = QuotePoint('I open it for the founder of X. The article says: "',
                       ["X is a bank.", "The founder of X was Yu Ko.", "Tu Ko established X."], gold=1)
    for k in range(3):
        target = char_encode(point.prefix + point.candidates[k] + '"')
        scores = score_candidates(oracle(target), char_encode, point)
        assert max(range(3), key=scores.__getitem__) == k
    uniform = score_candidates(lambda x: torch.zeros(*x.shape, V), char_encode, point)
    # a uniform model: each candidate costs log V per token, its closing quote mark included
    lengths = [len(char_encode(point.prefix + c + '"')) - len(char_encode(point.prefix)) + 1 for c in point.candidates]
    assert uniform == pytest.approx([-n * torch.log(torch.tensor(float(V))).item() for n in lengths], rel=1e-5)


def test_probe_counts_right_picks_per_quote(tasks):
    messages = tasks[0].messages
    points = quote_points(messages, SCHEMAS)
    gold_target = char_encode(points[0].prefix + points[0].candidates[points[0].gold] + '"')
    r = quote_probe(oracle(gold_target), char_encode, [(messages, SCHEMAS)])
    assert r.quotes == len(points) and r.tasks == 1 and r.picks[0] == 1 and r.right == sum(r.picks)
    wrong = (points[0].gold + 1) % len(points[0].candidates)
    r = quote_probe(oracle(char_encode(points[0].prefix + points[0].candidates[wrong] + '"')), char_encode,
                    [(messages, SCHEMAS)])
    assert r.picks[0] == 0


def test_eval_quote_command_on_a_checkpoint(tmp_path, capsys):
    from nanok2 import ModelArgs, build_model, save_model
    from nanok2.cli import main
    from nanok2.tokenizer import Tokenizer

    save_model(build_model(ModelArgs.from_preset("tiny"), seed=3), tmp_path / "m")
    Tokenizer({bytes([i]): i for i in range(256)}).save(tmp_path / "m")
    assert main(["eval", "quote", "--model", str(tmp_path / "m"), "--world", "1000", "--size", "400",
                 "--hops", "1", "--n", "2"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["eval"] == "quote" and out["tasks"] == 2 and out["quotes"] == 2 == len(out["picks"])
    assert out["right"] == sum(out["picks"]) and out["accuracy"] == out["right"] / 2
    assert main(["eval", "quote", "--model", str(tmp_path / "m"), "--n", "0"]) == 2
    assert "--n 0" in capsys.readouterr().err
