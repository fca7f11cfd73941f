"""`nanok2 world build` and `nanok2 world tasks` from the command line."""
import json

from nanok2.cli import main
from nanok2.world import Toolbox, load_world, replay
from nanok2.world.corpus import Corpus


def test_build_then_tasks(tmp_path, capsys):
    assert main(["world", "build", "--seed", "3", "--size", "400", "--out", str(tmp_path / "w")]) == 0
    assert "400 documents" in capsys.readouterr().out
    assert main(["world", "tasks", "--world", str(tmp_path / "w"), "--family", "multihop", "--hops", "3",
                 "--n", "2", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    tools = Toolbox(load_world(tmp_path / "w").corpus)
    for line in lines:
        task = json.loads(line)
        assert {"question", "answer", "family", "messages"} <= set(task)
        assert replay(tools, task["messages"]) == []
    # the same seed and size without a saved world give the same tasks
    assert main(["world", "tasks", "--seed", "3", "--size", "400", "--family", "multihop", "--hops", "3",
                 "--n", "2", "--json"]) == 0
    assert capsys.readouterr().out.splitlines() == lines


def test_tasks_text_and_views(capsys):
    assert main(["world", "tasks", "--seed", "1", "--size", "1000", "--family", "trail", "--hops", "20"]) == 0
    assert "[trail, 20 hops, 20 tool calls]" in capsys.readouterr().out
    assert main(["world", "tasks", "--seed", "1", "--size", "1000", "--family", "trail", "--hops", "20",
                 "--json", "--context-chars", "2000", "--keep-last", "1"]) == 0
    task = json.loads(capsys.readouterr().out)
    assert len(task["views"]) > 1 and task["views"][0]["train_from"] == 0


def test_user_corpus(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("The lighthouse keeper logs the weather at dawn.")
    assert main(["world", "build", "--corpus", str(tmp_path / "docs"), "--out", str(tmp_path / "idx")]) == 0
    tools = Toolbox(Corpus.load(tmp_path / "idx"))
    assert tools.call("search", {"query": "lighthouse"}).startswith("d0000 | a.txt | ")


def test_bad_input_is_a_message_not_a_traceback(tmp_path, capsys):
    assert main(["world", "build", "--seed", "0", "--size", "5", "--out", str(tmp_path / "w")]) == 2
    assert "error: --size 5" in capsys.readouterr().err
    assert main(["world", "tasks", "--seed", "0", "--size", "400", "--family", "trail", "--hops", "299"]) == 2
    assert "build a larger" in capsys.readouterr().err
    assert main(["world", "build", "--corpus", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "not a folder" in capsys.readouterr().err
