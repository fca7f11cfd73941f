"""BM25 search over a list of texts, through the bm25s library.

Retrieval is the model's only window on a world, so it must be a real, well-tested ranking function,
the one BrowseComp-Plus uses as its baseline; bm25s provides it as sparse matrices in numpy. Tokens
are lowercase letter-or-digit runs without stop words: nothing to download, and docids (`d0421`),
years and invented names each stay one token, so an exact name or docid is a good query.

A query word the index has never seen is matched fuzzily, as Elasticsearch's `"fuzziness": "AUTO"` does:
it stands for the indexed words within 1 edit (words of 3-5 characters) or 2 edits (longer words;
Damerau's transposition counts as one edit), the closest ones only. A misspelt name
(`Broknisshis Bridge` for `Troknisshis Bridge`) still finds its article; a word the index knows is
never changed, so exact queries rank as before.
"""
from __future__ import annotations

import re
import threading
from pathlib import Path

import bm25s
import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import OSA

TOKEN_RE = re.compile(r"[a-z0-9]+")
STOPWORDS = frozenset(
    "a an and are as at be by for from has have in is it its of on or that the this to was were which "
    "who with what when where whose how did does do".split())


MAX_EXPANSIONS = 4   # indexed words one unknown query word may stand for


def tokenize(text: str) -> list[str]:
    return [t for t in TOKEN_RE.findall(text.lower()) if t not in STOPWORDS]


def max_edits(word: str) -> int:
    """Elasticsearch's AUTO fuzziness: 0 edits up to 2 characters, 1 up to 5, then 2."""
    return 0 if len(word) < 3 else 1 if len(word) < 6 else 2


class BM25Index:
    """Ranks texts for a query; `search` may be called from several threads at once."""

    def __init__(self, model: bm25s.BM25, n_docs: int):
        self.model = model
        self.n_docs = n_docs
        self._lock = threading.Lock()  # bm25s keeps no promise about concurrent retrieve calls
        self._words: list[str] | None = None   # the indexed words, listed on the first fuzzy lookup

    @classmethod
    def build(cls, texts: list[str]) -> "BM25Index":
        model = bm25s.BM25()
        # an empty token list would make bm25s drop the document; one placeholder keeps positions aligned
        model.index([tokenize(t) or ["\x00"] for t in texts], show_progress=False)
        return cls(model, len(texts))

    def query_words(self, query: str, fuzzy: bool = True) -> list[tuple[str, float]]:
        """The query's words as the index matches them, with their weights: a known word weighs 1; an
        unknown one (with `fuzzy`) stands for the closest indexed words within its edit budget, each
        weighted 1 - edits / length as Lucene's fuzzy query does, or is dropped when there are none."""
        vocab = self.model.vocab_dict
        words = []
        for word in tokenize(query):
            if word in vocab or not fuzzy:
                words.append((word, 1.0))
                continue
            if self._words is None:   # racing threads build the same list
                self._words = [w for w in vocab if TOKEN_RE.fullmatch(w)]
            near = process.extract(word, self._words, scorer=OSA.distance, score_cutoff=max_edits(word),
                                   limit=None)
            if near:
                edits = min(d for _, d, _ in near)
                words += [(w, 1 - edits / len(word)) for w in sorted(w for w, d, _ in near if d == edits)
                          ][:MAX_EXPANSIONS]
        return words

    def search(self, query: str, k: int, fuzzy: bool = True) -> list[tuple[int, float]]:
        """Up to k (position, score) pairs, best first, only documents that share a word with the query
        (after fuzzy matching, `query_words`)."""
        return self.rank(self.query_words(query, fuzzy), k)

    def rank(self, words: list[tuple[str, float]], k: int) -> list[tuple[int, float]]:
        """`search` for words `query_words` already matched (a caller that also needs them looks up once)."""
        if not words or self.n_docs == 0:
            return []
        k = min(k, self.n_docs)
        with self._lock:
            if all(weight == 1.0 for _, weight in words):   # exact words: bm25s' own ranking
                docs, scores = self.model.retrieve([[w for w, _ in words]], k=k, show_progress=False)
                docs, scores = docs[0], scores[0]
            else:   # BM25 is a sum over query words, so a weighted word scales its term
                total = sum(weight * self.model.get_scores([w]) for w, weight in words)
                docs = np.argsort(-total, kind="stable")[:k]
                scores = total[docs]
        return [(int(d), float(s)) for d, s in zip(docs, scores) if s > 0]

    def save(self, path: Path) -> None:
        self.model.save(str(path), show_progress=False)

    @classmethod
    def load(cls, path: Path, n_docs: int) -> "BM25Index":
        return cls(bm25s.BM25.load(str(path), show_progress=False), n_docs)
