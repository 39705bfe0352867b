"""The README and the docs as written: the README's Python runs, its Quickstart is the two commands CI and
a new user run (and their command lines parse), and every relative link and anchor in the docs resolves."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def section(text: str, title: str) -> str:
    return re.search(rf"^## {re.escape(title)}$(.*?)(?=^## |\Z)", text, re.M | re.S).group(1)


def slug(title: str) -> str:
    """GitHub's anchor of a heading."""
    title = re.sub(r"[`*]", "", title.strip().lower())
    return re.sub(r"[^\w\- ]", "", title).replace(" ", "-")


def test_readme_python_runs_as_written(tmp_path):
    code = "\n".join(blocks(README.read_text(), "python"))
    assert code, "the README has Python examples"
    script = tmp_path / "readme.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_quickstart_is_two_commands_whose_command_lines_parse():
    from windowed_attention.cli import build_parser

    commands = blocks(section(README.read_text(), "Quickstart"), "bash")
    assert len(commands) == 2
    main, tests = (c.strip() for c in commands)
    assert "\n" not in main and "\n" not in tests
    assert tests.endswith("python -m pytest")  # what .ci/run extracts and runs
    invocations = [part.strip() for part in main.split("&&") if part.strip().startswith("windowed-attention ")]
    assert [shlex.split(part)[1] for part in invocations] == ["train", "generate"]
    for part in invocations:
        build_parser().parse_args(shlex.split(part)[1:])  # exits (SystemExit) on a flag that does not exist


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: {target} does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.*)$", re.sub(r"```.*?```", "", file.read_text(), flags=re.S), re.M)
            assert anchor in {slug(h) for h in headings}, f"{page.name}: no heading #{anchor} in {file.name}"
