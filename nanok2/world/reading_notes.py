"""Reading notes: an entity's article framed the way the agent reads it, for pre-training.

The agent opens an article for a purpose ("I open it for the employer of X."), reads the page, and quotes
the one sentence that states that fact ('The article says: "X worked for Y." So the employer of X is Y.').
Picking that sentence is where the small model fails most (README, "Agent model"): it has to map "the
employer" to whichever of the fact's templates the page used ("worked for", "was employed by", ...).
Pre-training on documents alone never shows that mapping; SFT shows it a few thousand times. A reading note
wraps an article in the same words, with the purpose before the page and the quote after it, so
pre-training sees the mapping once per article of its worlds:

    I open it for the employer of Hekshok Zoknadar.
    <the article>
    The article says: "Hekshok Zoknadar worked for Thusithes Society." So the employer of Hekshok Zoknadar is
    Thusithes Society.

The facts are the ones questions ask (world/tasks.py): an entity's relations, the attributes multi-hop
questions end on, and a person's occupation (constraint questions). The wording is tasks.py's own phrases.
"""
from __future__ import annotations

import random

from nanok2.world.documents import FACT_OF
from nanok2.world.tasks import ASK, ATTR_PHRASE, PHRASE, answer_text, checking
from nanok2.world.world import World

OCCUPATION_PHRASE = "the occupation of {x}"   # as constraint questions' thinking names it (CONDITION_FIELD)


def readable_facts(world: World, key: str) -> list[tuple[str, str, str]]:
    """(fact, its phrase for this entity, the value it gives) for every fact of the entity at `key` that a
    question can ask: 'the employer of X' -> 'Thusithes Society'."""
    g = world.graph
    e = g.entities[key]
    out = []
    for what, fact in FACT_OF[e.kind].items():
        if what in e.rels:
            out.append((fact, PHRASE[what].format(x=e.name), g.related(e, what).name))
        elif (e.kind, what) in ASK:
            out.append((fact, ATTR_PHRASE[(e.kind, what)].format(x=e.name), answer_text(e.attrs[what])))
        elif what == "occupation":
            out.append((fact, OCCUPATION_PHRASE.format(x=e.name), e.attrs[what]))
    return out


def reading_note(world: World, key: str, rng: random.Random, max_facts: int = 3) -> tuple[str, str]:
    """(the purpose line before the article, the quotes after it) for 1 to `max_facts` facts of the entity
    at `key` (one fact half the time, as multi-hop reads; several as constraint questions read a person)."""
    facts = readable_facts(world, key)
    n = 1 if rng.random() < 0.5 else rng.randint(1, min(max_facts, len(facts)))
    chosen = rng.sample(facts, n)
    name = world.graph.entities[key].name
    purpose = (chosen[0][1] if n == 1 else
               checking([phrase.removesuffix(f" of {name}") for _, phrase, _ in chosen], name))
    sentences = world.rendered.facts[key]
    quotes = " ".join(f'The article says: "{sentences[fact]}" So {phrase} is {value}.'
                      for fact, phrase, value in chosen)
    return f"I open it for {purpose}.", quotes


def noted_documents(world: World, rng: random.Random, share: float = 1.0) -> list[str]:
    """The texts of the world's documents in corpus order, `share` of its entity articles with a reading
    note around them (the others, the chronicles and the trail notes as they are)."""
    entity_of = {docid: key for key, docid in world.rendered.entity_docid.items()}
    texts = []
    for d in world.corpus.docs:
        key = entity_of.get(d.docid)
        if key is not None and rng.random() < share:   # every kind of entity has facts a question asks
            before, after = reading_note(world, key, rng)
            texts.append(f"{before}\n{d.text}\n{after}")
        else:
            texts.append(d.text)
    return texts
