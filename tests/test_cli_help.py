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


@pytest.mark.parametrize("command,flag,bad,message", [
    ("distill.run", "--guidance-offsets", "0.5,x", "expected comma-separated numbers, got '0.5,x'"),
    ("distill.run", "--guidance-offsets=-20,0", None, "every value must be in [-16, 16], got '-20,0'"),
    ("distill.selection", "--guidance", " , ", "expected at least one of the comma-separated numbers, got ' , '"),
    ("distill.evaluate", "--guidance-sweep", "", "expected at least one of the comma-separated numbers, got ''"),
    ("boot_serve.bench", "--concurrency", "1,0", "every value must be >= 1, got '1,0'"),
    ("boot_serve.bench.inprocess", "--batches", "2.5", "expected comma-separated integers, got '2.5'"),
])
def test_every_list_flag_refuses_a_bad_list_with_one_line_naming_it(command, flag, bad, message, capsys):
    """The commands' comma-separated flags share one parser (boot.cli.number_list): a bad list exits 2
    before anything loads, naming the flag and the text it got."""
    module = importlib.import_module(command)
    argv = [flag] if bad is None else [flag, bad]
    parse = (module.parser().parse_args if hasattr(module, "parser")
             else getattr(module, "parse_args", getattr(module, "main", None)))
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert flag.split("=")[0] in err and message in err


def test_a_list_flag_parses_blanks_repeats_and_bounds_as_documented():
    from boot.cli import number_list

    assert number_list(float, -16, 16)("-0.5, 0,,0.5") == [-0.5, 0.0, 0.5]
    assert number_list(int, 1, unique=True)("8,1,1,4") == [1, 4, 8]
    assert number_list(float, 1, 6)("1,6") == [1.0, 6.0]
