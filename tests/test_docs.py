"""The documentation runs as written: every fenced ``python`` and ``bash`` block of README.md and
docs/*.md.

Each document is one test: its blocks run in order, in a temporary folder of their own.

- ``python`` blocks are executed, each in a fresh namespace.
- ``bash`` blocks run command by command (comments dropped, ``\\`` continuations joined):
  ``lmdfx ...`` / ``python -m lmdfx ...`` through ``lmdfx.bev.cli.main``,
  ``python -m lmdfx.bev.train_world ...`` and ``python -m benchmarks.NAME ...`` through their
  ``main``, all in-process and with the small settings of ``SMALL`` appended (argparse keeps
  the last value of an option), so the whole file runs in about a minute on 2 cores, half of it
  the demo. A command whose parsed arguments equal an earlier one's (the README's demo and the
  reference's) runs once per session. Any other command fails the test: give it a runner here or
  a skip in the document.
- An HTML comment on the line before a block changes how it runs (docs/architecture.md):
  ``<!-- docs-test: skip (reason) -->`` (the reason is required),
  ``<!-- docs-test: requires cuda -->`` / ``<!-- docs-test: requires MODULE -->``,
  ``<!-- docs-test: file NAME -->`` (the block is the file NAME in the document's folder).

The tests below the runner check what a reader relies on besides the code: every skip has a
reason, relative links point at files that exist, the command-line reference names every flag,
the guarantees table cites tests that exist, and no document cites a design document the
project does not ship.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import re
import shlex
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Appended to each command so that it runs in seconds; argparse lets the last value win.
SMALL = {
    "demo": ["--scenes", "2", "--no-progress"],
    "inspect": [],
    "evaluate": ["--limit", "2", "--shift", "1", "--repeats", "1", "--no-progress"],
    "train_world": ["--scenes", "2", "--val-scenes", "1", "--steps", "1", "--batch", "2", "--no-progress"],
    "benchmarks": ["--config", "tiny", "--repeats", "1", "--no-compiled"],
}
LANGUAGES = {"python", "bash", "text", "toml"}  # every fenced block names one of these
DIRECTIVE = re.compile(r"<!--\s*docs-test:\s*(?P<body>.*?)\s*-->")
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w+-]*)\s*$")


@dataclass
class Block:
    doc: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    directive: str | None

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def blocks(doc: Path) -> list[Block]:
    """The fenced blocks of ``doc`` with the docs-test directive on the line before each."""
    lines = doc.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent = match["indent"]
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"{doc.name}:{i + 1}: unclosed code fence"
        previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        directive = DIRECTIVE.search(previous)
        body = textwrap.dedent("\n".join(line[len(indent):] if line.startswith(indent) else line
                                         for line in lines[i + 1:end]))
        found.append(Block(doc, i + 1, match["lang"], body + "\n", directive["body"] if directive else None))
        i = end + 1
    return found


ALL = [b for doc in DOCS for b in blocks(doc)]
# Commands already run in this session, by their parsed arguments: the same command in another
# document (the README's demo and the reference's) has proved itself once.
DONE: set[tuple] = set()
TIMES: dict[str, float] = {}  # seconds per block; blocks over 3 s are printed


# ---------------------------------------------------------------------------
# Shell commands
# ---------------------------------------------------------------------------
def commands(code: str) -> list[list[str]]:
    """The commands of a bash block as argument lists (comments dropped, continuations joined)."""
    joined = re.sub(r"\\\n", " ", code)
    return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


def _lmdfx(argv: list[str]) -> tuple[Callable[[], int], tuple]:
    from lmdfx.bev.cli import _parser, main

    argv = argv + SMALL.get(argv[0], []) if argv else argv
    parsed = vars(_parser().parse_args(argv))
    parsed.pop("func", None)
    return (lambda: main(argv)), ("lmdfx", tuple(sorted((k, str(v)) for k, v in parsed.items())))


def _train_world(argv: list[str]) -> tuple[Callable[[], int], tuple]:
    from lmdfx.bev import train_world

    argv = argv + SMALL["train_world"]
    return (lambda: train_world.main(argv) or 0), ("train_world", tuple(argv))


def _benchmark(name: str, argv: list[str]) -> tuple[Callable[[], int], tuple]:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    module = importlib.import_module(f"benchmarks.{name}")
    argv = argv + SMALL["benchmarks"]
    return (lambda: (module.main(argv), 0)[1]), ("benchmarks", name, tuple(argv))


def runner(words: list[str]) -> tuple[Callable[[], int], tuple]:
    """(call returning the exit status, key of the parsed command) for one documented command."""
    if words[0] == "lmdfx":
        return _lmdfx(words[1:])
    if words[:3] == ["python", "-m", "lmdfx"]:
        return _lmdfx(words[3:])
    if words[:3] == ["python", "-m", "lmdfx.bev.train_world"]:
        return _train_world(words[3:])
    if len(words) >= 3 and words[:2] == ["python", "-m"] and words[2].startswith("benchmarks."):
        return _benchmark(words[2].split(".", 1)[1], words[3:])
    raise AssertionError(f"no runner for the documented command {shlex.join(words)!r}: add one to "
                         "tests/test_docs.py or mark the block <!-- docs-test: skip (reason) -->")


# ---------------------------------------------------------------------------
# Running a document
# ---------------------------------------------------------------------------
def _requirement(block: Block) -> str | None:
    """Why ``block`` cannot run here (None: it can)."""
    if block.directive is None or not block.directive.startswith("requires "):
        return None
    need = block.directive.split(None, 1)[1]
    if need == "cuda":
        return None if torch.cuda.is_available() else "needs a CUDA device"
    return None if importlib.util.find_spec(need) is not None else f"needs the {need} package"


@contextlib.contextmanager
def _isolated(folder: Path):
    """Run in ``folder`` with the modules a block imports from it, sys.path, the RNG and the
    thread count restored afterwards."""
    cwd, path, modules = os.getcwd(), list(sys.path), set(sys.modules)
    threads = torch.get_num_threads()
    os.chdir(folder)
    sys.path.insert(0, str(folder))
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        os.chdir(cwd)
        sys.path[:] = path
        for name in set(sys.modules) - modules:
            module = sys.modules.get(name)
            if str(getattr(module, "__file__", "") or "").startswith(str(folder)):
                del sys.modules[name]
        torch.set_num_threads(threads)


def run_document(doc: Path, folder: Path) -> list[str]:
    """Run every block of ``doc`` in ``folder``; return the blocks not run, with why."""
    not_run = []
    for block in blocks(doc):
        if block.lang not in ("python", "bash"):
            continue
        if block.directive is not None and block.directive.startswith("skip"):
            not_run.append(f"{block.where}: {block.directive}")
            continue
        missing = _requirement(block)
        if missing is not None:
            not_run.append(f"{block.where}: {missing}")
            continue
        if block.directive is not None and block.directive.startswith("file "):
            name = block.directive.split(None, 1)[1]
            (folder / name).write_text(block.code)
        start = time.perf_counter()
        with _isolated(folder):
            if block.lang == "python":
                try:
                    exec(compile(block.code, block.where, "exec"), {"__name__": "__docs__"})
                except Exception as exc:
                    raise AssertionError(f"{block.where}: the python block fails: {type(exc).__name__}: {exc}") \
                        from exc
            else:
                run_commands(block, folder)
        TIMES[block.where] = time.perf_counter() - start
    return not_run


def run_commands(block: Block, folder: Path) -> None:
    """The commands of a bash block, each once per test session (see ``DONE``)."""
    for words in commands(block.code):
        call, key = runner(words)
        if key in DONE:
            continue
        status = call()
        assert status == 0, f"{block.where}: {shlex.join(words)!r} exited with status {status}"
        DONE.add(key)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_document_runs_as_written(doc, tmp_path, capsys):
    not_run = run_document(doc, tmp_path)
    with capsys.disabled():
        for line in not_run:
            print(f"\n  not run: {line}", end="")
        for where, seconds in TIMES.items():  # where the time goes
            if where.startswith(f"{doc.relative_to(ROOT)}:") and seconds > 3:
                print(f"\n  {seconds:5.1f} s: {where}", end="")


# ---------------------------------------------------------------------------
# What the documents promise besides runnable blocks
# ---------------------------------------------------------------------------
def test_every_block_is_runnable_or_says_why_not():
    for block in ALL:
        assert block.lang in LANGUAGES, f"{block.where}: fenced block without a known language ({block.lang!r})"
        if block.directive is None:
            continue
        if block.directive.startswith("skip"):
            reason = re.fullmatch(r"skip \((?P<reason>[^)]*\S[^)]*)\)", block.directive)
            assert reason, f"{block.where}: a skipped block needs a reason: <!-- docs-test: skip (why) -->"
        elif block.directive.startswith("file "):
            assert block.lang == "python", f"{block.where}: file blocks are python"
        else:
            assert re.fullmatch(r"requires [\w.]+", block.directive), \
                f"{block.where}: unknown directive {block.directive!r}"
        assert block.lang in ("python", "bash"), f"{block.where}: a directive on a {block.lang} block"


def test_every_documented_command_has_a_runner():
    for block in ALL:
        if block.lang == "bash" and not (block.directive or "").startswith("skip"):
            for words in commands(block.code):
                runner(words)  # raises for a command nothing here can run


def test_skipped_blocks_are_few_and_explained():
    skipped = [b for b in ALL if (b.directive or "").startswith("skip")]
    reasons = {re.search(r"\((.*)\)", b.directive).group(1) for b in skipped}
    allowed = ("nuScenes", "downloads", "test suite", "GPU", "tests/test_benchmarks.py")
    assert all(any(word in reason for word in allowed) for reason in reasons), reasons


def test_relative_links_point_at_files():
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+://|#|mailto:", target):
                continue
            path = (doc.parent / target.split("#")[0]).resolve()
            assert path.exists(), f"{doc.relative_to(ROOT)} links to {target}, which does not exist"


def test_no_document_cites_a_design_document():
    for doc in DOCS:
        assert "DESIGN" not in doc.read_text(), f"{doc.relative_to(ROOT)} cites a DESIGN document"


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings if option.startswith("--")}


def test_the_command_line_reference_names_every_flag():
    from lmdfx.bev import train_world
    from lmdfx.bev.cli import _parser

    usage = (ROOT / "docs" / "usage.md").read_text()
    parser = _parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subcommands.choices.items():
        assert f"`lmdfx {name}`" in usage or f"lmdfx {name} " in usage, name
        for flag in _flags(sub) - {"--help"}:
            assert f"`{flag}" in usage, f"docs/usage.md does not describe lmdfx {name} {flag}"
    source = Path(train_world.__file__).read_text()
    for flag in set(re.findall(r'add_argument\("(--[\w-]+)"', source)):
        assert f"`{flag}" in usage, f"docs/usage.md does not describe train_world {flag}"


def test_the_guarantees_table_cites_tests_that_exist():
    text = (ROOT / "docs" / "guarantees.md").read_text()
    cited = re.findall(r"`(test_\w+\.py)::(test_\w+)(?:\[([^\]]*)\])?`", text)
    assert len(cited) >= 20
    for file, name, case in cited:
        source = (ROOT / "tests" / file).read_text()
        assert re.search(rf"^def {name}\(", source, re.M), \
            f"docs/guarantees.md cites {file}::{name}, which does not exist"
        assert not case or f'"{case}"' in source, f"docs/guarantees.md cites {file}::{name}[{case}], an unknown case"
