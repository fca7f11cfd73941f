"""A reading order for a world's documents: each one followed, where it can be, by a document it mentions.

Pre-training reads windows cut from the documents laid end to end. In the corpus's own order neighbours
are unrelated (docids are shuffled), so a name is only ever predicted from memory of the pre-training
worlds. An agent must instead write a name it has just read: the page it opened names the builder, and the
next search is for that builder. Laying the documents out as a walk along their mentions (as in-context
pre-training orders related documents together) puts that situation in the pre-training text: the next
article is about one of the names the previous one wrote, so its opening words can only be predicted by
finding that name earlier in the window.

    links(docs)              -> for each document, the documents it mentions (by title or by docid)
    linked_order(docs, rng)  -> every document once, each where it can be after one that mentions it
"""
from __future__ import annotations

import random
import re
from collections import defaultdict

from nanok2.world.corpus import Doc

WORD_RE = re.compile(r"[A-Za-z]+")
DOCID_RE = re.compile(r"\bd\d{4,}\b")


def links(docs: list[Doc]) -> list[list[int]]:
    """links[i]: indices of the other documents whose title or docid occurs in docs[i].text, in text order.

    A title is looked up by its rarest word among all titles (a made-up name, not "The" or "Bridge"), so
    each document checks only the few titles that share one of its words; the full title must then occur
    in the text on word boundaries."""
    word_count: dict[str, int] = defaultdict(int)
    for d in docs:
        for w in set(WORD_RE.findall(d.title)):
            word_count[w] += 1
    by_key: dict[str, list[int]] = defaultdict(list)
    for j, d in enumerate(docs):
        words = WORD_RE.findall(d.title)
        if words:
            by_key[min(words, key=lambda w: (word_count[w], w))].append(j)
    by_docid = {d.docid: j for j, d in enumerate(docs)}
    title_re = [re.compile(r"(?<![A-Za-z])" + re.escape(d.title) + r"(?![A-Za-z])") for d in docs]
    out: list[list[int]] = []
    for i, d in enumerate(docs):
        found: dict[int, tuple[int, int]] = {}           # document -> (where it is first mentioned, -length)
        for w in set(WORD_RE.findall(d.text)):
            for j in by_key.get(w, ()):
                if j != i and j not in found:
                    m = title_re[j].search(d.text)
                    if m:
                        found[j] = (m.start(), -len(docs[j].title))
        for m in DOCID_RE.finditer(d.text):
            j = by_docid.get(m.group())
            if j is not None and j != i and j not in found:
                found[j] = (m.start(), 0)
        # in text order, the longer title first where two start together ("Vantu Press" before "Vantu"):
        # a fixed order, so a seeded walk is the same in every process (set order is not)
        out.append(sorted(found, key=lambda j: (*found[j], j)))
    return out


def linked_order(docs: list[Doc], rng: random.Random, look_back: int = 8) -> list[Doc]:
    """All of `docs`, each once, as walks along `links`: from each document to a random unvisited one it
    mentions; where there is none, to one that a document up to `look_back` places before mentions (still
    within a pre-training window's reach); where there is none either, to a random unvisited document."""
    graph = links(docs)
    restarts = list(range(len(docs)))
    rng.shuffle(restarts)
    visited = [False] * len(docs)
    order: list[int] = []
    for start in restarts:
        if visited[start]:
            continue
        current: int | None = start
        while current is not None:
            visited[current] = True
            order.append(current)
            current = None
            for previous in reversed(order[-look_back:]):
                onward = [j for j in graph[previous] if not visited[j]]
                if onward:
                    current = rng.choice(onward)
                    break
    return [docs[i] for i in order]
