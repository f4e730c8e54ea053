"""The command lines' argument parser: `--help` shows the product flags on one screen, `--help-all`
every flag and the long description. Each command still parses every flag the same way.

    p = Parser(prog="python -m distill.run", description=SHORT_TEXT, details=LONG_TEXT)
    p.add_argument("--teacher", ...)                     # shown by --help
    recipe = p.expert_group("training recipe")
    recipe.add_argument("--delta", ...)                  # shown by --help-all only; parsed alike

The training and evaluation commands (distill/) and the serving ones (boot_serve/) share it; it lives in
the core so that neither imports the other.
"""

from __future__ import annotations

import argparse
import sys
import textwrap


class _HelpAll(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        parser._print_message(parser.format_help(everything=True), sys.stdout)
        parser.exit()


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose groups made by `expert_group` and whose `details` text appear only in
    `--help-all`; `--help` ends with the titles of the groups it leaves out."""

    def __init__(self, *args, details: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.details = details
        self.expert_groups: list[argparse._ArgumentGroup] = []
        self.add_argument("--help-all", action=_HelpAll, help="show every flag and the full description, and exit")

    def expert_group(self, title: str, description: str | None = None) -> argparse._ArgumentGroup:
        group = self.add_argument_group(title, description)
        self.expert_groups.append(group)
        return group

    operator_group = expert_group  # the serving commands' name for their operators' flags

    def format_help(self, everything: bool = False) -> str:
        groups = [g for g in self._action_groups if everything or g not in self.expert_groups]
        shown = {id(a) for g in groups for a in g._group_actions}
        formatter = self._get_formatter()
        formatter.add_usage(self.usage, [a for a in self._actions if id(a) in shown], self._mutually_exclusive_groups)
        formatter.add_text(self.description)
        if everything:
            formatter.add_text(self.details)
        for group in groups:
            formatter.start_section(group.title)
            formatter.add_text(group.description)
            formatter.add_arguments(group._group_actions)
            formatter.end_section()
        hidden = [g.title for g in self.expert_groups if g not in groups and g._group_actions]
        if hidden:  # wrapped here: a raw-description formatter would print it as one line
            formatter.add_text(textwrap.fill(f"--help-all also shows: {'; '.join(hidden)}.", formatter._width))
        formatter.add_text(self.epilog)
        return formatter.format_help()


def flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string the parser accepts (for checks that --help-all lists them all)."""
    return {s for a in parser._actions for s in a.option_strings}


def number_list(kind: type = float, low: float | None = None, high: float | None = None, unique: bool = False):
    """An argparse type for "V1,V2,...": a list of at least one `kind` (blank items skipped), each in
    [low, high] where given; `unique` sorts them and drops repeats. Every error names the text it got."""
    what = "integers" if kind is int else "numbers"

    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one of the comma-separated {what}, got {text!r}")
        if (low is not None and min(values) < low) or (high is not None and max(values) > high):
            rule = (f"in [{low}, {high}]" if low is not None and high is not None
                    else f">= {low}" if low is not None else f"<= {high}")
            raise argparse.ArgumentTypeError(f"every value must be {rule}, got {text!r}")
        return sorted(set(values)) if unique else values

    return parse


def name_list(text: str) -> tuple[str, ...]:
    """An argparse type for "A,B,...": at least one non-blank name, blanks around each stripped."""
    names = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    if not names:
        raise argparse.ArgumentTypeError(f"expected at least one comma-separated name, got {text!r}")
    return names
