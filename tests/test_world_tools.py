"""search / open / python through the Toolbox: real BM25 results, paging, errors as text, threads, user folders."""
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from nanok2.errors import NanoK2Error
from nanok2.world import SCHEMAS, Corpus, Doc, Toolbox, build_world
from nanok2.world.corpus import paginate
from nanok2.world.tools import search


@pytest.fixture(scope="module")
def world():
    return build_world(5, 800)


@pytest.fixture(scope="module")
def tools(world):
    return Toolbox(world.corpus)


def test_schemas_are_openai_tools(tools):
    assert [s["function"]["name"] for s in tools.schemas] == ["search", "open", "python"]
    for s in SCHEMAS:
        assert s["type"] == "function" and s["function"]["parameters"]["type"] == "object"
        assert set(s["function"]["parameters"]["required"]) <= set(s["function"]["parameters"]["properties"])


def test_search_finds_an_entity_by_name(world, tools):
    e = next(e for e in world.graph.entities.values() if e.kind == "person")
    hits = search(world.corpus, e.name, 5)
    assert hits[0] == {"docid": world.rendered.entity_docid[e.key], "title": e.name, "snippet": hits[0]["snippet"]}
    assert all(len(h["snippet"]) <= 160 for h in hits)
    out = tools.call("search", {"query": e.name, "k": 3})
    assert out.splitlines()[0].startswith(f"{hits[0]['docid']} | {e.name} | ") and len(out.splitlines()) <= 3
    assert tools.call("search", json.dumps({"query": e.name})) == tools.call("search", {"query": e.name, "k": 5})


def test_open_reads_a_document(world, tools):
    doc = world.corpus.docs[3]
    out = tools.call("open", {"docid": doc.docid})
    assert out == f"{doc.docid} | {doc.title}\n{doc.text}"
    assert tools.call("open", {"docid": " " + doc.docid.upper()}) == out


def test_paging():
    text = "\n".join(f"Paragraph {i}. " + "word " * 100 for i in range(20)) + "\n" + "x" * 4000
    pages = paginate(text, 1500)
    assert all(len(p) <= 1500 for p in pages) and len(pages) > 3
    assert "".join(p.replace("\n", "") for p in pages) == text.replace("\n", "")
    tools = Toolbox(Corpus([Doc("d0000", "long", text)]))
    first = tools.call("open", {"docid": "d0000"})
    assert "page 0 of pages 0-" in first and "(more: open d0000 page 1)" in first
    last = len(pages) - 1
    assert tools.call("open", {"docid": "d0000", "page": last}).endswith(pages[last])
    assert tools.call("open", {"docid": "d0000", "page": last + 1}).startswith("Error: d0000 has pages 0 to")


@pytest.mark.parametrize("name,args,expected", [
    ("open", {"docid": "d9999"}, "Error: there is no document 'd9999'"),
    ("open", {"docid": 12}, "Error: open: argument 'docid' must be a string"),
    ("open", {"page": 1}, "Error: open: missing argument 'docid'"),
    ("open", {"docid": "d0001", "page": True}, "Error: open: argument 'page' must be an integer"),
    ("search", {"query": "x", "k": 0}, "Error: search: k must be between"),
    ("search", {"query": "x", "limit": 3}, "Error: search: unknown argument 'limit'"),
    ("search", "{not json", "Error: the arguments of search are not valid JSON"),
    ("search", "[1, 2]", "Error: the arguments of search must be a JSON object"),
    ("browse", {}, "Error: there is no tool 'browse'"),
    ("python", {}, "Error: python: missing argument 'code'"),
])
def test_errors_come_back_as_text(tools, name, args, expected):
    assert tools.call(name, args).startswith(expected)


def test_search_without_hits(tools):
    assert tools.call("search", {"query": "the of and"}).startswith("No results for")
    assert tools.call("search", {"query": "zzzqqq"}).startswith("No results for")


def test_calls_from_threads_agree(world, tools):
    queries = [e.name for e in list(world.graph.entities.values())[:40]]
    alone = [tools.call("search", {"query": q}) for q in queries]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda q: tools.call("search", {"query": q}), queries))
    assert together == alone


def test_user_folder(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.md").write_text("# Kettles\nThe blue kettle boils in 3 minutes.")
    (tmp_path / "b.txt").write_text("Tea is best with water just off the boil.")
    (tmp_path / "skip.pdf").write_text("not indexed")
    corpus = Corpus.from_folder(tmp_path)
    assert [(d.docid, d.title) for d in corpus.docs] == [("d0000", "b.txt"), ("d0001", "notes/a.md")]
    tools = Toolbox(corpus)
    assert tools.call("search", {"query": "blue kettle"}).startswith("d0001 | notes/a.md | ")
    corpus.save(tmp_path / "out", {"kind": "corpus"})
    again = Toolbox(Corpus.load(tmp_path / "out"))
    assert again.call("search", {"query": "tea"}) == tools.call("search", {"query": "tea"})
    with pytest.raises(NanoK2Error, match="no .txt or .md"):
        Corpus.from_folder(tmp_path / "out" / "index")


def misspelt(word: str, vocab: dict) -> str:
    """`word` with its first letter changed, to a spelling the index does not know."""
    for letter in "zqxjvw":
        wrong = letter.upper() + word[1:]
        if wrong.lower() not in vocab:
            return wrong
    raise AssertionError(f"no unknown misspelling of {word}")


def test_search_forgives_a_misspelt_name(world):
    vocab = world.corpus.index.model.vocab_dict
    people = world.graph.of_kind("person")[:40]
    exact, fuzzy = Toolbox(world.corpus, fuzzy_search=False), Toolbox(world.corpus)
    for e in people:
        first, last = e.name.split(" ", 1)
        query = f"{first} {misspelt(last, vocab)}"
        docid = world.rendered.entity_docid[e.key]
        assert fuzzy.call("search", {"query": query}).startswith(f"{docid} | {e.name} | "), query
        assert exact.call("search", {"query": misspelt(last, vocab)}).startswith("No results")
        # a single misspelt word (two edits here) finds it too, and its snippet is a sentence naming it
        lone = misspelt(misspelt(last, vocab)[::-1], vocab)[::-1]
        if len(last) > 5:
            hits = search(world.corpus, lone, 5)
            assert docid in [h["docid"] for h in hits], lone
            assert all(last in h["snippet"] for h in hits if h["docid"] == docid)


def test_fuzzy_matching_leaves_known_words_alone(world):
    index = world.corpus.index
    for e in list(world.graph.entities.values())[:40]:
        assert all(weight == 1.0 for _, weight in index.query_words(e.name))
        assert index.search(e.name, 5) == index.search(e.name, 5, fuzzy=False)
    # an unknown word weighs less than a known one, and one with nothing within its edits is dropped
    words = index.query_words("zzzqqq " + misspelt(world.graph.of_kind("place")[0].name, index.model.vocab_dict))
    assert words and all(0 < weight < 1 for _, weight in words)
    assert index.query_words("qx") == []
