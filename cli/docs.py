"""Render docs/cli.md from the commands' --help (a test keeps the file in sync).

    python -m kdstore.cli.docs > docs/cli.md
"""

from __future__ import annotations

import click

from kdstore.cli.main import cli


def render_cli_docs() -> str:
    parts = ["# kdstore command line\n", "Generated from `--help` by `python -m kdstore.cli.docs > docs/cli.md`.\n"]
    context = click.Context(cli, info_name="kdstore", terminal_width=88, max_content_width=88)
    parts.append(f"```\n{cli.get_help(context)}\n```\n")
    for name in sorted(cli.commands):
        command = cli.commands[name]
        sub = click.Context(command, info_name=name, parent=context)
        parts.append(f"## kdstore {name}\n\n```\n{command.get_help(sub)}\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(render_cli_docs(), end="")
