"""The documentation's code blocks are checked against the code they show: every spec written
out in full validates, every `reconfx` command line parses with the CLI's own parser (its
subcommand and flags exist), every `make` target exists, and every Python block compiles."""

from __future__ import annotations

import re
import shlex
import textwrap
from pathlib import Path

import pytest

from reconfx.cli import parser
from reconfx.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(kinds: tuple[str, ...]) -> list[tuple[str, str]]:
    """(where, text) of each fenced block of one of ``kinds`` ("" for an unlabelled one)."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in FENCE.finditer(text):
            if match.group(1) in kinds:
                line = text[:match.start()].count("\n") + 1
                found.append((f"{page.relative_to(ROOT)}:{line}", match.group(2)))
    return found


def command_lines(text: str) -> list[str]:
    """The shell lines of a block, comments cut, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    lines = []
    for raw in joined.splitlines():
        line = raw.split(" # ")[0].strip().removeprefix("$ ")
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


SPECS = [(w, t) for w, t in blocks(("yaml",))
         if re.search(r"^name:", t, re.M) and re.search(r"^inputs:", t, re.M)
         and re.search(r"^(model|backbone):", t, re.M)]
SHELL = [(w, line) for w, t in blocks(("", "bash", "sh", "console"))
         for line in command_lines(t) if line.startswith(("reconfx ", "make "))]
PYTHON = blocks(("python",))


def test_the_docs_hold_code_of_each_kind():
    assert len(SPECS) >= 3 and len(SHELL) >= 15 and len(PYTHON) >= 5


@pytest.mark.parametrize(("where", "text"), SPECS, ids=[w for w, _ in SPECS])
def test_a_spec_written_out_in_the_docs_validates(tmp_path, where, text):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    load_spec(path)


@pytest.mark.parametrize(("where", "line"), SHELL, ids=[f"{w} {line[:40]}" for w, line in SHELL])
def test_a_command_line_in_the_docs_exists(where, line):
    words = shlex.split(line)
    if words[0] == "make":
        targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
        assert all(w in targets for w in words[1:] if "=" not in w), line
        return
    if words[1:] in (["--version"], ["--help"]):
        return
    parser().parse_args(words[1:])


@pytest.mark.parametrize(("where", "text"), PYTHON, ids=[w for w, _ in PYTHON])
def test_a_python_block_in_the_docs_compiles(where, text):
    # (fragments of a method, as the README shows model.py's forward, compile dedented)
    compile(textwrap.dedent(text), where, "exec")
