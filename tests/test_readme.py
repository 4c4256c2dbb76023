"""README.md and docs/ stay true: every `mert-pipe` command line they show names a command that exists, with
options that command takes, and every relative link points at a file of the checkout."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import typer

from mert_pipeline.cli import app
from tests.helpers import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def command_lines(text: str) -> list[str]:
    """Every `mert-pipe ...` invocation: lines of fenced blocks (backslash continuations joined, several
    commands on one line split at && and ;) and inline code spans."""
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|;|\|\s", line.split(" #")[0]):
                found.append(" ".join(part.split()))
    found += re.findall(r"`([^`\n]*mert-pipe [^`\n]*)`", text)
    return [line[line.index("mert-pipe") :] for line in found if re.search(r"(^|[/ ])mert-pipe ", line)]


def resolve(words: list[str]) -> tuple[list[str], Any, list[str]]:
    """The command a line names (its path and click command) and the words after it."""
    command: Any = typer.main.get_command(app)
    path: list[str] = []
    while words and hasattr(command, "commands") and words[0] in command.commands:
        path.append(words[0])
        command = command.commands[words[0]]
        words = words[1:]
    return path, command, words


def options_of(command: Any) -> set[str]:
    names = {"--help"}
    for param in command.params:
        names.update(getattr(param, "opts", []))
        names.update(getattr(param, "secondary_opts", []))
    return names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_mert_pipe_command_and_flag_named_exists(page: Path) -> None:
    lines = command_lines(page.read_text())
    if page.name == "README.md" and page.parent == REPO:
        assert len(lines) >= 8, "the README shows the main commands"
    problems = []
    for line in lines:
        words = line.split()[1:]
        path, command, rest = resolve(words)
        if not path and not (rest and rest[0].startswith("--")):
            problems.append(f"{line!r}: no such command {rest[:1]}")
            continue
        if hasattr(command, "commands") and rest and not rest[0].startswith("-"):
            problems.append(f"{line!r}: `{' '.join(path)}` has no command {rest[0]!r}")
            continue
        known = options_of(command)
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", " ".join(rest)):
            if flag not in known:
                problems.append(f"{line!r}: `mert-pipe {' '.join(path)}` has no option {flag}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_at_files(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_the_checker_catches_a_wrong_flag_and_a_wrong_command() -> None:
    """The checks above would fail on a page naming what does not exist."""
    path, command, rest = resolve(["run", "ROOT", "--no-such-flag"])
    assert (
        path == ["run"]
        and "--no-such-flag" not in options_of(command)
        and "--teachers" in options_of(command)
    )
    path, command, rest = resolve(["kmeans", "fitt", "WORKDIR"])
    assert path == ["kmeans"] and rest[0] == "fitt" and hasattr(command, "commands")
    assert command_lines("```bash\nmert-pipe run a \\\n  --out w && mert-pipe verify s\n```") == [
        "mert-pipe run a --out w",
        "mert-pipe verify s",
    ]
