"""The ``kdstore`` command: thin click wrappers over the library.

Each command parses its arguments, calls one library function and prints the
result. Library errors (``KdstoreError``) become one line ``Error: ...`` and
exit status 1; the fix-it hint lives on the exception.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from kdstore.errors import KdstoreError


class _Group(click.Group):
    """Turns library errors into one clean line instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KdstoreError as exc:
            raise click.ClickException(exc.one_line()) from None
        except KeyboardInterrupt:
            click.echo("Interrupted; nothing half-written was committed.", err=True)
            sys.exit(130)


store_argument = click.argument("store", type=click.Path(file_okay=False))


@click.group(cls=_Group)
@click.version_option(package_name="kdstore")
def cli() -> None:
    """kdstore: run a teacher once, store what it knows, stream it into any student."""


@cli.command()
@store_argument
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info(store: str, as_json: bool) -> None:
    """Summarise a store: teacher, tokenizer, K, sequences, tokens, bytes/token, shards.

    \b
    Example:
      kdstore info my-store
      kdstore info my-store --json | jq .bytes_per_token
    """
    from kdstore.store import open_store

    summary = open_store(store).summary()
    if as_json:
        click.echo(json.dumps(summary, indent=1))
        return
    for key, value in summary.items():
        click.echo(f"{key:>16}: {', '.join(value) if isinstance(value, list) else value}")


@cli.command()
@store_argument
def verify(store: str) -> None:
    """Check checksums, schema and invariants of every shard; exit 1 listing all problems.

    \b
    Example:
      kdstore verify my-store && echo sound
    """
    from kdstore.store import open_store

    opened = open_store(store)
    problems = opened.verify()
    if problems:
        for problem in problems:
            click.echo(f"problem: {problem}")
        raise click.ClickException(f"{len(problems)} problem(s) in {store}")
    summary = opened.summary()
    click.echo(f"OK: {summary['num_shards']} shards, {summary['num_sequences']} sequences, "
               f"{summary['num_tokens']} tokens verified")


@cli.command()
@store_argument
@click.option("-n", "num_positions", default=16, show_default=True, help="Positions to show.")
@click.option("--top", default=5, show_default=True, help="Teacher alternatives per position.")
@click.option("--sequence", "sequence_id", default=None, help="Sequence id to show (default: the first).")
def head(store: str, num_positions: int, top: int, sequence_id: str | None) -> None:
    """Show the first positions of a sequence with the teacher's top alternatives.

    Tokens are decoded with the store's tokenizer when it ships one; otherwise ids are shown.

    \b
    Example:
      kdstore head my-store -n 8 --top 3
    """
    from kdstore.inspect import format_head

    for line in format_head(store, num_positions, top, sequence_id):
        click.echo(line)


def main() -> None:
    cli(prog_name="kdstore")


if __name__ == "__main__":
    main()
