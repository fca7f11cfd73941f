"""nanok2.tokenizer: the tiktoken.model format, K2's special ids and pattern, training, the CLI."""
import base64
import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanok2.errors import NanoK2Error
from nanok2.tokenizer import (K2_PATTERN, SPECIAL_SLOTS, Tokenizer, ranks_from_hf, read_tiktoken_model, special_tokens,
                              train, train_hf_bpe, write_tiktoken_model)

BYTES = {bytes([i]): i for i in range(256)}

# Text that stresses the tokenizer: CJK and Han-adjacent Latin, emoji with modifiers and ZWJ, combining
# marks, RTL, digits, whitespace runs of every kind, contractions, and special-token look-alikes.
PIECES = ["中文字符", "日本語", "한국어", "a中b", "CamelCase", "HTTPServer", "don't", "WE'LL", "x'S", "😀", "👍🏽",
          "👩‍👩‍👧", "é", "e\u0301", "مرحبا", "Ωμέγα", "12345", "3.14", " ", "  ", "\n", "\r\n", "\t", "\u3000",
          "\u00a0", "\u2028", "   \n\n  ", "<|im_end|>", "<|im_end", "[BOS]", "<think>", "</think>",
          "<|reserved_token_163600|>", "<|tool_call_begin|>", "<|", "|>", "!?", "...", "—", "\x00", "\ufeff"]
tricky_text = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=8)), max_size=20).map("".join)
any_text = st.one_of(st.text(), tricky_text)


def _corpus(seed: int, n_words: int) -> str:
    """A synthetic multilingual corpus, so tests need no data files."""
    rng = random.Random(seed)
    latin = ["the", "model", "token", "Kimi", "thinks", "tool", "call", "weather", "Paris", "don't", "it's", "HTTP",
             "JSONDecoder", "über", "café", "naïve", "résumé"]
    others = ["北京", "天气", "模型", "思考", "こんにちは", "世界", "😀", "👍🏽", "مرحبا", "Ωμέγα", "123", "4567", "3.14",
              "()", "{}", "==", "->", "...", "\n", "\n\n", "    ", "\t", "<|im_end|>"]
    return "".join(rng.choice(latin if rng.random() < 0.6 else others) + rng.choice([" ", "", ", ", ". "])
                   for _ in range(n_words))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(nanok2 Tokenizer, HF tokenizer) trained on ~1 MB of synthetic text."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(_corpus(0, 150_000), encoding="utf-8")
    hf = train_hf_bpe([str(path)], 1500)
    return Tokenizer(ranks_from_hf(hf)), hf


# --- special tokens -------------------------------------------------------------------------------

def test_k2_special_ids():
    ids = special_tokens(163584)
    expected = {"[BOS]": 163584, "[EOS]": 163585, "<|im_end|>": 163586, "<|im_user|>": 163587,
                "<|im_assistant|>": 163588, "<|im_system|>": 163594, "<|tool_calls_section_begin|>": 163595,
                "<|tool_calls_section_end|>": 163596, "<|tool_call_begin|>": 163597,
                "<|tool_call_argument_begin|>": 163598, "<|tool_call_end|>": 163599, "<|im_middle|>": 163601,
                "<think>": 163606, "</think>": 163607, "[UNK]": 163838, "[PAD]": 163839}
    assert {name: ids[name] for name in expected} == expected
    assert len(ids) == 256 and sorted(ids.values()) == list(range(163584, 163840))
    assert ids["<|reserved_token_163589|>"] == 163589 and ids["<|reserved_token_163608|>"] == 163608


def test_k2_sized_file_yields_k2_ids(tmp_path):
    # A file with K2's base size (163584 ranks) gets K2's ids through the real load path.
    ranks = dict(BYTES)
    for i in range(163584 - 256):
        ranks[b"\xff" + i.to_bytes(3, "big")] = len(ranks)
    write_tiktoken_model(ranks, tmp_path / "tiktoken.model")
    tok = Tokenizer.load(tmp_path)
    assert tok.n_vocab == 163840
    assert tok.id_of("<|im_middle|>") == 163601 and tok.id_of("[BOS]") == 163584 and tok.id_of("[PAD]") == 163839
    text = "<|im_user|>user<|im_middle|>hi<|im_end|>"
    assert tok.encode(text, allowed_special="all")[:1] == [163587]
    assert tok.decode(tok.encode(text, allowed_special="all")) == text


def test_special_tokens_only_when_allowed():
    tok = Tokenizer(dict(BYTES))
    text = "a<|im_end|>b<think>"
    assert tok.encode(text) == list(text.encode())  # look-alikes are ordinary text by default
    assert tok.encode(text, allowed_special={"<|im_end|>"}) == [97, 258, 98, *b"<think>"]
    assert tok.encode(text, allowed_special="all") == [97, 258, 98, 256 + 22]
    with pytest.raises(NanoK2Error, match="unknown special token"):
        tok.encode(text, allowed_special={"<|im_ending|>"})


def test_id_of_and_decode_errors():
    tok = Tokenizer(dict(BYTES))
    assert tok.id_of("[EOS]") == 257
    with pytest.raises(NanoK2Error, match="did you mean <|im_end|>"):
        tok.id_of("<|im_ends|>")
    with pytest.raises(NanoK2Error, match="outside the vocabulary"):
        tok.decode([512])


# --- the file format ------------------------------------------------------------------------------

def test_file_round_trip(tmp_path, trained):
    tok, _ = trained
    tok.save(tmp_path, chat_template="{{ messages }}")
    assert read_tiktoken_model(tmp_path / "tiktoken.model") == tok.ranks
    first = (tmp_path / "tiktoken.model").read_text().splitlines()[0].split()
    assert base64.b64decode(first[0]) in BYTES and first[1] == "0"  # rank order, as K2's file
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == "{{ messages }}"
    assert config["added_tokens_decoder"][str(tok.id_of("<|im_middle|>"))]["content"] == "<|im_middle|>"
    assert Tokenizer.load(tmp_path / "tiktoken.model").encode("北京 weather") == tok.encode("北京 weather")


@pytest.mark.parametrize("content, message", [
    ("QQ== 0\nnot-a-line\n", r":2: expected 'base64\(token\) rank'"),
    ("QQ== 0\nQQ== 1\n", "appears twice"),
    ("\n".join(f"{base64.b64encode(bytes([i])).decode()} {i + (i > 9)}" for i in range(256)), "no gap or repeat"),
    ("QQ== 0\nQg== 1\n", "lacks 254 single bytes"),
])
def test_malformed_files(tmp_path, content, message):
    (tmp_path / "tiktoken.model").write_text(content)
    with pytest.raises(NanoK2Error, match=message):
        Tokenizer.load(tmp_path)


def test_missing_file(tmp_path):
    with pytest.raises(NanoK2Error, match="cannot read tokenizer file"):
        Tokenizer.load(tmp_path / "nope.model")


# --- round trips ----------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=any_text)
def test_decode_encode_is_identity(trained, text):
    tok, _ = trained
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, allowed_special="all")) == text


def test_long_runs_are_cut_like_k2(trained):
    tok, _ = trained
    for text in [" " * 60_000 + "x", "a" * 60_000, ("ab " * 30_000) + "\n" * 30_000]:
        assert tok.decode(tok.encode(text)) == text


# --- pre-tokenisation -----------------------------------------------------------------------------

def _tiktoken_split(text: str) -> list[str]:
    # A vocabulary holding every substring of the text makes BPE merge each pre-token into one token,
    # so the tokens show where tiktoken's regex engine split.
    data = text.encode()
    ranks = dict(BYTES)
    for sub in sorted({data[i:j] for i in range(len(data)) for j in range(i + 2, len(data) + 1)}, key=len):
        ranks[sub] = len(ranks)
    import tiktoken
    enc = tiktoken.Encoding("split-probe", pat_str=K2_PATTERN, mergeable_ranks=ranks, special_tokens={})
    return [enc.decode_single_token_bytes(t).decode() for t in enc.encode_ordinary(text)]


@settings(max_examples=100, deadline=None)
@given(text=st.lists(st.sampled_from(PIECES[:-2] + ["a", "Z", "'", "&", "&&", "-", "x"]), max_size=8).map("".join))
def test_pattern_splits_alike_in_every_engine(text):
    """K2's pattern, kept verbatim, means the same in tiktoken, HF tokenizers and `regex` (V1 flag)."""
    regex = pytest.importorskip("regex")
    from tokenizers import Regex, pre_tokenizers
    reference = regex.findall(K2_PATTERN, text, flags=regex.V1)
    assert "".join(reference) == text
    assert _tiktoken_split(text) == reference
    hf = pre_tokenizers.Split(Regex(K2_PATTERN), behavior="isolated").pre_tokenize_str(text)
    assert [piece for piece, _ in hf] == reference


def test_pattern_examples():
    assert _tiktoken_split("Hello World's 中文a日本 HTTPServer 12345 ?!  \n\n x") == [
        "Hello", " World's", " ", "中文", "a", "日本", " HTTPServer", " ", "123", "45", " ?!", "  \n\n", " x"]


# --- training -------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=any_text)
def test_trained_tiktoken_equals_hf(trained, text):
    tok, hf = trained
    assert tok.encode(text) == hf.encode(text).ids


def test_trained_equals_hf_on_held_out_corpus(trained):
    tok, hf = trained
    text = _corpus(1, 40_000)
    ids = tok.encode(text)
    assert ids == hf.encode(text).ids
    assert len(ids) < len(text.encode()) / 2  # it did learn merges
    assert tok.base_size == 1500 and tok.id_of("[BOS]") == 1500


def test_split_digits_learns_no_digit_merges_and_keeps_k2_pretokenisation(tmp_path):
    """With split_digits every digit is its own token, under K2's unchanged pattern (tiktoken's encode);
    without it the same text does merge digits."""
    path = tmp_path / "corpus.txt"
    path.write_text(_corpus(2, 40_000) + " d0006 d0421 1847 2025 3.14 " * 200, encoding="utf-8")
    tok = train(str(path).split(), 900, split_digits=True)
    for token in tok._enc.token_byte_values():
        assert sum(ch.isdigit() for ch in token.decode("utf-8", "replace")) <= 1, token
    text = "Docid d0006, born 1847; page d1234 of 2025. 北京 3.14"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert [tok.decode([i]) for i in tok.encode("d0006")] == ["d", "0", "0", "0", "6"]
    merged = train(str(path).split(), 900)
    assert len(merged.encode("d0006 1847")) < len(tok.encode("d0006 1847"))


def test_split_before_capitals_encodes_a_name_alike_after_a_space_and_a_quote(tmp_path):
    """With split_before_capitals no token joins a capitalised word to the character before it, so a name
    quoted in JSON encodes as the same tokens as in prose, under K2's unchanged pattern; without it the
    space merges into the name and the quoted name splits differently."""
    path = tmp_path / "corpus.txt"
    path.write_text(_corpus(2, 40_000) + " the Troknisshis Bridge of Sisshedrul Dam" * 300, encoding="utf-8")
    tok = train(str(path).split(), 900, split_before_capitals=True)
    for token in tok._enc.token_byte_values():
        text = token.decode("utf-8", "replace")
        assert not any(a in ' "([' and b.isupper() for a, b in zip(text, text[1:])), token
    pieces = lambda t, s: [t.decode([i]) for i in t.encode(s)]
    in_prose = pieces(tok, "built the Troknisshis Bridge")
    in_json = pieces(tok, '{"query": "Troknisshis Bridge"}')
    name = in_prose[in_prose.index(" ") + 1:]
    assert "".join(name) == "Troknisshis Bridge" and " the" in in_prose
    start = in_json.index(name[0])
    assert in_json[start - 1] == '"' and in_json[start:start + len(name)] == name
    assert tok.decode(tok.encode('{"query": "Troknisshis Bridge"}')) == '{"query": "Troknisshis Bridge"}'
    merged = train(str(path).split(), 900)
    assert pieces(merged, " Troknisshis")[0].startswith(" T") and pieces(merged, '"Troknisshis')[0] == '"'


def test_vocab_size_below_bytes_is_refused(tmp_path):
    (tmp_path / "t.txt").write_text("abc")
    with pytest.raises(NanoK2Error, match="below 256"):
        train_hf_bpe([str(tmp_path / "t.txt")], 100)
    with pytest.raises(NanoK2Error, match="is not a file"):
        train_hf_bpe([str(tmp_path / "missing.txt")], 1000)


def _run_cli(argv: list[str]) -> int:
    from nanok2.cli import main
    return main(argv)   # imports only the tokenizer's command module


def test_cli_train(tmp_path, capsys):
    from nanok2.chat import own_chat_template
    corpus = tmp_path / "a.txt"
    corpus.write_text(_corpus(2, 20_000), encoding="utf-8")
    assert _run_cli(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "600", "--out", str(tmp_path / "tok")]) == 0
    assert "trained 600 base tokens" in capsys.readouterr().out
    tok = Tokenizer.load(tmp_path / "tok")
    assert tok.base_size == 600 and tok.id_of("<|im_end|>") == 602
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == own_chat_template()
    assert {config["added_tokens_decoder"][str(600 + slot)]["content"] for slot in SPECIAL_SLOTS} == set(SPECIAL_SLOTS.values())
    assert _run_cli(["tokenizer", "train", "--input", str(tmp_path / "none.txt"), "--vocab-size", "600",
                     "--out", str(tmp_path / "x")]) == 2
