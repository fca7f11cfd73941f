"""The facts of a world: entities with attributes and relations, drawn from one seed.

Everything a task asks about is decided here, before any sentence is written: documents only render
these facts, questions only walk these relations, and answers are read off this graph. Dates are kept
plausible (a founder is born before the organisation, a work is written in its author's life) so that
a model learning from the world never sees a contradiction it should not.
"""
from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field

from nanok2.world.names import NameMaker

KINDS = ("place", "person", "org", "work", "structure", "event")
# share of entities per kind: people dominate, as they do in an encyclopedia
SHARES = {"place": 0.12, "person": 0.38, "org": 0.15, "work": 0.15, "structure": 0.10, "event": 0.10}
TWIN_SHARE = 0.08  # entities named as a near-miss of an earlier one of the same kind
LAST_YEAR = 2024  # nothing is built or held in the future

OCCUPATIONS = ("engineer", "cartographer", "chemist", "novelist", "astronomer", "architect", "botanist",
               "composer", "physician", "printer", "shipwright", "historian", "painter", "surveyor")
ORG_KINDS = {"foundry": "Foundry", "shipyard": "Shipyard", "press": "Press", "institute": "Institute",
             "society": "Society", "company": "Trading Company", "observatory": "Observatory", "bank": "Bank"}
WORK_KINDS = {"novel": ("The House of {w}", "{w} in Winter", "The Last Days of {w}"),
              "treatise": ("A Treatise on {w}", "On the Nature of {w}"),
              "atlas": ("The {w} Atlas", "Maps of {w}"),
              "symphony": ("The {w} Symphony", "Songs of {w}"),
              "almanac": ("The {w} Almanac", "Tables of {w}")}
STRUCTURE_KINDS = {"bridge": "Bridge", "lighthouse": "Lighthouse", "dam": "Dam", "canal": "Canal",
                   "tower": "Tower", "railway": "Railway"}
EVENT_KINDS = {"fair": "Fair", "expedition": "Expedition", "congress": "Congress", "regatta": "Regatta",
               "exhibition": "Exhibition"}


@dataclass
class Entity:
    key: str    # "person:12": stable within one world, never shown to the model
    kind: str   # one of KINDS
    name: str
    attrs: dict[str, int | str] = field(default_factory=dict)
    rels: dict[str, str] = field(default_factory=dict)  # relation -> key of the related entity
    twin: str | None = None  # key of the entity whose name this one nearly shares


@dataclass
class Graph:
    seed: int
    entities: dict[str, Entity]
    _inverse: dict[tuple[str, str], list[Entity]] | None = field(default=None, repr=False, compare=False)

    def of_kind(self, kind: str) -> list[Entity]:
        return [e for e in self.entities.values() if e.kind == kind]

    def related(self, entity: Entity, rel: str) -> Entity:
        return self.entities[entity.rels[rel]]

    def inverse(self, key: str, rel: str) -> list[Entity]:
        """Entities whose `rel` points at `key` (people born in a place, works of an author), in key order."""
        if self._inverse is None:  # built once, after generation has filled every relation
            self._inverse = {}
            for e in self.entities.values():
                for r, target in e.rels.items():
                    self._inverse.setdefault((target, r), []).append(e)
        return self._inverse.get((key, rel), [])


def entity_counts(n_entities: int) -> dict[str, int]:
    counts = {k: max(3, round(n_entities * SHARES[k])) for k in KINDS}
    counts["person"] += n_entities - sum(counts.values())  # the rounding remainder goes to people
    if counts["person"] < 3:
        raise ValueError(f"{n_entities} entities are too few for a world")
    return counts


def generate_graph(seed: int, n_entities: int) -> Graph:
    rng = random.Random(f"nanok2-world:{seed}:graph")
    names = NameMaker(random.Random(f"nanok2-world:{seed}:names"))
    counts = entity_counts(n_entities)
    ents: dict[str, Entity] = {}

    def later(year: int, most: int) -> int:
        """A year 1..most years after `year`, but not after LAST_YEAR."""
        return year + rng.randint(1, max(1, min(most, LAST_YEAR - year)))

    untwinned: dict[tuple, list[Entity]] = {}  # (kind, sub-kind) -> entities still free to get a twin

    def add(kind: str, i: int, name_of, attrs: dict, rels: dict | None = None) -> Entity:
        # a twin has the same kind and sub-kind (a bridge next to a bridge), only one vowel apart
        group = untwinned.setdefault((kind, attrs.get(f"{kind}_kind")), [])
        twin_of = group.pop(rng.randrange(len(group))) if group and rng.random() < TWIN_SHARE else None
        name = names.twin(twin_of.name) if twin_of else None
        e = Entity(f"{kind}:{i}", kind, name or name_of(), attrs, rels or {})
        if name:
            e.twin, twin_of.twin = twin_of.key, e.key
        else:
            group.append(e)
        ents[e.key] = e
        return e

    for i in range(counts["place"]):
        add("place", i, lambda: names.unique("{w}", w=3),
            {"population": rng.randint(2_000, 2_500_000), "elevation": rng.randint(0, 2_400),
             "founded": rng.randint(700, 1700)})
    places = [e.key for e in ents.values() if e.kind == "place"]
    for i in range(counts["person"]):
        add("person", i, lambda: names.unique("{g} {f}", g=2, f=3),
            {"birth_year": rng.randint(1700, 1940), "occupation": rng.choice(OCCUPATIONS)},
            {"birthplace": rng.choice(places)})
    people = [e for e in ents.values() if e.kind == "person"]
    for i in range(counts["org"]):
        kind = rng.choice(sorted(ORG_KINDS))
        founder = rng.choice(people)
        add("org", i, lambda: names.unique("{w} " + ORG_KINDS[kind], w=3),
            {"org_kind": kind, "founded": founder.attrs["birth_year"] + rng.randint(25, 60)},
            {"founder": founder.key, "headquarters": rng.choice(places)})
    orgs = [e for e in ents.values() if e.kind == "org"]
    by_founding = sorted(orgs, key=lambda o: (o.attrs["founded"], o.key))
    years = [o.attrs["founded"] for o in by_founding]
    for person in people:
        # people work for an organisation that exists before they turn 45, when there is one
        fitting = bisect.bisect_right(years, person.attrs["birth_year"] + 45)
        person.rels["employer"] = (by_founding[rng.randrange(fitting)] if fitting else rng.choice(orgs)).key
    for i in range(counts["work"]):
        kind = rng.choice(sorted(WORK_KINDS))
        author = rng.choice(people)
        add("work", i, lambda: names.unique(rng.choice(WORK_KINDS[kind]), w=3),
            {"work_kind": kind, "year": author.attrs["birth_year"] + rng.randint(20, 70)},
            {"author": author.key})
    for i in range(counts["structure"]):
        kind = rng.choice(sorted(STRUCTURE_KINDS))
        builder = rng.choice(orgs)
        add("structure", i, lambda: names.unique("{w} " + STRUCTURE_KINDS[kind], w=3),
            {"structure_kind": kind, "year": later(builder.attrs["founded"], 100)},
            {"builder": builder.key, "location": rng.choice(places)})
    for i in range(counts["event"]):
        kind = rng.choice(sorted(EVENT_KINDS))
        organiser = rng.choice(orgs)
        add("event", i, lambda: names.unique("{w} " + EVENT_KINDS[kind], w=3),
            {"event_kind": kind, "year": later(organiser.attrs["founded"], 120)},
            {"organiser": organiser.key, "venue": rng.choice(places)})
    return Graph(seed, ents)
