"""The documents of a world: each fact of the graph written as one of several sentences, plus noise.

Three kinds of document: one article per entity (its facts, in varied sentences and order, with a
"not to be confused with" line for a near-namesake), chronicles that mention entities with near-miss
facts (a count of inhabitants that is not the population, a repair that is not the construction), and
trail notes, each naming the document to open next, that end in a code word. Every sentence that a
task may need is kept as evidence, so the task generator can check that the fact is really written.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from nanok2.world.corpus import Doc, docids
from nanok2.world.graph import Entity, Graph
from nanok2.world.names import NameMaker

MAX_TRAIL = 300  # the longest trail: K2 Thinking's step budget for agentic search

TEMPLATES = {
    "occupation": ("{n} was {v}.", "{n} worked as {v}.", "By profession, {n} was {v}."),
    "birth_year": ("{n} was born in {v}.", "The year of birth of {n} was {v}.",
                   "{n}'s birth year is recorded as {v}."),
    "birthplace": ("{n} was born in the city of {v}.", "The birthplace of {n} was {v}.",
                   "{n} was a native of {v}."),
    "employer": ("{n} worked for {v}.", "{n} was employed by {v}.",
                 "For most of a long career, {n} worked at {v}."),
    "founded_orgs": ("{n} founded {v}.", "{n} was the founder of {v}."),
    "works": ("{n} wrote {v}.", "Among the works of {n}: {v}."),
    "org_kind": ("{n} is {v}.", "{n} was set up as {v}."),
    "founded": ("{n} was founded in {v}.", "The founding year of {n} is {v}.",
                "{n} dates from {v}, the year it was founded."),
    "founder": ("{n} was founded by {v}.", "The founder of {n} was {v}.", "{v} established {n}."),
    "headquarters": ("{n} has its headquarters in {v}.", "{n} is headquartered in {v}.",
                     "The seat of {n} is in {v}."),
    "built": ("{n} built {v}.", "Works built by {n}: {v}."),
    "organised": ("{n} organised {v}.", "Events organised by {n}: {v}."),
    "population": ("{n} has a population of {v}.", "The population of {n} is {v}.",
                   "{v} people live in {n}."),
    "elevation": ("{n} lies {v} metres above sea level.", "The elevation of {n} is {v} metres.",
                  "{n} stands at an elevation of {v} metres."),
    "settled": ("{n} was founded in {v}.", "The town of {n} dates from {v}.", "{n} was first settled in {v}."),
    "natives": ("The people born in {n} are {v}.", "{n} is the birthplace of {v}."),
    "home_to": ("{n} is home to {v}.", "Organisations based in {n}: {v}."),
    "sights": ("{n} is the site of {v}.", "Visitors to {n} can see {v}."),
    "hosted": ("{n} hosted {v}.", "Events held in {n}: {v}."),
    "work_kind": ("{n} is {v}.", "{n} is known as {v}."),
    "published": ("{n} was published in {v}.", "{n} first appeared in {v}.", "{n} was completed in {v}."),
    "author": ("{n} was written by {v}.", "The author of {n} is {v}.", "{v} wrote {n}."),
    "structure_kind": ("{n} is {v}.", "{n} was built as {v}."),
    "completed": ("{n} was completed in {v}.", "Construction of {n} was finished in {v}.", "{n} opened in {v}."),
    "builder": ("{n} was built by {v}.", "{v} built {n}.", "The builder of {n} was {v}."),
    "location": ("{n} stands in {v}.", "{n} is located in {v}.", "{n} can be found in {v}."),
    "event_kind": ("{n} was {v}.", "{n} is remembered as {v}."),
    "held": ("{n} took place in {v}.", "{n} was held in {v}.", "The year of {n} was {v}."),
    "venue": ("The venue of {n} was {v}.", "{n} was held in the city of {v}.", "{n} took place in the city of {v}."),
    "organiser": ("{n} was organised by {v}.", "{v} organised {n}.", "The organiser of {n} was {v}."),
}
# which attribute or relation each fact renders, per kind (lists come from inverse relations)
ATTR_FACTS = {"person": {"occupation": "occupation", "birth_year": "birth_year"},
              "org": {"org_kind": "org_kind", "founded": "founded"},
              "place": {"population": "population", "elevation": "elevation", "settled": "founded"},
              "work": {"work_kind": "work_kind", "published": "year"},
              "structure": {"structure_kind": "structure_kind", "completed": "year"},
              "event": {"event_kind": "event_kind", "held": "year"}}
REL_FACTS = {"person": {"birthplace": "birthplace", "employer": "employer"},
             "org": {"founder": "founder", "headquarters": "headquarters"},
             "place": {},
             "work": {"author": "author"},
             "structure": {"builder": "builder", "location": "location"},
             "event": {"organiser": "organiser", "venue": "venue"}}
LIST_FACTS = {"person": {"founded_orgs": "founder", "works": "author"},
              "org": {"built": "builder", "organised": "organiser"},
              "place": {"natives": "birthplace", "home_to": "headquarters", "sights": "location",
                        "hosted": "venue"},
              "work": {}, "structure": {}, "event": {}}
# which fact states a given attribute or relation (the evidence a question on it needs)
FACT_OF = {kind: {**{a: f for f, a in ATTR_FACTS[kind].items()}, **{r: f for f, r in REL_FACTS[kind].items()}}
           for kind in ATTR_FACTS}

POINTERS = ("The next clue is in document {d}.", "Continue with document {d}.",
            "Go on to document {d} for the next clue.", "The trail continues in document {d}.")
DECOYS = ("An older index wrongly gives document {d} as the next step.",
          "Ignore the crossed-out reference to document {d}.")
ENDINGS = ("This is the last note of the trail. The answer is {c}.", "The trail ends here. The answer is {c}.",
           "End of the trail: the answer is {c}.")
FILLERS = ("This note was left by {person}.", "The paper bears the seal of {org}.",
           "A sketch of {place} fills the margin.", "The note was found in a copy of {work}.")


def with_article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def value_text(fact: str, value) -> str:
    if fact == "population":
        return f"{value:,}"  # 881,063: as an encyclopedia writes it; answers drop the commas
    if fact.endswith("_kind") or fact == "occupation":
        return with_article({"company": "trading company"}.get(value, value))
    return str(value)


def join_names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


@dataclass
class Trails:
    """Trail notes as a forest: nxt[i] is the note after note i (None at an end), depth[i] counts the
    notes from i to its end inclusive, code[i] is the answer written in an end note."""
    nxt: list[int | None]
    depth: list[int]
    code: dict[int, str]


def make_trails(n: int, rng: random.Random, codes: NameMaker) -> Trails:
    """The longest trail, of min(MAX_TRAIL, n / 2) notes, then short branches with the other half: new
    trails, branches that join an existing trail, and branches that join one so as to end exactly as
    far from its end as the longest trail (so that several distinct starts have the longest length).

    Branch lengths are log-uniform, so short trails, the ones a small model learns first, have the
    most distinct starting notes.
    """
    nxt: list[int | None] = []
    depth: list[int] = []
    at_depth: dict[int, list[int]] = {}

    def chain(length: int, onto: int | None) -> None:
        base = 0 if onto is None else depth[onto]
        first = len(nxt)
        for j in range(length):
            nxt.append(first + j + 1 if j < length - 1 else onto)
            depth.append(base + length - j)
            at_depth.setdefault(depth[-1], []).append(first + j)

    def short(most: int) -> int:
        return min(most, int(math.exp(rng.uniform(0, math.log(min(most, 60) + 1)))))

    longest = max(1, min(MAX_TRAIL, n // 2))
    chain(longest, None)
    while len(nxt) < n:
        left = n - len(nxt)
        roll = rng.random()
        deep = [i for d in range(longest - min(left, 30), longest) for i in at_depth.get(d, [])] if roll < 0.2 else []
        if deep:
            onto = rng.choice(deep)
            chain(longest - depth[onto], onto)
        elif roll < 0.6 or longest == 1:
            chain(short(left), None)
        else:  # join at a depth drawn uniformly, so that middle lengths get starts of their own
            onto = rng.choice(at_depth[rng.randint(1, longest - 1)])
            chain(short(min(left, longest - depth[onto])), onto)
    ends = [i for i, x in enumerate(nxt) if x is None]
    return Trails(nxt, depth, {i: codes.unique("{w}", w=3) for i in ends})


def render_entity(g: Graph, e: Entity, rng: random.Random) -> tuple[str, dict[str, str]]:
    """The article on `e` and, per fact, the sentence that states it."""
    facts: dict[str, str] = {}

    def say(fact: str, value: str) -> None:
        facts[fact] = rng.choice(TEMPLATES[fact]).format(n=e.name, v=value)

    for fact, attr in ATTR_FACTS[e.kind].items():
        say(fact, value_text(fact, e.attrs[attr]))
    for fact, rel in REL_FACTS[e.kind].items():
        say(fact, g.related(e, rel).name)
    for fact, rel in LIST_FACTS[e.kind].items():
        others = g.inverse(e.key, rel)
        if others:
            say(fact, join_names([o.name for o in others]))
    paragraphs = []
    for group in (ATTR_FACTS, REL_FACTS, LIST_FACTS):
        sentences = [facts[f] for f in group[e.kind] if f in facts]
        rng.shuffle(sentences)  # the order varies, so a reader must find a fact, not count lines
        if sentences:
            paragraphs.append(" ".join(sentences))
    if e.twin:
        paragraphs.append(f"{e.name} is not to be confused with {twin_note(g, g.entities[e.twin])}.")
    return "\n".join(paragraphs), facts


def twin_note(g: Graph, t: Entity) -> str:
    """A near-miss fact: the namesake's own name and one of its facts."""
    a = t.attrs
    if t.kind == "person":
        return f"{t.name}, {with_article(a['occupation'])} born in {a['birth_year']}"
    if t.kind == "place":
        return f"{t.name}, a town of {a['population']:,} people"
    verb = {"org": "founded", "work": "published", "structure": "completed", "event": "held"}[t.kind]
    return f"{t.name}, {verb} in {a['founded'] if t.kind == 'org' else a['year']}"


def render_chronicle(g: Graph, by_kind: dict[str, list[Entity]], rng: random.Random) -> tuple[str, str]:
    """A chronicle of a place: a few sentences with facts that are near, but not, what tasks ask."""
    place = rng.choice(by_kind["place"])
    lines = []
    for _ in range(rng.randint(3, 5)):
        p, o, s, w = (rng.choice(by_kind[k]) for k in ("person", "org", "structure", "work"))
        lines.append(rng.choice((
            f"In {p.attrs['birth_year'] + rng.randint(15, 60)}, {p.name} visited {place.name}.",
            f"{p.name} gave a lecture at {o.name} in {p.attrs['birth_year'] + rng.randint(25, 70)}.",
            f"Travellers in {place.attrs['founded'] + rng.randint(50, 900)} counted about "
            f"{round(place.attrs['population'] * rng.uniform(0.5, 0.9), -3):,.0f} inhabitants in {place.name}.",
            f"{s.name} was repaired by {o.name} in {s.attrs['year'] + rng.randint(5, 80)}.",
            f"{o.name} celebrated its anniversary in {o.attrs['founded'] + rng.choice((25, 50, 100))}.",
            f"A copy of {w.name} was reprinted in {w.attrs['year'] + rng.randint(3, 90)}.")))
    title = rng.choice(("Chronicle of {n}", "Letters from {n}", "Notes on {n}", "A Traveller in {n}"))
    return title.format(n=place.name), " ".join(lines)


def render_trail(i: int, trails: Trails, note_docid: list[str], by_kind: dict[str, list[Entity]],
                 rng: random.Random) -> tuple[str, str]:
    """Trail note i: a line of filler, maybe a decoy reference, then the pointer or the answer."""
    person, org, place, work = (rng.choice(by_kind[k]) for k in ("person", "org", "place", "work"))
    lines = [rng.choice(FILLERS).format(person=person.name, org=org.name, place=place.name, work=work.name)]
    nxt = trails.nxt[i]
    if nxt is None:
        lines.append(rng.choice(ENDINGS).format(c=trails.code[i]))
    else:
        decoy = rng.choice(note_docid)
        if rng.random() < 0.15 and decoy != note_docid[nxt]:  # a near-miss reference not to follow
            lines.append(rng.choice(DECOYS).format(d=decoy))
        lines.append(rng.choice(POINTERS).format(d=note_docid[nxt]))
    return f"Trail note {rng.randint(100, 999)}", " ".join(lines)


@dataclass
class Rendered:
    docs: list[Doc]
    entity_docid: dict[str, str]          # entity key -> docid of its article
    facts: dict[str, dict[str, str]]      # entity key -> fact -> the sentence in its article
    trails: Trails
    trail_docid: list[str]                # trail note i -> docid


def render_documents(g: Graph, n_chronicles: int, n_trail: int) -> Rendered:
    rng = random.Random(f"nanok2-world:{g.seed}:documents")
    by_kind = {k: g.of_kind(k) for k in ("place", "person", "org", "work", "structure", "event")}
    codes = NameMaker(random.Random(f"nanok2-world:{g.seed}:codes"))
    codes.words = {w.lower() for e in g.entities.values() for w in e.name.split()}  # codes are not names
    trails = make_trails(n_trail, rng, codes) if n_trail else Trails([], [], {})
    slots = ([("entity", k) for k in g.entities] + [("chronicle", i) for i in range(n_chronicles)]
             + [("trail", i) for i in range(n_trail)])
    rng.shuffle(slots)  # a docid says nothing about what the document is
    ids = docids(len(slots))
    where = dict(zip(slots, ids))
    trail_docid = [where[("trail", i)] for i in range(n_trail)]
    docs, facts = [], {}
    for (kind, key), docid in zip(slots, ids):
        if kind == "entity":
            text, facts[key] = render_entity(g, g.entities[key], rng)
            title = g.entities[key].name
        elif kind == "chronicle":
            title, text = render_chronicle(g, by_kind, rng)
        else:
            title, text = render_trail(key, trails, trail_docid, by_kind, rng)
        docs.append(Doc(docid, title, text))
    return Rendered(docs, {k: where[("entity", k)] for k in g.entities}, facts, trails, trail_docid)
