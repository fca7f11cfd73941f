"""The python tool: it runs code, stays in its scratch folder, and is stopped at its limits with a readable error."""
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from nanok2.world.sandbox import run_python


def test_runs_code_and_captures_output():
    assert run_python("print(6 * 7)") == "42"
    assert run_python("import sys; print('oops', file=sys.stderr)") == "[stderr]\noops"
    assert run_python("x = 1") == "(no output; use print() to show a result)"


def test_exceptions_are_readable():
    out = run_python("def f():\n    return 1 / 0\nf()")
    assert "ZeroDivisionError: division by zero" in out and "return 1 / 0" in out
    assert out.endswith("Error: the code exited with status 1.")
    assert run_python("raise SystemExit(3)") == "Error: the code exited with status 3."


def test_writes_inside_scratch_are_allowed(tmp_path):
    out = run_python("import os\nos.makedirs('a/b')\nopen('a/b/f.txt', 'w').write('hi')\n"
                     "os.rename('a/b/f.txt', 'g.txt')\nprint(open('g.txt').read())", scratch=str(tmp_path))
    assert out == "hi" and (tmp_path / "g.txt").read_text() == "hi"


@pytest.mark.parametrize("code", [
    "open({target!r}, 'w').write('x')",
    "open({target!r}, 'a').write('x')",
    "import os; os.close(os.open({target!r}, os.O_WRONLY | os.O_CREAT))",
    "import pathlib; pathlib.Path({target!r}).write_text('x')",
    "import shutil; shutil.copy('/etc/hostname', {target!r})",
    "import os; os.chdir('..'); open({name!r}, 'w').write('x')",
    "import os; os.symlink({target!r}, 'link'); open('link', 'w').write('x')",
    "import os; os.system('touch ' + {target!r})",
    "import subprocess; subprocess.run(['touch', {target!r}])",
    "import ctypes",
])
def test_cannot_write_outside_scratch(tmp_path, code):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    target = tmp_path / "outside.txt"
    out = run_python(code.format(target=str(target), name=target.name), scratch=str(scratch))
    assert not target.exists()
    assert "sandbox:" in out and "Error:" in out


def test_cannot_remove_or_rename_outside(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("data")
    (tmp_path / "s").mkdir()
    for code in (f"import os; os.remove({str(victim)!r})", f"import os; os.rename({str(victim)!r}, 'stolen')",
                 f"import shutil; shutil.rmtree({str(tmp_path)!r})", f"import os; os.chmod({str(victim)!r}, 0)"):
        assert "sandbox:" in run_python(code, scratch=str(tmp_path / "s"))
    assert victim.read_text() == "data"


def test_time_limit():
    out = run_python("while True:\n    pass", timeout_s=1)
    assert out == "Error: the code ran past the time limit of 1 s and was stopped."
    assert run_python("import time; time.sleep(60)", timeout_s=1).endswith("time limit of 1 s and was stopped.")


def test_memory_limit():
    out = run_python("x = bytearray(2 << 30)\nprint('allocated')", memory_mb=256)
    assert "allocated" not in out and out.endswith("Error: the code ran out of memory (limit 256 MB).")


def test_output_is_capped():
    out = run_python("print('x' * 100000)", max_output=1000)
    assert out.startswith("x" * 1000) and "[output truncated: 100001 bytes in all" in out and len(out) < 1200
    flood = run_python("while True:\n    print('y' * 1000)", timeout_s=5, max_output=500)
    assert "[output truncated" in flood and "Error:" in flood and len(flood) < 2000


def test_clean_environment(tmp_path):
    os.environ["NANOK2_SECRET"] = "leak"
    try:
        out = run_python("import os; print(os.environ.get('NANOK2_SECRET'), os.getcwd())", scratch=str(tmp_path))
    finally:
        del os.environ["NANOK2_SECRET"]
    assert out == f"None {os.path.realpath(tmp_path)}"


def test_calls_from_threads_stay_apart():
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda i: run_python(f"open('f', 'w').write('{i}'); print(open('f').read())"), range(4)))
    assert outs == ["0", "1", "2", "3"]  # each call had its own scratch folder
