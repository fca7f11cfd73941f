"""Task families over a world, each with an exact answer, a difficulty knob and a gold trajectory.

- multihop (hops = documents to read, 1-6): "In what year was the founder of the builder of X born?"
- constraint (hops = conditions, 2-5), BrowseComp's inverted style: "Which person was born in P, worked
  as a chemist and was born before 1850?"; the answer is the only person in the world who fits.
- trail (hops = notes to open, 1-300): open a note, which names the next one, until the last gives a word.
- arithmetic (hops = facts, 2-5): facts read from documents, combined with the python tool.

Every task is checked by `verify` when it is made: the answer is recomputed from the graph (and, for
trails, from the documents' text), it is unique in the world, and each sentence the task needs is
present in the document it is said to be in.
"""
from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field

from nanok2.errors import NanoK2Error
from nanok2.world.documents import ENDINGS, FACT_OF, POINTERS, join_names, with_article
from nanok2.world.graph import Entity
from nanok2.world.tools import Toolbox
from nanok2.world.trajectories import Recorder
from nanok2.world.world import World

FAMILIES = ("multihop", "constraint", "trail", "arithmetic")
HOPS = {"multihop": (1, 6), "constraint": (2, 5), "trail": (1, 300), "arithmetic": (2, 5)}
DEFAULT_HOPS = {"multihop": 2, "constraint": 3, "trail": 5, "arithmetic": 2}
# how the gold thinking is worded. "plain" states each fact as it is read (the embedded model was trained on
# it). "restate" also carries what is still sought: multi-hop thinking restates the question as a noun
# phrase and narrows it after each hop ("Now the question asks for the founding year of the employer of Y"),
# constraint thinking keeps the conditions and the candidates left, arithmetic thinking the numbers read so
# far. A step's context may have lost the question's earlier steps (agent.fit_context), so the last thinking
# is the agent's only memory of them. "compare" is "restate" with constraint verdicts written out: after the
# quote, the question's value and the page's side by side ("Asked: worked as a historian. Found: was an
# engineer, not a historian."), so the verdict is read off two adjacent values instead of a page value and a
# question far up the context. "compute" is "restate" with constraint verdicts computed by the python tool:
# after an article is read, a program holds the page's values and tests them against the question's
# (`born = 1838` / `print(occupation == "historian" and born < 1850)`), and the verdict follows what it
# printed, so the model copies values and reads one word instead of comparing them itself.
GOLD_STYLES = ("plain", "restate", "compare", "compute")
RESTATING = ("restate", "compare", "compute")   # the styles that carry what is still sought


@dataclass
class Task:
    family: str
    question: str
    answer: str
    hops: int
    messages: list[dict]
    evidence: list[dict]                        # [{docid, text}]: sentences the answer rests on
    spec: dict = field(default_factory=dict)    # what `verify` recomputes the answer from

    def to_json(self) -> dict:
        return {"family": self.family, "hops": self.hops, "question": self.question, "answer": self.answer,
                "evidence": self.evidence, "messages": self.messages}


class Skip(Exception):
    """This draw cannot make a good task (the search misses the article, the answer is not unique)."""


# ---- reading an entity's article, as the gold agent does it ----------------------------------------

def read_article(rec: Recorder, world: World, e: Entity, why: str, facts: tuple[str, ...],
                 purpose: str | None = None) -> list[str]:
    """search(name), then open(docid) page by page until the sentences of `facts` have all been seen;
    `purpose` is said when the article is opened ("I open it for the employer of X.").

    Returns those sentences. Raises Skip when the article is not among the search results.
    """
    docid = world.rendered.entity_docid[e.key]
    wanted = [world.rendered.facts[e.key][f] for f in facts]
    found = rec.call(f"{why} Let me search for {e.name}.", "search", {"query": e.name})
    if not any(line.split(" | ")[:2] == [docid, e.name] for line in found.splitlines()):
        raise Skip(f"search for {e.name!r} misses {docid}")
    seen, page = "", 0
    while True:
        opener = f"I open it for {purpose}." if purpose else "I open it."
        note = f"{docid} is the article on {e.name}. {opener}" if page == 0 else \
            f"Not everything I need is on page {page - 1}; I read page {page}."
        text = rec.call(note, "open", {"docid": docid} if page == 0 else {"docid": docid, "page": page})
        seen += text
        if all(w in seen for w in wanted):
            return wanted
        if "(more: open" not in text:
            raise Skip(f"{docid} does not state {facts}")
        page += 1


def evidence(world: World, e: Entity, fact: str) -> dict:
    return {"docid": world.rendered.entity_docid[e.key], "text": world.rendered.facts[e.key][fact]}


# ---- multihop ------------------------------------------------------------------------------------

RELATIONS = {"person": ("birthplace", "employer"), "org": ("founder", "headquarters"), "work": ("author",),
             "structure": ("builder", "location"), "event": ("organiser", "venue"), "place": ()}
PHRASE = {"birthplace": "the birthplace of {x}", "employer": "the employer of {x}", "founder": "the founder of {x}",
          "headquarters": "the headquarters city of {x}", "author": "the author of {x}",
          "builder": "the builder of {x}", "location": "the location of {x}", "organiser": "the organiser of {x}",
          "venue": "the venue of {x}"}
ASK = {("person", "birth_year"): "In what year was {x} born?", ("org", "founded"): "In what year was {x} founded?",
       ("place", "population"): "What is the population of {x}?",
       ("place", "elevation"): "What is the elevation of {x}, in metres?",
       ("place", "founded"): "In what year was {x} founded?", ("work", "year"): "In what year was {x} published?",
       ("structure", "year"): "In what year was {x} completed?", ("event", "year"): "In what year was {x} held?"}
ATTR_PHRASE = {("person", "birth_year"): "the year of birth of {x}", ("org", "founded"): "the founding year of {x}",
               ("place", "population"): "the population of {x}", ("place", "elevation"): "the elevation of {x}",
               ("place", "founded"): "the founding year of {x}", ("work", "year"): "the year of publication of {x}",
               ("structure", "year"): "the year of completion of {x}", ("event", "year"): "the year of {x}"}


def answer_text(value) -> str:
    return str(value)  # numbers without digit-group commas: one exact spelling


def follow(world: World, start: str, path: list[str]) -> list[Entity]:
    chain = [world.graph.entities[start]]
    for rel in path:
        chain.append(world.graph.related(chain[-1], rel))
    return chain


def make_multihop(world: World, toolbox: Toolbox, hops: int, rng: random.Random, style: str = "plain") -> Task:
    g = world.graph
    start = rng.choice([e for e in g.entities.values() if RELATIONS[e.kind]])
    path, cur, visited = [], start, {start.key}
    for step in range(hops - 1):
        # go where the walk can go on (places have no relations) and never back to an entity already seen
        ways = [r for r in RELATIONS[cur.kind] if cur.rels[r] not in visited
                and (step == hops - 2 or RELATIONS[g.entities[cur.rels[r]].kind])]
        if not ways:
            raise Skip("the walk has nowhere new to go")
        path.append(rng.choice(ways))
        cur = g.related(cur, path[-1])
        visited.add(cur.key)
    attr = rng.choice([a for kind, a in ASK if kind == cur.kind])
    spec = {"start": start.key, "path": path, "attr": attr}
    chain = follow(world, start.key, path)

    def reached(i: int) -> str:   # the entity the question leads to, named from the chain's i-th on
        x = chain[i].name
        for rel in path[i:]:
            x = PHRASE[rel].format(x=x)
        return x

    def sought(i: int) -> str:    # what the question asks, from the chain's i-th entity on
        return ATTR_PHRASE[(cur.kind, attr)].format(x=reached(i))

    question = ASK[(cur.kind, attr)].format(x=reached(0))
    answer = answer_text(cur.attrs[attr])
    rec = Recorder(toolbox, question)

    restate = style in RESTATING
    why = (f"The question asks for {sought(0)}. It starts from {start.name}." if restate else
           f"The question starts from {start.name}.")
    sentences = []
    for i, (e, rel) in enumerate(zip(chain, path + [attr])):
        purpose = (PHRASE[rel].format(x=e.name) if rel != attr else sought(i)) if restate else None
        sentence = read_article(rec, world, e, why, (FACT_OF[e.kind][rel],), purpose)[0]
        sentences.append(sentence)
        if rel != attr:
            nxt = g.related(e, rel)
            why = f'The article says: "{sentence}" So {PHRASE[rel].format(x=e.name)} is {nxt.name}.'
            if restate:
                why += f" Now the question asks for {sought(i + 1)}."
    messages = rec.finish(f'The article says: "{sentences[-1]}" So the answer is {answer}.',
                          " ".join(sentences), answer)
    ev = [evidence(world, e, FACT_OF[e.kind][rel]) for e, rel in zip(chain, path + [attr])]
    return Task("multihop", question, answer, hops, messages, ev, spec)


# ---- constraint ----------------------------------------------------------------------------------

def holds(world: World, p: Entity, cond: tuple) -> bool:
    kind, value = cond
    employer = world.graph.related(p, "employer")
    return {"birthplace": lambda: p.rels["birthplace"] == value,
            "occupation": lambda: p.attrs["occupation"] == value,
            "born_before": lambda: p.attrs["birth_year"] < value,
            "born_after": lambda: p.attrs["birth_year"] > value,
            "employer_before": lambda: employer.attrs["founded"] < value,
            "employer_after": lambda: employer.attrs["founded"] > value,
            "employer_in": lambda: employer.rels["headquarters"] == value}[kind]()


def describe(world: World, cond: tuple, employer: bool = True) -> str:
    """The condition as a clause ("was born before 1850"); `employer=False` drops "worked for an
    organisation" from employer conditions, so that two of them share it in a question."""
    kind, value = cond
    name = world.graph.entities[value].name if kind in ("birthplace", "employer_in") else None
    text = {"birthplace": f"was born in {name}", "occupation": f"worked as {with_article(str(value))}",
            "born_before": f"was born before {value}", "born_after": f"was born after {value}",
            "employer_before": f"founded before {value}", "employer_after": f"founded after {value}",
            "employer_in": f"headquartered in {name}"}[kind]
    return f"worked for an organisation {text}" if employer and kind.startswith("employer") else text


def question_parts(world: World, conds: list[tuple]) -> list[str]:
    parts = [describe(world, c) for c in conds if not c[0].startswith("employer")]
    of_employer = [describe(world, c, employer=False) for c in conds if c[0].startswith("employer")]
    if of_employer:  # one organisation, however many conditions on it
        parts.append("worked for an organisation " + " and ".join(of_employer))
    return parts


def matches(world: World, conds: list[tuple]) -> list[Entity]:
    return [p for p in world.graph.of_kind("person") if all(holds(world, p, c) for c in conds)]


def source(world: World, p: Entity, cond: tuple) -> tuple[Entity, str]:
    """The entity and fact whose sentence shows whether `p` meets `cond`."""
    kind = cond[0]
    if kind == "birthplace":
        return world.graph.related(p, "birthplace"), "natives"
    if kind.startswith("employer"):
        return world.graph.related(p, "employer"), "headquarters" if kind == "employer_in" else "founded"
    return p, "occupation" if kind == "occupation" else "birth_year"


# restate style: what a person's or an employer's article is read for, per condition (and "employer" for
# the person's link to it), taken from multi-hop's ATTR_PHRASE and PHRASE so both families word it alike
CONDITION_FIELD = {kind: phrase.removesuffix(" of {x}") for kind, phrase in (
    ("occupation", "the occupation of {x}"), ("born_before", ATTR_PHRASE[("person", "birth_year")]),
    ("born_after", ATTR_PHRASE[("person", "birth_year")]), ("employer", PHRASE["employer"]),
    ("employer_before", ATTR_PHRASE[("org", "founded")]), ("employer_after", ATTR_PHRASE[("org", "founded")]),
    ("employer_in", PHRASE["headquarters"]))}


def checking(fields: list[str], name: str) -> str:
    """"the year of birth and the employer of X": the purpose an article is opened for."""
    return f"{join_names(list(dict.fromkeys(fields)))} of {name}"


def condition_values(world: World, cand: Entity, cond: tuple) -> tuple:
    """(the page's value, the question's) for `cond` on `cand`: occupations as words, headquarters as city
    names (unique in a world), years as numbers."""
    kind, value = cond
    e, _ = source(world, cand, cond)
    if kind == "occupation":
        return e.attrs["occupation"], str(value)
    if kind == "employer_in":
        return world.graph.related(e, "headquarters").name, world.graph.entities[value].name
    return e.attrs["birth_year" if e is cand else "founded"], value


def comparison(world: World, cand: Entity, cond: tuple) -> str:
    """compare style: the question's value, then the page's, then how they relate -> "Asked: founded before
    1907. Found: founded in 1920, after 1907" (a verdict follows). Names are left out: the quote just before
    gives them, and a final turn with three verdicts must stay within one reply."""
    kind = cond[0]
    page, asked = condition_values(world, cand, cond)
    if kind == "occupation":
        found = f"was {with_article(page)}" + (f", not {with_article(asked)}" if page != asked else "")
    elif kind == "employer_in":
        found = f"headquartered in {page}" + (f", not in {asked}" if page != asked else "")
    else:   # a year against a limit: "was born in 1838, after 1829"; the same year is "not after 1829"
        side = "before" if page < asked else "after" if page > asked else f"not {kind.rsplit('_', 1)[1]}"
        found = f"{'was born' if kind.startswith('born') else 'founded'} in {page}, {side} {asked}"
    return f"Asked: {describe(world, cond, employer=False)}. Found: {found}"


# compute style: the variable a page's value is held in, and the test of it against the question's value
CODE_NAME = {"occupation": "occupation", "born_before": "born", "born_after": "born", "employer_before": "founded",
             "employer_after": "founded", "employer_in": "headquarters"}
CODE_TEST = {"occupation": "==", "born_before": "<", "born_after": ">", "employer_before": "<",
             "employer_after": ">", "employer_in": "=="}


def check_code(world: World, cand: Entity, conds: list[tuple]) -> str:
    """compute style: a program that prints whether `cand` meets every one of `conds` (all on one article:
    the person's, or the employer's) -> 'founded = 1888\nheadquarters = "Velmora"\nprint(founded < 1907 and
    headquarters == "Kastel")'. The page's values are variables, the question's are literals."""
    values, tests = {}, []
    for cond in conds:
        page, asked = condition_values(world, cand, cond)
        name = CODE_NAME[cond[0]]
        values[name] = page
        tests.append(f"{name} {CODE_TEST[cond[0]]} {literal(asked)}")
    lines = [f"{name} = {literal(value)}" for name, value in values.items()]
    return "\n".join(lines + [f"print({' and '.join(tests)})"])


def literal(value) -> str:
    """A Python literal for a year or a word, strings in double quotes as JSON writes them."""
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else str(value)


def check(world: World, cand: Entity, conds: list[tuple], style: str) -> tuple[str, tuple | None]:
    """Check `conds` in order on what was just read -> (the thinking that quotes and judges each condition
    that holds, the first that fails or None). In the plain style the conditions that hold go unsaid."""
    said = ""
    for c in conds:
        if not holds(world, cand, c):
            return said, c
        if style == "plain":
            continue
        e, fact = source(world, cand, c)
        quote = f'The article says: "{world.rendered.facts[e.key][fact]}"'
        if style == "compare":
            said += f"{quote} {comparison(world, cand, c)}, as the question asks. "
        else:
            # restate: "So X was born after 1742" for the person, "So Y was founded after 1842" for the employer
            verdict = f"{cand.name} {describe(world, c)}" if e is cand else \
                f"{e.name} was {describe(world, c, employer=False)}"
            said += f"{quote} So {verdict}, as the question asks. "
    return said, None


def compute_check(rec: Recorder, world: World, cand: Entity, conds: list[tuple]) -> tuple[str, tuple | None]:
    """compute style: test `conds` on the article just read with the python tool -> ("The program printed
    True. ", None) or (..., the first condition that fails). With no conditions there is nothing to run."""
    if not conds:
        return "", None
    e, _ = source(world, cand, conds[0])
    asked = checking([CONDITION_FIELD[c[0]] for c in conds], e.name)
    out = rec.call(f"I check {asked} against the question with python.", "python",
                   {"code": check_code(world, cand, conds)}).strip()
    failed = next((c for c in conds if not holds(world, cand, c)), None)
    if out != str(failed is None):
        raise Skip(f"python printed {out!r} for {cand.name}, expected {failed is None}")
    return f"The program printed {out}. ", failed


def make_constraint(world: World, toolbox: Toolbox, hops: int, rng: random.Random, style: str = "plain") -> Task:
    g = world.graph
    target = rng.choice(g.of_kind("person"))
    employer = g.related(target, "employer")
    year, founded = target.attrs["birth_year"], employer.attrs["founded"]
    pool = [("occupation", target.attrs["occupation"]),
            rng.choice((("born_before", year + rng.randint(1, 15)), ("born_after", year - rng.randint(1, 15)))),
            rng.choice((("employer_before", founded + rng.randint(1, 20)),
                        ("employer_after", founded - rng.randint(1, 20)))),
            ("employer_in", employer.rels["headquarters"])]
    conds = [("birthplace", target.rels["birthplace"])] + rng.sample(pool, hops - 1)
    if matches(world, conds) != [target]:
        raise Skip("not exactly one person fits")
    place = g.entities[conds[0][1]]
    parts = question_parts(world, conds)
    question = f"Which person {join_names(parts)}? Give the full name."
    rec = Recorder(toolbox, question)
    restate = style in RESTATING
    why = f"Whoever it is was born in {place.name}, so I first list the people born there."
    if restate:
        why = f"The question asks for the person who {join_names(parts)}. {why}"
    natives = read_article(rec, world, place, why, ("natives",),
                           f"the people born in {place.name}" if restate else None)[0]
    note = f'The article says: "{natives}" I check each of them against the other conditions.'
    personal = [c for c in conds[1:] if not c[0].startswith("employer")]
    via_employer = [c for c in conds[1:] if c[0].startswith("employer")]
    candidates = g.inverse(place.key, "birthplace")
    for k, cand in enumerate(candidates):
        facts = world.rendered.facts[cand.key]
        wanted = [CONDITION_FIELD[c[0]] for c in personal] + ([CONDITION_FIELD["employer"]] if via_employer else [])
        read_article(rec, world, cand, note, ("occupation", "birth_year", "employer"),
                     checking(wanted, cand.name) if restate else None)
        checked, failed = (compute_check(rec, world, cand, personal) if style == "compute" else
                           check(world, cand, personal, style))
        if failed is None and via_employer:
            emp = g.related(cand, "employer")
            read_article(rec, world, emp, f'{checked}The article says: "{facts["employer"]}" I check {emp.name}.',
                         ("founded", "headquarters"),
                         checking([CONDITION_FIELD[c[0]] for c in via_employer], emp.name) if restate else None)
            checked, failed = (compute_check(rec, world, cand, via_employer) if style == "compute" else
                               check(world, cand, via_employer, style))
        if failed:
            if style == "compute":
                note = f"{checked}So {cand.name} is ruled out."
            else:
                e, fact = source(world, cand, failed)
                why_not = (f"{comparison(world, cand, failed)}. So {cand.name} is ruled out." if style == "compare"
                           else f"So {cand.name} is ruled out: the person sought {describe(world, failed)}.")
                note = f'"{world.rendered.facts[e.key][fact]}" {why_not}'
                if restate:
                    note = f"{checked}The article says: {note}"
            if restate:   # the list of people born there may have left the context by now
                note += f" Still to check: {join_names([c.name for c in candidates[k + 1:]])}."
            continue
        # matches() found exactly one person, so the first candidate who fits is the answer
        shown = [source(world, cand, c) for c in conds] + ([(cand, "employer")] if via_employer else [])
        ev = [evidence(world, e, fact) for e, fact in shown]
        # restate: the conditions were each judged as they were read, so the last thinking need not list them
        # again (and stays within one reply's token budget)
        done = (f"{checked}So {cand.name} meets every condition." if restate else
                f"{cand.name} meets every condition: {cand.name} {join_names(parts)}.")
        messages = rec.finish(done,
                              " ".join(dict.fromkeys(x["text"] for x in ev)), cand.name)
        return Task("constraint", question, cand.name, hops, messages, ev, {"conds": conds})
    raise Skip("no candidate fits")


# ---- trail ---------------------------------------------------------------------------------------

POINTER_RE = re.compile("|".join(re.escape(p).replace(r"\{d\}", r"(d\d+)") for p in POINTERS))
ENDING_RE = re.compile("|".join(re.escape(e).replace(r"\{c\}", r"(\w+)") for e in ENDINGS))


def trail_from(world: World, start: int) -> list[int]:
    chain = [start]
    while world.rendered.trails.nxt[chain[-1]] is not None:
        chain.append(world.rendered.trails.nxt[chain[-1]])
    return chain


def make_trail(world: World, toolbox: Toolbox, hops: int, rng: random.Random, style: str = "plain") -> Task:
    # one wording in both styles: each note's thinking already names the note it opens next
    trails, ids = world.rendered.trails, world.rendered.trail_docid
    starts = [i for i, d in enumerate(trails.depth) if d == hops]
    if not starts:
        raise NanoK2Error(f"this world has no trail of {hops} notes; build a larger one (--size)")
    chain = trail_from(world, rng.choice(starts))
    answer = trails.code[chain[-1]]
    question = (f"Start by opening document {ids[chain[0]]}. Each note names the document to read next. "
                "Follow the trail to its end: what is the answer written in the last note?")
    rec = Recorder(toolbox, question)
    note = f"I open the first note, {ids[chain[0]]}."
    for i, nxt in zip(chain, chain[1:] + [None]):
        rec.call(note, "open", {"docid": ids[i]})
        if nxt is not None:
            note = f"The note says the next clue is in {ids[nxt]}. I open it."
    docid = ids[chain[-1]]
    messages = rec.finish(f"The last note, {docid}, says the answer is {answer}.",
                          f"I followed the notes from {ids[chain[0]]} to {docid}, which gives the answer.",
                          answer)
    ev = [{"docid": ids[i], "text": (ENDING_RE if i == chain[-1] else POINTER_RE).search(
        world.corpus.by_id[ids[i]].text).group(0)} for i in chain]  # the sentence that leads on
    return Task("trail", question, answer, hops, messages, ev, {"start": ids[chain[0]]})


# ---- arithmetic ----------------------------------------------------------------------------------

def make_arithmetic(world: World, toolbox: Toolbox, hops: int, rng: random.Random, style: str = "plain") -> Task:
    g = world.graph
    op = rng.choice(["population_sum", "elevation_range"] + (["founder_age"] if hops == 2 else []))
    if op == "founder_age":
        org = rng.choice(g.of_kind("org"))
        founder = g.related(org, "founder")
        question = f"How old was the founder of {org.name} in the year {org.name} was founded?"
        reads = [(org, ("founder", "founded")), (founder, ("birth_year",))]
        # for "restate": what each read tells, and what the computation still needs after it
        learned = [f"{org.name} was founded in {org.attrs['founded']} and its founder is {founder.name}",
                   f"{founder.name} was born in {founder.attrs['birth_year']}"]
        needed = [[f"the year of birth of {founder.name}"], []]
        sought = f"the age of the founder of {org.name} in the year {org.name} was founded"
        code = f"founded = {org.attrs['founded']}\nborn = {founder.attrs['birth_year']}\nprint(founded - born)"
        spec = {"op": op, "keys": [org.key]}
    else:
        places = rng.sample(g.of_kind("place"), hops)
        names = join_names([p.name for p in places])
        attr = "population" if op == "population_sum" else "elevation"
        question = (f"What is the combined population of {names}?" if op == "population_sum" else
                    f"By how many metres is the highest of {names} higher than the lowest?")
        reads = [(p, (attr,)) for p in places]
        phrase = [ATTR_PHRASE[("place", attr)].format(x=p.name) for p in places]
        learned = [f"{phrase[i]} is {p.attrs[attr]}" for i, p in enumerate(places)]
        needed = [phrase[i + 1:] for i in range(len(places))]
        sought = (f"the combined population of {names}" if op == "population_sum" else
                  f"how many metres the highest of {names} is higher than the lowest")
        values = "{" + ", ".join(f'"{p.name}": {p.attrs[attr]}' for p in places) + "}"
        code = f"{attr} = {values}\n" + (f"print(sum({attr}.values()))" if op == "population_sum" else
                                         f"print(max({attr}.values()) - min({attr}.values()))")
        spec = {"op": op, "keys": [p.key for p in places]}
    task = Task("arithmetic", question, "", hops, [], [], spec)
    answer = solve(world, task)
    rec = Recorder(toolbox, question)
    restate = style in RESTATING
    said, why = [], "I need each number from its document first."
    if restate:
        why = f"The question asks for {sought}. {why}"
    for i, (e, facts) in enumerate(reads):
        said += read_article(rec, world, e, why, facts)
        why = "The article says: " + " ".join(f'"{x}"' for x in said[-len(facts):])
        if restate:   # the numbers read so far, in the digits python will take
            why += f" So far: {'; '.join(learned[:i + 1])}."
            if needed[i]:
                why += f" Still needed: {join_names(needed[i])}."
    out = rec.call(f"{why} Now I compute the result with python.", "python", {"code": code})
    if out.strip() != answer:
        raise Skip(f"python printed {out!r}, expected {answer}")
    task.answer = answer
    task.messages = rec.finish(f"The program printed {answer}.", " ".join(said) + f" Computed with python: {answer}.",
                               answer)
    task.evidence = [evidence(world, e, f) for e, facts in reads for f in facts]
    return task


# ---- checks and the entry point ------------------------------------------------------------------

def solve(world: World, task: Task) -> str:
    """The answer recomputed from the graph (trails: from the documents' own text)."""
    g, s = world.graph, task.spec
    if task.family == "multihop":
        return answer_text(follow(world, s["start"], s["path"])[-1].attrs[s["attr"]])
    if task.family == "constraint":
        found = matches(world, s["conds"])
        return found[0].name if len(found) == 1 else f"<{len(found)} people fit>"
    if task.family == "arithmetic":
        ents = [g.entities[k] for k in s["keys"]]
        if s["op"] == "founder_age":
            return answer_text(ents[0].attrs["founded"] - g.related(ents[0], "founder").attrs["birth_year"])
        values = [e.attrs["population" if s["op"] == "population_sum" else "elevation"] for e in ents]
        return answer_text(sum(values) if s["op"] == "population_sum" else max(values) - min(values))
    docid, seen = s["start"], 0
    while seen <= HOPS["trail"][1]:
        text = world.corpus.by_id[docid].text
        seen += 1
        pointer, ending = POINTER_RE.search(text), ENDING_RE.search(text)
        if ending:
            return next(x for x in ending.groups() if x) if seen == task.hops else f"<ends after {seen} notes>"
        docid = next(x for x in pointer.groups() if x)
    return "<no end>"


def verify(world: World, task: Task) -> list[str]:
    """Problems with `task` (an empty list when it is sound)."""
    problems = []
    if solve(world, task) != task.answer:
        problems.append(f"answer {task.answer!r} but the world gives {solve(world, task)!r}")
    named = Counter(e.name for e in world.graph.entities.values())
    problems += [f"{name!r} names several entities" for name, count in named.items()
                 if count > 1 and name in task.question]
    for ev in task.evidence:
        doc = world.corpus.by_id.get(ev["docid"])
        if doc is None or ev["text"] not in doc.text:
            problems.append(f"{ev['docid']} does not contain {ev['text']!r}")
    return problems


MAKERS = {"multihop": make_multihop, "constraint": make_constraint, "trail": make_trail,
          "arithmetic": make_arithmetic}


def make_tasks(world: World, toolbox: Toolbox, family: str, hops: int | None = None, n: int = 1,
               style: str = "plain") -> list[Task]:
    """`n` distinct verified tasks of `family` at difficulty `hops`; the same arguments give the same tasks,
    and the two gold styles (GOLD_STYLES) the same questions, answers and tool calls."""
    if family not in MAKERS:
        raise NanoK2Error(f"--family {family!r}: unknown; the families are {', '.join(FAMILIES)}")
    if style not in GOLD_STYLES:
        raise NanoK2Error(f"gold style {style!r}: unknown; the styles are {', '.join(GOLD_STYLES)}")
    hops = DEFAULT_HOPS[family] if hops is None else hops
    low, high = HOPS[family]
    if not low <= hops <= high:
        raise NanoK2Error(f"--hops {hops}: {family} tasks take {low} to {high} hops")
    rng = random.Random(f"nanok2-tasks:{world.seed}:{family}:{hops}")
    tasks, questions = [], set()
    for _ in range(max(50, 40 * n)):
        if len(tasks) == n:
            break
        try:
            task = MAKERS[family](world, toolbox, hops, rng, style)
        except Skip:
            continue
        if task.question in questions:
            continue
        problems = verify(world, task)
        if problems:  # a generator bug, not bad luck: stop loudly
            raise AssertionError(f"{family} task failed its checks: {problems}")
        questions.add(task.question)
        tasks.append(task)
    if len(tasks) < n:
        raise NanoK2Error(f"only {len(tasks)} distinct {family} tasks of {hops} hops found in this world "
                          f"(asked for {n}); build a larger world with --size")
    return tasks
