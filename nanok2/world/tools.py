"""The tools an agent uses on a corpus, `search`, `open` and `python`, with their OpenAI JSON schemas.

`Toolbox.call(name, arguments)` is the single entry point of the agent loop and of gold trajectories:
it takes the arguments as the model wrote them (a JSON string or a dict), always returns a string, and
never raises; an unknown tool, bad JSON, a wrong argument, an unknown docid or a failing program all
come back as a line starting with "Error:" that tells the model what to do instead. Outputs are plain
compact text, because a small model has to read them.
"""
from __future__ import annotations

import json
import re

from nanok2.world.corpus import Corpus
from nanok2.world.index import tokenize
from nanok2.world.sandbox import MEMORY_MB, TIMEOUT_S, run_python

SNIPPET_CHARS = 160
MAX_K = 20

SCHEMAS = [
    {"type": "function", "function": {
        "name": "search",
        "description": "Search the document collection (BM25). Returns up to k lines: docid | title | snippet.",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string", "description": "words to look for, e.g. a name"},
            "k": {"type": "integer", "description": f"number of results, 1 to {MAX_K}", "default": 5}},
            "required": ["query"]}}},
    {"type": "function", "function": {
        "name": "open",
        "description": "Open a document by its docid (like d0421) and read one page of its text.",
        "parameters": {"type": "object", "properties": {
            "docid": {"type": "string", "description": "a docid from search results or from another document"},
            "page": {"type": "integer", "description": "page number, from 0", "default": 0}},
            "required": ["docid"]}}},
    {"type": "function", "function": {
        "name": "python",
        "description": "Run Python code and return what it prints. Use print() to show results. "
                       "Each call starts afresh; only the current folder can be written.",
        "parameters": {"type": "object", "properties": {
            "code": {"type": "string", "description": "a Python 3 program"}},
            "required": ["code"]}}},
]


def snippet(text: str, words: set[str]) -> str:
    """The sentence of `text` sharing most of `words` (the query's, as the index matched them; the first
    sentence on ties), shortened."""
    sentences = [s for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()] or [""]
    best = max(sentences, key=lambda s: len(words & set(tokenize(s))))  # max keeps the first of equals
    return best if len(best) <= SNIPPET_CHARS else best[:SNIPPET_CHARS - 3].rstrip() + "..."


def search(corpus: Corpus, query: str, k: int = 5, fuzzy: bool = True) -> list[dict]:
    """Up to k hits, best first: [{docid, title, snippet}]. `fuzzy`: a misspelt word matches the indexed
    words near it (index.BM25Index.query_words)."""
    matched = corpus.index.query_words(query, fuzzy)
    hits = corpus.index.rank(matched, k)
    words = {w for w, _ in matched}
    return [{"docid": corpus.docs[i].docid, "title": corpus.docs[i].title,
             "snippet": snippet(corpus.docs[i].text, words)} for i, _ in hits]


def format_search(query: str, hits: list[dict]) -> str:
    if not hits:
        return f"No results for {query!r}. Try other words, such as a name or a year."
    return "\n".join(f"{h['docid']} | {h['title']} | {h['snippet']}" for h in hits)


def open_document(corpus: Corpus, docid: str, page: int = 0) -> str:
    """One page of a document, under a header line; an error line for a docid or page that does not exist."""
    key = docid.strip().lower()
    if key not in corpus.by_id:
        example = corpus.docs[0].docid if corpus.docs else "d0000"
        return f"Error: there is no document {docid!r}. Docids look like {example}; use search to find them."
    pages = corpus.pages(key)
    if not 0 <= page < len(pages):
        return f"Error: {key} has pages 0 to {len(pages) - 1}; there is no page {page}."
    head = f"{key} | {corpus.by_id[key].title}"
    if len(pages) > 1:
        head += f" | page {page} of pages 0-{len(pages) - 1}"
    more = f"\n(more: open {key} page {page + 1})" if page + 1 < len(pages) else ""
    return f"{head}\n{pages[page]}{more}"


def _check(args: dict, spec: dict[str, type], required: tuple[str, ...]) -> str | None:
    """An error message for missing, unknown or mistyped arguments, else None."""
    for name in required:
        if name not in args:
            return f"missing argument {name!r}"
    for name, value in args.items():
        if name not in spec:
            return f"unknown argument {name!r} (expected {', '.join(spec)})"
        # bool is an int in Python, but never a page number
        if not isinstance(value, spec[name]) or (spec[name] is int and isinstance(value, bool)):
            return f"argument {name!r} must be {'an integer' if spec[name] is int else 'a string'}"
    return None


class Toolbox:
    """search / open / python over one corpus; `call` is safe to use from several threads at once."""

    def __init__(self, corpus: Corpus, python_timeout_s: float = TIMEOUT_S, python_memory_mb: int = MEMORY_MB,
                 fuzzy_search: bool = True):
        self.corpus = corpus
        self.fuzzy_search = fuzzy_search
        self.python_timeout_s = python_timeout_s
        self.python_memory_mb = python_memory_mb

    @property
    def schemas(self) -> list[dict]:
        return json.loads(json.dumps(SCHEMAS))  # a copy: callers may edit theirs

    def call(self, name: str, arguments: str | dict) -> str:
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as e:
                return f"Error: the arguments of {name} are not valid JSON ({e.msg} at character {e.pos})."
        if not isinstance(arguments, dict):
            return f"Error: the arguments of {name} must be a JSON object."
        try:
            if name == "search":
                problem = _check(arguments, {"query": str, "k": int}, ("query",))
                if problem:
                    return f"Error: search: {problem}."
                k = arguments.get("k", 5)
                if not 1 <= k <= MAX_K:
                    return f"Error: search: k must be between 1 and {MAX_K}."
                return format_search(arguments["query"], search(self.corpus, arguments["query"], k,
                                                                self.fuzzy_search))
            if name == "open":
                problem = _check(arguments, {"docid": str, "page": int}, ("docid",))
                if problem:
                    return f"Error: open: {problem}."
                return open_document(self.corpus, arguments["docid"], arguments.get("page", 0))
            if name == "python":
                problem = _check(arguments, {"code": str}, ("code",))
                if problem:
                    return f"Error: python: {problem}."
                return run_python(arguments["code"], self.python_timeout_s, self.python_memory_mb)
        except Exception as e:  # a bug of ours must not end the model's run; it reads what went wrong
            return f"Error: {name} failed: {type(e).__name__}: {e}"
        return f"Error: there is no tool {name!r}; the tools are search, open and python."
