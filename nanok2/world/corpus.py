"""A corpus: documents with short docids, their pages, and a BM25 index, saved to and loaded from a folder.

The same object serves a generated world and a user's own folder of `.txt`/`.md` files, so the tools
and the agent loop never need to know which one they are reading. Docids are `d` plus a zero-padded
number (`d0421`): short, and easy for a small model to copy from one tool call to the next.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from nanok2.errors import NanoK2Error
from nanok2.world.index import BM25Index

PAGE_CHARS = 1500  # one page of `open`: a few paragraphs, small enough for a small model's context


@dataclass(frozen=True)
class Doc:
    docid: str
    title: str
    text: str


def docids(n: int) -> list[str]:
    width = max(4, len(str(n - 1)))
    return [f"d{i:0{width}d}" for i in range(n)]


def paginate(text: str, page_chars: int = PAGE_CHARS) -> list[str]:
    """Split at paragraph breaks, then at spaces, into pages of at most `page_chars` characters."""
    pieces: list[str] = []
    for para in text.split("\n"):
        while len(para) > page_chars:  # a paragraph longer than a page is cut at its last space
            cut = para.rfind(" ", 0, page_chars)
            cut = cut if cut > 0 else page_chars
            pieces.append(para[:cut])
            para = para[cut:].lstrip(" ")
        pieces.append(para)
    pages, current = [], ""
    for piece in pieces:
        joined = f"{current}\n{piece}" if current else piece
        if current and len(joined) > page_chars:
            pages.append(current)
            joined = piece
        current = joined
    pages.append(current)
    return pages


class Corpus:
    """Documents in docid order, with an index over title and text; safe to read from many threads."""

    def __init__(self, docs: list[Doc], index: BM25Index | None = None, page_chars: int = PAGE_CHARS):
        self.docs = docs
        self.by_id = {d.docid: d for d in docs}
        self.page_chars = page_chars
        self.index = index or BM25Index.build([f"{d.title}\n{d.text}" for d in docs])
        self._pages: dict[str, list[str]] = {}

    def pages(self, docid: str) -> list[str]:
        # a dict store of an immutable list is atomic under the GIL: racing threads compute the same value
        if docid not in self._pages:
            self._pages[docid] = paginate(self.by_id[docid].text, self.page_chars)
        return self._pages[docid]

    def save(self, out: Path, meta: dict) -> None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "docs.jsonl", "w", encoding="utf-8") as f:
            for d in self.docs:
                f.write(json.dumps(asdict(d), ensure_ascii=False) + "\n")
        self.index.save(out / "index")
        (out / "corpus.json").write_text(json.dumps({**meta, "n_docs": len(self.docs)}, indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> "Corpus":
        path = Path(path)
        if not (path / "docs.jsonl").exists() or not (path / "index").is_dir():
            raise NanoK2Error(f"{path} is not a corpus folder (expected docs.jsonl and index/; "
                              f"make one with `nanok2 world build`)")
        with open(path / "docs.jsonl", encoding="utf-8") as f:
            docs = [Doc(**json.loads(line)) for line in f]
        return cls(docs, BM25Index.load(path / "index", len(docs)))

    @classmethod
    def from_folder(cls, folder: Path) -> "Corpus":
        """Every `.txt` and `.md` file under `folder`, in path order; the title is the relative path."""
        folder = Path(folder)
        if not folder.is_dir():
            raise NanoK2Error(f"--corpus {folder}: not a folder")
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in (".txt", ".md"))
        if not files:
            raise NanoK2Error(f"--corpus {folder}: no .txt or .md files in it")
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
        return cls([Doc(i, str(p.relative_to(folder)), t) for i, p, t in zip(docids(len(files)), files, texts)])
