"""The copy probe (`nanok2 eval copy`): its windows, its accounting against a known copier, the command."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

from nanok2.copy_probe import copy_probe, probe_windows
from nanok2.errors import NanoK2Error

V = 4000


def random_texts(n: int = 40, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(V) for _ in range(rng.randint(20, 60))] for _ in range(n)]


def induction_copier(x: torch.Tensor) -> torch.Tensor:
    """Induction written out: at position i, predict the token after the latest earlier occurrence of x[i],
    preferring one that also follows x[i - 1] (two tokens matched); with no occurrence, uniform."""
    B, T = x.shape
    logits = torch.zeros(B, T, V)
    for b in range(B):
        row = x[b].tolist()
        for i in range(T):
            earlier = [j for j in range(i - 1, -1, -1) if row[j] == row[i]]
            both = [j for j in earlier if j > 0 and i > 0 and row[j - 1] == row[i - 1]]
            if earlier:
                logits[b, i, row[(both or earlier)[0] + 1]] = 20.0
    return logits


def test_windows_copy_a_span_to_a_later_place_without_overlap():
    texts = random_texts()
    windows = probe_windows(texts, n=20, span=6, length=80, seed=3)
    assert windows == probe_windows(texts, n=20, span=6, length=80, seed=3)     # deterministic per seed
    assert windows != probe_windows(texts, n=20, span=6, length=80, seed=4)
    for ids, p1, p2 in windows:
        assert len(ids) == 80 and 0 <= p1 < 40 - 6 and p2 >= p1 + 12 and p2 + 6 <= 80
        assert ids[p1:p1 + 6] == ids[p2:p2 + 6]
    assert len({p2 - p1 for _, p1, p2 in windows}) > 5                        # offsets vary: no positional shortcut


def test_a_copier_gains_and_a_uniform_model_does_not():
    texts = random_texts()
    copier = copy_probe(induction_copier, texts, n=16, span=6, length=80)
    assert copier.repeat < 0.5 and copier.first > 2.0 and copier.gain > 2.0
    uniform = copy_probe(lambda x: torch.zeros(*x.shape, V), texts, n=16, span=6, length=80)
    assert uniform.first == pytest.approx(math.log(V)) and uniform.repeat == pytest.approx(math.log(V))
    assert uniform.gain == pytest.approx(0.0, abs=1e-6)


def test_bad_probe_settings_are_clear_errors():
    with pytest.raises(NanoK2Error, match="fewer than one window"):
        probe_windows([[1, 2, 3]], n=2, span=4, length=40)
    with pytest.raises(NanoK2Error, match="span >= 2"):
        probe_windows(random_texts(), n=2, span=8, length=20)


def test_eval_copy_command_on_a_checkpoint(tmp_path, capsys):
    from nanok2 import ModelArgs, build_model, save_model
    from nanok2.cli import main
    from nanok2.tokenizer import Tokenizer

    save_model(build_model(ModelArgs.from_preset("tiny"), seed=3), tmp_path / "m")
    Tokenizer({bytes([i]): i for i in range(256)}).save(tmp_path / "m")
    text = tmp_path / "docs.jsonl"
    text.write_text("".join(json.dumps({"text": f"Document {i} says that river {i % 7} runs north."}) + "\n"
                            for i in range(60)))
    assert main(["eval", "copy", "--model", str(tmp_path / "m"), "--text", str(text), "--n", "4",
                 "--length", "96"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["eval"] == "copy" and out["windows"] == 4 and out["length"] == 96
    assert out["gain"] == pytest.approx(out["first"] - out["repeat"])


def test_eval_copy_names_a_bad_text_line(tmp_path, capsys):
    from nanok2.cli import main

    bad = tmp_path / "docs.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    assert main(["eval", "copy", "--model", str(tmp_path / "absent"), "--text", str(bad)]) == 2
    assert "line 2: expected a JSON object with a 'text' field" in capsys.readouterr().err
