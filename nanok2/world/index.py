"""BM25 search over a list of texts, through the bm25s library.

Retrieval is the model's only window on a world, so it must be a real, well-tested ranking function,
the one BrowseComp-Plus uses as its baseline; bm25s provides it as sparse matrices in numpy. Tokens
are lowercase letter-or-digit runs without stop words: nothing to download, and docids (`d0421`),
years and invented names each stay one token, so an exact name or docid is a good query.
"""
from __future__ import annotations

import re
import threading
from pathlib import Path

import bm25s

TOKEN_RE = re.compile(r"[a-z0-9]+")
STOPWORDS = frozenset(
    "a an and are as at be by for from has have in is it its of on or that the this to was were which "
    "who with what when where whose how did does do".split())


def tokenize(text: str) -> list[str]:
    return [t for t in TOKEN_RE.findall(text.lower()) if t not in STOPWORDS]


class BM25Index:
    """Ranks texts for a query; `search` may be called from several threads at once."""

    def __init__(self, model: bm25s.BM25, n_docs: int):
        self.model = model
        self.n_docs = n_docs
        self._lock = threading.Lock()  # bm25s keeps no promise about concurrent retrieve calls

    @classmethod
    def build(cls, texts: list[str]) -> "BM25Index":
        model = bm25s.BM25()
        # an empty token list would make bm25s drop the document; one placeholder keeps positions aligned
        model.index([tokenize(t) or ["\x00"] for t in texts], show_progress=False)
        return cls(model, len(texts))

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        """Up to k (position, score) pairs, best first, only documents that share a word with the query."""
        tokens = tokenize(query)
        if not tokens or self.n_docs == 0:
            return []
        with self._lock:
            docs, scores = self.model.retrieve([tokens], k=min(k, self.n_docs), show_progress=False)
        return [(int(d), float(s)) for d, s in zip(docs[0], scores[0]) if s > 0]

    def save(self, path: Path) -> None:
        self.model.save(str(path), show_progress=False)

    @classmethod
    def load(cls, path: Path, n_docs: int) -> "BM25Index":
        return cls(bm25s.BM25.load(str(path), show_progress=False), n_docs)
