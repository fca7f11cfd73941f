"""Reading notes: an article with the agent's purpose before it and its quoted sentence after it."""
import json
import random
import re

import pytest

from nanok2.errors import NanoK2Error
from nanok2.world import build_world, make_tasks
from nanok2.world.reading_notes import noted_documents, readable_facts, reading_note
from nanok2.world.tools import Toolbox

QUOTE = re.compile(r'The article says: "(.*?)" So (.*?) is (.*?)\.(?= The article says|$)')


@pytest.fixture(scope="module")
def world():
    return build_world(5, 600)


def test_every_note_quotes_its_own_article_and_states_the_graphs_value(world):
    g = world.graph
    entity_of = {docid: key for key, docid in world.rendered.entity_docid.items()}
    texts = noted_documents(world, random.Random(1))
    assert len(texts) == len(world.corpus.docs)
    noted = 0
    for d, text in zip(world.corpus.docs, texts):
        key = entity_of.get(d.docid)
        if key is None:                              # chronicles and trail notes stay as they are
            assert text == d.text
            continue
        before, article, after = text.split("\n", 1)[0], d.text, text.rsplit("\n", 1)[1]
        assert text == f"{before}\n{article}\n{after}"
        quotes = QUOTE.findall(after)
        assert quotes and " ".join(f'The article says: "{s}" So {p} is {v}.' for s, p, v in quotes) == after
        facts = {phrase: (fact, value) for fact, phrase, value in readable_facts(world, key)}
        name = g.entities[key].name
        for sentence, phrase, value in quotes:
            fact, true_value = facts[phrase]
            assert sentence == world.rendered.facts[key][fact] and sentence in article
            assert value == true_value
            # the purpose names every fact quoted, in the order quoted ("the founder and the ... of X")
            assert phrase.removesuffix(f" of {name}") in before
        assert before.startswith("I open it for ") and before.endswith(f" of {name}.")
        noted += 1
    assert noted == len(world.rendered.entity_docid)


def test_a_value_is_written_as_answers_are_and_names_as_the_graph_has_them(world):
    g = world.graph
    place = g.of_kind("place")[0]
    facts = {fact: (phrase, value) for fact, phrase, value in readable_facts(world, place.key)}
    assert facts["population"] == (f"the population of {place.name}", str(place.attrs["population"]))  # no commas
    assert "," in world.rendered.facts[place.key]["population"] or place.attrs["population"] < 1000
    person = g.of_kind("person")[0]
    facts = {fact: (phrase, value) for fact, phrase, value in readable_facts(world, person.key)}
    assert facts["employer"] == (f"the employer of {person.name}", g.related(person, "employer").name)
    assert facts["occupation"] == (f"the occupation of {person.name}", person.attrs["occupation"])
    assert "occupation" not in {f for f, *_ in readable_facts(world, g.of_kind("org")[0].key)}


def test_purposes_are_worded_as_the_gold_thinking_words_them(world):
    """A multi-hop gold trajectory opens each article 'for' a phrase that a reading note can also use."""
    phrases = {phrase for key in world.rendered.entity_docid for _, phrase, _ in readable_facts(world, key)}
    tasks = make_tasks(world, Toolbox(world.corpus), "multihop", 2, 5, "restate")
    purposes = [m for t in tasks for msg in t.messages if msg["role"] == "assistant"
                for m in re.findall(r"I open it for (.*?)\.", msg.get("reasoning_content") or "")]
    assert purposes
    # the last article of a multi-hop chain is read for the asked attribute, the others for a relation
    assert all(p in phrases for p in purposes), [p for p in purposes if p not in phrases]


def test_share_and_seed(world):
    bare = [d.text for d in world.corpus.docs]
    assert noted_documents(world, random.Random(0), share=0.0) == bare
    half = noted_documents(world, random.Random(0), share=0.5)
    n = sum(t != b for t, b in zip(half, bare))
    assert 0.3 * len(world.rendered.entity_docid) < n < 0.7 * len(world.rendered.entity_docid)
    assert noted_documents(world, random.Random(0), share=0.5) == half
    key = next(iter(world.rendered.entity_docid))
    counts = {len(QUOTE.findall(reading_note(world, key, random.Random(s))[1])) for s in range(40)}
    assert counts <= {1, 2, 3} and 1 in counts and len(counts) > 1


def test_the_recipe_writes_noted_documents_and_checks_the_share(tmp_path):
    from nanok2.agent_recipe import AgentTinyConfig, apply_overrides, stage_text

    cfg = apply_overrides(AgentTinyConfig(), [f"out={tmp_path}", "worlds=1", "world_size=400", "pretrain_worlds=1",
                                              "tokenizer_worlds=1", "pretrain_reading_notes=1"])
    stage_text(cfg, tmp_path)
    texts = [json.loads(line)["text"] for line in (tmp_path / "text" / "docs.jsonl").read_text().splitlines()]
    world = build_world(1, 400)
    assert texts == noted_documents(world, random.Random("agent-tiny:notes:0:1"), 1.0)
    assert sum(t.startswith("I open it for ") for t in texts) == len(world.rendered.entity_docid)
    # the tokenizer still learns from the bare documents: the option changes pre-training text only
    assert (tmp_path / "text" / "tokenizer.txt").read_text().startswith("\n\n".join(d.text for d in world.corpus.docs))
    with pytest.raises(NanoK2Error, match="pretrain_reading_notes=1.5 is a share of articles"):
        apply_overrides(AgentTinyConfig(), ["pretrain_reading_notes=1.5"])
