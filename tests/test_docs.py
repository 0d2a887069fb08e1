"""The docs say what the code does: every `st-npu` command line in README.md and docs/*.md parses with the command's
own options, and every link between the pages points at a file that exists.

The commands that run quickly are also run as written elsewhere (README's quick start in tests/test_new_user.py,
the corpus page's snippets in tests/test_corpus_fixes.py and tests/test_corpus_compact.py); the long benchmark
lines are only parsed here, so an option renamed in the code cannot stay in the docs.
"""

from __future__ import annotations

import re
import shlex

import pytest
from conftest import REPO

from st_npu.cli import build_parser

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SEPARATORS = {"&&", "||", "|", ";"}


def command_lines(page) -> list[str]:
    """Each shell command of the page's bash blocks, continuation lines joined."""
    text = page.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        commands += [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return commands


def st_npu_invocations(line: str) -> list[list[str]]:
    """The argument lists of every `st-npu ...` in one shell line (after `VAR=value` prefixes, between `&&`, `|`)."""
    words = shlex.split(line, comments=True)
    found, current = [], []
    for word in [*words, ";"]:
        if word in SEPARATORS:
            while current and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", current[0]):
                current.pop(0)
            if current[:1] == ["st-npu"]:
                found.append(current[1:])
            current = []
        else:
            current.append(word)
    return found


CASES = [(page.relative_to(REPO).as_posix(), args) for page in PAGES for line in command_lines(page)
         for args in st_npu_invocations(line)]


def test_the_docs_have_commands_to_check():
    pages = {page for page, _ in CASES}
    assert {"README.md", "docs/corpus.md", "docs/serving.md", "docs/benchmarks.md"} <= pages


@pytest.mark.parametrize(("page", "args"), CASES, ids=[f"{page}:{' '.join(args)[:60]}" for page, args in CASES])
def test_each_documented_command_parses(page, args, capsys):
    try:
        build_parser().parse_args(args)
    except SystemExit as exc:
        if exc.code != 0:  # `--help` and `--version` exit 0
            pytest.fail(f"{page}: `st-npu {' '.join(args)}` does not parse: {capsys.readouterr().err.strip()}")


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_links_between_pages_point_at_files(page):
    text = page.read_text(encoding="utf-8")
    targets = [target for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text) if "://" not in target]
    missing = [target for target in targets if not (page.parent / target).exists()]
    assert not missing, f"{page.name} links to missing files: {missing}"
