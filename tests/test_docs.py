"""The README and docs/ cannot rot: every `algpt2` command they show parses with the real
command line, every page the README indexes exists, and the README stays short."""

import glob
import os
import re
import shlex

import pytest

from conftest import REPO

from algpt2_tf.cli import build_parser

PAGES = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))


def shown_commands(path):
    """`(line number, argv)` of every `algpt2 ...` line in the fenced blocks of a page
    (continuation backslashes joined, comments and shell redirections dropped)."""
    found, fenced, pending, start = [], False, "", 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.startswith("```"):
                fenced = not fenced
                continue
            if not fenced:
                continue
            text = line.strip()
            if pending:
                text, start = pending + " " + text, start
            else:
                start = number
            if text.endswith("\\"):
                pending = text[:-1]
                continue
            pending = ""
            command = re.split(r"\s#\s|\s[|&>]|;", text)[0].strip()
            for prefix in ("$ ", "KERAS_BACKEND=torch ", "KERAS_BACKEND=jax "):
                command = command.removeprefix(prefix)
            if command.startswith("algpt2 "):
                found.append((start, shlex.split(command)[1:]))
    return found


def test_the_readme_is_short_and_its_index_exists():
    with open(PAGES[0], encoding="utf-8") as f:
        text = f.read()
    assert len(text.splitlines()) <= 300
    for link in re.findall(r"\]\(((?:docs|benchmarks|experiments)/[^)]+\.md)\)", text):
        assert os.path.exists(os.path.join(REPO, link)), link
    assert {os.path.basename(p) for p in PAGES[1:]} <= set(
        os.path.basename(link) for link in re.findall(r"\]\((docs/[^)]+\.md)\)", text))


@pytest.mark.parametrize("path", PAGES, ids=[os.path.relpath(p, REPO) for p in PAGES])
def test_every_command_shown_parses(path):
    parser = build_parser()
    commands = shown_commands(path)
    for number, argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            raise AssertionError(f"{os.path.relpath(path, REPO)}:{number}: "
                                 f"algpt2 {' '.join(argv)} does not parse") from e


def test_the_pages_show_commands():
    assert sum(len(shown_commands(p)) for p in PAGES) >= 20  # the extractor finds them


def test_the_readme_layout_names_every_module_once():
    """The README's Layout is the package: one line per module, none missing, none gone."""
    with open(PAGES[0], encoding="utf-8") as f:
        text = f.read()
    block = text.split("## Layout", 1)[1].split("```")[1]
    listed = [line.split()[0] for line in block.splitlines()[2:] if line.strip()]
    package = os.path.join(REPO, "algpt2_tf")
    modules = sorted(os.path.relpath(p, package).replace(os.sep, "/")
                     for p in glob.glob(os.path.join(package, "**", "*.py"), recursive=True)
                     if os.path.basename(p) != "__init__.py")
    assert sorted(listed) == modules
