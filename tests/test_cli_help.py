"""The product's commands (pyproject [project.scripts]): `--help` shows the product flags on one screen
(at most 40 lines at 100 columns) and says what `--help-all` adds; `--help-all` also the operators' and
experts' flags, every one of them. Both run the command's own `main`, as the console script does."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("boot-distil", "boot-evaluate", "boot-export", "boot-serve", "boot-client", "boot-bench", "boot-soak",
            "boot-demo")
SCREEN_LINES, SCREEN_COLUMNS = 40, 100


def entry_point(command: str):
    """The module of `command`'s `module:main` in pyproject.toml."""
    scripts = (ROOT / "pyproject.toml").read_text().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    module, function = re.search(rf'^{re.escape(command)} = "([\w.]+):(\w+)"$', scripts, re.M).groups()
    assert function == "main", command
    return importlib.import_module(module)


def run_help(module, flag: str, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", str(SCREEN_COLUMNS))
    with pytest.raises(SystemExit) as done:
        module.main([flag])
    assert done.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", COMMANDS)
def test_help_fits_one_screen_and_help_all_lists_every_flag(command, capsys, monkeypatch):
    module = entry_point(command)
    short = run_help(module, "--help", capsys, monkeypatch)
    full = run_help(module, "--help-all", capsys, monkeypatch)
    assert len(short.splitlines()) <= SCREEN_LINES, f"{command} --help is {len(short.splitlines())} lines:\n{short}"
    assert all(len(line) <= SCREEN_COLUMNS for line in short.splitlines()), short
    flags = {option for action in module.parser()._actions for option in action.option_strings}
    assert {"--help", "--help-all"} <= flags
    listed = set(re.findall(r"(?<![\w-])--?[a-z][\w-]*", full))
    assert flags <= listed, f"{command} --help-all lacks {sorted(flags - listed)}"
    shown = set(re.findall(r"(?<![\w-])--?[a-z][\w-]*", short))
    assert flags - shown, f"{command}: --help already shows every flag; --help-all adds none"
    assert "--help-all also shows:" in short
    assert len(full.splitlines()) > len(short.splitlines())


def test_distil_help_shows_the_product_flags_and_hides_the_expert_ones(capsys, monkeypatch):
    from distill import run

    short = run_help(run, "--help", capsys, monkeypatch)
    shown = set(re.findall(r"(?<![\w-])--?[a-z][\w-]*", short))
    assert {"--teacher", "--prompts", "--out", "--preset", "--init-from", "--resume", "--device"} <= shown
    assert not {"--dmd-weight", "--lora-rank", "--parameterization", "--solver-steps"} & shown
    for title in run.FLAG_GROUPS:  # each group's title, in the footer or as a section of --help-all
        assert title.split(" (")[0] in " ".join(short.split())
