"""A world: the graph of one seed, its documents and their index, built in one call and saved to a folder.

The size is counted in documents, as BrowseComp-Plus counts its corpus: 70% entity articles, 10%
chronicles, 20% trail notes. The same (seed, size) always gives the same world, byte for byte, so a
saved world is reloaded by rebuilding its graph and reading the saved documents and index, and a
fingerprint of the documents catches a world saved by a different version of the generator.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from nanok2.errors import NanoK2Error
from nanok2.world.corpus import Corpus
from nanok2.world.documents import Rendered, render_documents
from nanok2.world.graph import Graph, generate_graph

MIN_SIZE = 60
DEFAULT_SIZE = 10_000  # BrowseComp-Plus scale / 10: builds in seconds, enough trails of every length
CHRONICLE_SHARE, TRAIL_SHARE = 0.10, 0.20


@dataclass
class World:
    seed: int
    size: int
    graph: Graph
    rendered: Rendered
    corpus: Corpus

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for d in self.corpus.docs:
            h.update(f"{d.docid}\t{d.title}\t{d.text}\n".encode())
        return h.hexdigest()[:16]


def layout(size: int) -> tuple[int, int, int]:
    """(entities, chronicles, trail notes) for a world of `size` documents."""
    if size < MIN_SIZE:
        raise NanoK2Error(f"--size {size}: a world needs at least {MIN_SIZE} documents")
    chronicles, trail = round(size * CHRONICLE_SHARE), round(size * TRAIL_SHARE)
    return size - chronicles - trail, chronicles, trail


def build_world(seed: int, size: int = DEFAULT_SIZE, corpus: Corpus | None = None) -> World:
    """The world of `seed` with `size` documents; `corpus` reuses an index loaded from disk."""
    if seed < 0:
        raise NanoK2Error(f"--seed {seed}: seeds are non-negative integers")
    n_entities, n_chronicles, n_trail = layout(size)
    graph = generate_graph(seed, n_entities)
    rendered = render_documents(graph, n_chronicles, n_trail)
    return World(seed, size, graph, rendered, corpus or Corpus(rendered.docs))


def save_world(world: World, out: Path) -> None:
    world.corpus.save(out, {"kind": "world", "seed": world.seed, "size": world.size,
                            "fingerprint": world.fingerprint})


def load_world(path: Path) -> World:
    corpus = Corpus.load(path)
    meta = json.loads((Path(path) / "corpus.json").read_text())
    if meta.get("kind") != "world":
        raise NanoK2Error(f"{path} holds a user corpus, not a generated world")
    world = build_world(meta["seed"], meta["size"], corpus)
    if [d.text for d in world.rendered.docs] != [d.text for d in corpus.docs]:
        raise NanoK2Error(f"{path} was saved by another version of the world generator; rebuild it "
                          f"with `nanok2 world build --seed {meta['seed']} --size {meta['size']}`")
    return world
