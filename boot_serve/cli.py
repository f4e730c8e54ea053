"""The command lines' argument parser: `--help` shows the product flags on one screen, `--help-all`
also the operator flags and the long description.

    p = Parser(prog="python -m boot_serve.serve", description="...", details=LONG_TEXT)
    p.add_argument("--repository", ...)                  # shown by --help
    ops = p.operator_group("protection (docs/robustness.md)")
    ops.add_argument("--max-body-bytes", ...)            # shown by --help-all only; parsed alike
"""

from __future__ import annotations

import argparse
import sys


class _HelpAll(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        parser._print_message(parser.format_help(everything=True), sys.stdout)
        parser.exit()


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose groups made by `operator_group` and whose `details` text appear only in
    `--help-all`. Every flag parses the same either way."""

    def __init__(self, *args, details: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.details = details
        self.operator_groups: list[argparse._ArgumentGroup] = []
        self.add_argument("--help-all", action=_HelpAll, help="show every flag, operator and expert ones included, and exit")

    def operator_group(self, title: str, description: str | None = None) -> argparse._ArgumentGroup:
        group = self.add_argument_group(title, description)
        self.operator_groups.append(group)
        return group

    def format_help(self, everything: bool = False) -> str:
        groups = [g for g in self._action_groups if everything or g not in self.operator_groups]
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
        hidden = [g.title for g in self.operator_groups if g not in groups and g._group_actions]
        if hidden:
            formatter.add_text(f"--help-all also shows: {'; '.join(hidden)}.")
        formatter.add_text(self.epilog)
        return formatter.format_help()
