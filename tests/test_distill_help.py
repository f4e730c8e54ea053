"""The training and evaluation commands (boot-distil = distill.run, boot-evaluate = distill.evaluate):
`--help` shows the product flags on one screen (at most 40 lines at 100 columns) and names the groups it
leaves out; `--help-all` lists every flag the command parses. Both go through the command's own `main`."""

from __future__ import annotations

import re

import pytest

from boot.cli import flags
from distill import evaluate, run

SCREEN_LINES, SCREEN_COLUMNS = 40, 100
COMMANDS = {"boot-distil": run, "boot-evaluate": evaluate}
FLAG = re.compile(r"(?<![\w-])--?[a-z][\w-]*")


def help_text(module, flag: str, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", str(SCREEN_COLUMNS))
    with pytest.raises(SystemExit) as done:
        module.main([flag])
    assert done.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", COMMANDS)
def test_help_fits_one_screen_and_help_all_lists_every_flag(command, capsys, monkeypatch):
    module = COMMANDS[command]
    short = help_text(module, "--help", capsys, monkeypatch)
    full = help_text(module, "--help-all", capsys, monkeypatch)
    lines = short.splitlines()
    assert len(lines) <= SCREEN_LINES, f"{command} --help is {len(lines)} lines:\n{short}"
    assert max(map(len, lines)) <= SCREEN_COLUMNS, short
    every = flags(module.build_parser())
    assert {"--help", "--help-all"} <= every
    assert every <= set(FLAG.findall(full)), f"{command} --help-all lacks {sorted(every - set(FLAG.findall(full)))}"
    hidden = every - set(FLAG.findall(short))
    assert hidden, f"{command}: --help already shows every flag"
    assert "--help-all also shows:" in short
    assert len(full.splitlines()) > len(lines)


def test_distil_help_shows_the_product_flags_and_hides_the_expert_ones(capsys, monkeypatch):
    short = help_text(run, "--help", capsys, monkeypatch)
    shown = set(FLAG.findall(short))
    assert {"--teacher", "--prompts", "--out", "--preset", "--init-from", "--resume", "--device"} <= shown
    assert not {"--dmd-weight", "--lora-rank", "--parameterization", "--solver-steps"} & shown
    for title in run.FLAG_GROUPS:  # each group's title, in the footer or as a section of --help-all
        assert title.split(" (")[0] in " ".join(short.split())
