"""Token shards: write, memory-map, deterministic order, vocabulary checks, `nanok2 data tokenize` (text and chat)."""
import json

import numpy as np
import pytest

from nanok2.cli import main
from nanok2.data import MANIFEST, ShardWriter, TokenDataset, tokenizer_fingerprint
from nanok2.errors import NanoK2Error
from nanok2.tokenizer import Tokenizer


def _write(path, vocab=512, docs=5, n=300, sft=False):
    w = ShardWriter(path, vocab, "sft" if sft else "pretrain", shard_tokens=700)
    rng = np.random.default_rng(0)
    for _ in range(docs):
        ids = rng.integers(0, vocab, n)
        w.add(ids, (np.arange(n) % 2) if sft else None)
    return w.close()


def test_roundtrip_dtype_and_shards(tmp_path):
    _write(tmp_path / "a")
    m = json.loads((tmp_path / "a" / MANIFEST).read_text())
    assert m["dtype"] == "uint16" and m["tokens"] == 1500 and len(m["shards"]) == 2
    _write(tmp_path / "b", vocab=163840)
    assert json.loads((tmp_path / "b" / MANIFEST).read_text())["dtype"] == "uint32"
    ds = TokenDataset(tmp_path / "a", seq_len=16, seed=0, eval_windows=4)
    b = ds.train_batch(0, 3)
    assert b.inputs.shape == b.targets.shape == (3, 16)
    assert (b.inputs[:, 1:] == b.targets[:, :-1]).all() and b.mask.eq(1).all()
    # the order is a function of (seed, sequence number) alone: the resume position is one integer
    again = TokenDataset(tmp_path / "a", seq_len=16, seed=0, eval_windows=4)
    assert (again.train_batch(1, 2).inputs == b.inputs[1:]).all()
    assert not (TokenDataset(tmp_path / "a", seq_len=16, seed=1, eval_windows=4).train_batch(0, 3).inputs == b.inputs).all()
    n = len(ds.train_windows)
    assert sorted(map(tuple, (ds._train_window(g) for g in range(n)))) == sorted(ds.train_windows)  # an epoch: each once
    assert sum(len(e.inputs) for e in ds.eval_batches(3)) == 4


def test_sft_mask_is_shifted_with_targets(tmp_path):
    _write(tmp_path / "s", sft=True)
    b = TokenDataset(tmp_path / "s", seq_len=10).train_batch(0, 4)
    # mask[t] belongs to target t = token t+1 of the window; the writer's mask alternates 0/1
    assert set(b.mask.unique().tolist()) == {0.0, 1.0}
    assert (b.mask[:, 1:] != b.mask[:, :-1]).all()


def test_bad_inputs(tmp_path):
    _write(tmp_path / "a", vocab=1000)
    ds = TokenDataset(tmp_path / "a", seq_len=16)
    with pytest.raises(NanoK2Error, match="vocabulary of 1000.*vocab_size 512"):
        ds.check_compatible(512)
    with pytest.raises(NanoK2Error, match="already holds a dataset"):
        ShardWriter(tmp_path / "a", 1000)
    with pytest.raises(NanoK2Error, match="outside the vocabulary"):
        ShardWriter(tmp_path / "c", 10).add([3, 11])
    shard = tmp_path / "a" / "shard_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(NanoK2Error, match="truncated"):
        TokenDataset(tmp_path / "a", seq_len=16)
    with pytest.raises(NanoK2Error, match="no dataset"):
        TokenDataset(tmp_path / "nothing", seq_len=16)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from nanok2.tokenizer import train
    d = tmp_path_factory.mktemp("tok")
    words = ["alpha", "beta", "gamma", "delta", "search", "result", "the", "answer", "is", "tool"]
    rng = np.random.default_rng(0)
    text = "\n".join(" ".join(rng.choice(words, 12)) for _ in range(300))
    (d / "corpus.txt").write_text(text)
    train([str(d / "corpus.txt")], 400).save(d / "tok")
    return d / "tok"


def test_tokenize_command_text_and_chat(tmp_path, tokenizer_dir):
    (tmp_path / "a.txt").write_text("the answer is alpha")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "beta gamma"}) + "\n")
    assert main(["data", "tokenize", "--tokenizer", str(tokenizer_dir), "--input", str(tmp_path / "a.txt"),
                 str(tmp_path / "b.jsonl"), "--out", str(tmp_path / "pt")]) == 0
    m = json.loads((tmp_path / "pt" / MANIFEST).read_text())
    n_vocab = Tokenizer.load(tokenizer_dir).n_vocab
    assert m["documents"] == 2 and m["tokenizer"] == tokenizer_fingerprint(tokenizer_dir) and m["vocab_size"] == n_vocab
    conv = {"messages": [{"role": "user", "content": "search alpha"},
                         {"role": "assistant", "content": "the answer is beta"}], "tools": []}
    (tmp_path / "c.jsonl").write_text(json.dumps(conv) + "\n")
    assert main(["data", "tokenize", "--sft", "--tokenizer", str(tokenizer_dir), "--input", str(tmp_path / "c.jsonl"),
                 "--out", str(tmp_path / "sft")]) == 0
    m = json.loads((tmp_path / "sft" / MANIFEST).read_text())
    mask = np.fromfile(tmp_path / "sft" / m["shards"][0]["mask"], dtype=np.uint8)
    assert 0 < mask.sum() < mask.size and m["kind"] == "sft"
    # a dataset made with another tokenizer is refused when the run names its tokenizer
    ds = TokenDataset(tmp_path / "pt", seq_len=2)
    with pytest.raises(NanoK2Error, match="tokenized with tokenizer"):
        ds.check_compatible(n_vocab, tokenizer="0123456789abcdef")
    assert main(["data", "tokenize", "--tokenizer", str(tokenizer_dir), "--input", str(tmp_path / "a.txt"),
                 "--out", str(tmp_path / "pt")]) == 2                       # exists: refused, nothing changed


def test_pretraining_jsonl_takes_conversations_rendered_in_the_chat_format(tmp_path, tokenizer_dir):
    from nanok2.chat import render_ids
    from nanok2.data import tokenize_files

    tok = Tokenizer.load(tokenizer_dir)
    conv = {"messages": [{"role": "user", "content": "search alpha"},
                         {"role": "assistant", "content": "the answer is beta", "reasoning_content": "gamma"}],
            "tools": []}
    (tmp_path / "mixed.jsonl").write_text(json.dumps({"text": "beta gamma"}) + "\n" + json.dumps(conv) + "\n")
    m = tokenize_files(str(tokenizer_dir), [str(tmp_path / "mixed.jsonl")], str(tmp_path / "pt"))
    ids = np.fromfile(tmp_path / "pt" / m["shards"][0]["file"], dtype=np.uint16).tolist()
    eos = tok.id_of("[EOS]")
    assert ids == tok.encode("beta gamma") + [eos] + render_ids(conv["messages"], tok, [])[0] + [eos]
    assert m["documents"] == 2 and "mask" not in m["shards"][0]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"title": "no text"}) + "\n")
    with pytest.raises(NanoK2Error, match="bad.jsonl:1: expected an object with 'text' or 'messages'"):
        tokenize_files(str(tokenizer_dir), [str(tmp_path / "bad.jsonl")], str(tmp_path / "bad"))
