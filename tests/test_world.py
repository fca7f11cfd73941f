"""The world generator: deterministic per seed, disjoint across seeds, the size asked, plausible facts."""
import re

import pytest

from nanok2.errors import NanoK2Error
from nanok2.world import build_world, load_world, save_world
from nanok2.world.corpus import docids
from nanok2.world.graph import LAST_YEAR
from nanok2.world.tasks import POINTER_RE


@pytest.fixture(scope="module")
def world():
    return build_world(0, 600)


def test_same_seed_same_world(world):
    again = build_world(0, 600)
    assert again.corpus.docs == world.corpus.docs
    assert again.fingerprint == world.fingerprint


def test_size_and_docids(world):
    assert len(world.corpus.docs) == 600
    assert [d.docid for d in world.corpus.docs] == [f"d{i:04d}" for i in range(600)]
    assert docids(12_345)[-1] == "d12344"  # wider numbers once four digits are not enough


def test_different_seeds_share_no_entities():
    worlds = [build_world(seed, 1000) for seed in range(3)]
    names = [{e.name for e in w.graph.entities.values()} for w in worlds]
    codes = [set(w.rendered.trails.code.values()) for w in worlds]
    for a in range(3):
        for b in range(a + 1, 3):
            assert not names[a] & names[b]
            assert not codes[a] & codes[b]


def test_names_unique_and_twins_near(world):
    names = [e.name for e in world.graph.entities.values()]
    assert len(names) == len(set(names))
    twins = [(e, world.graph.entities[e.twin]) for e in world.graph.entities.values() if e.twin]
    assert twins
    for a, b in twins:
        assert a.kind == b.kind and len(a.name) == len(b.name)
        assert sum(x != y for x, y in zip(a.name, b.name)) == 1  # one vowel apart
        assert b.name in world.corpus.by_id[world.rendered.entity_docid[a.key]].text


def test_facts_are_plausible(world):
    g = world.graph
    for e in g.entities.values():
        if e.kind == "org":
            assert e.attrs["founded"] > g.related(e, "founder").attrs["birth_year"]
        if e.kind in ("structure", "event"):
            assert e.attrs["year"] <= LAST_YEAR


def test_every_fact_sentence_is_in_its_article(world):
    for key, facts in world.rendered.facts.items():
        text = world.corpus.by_id[world.rendered.entity_docid[key]].text
        for sentence in facts.values():
            assert sentence in text


def test_trail_notes_point_to_trail_notes(world):
    trails, ids = world.rendered.trails, world.rendered.trail_docid
    for i, nxt in enumerate(trails.nxt):
        text = world.corpus.by_id[ids[i]].text
        if nxt is None:
            assert trails.code[i] in text and trails.depth[i] == 1
        else:
            pointer = [x for x in POINTER_RE.search(text).groups() if x]
            assert pointer == [ids[nxt]] and trails.depth[i] == trails.depth[nxt] + 1
    assert max(trails.depth) == min(len(trails.nxt) // 2, 300)


def test_save_and_load(world, tmp_path):
    save_world(world, tmp_path / "w")
    loaded = load_world(tmp_path / "w")
    assert loaded.corpus.docs == world.corpus.docs
    assert loaded.corpus.index.search("bridge", 5) == world.corpus.index.search("bridge", 5)


def test_bad_sizes_and_folders(tmp_path):
    with pytest.raises(NanoK2Error, match="at least"):
        build_world(0, 10)
    with pytest.raises(NanoK2Error, match="not a corpus folder"):
        load_world(tmp_path)


@pytest.mark.slow
def test_ten_thousand_documents_in_under_a_minute():
    import time
    start = time.perf_counter()
    world = build_world(7, 10_000)
    assert len(world.corpus.docs) == 10_000
    assert time.perf_counter() - start < 60
    assert not re.search(r"\{\w+\}", " ".join(d.text for d in world.corpus.docs))  # no unfilled template
