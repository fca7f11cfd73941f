"""K2's tokenizer: the `tiktoken.model` file, K2's special tokens and pre-tokenisation, BPE training.

nanok2 has to read the tokenizer K2 ships and give K2's ids, and to train small tokenizers of the same
shape for its own models. tiktoken does the encoding (it is what K2 itself runs on); HF `tokenizers`
does the learning (fast, multi-threaded, well kept); `ranks_from_hf` turns what it learned into tiktoken
ranks so both libraries encode every text alike.

The file format is tiktoken's: one `base64(token bytes) rank` per line, ranks 0..V-1. Special tokens
are not in the file: like K2, they take the ids V, V+1, ... V+255 after a base vocabulary of size V, with
K2's names in K2's slots (`SPECIAL_SLOTS`), so that K2's own file (V = 163584) yields K2's ids.
"""
from __future__ import annotations

import base64
import binascii
import difflib
import json
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path

import tiktoken

from nanok2.errors import NanoK2Error

# K2's pre-tokenisation pattern, alternative by alternative: Han runs; a Latin-or-other word in lower or
# Title case (upper-case run, then lower) with an optional English contraction; the same with the
# upper-case run required (ALLCAPS, CamelCase heads); digit runs of 1-3; punctuation runs with one
# optional leading space and trailing newlines; newline runs; whitespace not followed by non-space;
# other whitespace. `[X&&[^\p{Han}]]` is class intersection ("letters of X that are not Han").
# Verified against moonshotai/Kimi-K2-Instruct's `tokenization_kimi.py` (`pat_str`), as mirrored in the
# public repos troy12x/quasar-kimi and PabloRaka/bear (identical text in both).
#
# Translation for the engines in use: none is needed. tiktoken compiles the pattern with fancy-regex,
# which hands character classes to Rust's `regex` crate, and that supports `&&`; HF `tokenizers`
# compiles it with Oniguruma, whose Ruby syntax supports `&&` too. Python's `re` does not (it would
# read `&&` as two literal `&`), while the `regex` module does under its V1 flag. tests/test_tokenizer.py
# checks that tiktoken's split, HF's split and `regex` V1's split agree on arbitrary text, so the
# pattern is kept byte for byte as K2 ships it rather than rewritten.
_LETTER_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_LETTER_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
K2_PATTERN = "|".join([
    r"[\p{Han}]+",
    rf"[^\r\n\p{{L}}\p{{N}}]?{_LETTER_UPPER}*{_LETTER_LOWER}+{_CONTRACTION}",
    rf"[^\r\n\p{{L}}\p{{N}}]?{_LETTER_UPPER}+{_LETTER_LOWER}*{_CONTRACTION}",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])

# Special tokens by offset from the base vocabulary size V; 256 slots, unnamed ones are reserved.
# Verified against K2's `tokenizer_config.json` (added_tokens_decoder) as copied into two independent
# public code bases (a Huawei openjiuwen token counter and a js-tiktoken Kimi loader): the gaps at
# +5, +8, +16 and +24..+253 are unnamed, `[EOT]` is +9, `</think>` is +23 (163607). K2 names its media
# tokens `<|media_begin|>`..., while the K2-Thinking chat template writes `<|media_start|>` (inherited
# from Kimi-VL): in K2's vocabulary that text is ordinary bytes, and nanok2 keeps it so.
SPECIAL_SLOTS = {
    0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>",
    6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>",
    11: "<|tool_calls_section_begin|>", 12: "<|tool_calls_section_end|>", 13: "<|tool_call_begin|>",
    14: "<|tool_call_argument_begin|>", 15: "<|tool_call_end|>", 17: "<|im_middle|>",
    18: "<|media_begin|>", 19: "<|media_content|>", 20: "<|media_end|>", 21: "<|media_pad|>",
    22: "<think>", 23: "</think>", 254: "[UNK]", 255: "[PAD]",
}
NUM_SPECIAL_SLOTS = 256

# Like K2's own tokenizer, text is cut before tiktoken sees it: its regex is slow (quadratic) on very
# long runs of whitespace or non-whitespace (openai/tiktoken#195) and it panics past ~400k characters.
# Cutting at the same places as K2 keeps K2's ids on such inputs too.
_MAX_CHUNK_CHARS = 400_000
_MAX_RUN_CHARS = 25_000


def special_tokens(base_size: int) -> dict[str, int]:
    """K2's special tokens for a base vocabulary of `base_size` tokens: name -> id."""
    return {SPECIAL_SLOTS.get(i, f"<|reserved_token_{base_size + i}|>"): base_size + i
            for i in range(NUM_SPECIAL_SLOTS)}


def read_tiktoken_model(path: str | Path) -> dict[bytes, int]:
    """Parse a `tiktoken.model` file into mergeable ranks (token bytes -> rank)."""
    path = Path(path)
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise NanoK2Error(f"cannot read tokenizer file {path}: {e.strerror}") from e
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token_b64, rank_text = line.split()
            token, rank = base64.b64decode(token_b64, validate=True), int(rank_text)
        except (ValueError, binascii.Error) as e:
            raise NanoK2Error(f"{path}:{lineno}: expected 'base64(token) rank', got {line[:80]!r}") from e
        if token in ranks:
            raise NanoK2Error(f"{path}:{lineno}: token {token!r} appears twice (ranks {ranks[token]} and {rank})")
        ranks[token] = rank
    _check_ranks(ranks, str(path))
    return ranks


def write_tiktoken_model(ranks: dict[bytes, int], path: str | Path) -> None:
    """Write mergeable ranks as a `tiktoken.model` file, in rank order (as K2's file is)."""
    lines = (f"{base64.b64encode(token).decode('ascii')} {rank}\n"
             for token, rank in sorted(ranks.items(), key=lambda item: item[1]))
    Path(path).write_text("".join(lines), encoding="ascii")


def _check_ranks(ranks: dict[bytes, int], where: str) -> None:
    # Special ids start right after the base ranks, so the ranks must be exactly 0..V-1; and every
    # single byte must be a token, or some texts could not be encoded at all (tiktoken would panic).
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise NanoK2Error(f"{where}: ranks must be 0..{len(ranks) - 1} with no gap or repeat")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise NanoK2Error(f"{where}: byte-level vocabulary lacks {len(missing)} single bytes, "
                          f"e.g. {bytes(missing[:4])!r}")


def _chunks(text: str) -> Iterator[str]:
    """Cut text where K2 cuts it: every 400k characters, and inside runs over 25k characters that are
    all whitespace or all non-whitespace."""
    for start in range(0, len(text), _MAX_CHUNK_CHARS):
        block = text[start:start + _MAX_CHUNK_CHARS]
        cut, run, run_is_space = 0, 0, block[:1].isspace()
        for i, ch in enumerate(block):
            if ch.isspace() != run_is_space:
                run, run_is_space = 1, ch.isspace()
            else:
                run += 1
                if run > _MAX_RUN_CHARS:
                    yield block[cut:i]
                    cut, run = i, 1
        yield block[cut:]


class Tokenizer:
    """Byte-level BPE over tiktoken with K2's pattern and special tokens.

    `encode` turns text into ids; only the special tokens named in `allowed_special` are recognised,
    every other text (look-alikes of special tokens included) is encoded as ordinary bytes, so that
    `decode(encode(s)) == s` for every string s.
    """

    def __init__(self, ranks: dict[bytes, int], name: str = "nanok2"):
        _check_ranks(ranks, name)
        self.base_size = len(ranks)
        self.special_tokens = special_tokens(self.base_size)
        self.n_vocab = self.base_size + NUM_SPECIAL_SLOTS
        self.ranks = ranks  # token bytes -> rank, as in the file
        self._enc = tiktoken.Encoding(name=name, pat_str=K2_PATTERN, mergeable_ranks=ranks,
                                      special_tokens=self.special_tokens)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load a `tiktoken.model` file, or the one inside a directory (a K2 or nanok2 checkpoint)."""
        path = Path(path)
        file = path / "tiktoken.model" if path.is_dir() else path
        return cls(read_tiktoken_model(file), name=str(file))

    def save(self, directory: str | Path, chat_template: str | None = None) -> None:
        """Write `tiktoken.model` and `tokenizer_config.json` (special tokens, chat template) to a directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_tiktoken_model(self.ranks, directory / "tiktoken.model")
        config = tokenizer_config(self.special_tokens, chat_template)
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                          encoding="utf-8")

    def encode(self, text: str, allowed_special: Collection[str] | str = ()) -> list[int]:
        """Text -> ids. `allowed_special` is "all" or the names of the special tokens to recognise."""
        if allowed_special == "all":
            allowed = set(self.special_tokens)
        else:
            allowed = set(allowed_special)
            unknown = allowed - self.special_tokens.keys()
            if unknown:
                raise NanoK2Error(f"unknown special token(s) {sorted(unknown)}; "
                                  f"known: {', '.join(SPECIAL_SLOTS.values())}")
        ids: list[int] = []
        for chunk in _chunks(text):
            ids.extend(self._enc.encode(chunk, allowed_special=allowed, disallowed_special=()))
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Ids -> the raw bytes they stand for (special tokens as their names); for streaming, where a
        token may end in the middle of a UTF-8 character."""
        ids = list(ids)
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise NanoK2Error(f"token id(s) {bad[:5]} outside the vocabulary 0..{self.n_vocab - 1}")
        return self._enc.decode_bytes(ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def id_of(self, name: str) -> int:
        """The id of a special token, by name (`<|im_end|>`, `[BOS]`, `<|reserved_token_163600|>`)."""
        try:
            return self.special_tokens[name]
        except KeyError:
            close = difflib.get_close_matches(name, SPECIAL_SLOTS.values(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise NanoK2Error(f"no special token named {name!r}{hint}") from None


def tokenizer_config(specials: dict[str, int], chat_template: str | None) -> dict:
    """The `tokenizer_config.json` K2 ships, for these special tokens: what transformers, vLLM and
    SGLang read beside `tiktoken.model` (the named tokens, BOS/EOS/PAD/UNK, the chat template)."""
    roles = {"[BOS]", "[EOS]", "[UNK]", "[PAD]"}  # these have their own keys below
    config = {
        "added_tokens_decoder": {
            str(i): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for name, i in specials.items()
        },
        "additional_special_tokens": [n for n in SPECIAL_SLOTS.values() if n not in roles],
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "clean_up_tokenization_spaces": False,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config


# --- training ---------------------------------------------------------------------------------------

def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet, which HF `tokenizers` uses in its vocabulary: printable Latin-1
    bytes stand for themselves, the 68 others are shifted to U+0100 and up so every byte is visible."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for shift, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + shift)
    return table


def train_hf_bpe(files: list[str], vocab_size: int, split_digits: bool = False,
                 split_before_capitals: bool = False):
    """Learn a byte-level BPE with HF `tokenizers` over K2's pre-tokenisation; returns the HF tokenizer.

    At most `vocab_size` base tokens (the 256 bytes included); fewer when the text has fewer pairs.
    `split_digits` learns no merge between two digits, so every digit encodes as its own token while the
    pre-tokenisation stays K2's (a checkpoint still loads in any engine that applies K2's pattern): a
    small model then copies a number digit by digit from a ten-token alphabet instead of having to copy
    rare three-digit tokens such as "000". K2's own vocabulary does merge digits (groups of up to 3).
    `split_before_capitals` learns no merge between a capitalised word and the one character K2's pattern
    lets lead it (a space, a quote, a bracket), so a name encodes the same after a space (a question, a
    page) as after a quote (a JSON argument): ` Trok|nis|shis` and `"|T|rok|nis|shis` become
    ` |Trok|nis|shis` and `"|Trok|nis|shis` (text grows ~16% in tokens). In agent-tiny's recipe it made
    copying worse, not better (README, "Agent model").
    """
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers  # only training needs it
    from tokenizers import Tokenizer as HFTokenizer

    if vocab_size < 256:
        raise NanoK2Error(f"--vocab-size {vocab_size} is below 256, the byte alphabet every byte-level BPE starts from")
    for f in files:
        if not Path(f).is_file():
            raise NanoK2Error(f"training input {f} is not a file")
    hf = HFTokenizer(models.BPE())
    # K2's pattern splits the text, then ByteLevel only maps bytes to its alphabet (its own GPT-2 regex off).
    # Digits only ever form pre-tokens of their own under K2's pattern, so isolating each one during
    # training removes every digit-digit merge and nothing else.
    digit_split = [pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated")] if split_digits else []
    # Under K2's pattern a word pre-token holds at most one non-letter, its first character; isolating
    # it when an upper-case letter follows removes exactly the merges across that boundary.
    capital_split = ([pre_tokenizers.Split(Regex(r"[^\p{L}\p{N}](?=\p{Lu})"), behavior="isolated")]
                     if split_before_capitals else [])
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(K2_PATTERN), behavior="isolated"),
        *digit_split,
        *capital_split,
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train(files, trainer)
    return hf


def ranks_from_hf(hf) -> dict[bytes, int]:
    """An HF byte-level BPE's vocabulary as tiktoken ranks.

    The trainer numbers the 256 bytes first and then each merged token in the order it was learned, and
    tiktoken applies merges by rank, so the HF id serves as the rank unchanged.
    """
    to_byte = {ch: b for b, ch in _byte_to_unicode().items()}
    return {bytes(to_byte[ch] for ch in token): i for token, i in hf.get_vocab().items()}


def train(files: list[str], vocab_size: int, split_digits: bool = False,
          split_before_capitals: bool = False) -> Tokenizer:
    """Learn a K2-shaped tokenizer (byte-level BPE, K2's pattern and special tokens) from text files."""
    return Tokenizer(ranks_from_hf(train_hf_bpe(files, vocab_size, split_digits, split_before_capitals)))


# --- command line -----------------------------------------------------------------------------------

def _train_command(args) -> int:
    import time

    from nanok2.chat import own_chat_template

    started = time.perf_counter()
    tok = train(args.input, args.vocab_size, args.split_digits, args.split_before_capitals)
    tok.save(args.out, chat_template=own_chat_template())
    size_mb = sum(Path(f).stat().st_size for f in args.input) / 1e6
    print(f"trained {tok.base_size} base tokens (+{NUM_SPECIAL_SLOTS} special = {tok.n_vocab}) on {size_mb:.1f} MB "
          f"in {time.perf_counter() - started:.1f} s -> {Path(args.out) / 'tiktoken.model'}")
    if tok.base_size < args.vocab_size:
        print(f"note: the text holds too few distinct pairs for {args.vocab_size} tokens")
    return 0


def register(subparsers) -> None:
    """`nanok2 tokenizer train --input FILES... --vocab-size N --out DIR`."""
    parser = subparsers.add_parser("tokenizer", help="train K2-format tokenizers")
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND", required=True)
    p = sub.add_parser("train", help="learn a byte-level BPE and write tiktoken.model + tokenizer_config.json")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="UTF-8 text files to learn from")
    p.add_argument("--vocab-size", type=int, required=True, metavar="N",
                   help="base vocabulary size (the 256 bytes included); 256 special ids follow it")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write the tokenizer into")
    p.add_argument("--split-digits", action="store_true",
                   help="learn no digit-digit merges, so every digit is one token (K2's pattern is kept)")
    p.add_argument("--split-before-capitals", action="store_true",
                   help="learn no merge of a capitalised word with the space or quote before it, so a name "
                        "encodes alike in prose and in JSON (K2's pattern is kept)")
    p.set_defaults(func=_train_command)
