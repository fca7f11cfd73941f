"""Pre-training's reading order: every document once, each after one that mentions it wherever it can be."""
import os
import random
import subprocess
import sys

import pytest

from nanok2.world import build_world
from nanok2.world.corpus import Doc
from nanok2.world.reading_order import linked_order, links


def _doc(i: int, title: str, text: str) -> Doc:
    return Doc(f"d{i:04d}", title, text)


def test_links_by_whole_title_and_by_docid_in_text_order():
    docs = [
        _doc(0, "Kelbor Bridge", "Kelbor Bridge was built by Vantu Press. See also d0003. Kelbor Bridge stands."),
        _doc(1, "Vantu Press", "Vantu Press is a press."),
        _doc(2, "Vantu", "Vantu is a city. Vantus and Vantu Pressing are other words."),
        _doc(3, "Trail note 1", "Go on to d0001; not d9999."),
        _doc(4, "The Last Days of Vantu", "A novel. Its author is Vantu Pressman."),
    ]
    got = links(docs)
    # doc 0 names Vantu Press (and so the word Vantu, a title too), then d0003; never itself
    assert got[0] == [1, 2, 3]
    assert got[1] == [2]             # "Vantu" inside "Vantu Press" is a mention of the city
    assert got[2] == []              # "Vantus" and "Vantu Pressing" are other words, and it is its own title
    assert got[3] == [1]             # a docid that no document has is no link
    assert got[4] == [2]             # "Vantu Pressman" is not "Vantu Press", but its first word is "Vantu"


def test_linked_order_is_a_permutation_that_follows_mentions():
    world = build_world(3, 600)
    docs = world.corpus.docs
    order = linked_order(docs, random.Random(0))
    assert sorted(d.docid for d in order) == [d.docid for d in docs]
    assert linked_order(docs, random.Random(0)) == order            # the same seed, the same order
    assert linked_order(docs, random.Random(1)) != order
    graph, index = links(docs), {d.docid: i for i, d in enumerate(docs)}
    placed: set[int] = set()
    followed = 0
    for k, d in enumerate(order):
        i = index[d.docid]
        if k:
            window = [index[p.docid] for p in order[max(0, k - 8):k]]
            # a document comes after a mention whenever one of the last eight still had an unplaced mention
            if any(j not in placed for p in window for j in graph[p]):
                assert any(i in graph[p] for p in window), f"{d.docid} placed at {k} ignores an open mention"
            followed += i in graph[index[order[k - 1].docid]]
        placed.add(i)
    corpus_followed = sum(index[b.docid] in graph[index[a.docid]] for a, b in zip(docs, docs[1:]))
    assert followed > 0.4 * len(docs) and corpus_followed < 0.02 * len(docs)


def test_recipe_refuses_an_unknown_order():
    from nanok2.agent_recipe import AgentTinyConfig, apply_overrides
    from nanok2.errors import NanoK2Error

    with pytest.raises(NanoK2Error, match="pretrain_order='random'; known: linked, corpus"):
        apply_overrides(AgentTinyConfig(), ["pretrain_order=random"])


def test_linked_order_does_not_depend_on_the_hash_seed():
    """String hashing differs per process; the recipe's pre-training text must not."""
    script = ("import random; from nanok2.world import build_world; from nanok2.world.reading_order import "
              "linked_order; print(' '.join(d.docid for d in linked_order(build_world(5, 300).corpus.docs, "
              "random.Random(0))))")
    runs = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout
            for seed in (1, 2)}
    assert len(runs) == 1 and len(runs.pop().split()) == 300
