"""The `nanok2` command tree: every command is listed, and running one imports only its own module."""
import subprocess
import sys

from nanok2.cli import COMMANDS, build_parser


def test_help_lists_every_command_without_importing_torch():
    code = ("import sys, contextlib, io; from nanok2.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    rc = main([])\n"
            "print(rc, 'torch' in sys.modules, out.getvalue())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rc, torch_loaded, text = r.stdout.split(" ", 2)
    assert rc == "2" and torch_loaded == "False"
    for name in COMMANDS:
        assert name in text


def test_each_command_registers_with_its_module():
    for name in COMMANDS:
        parser = build_parser(name)
        sub = next(a for a in parser._actions if a.dest == "command")
        assert sub.choices[name].get_default("func") is not None or sub.choices[name]._subparsers is not None, name
