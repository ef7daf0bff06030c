"""Human-readable views of a store (``kdstore head``), and the ``--where`` condition that picks a sequence.

    for line in format_head("my-store", num_positions=8, top=3, where="teacher_score < -3 AND num_tokens > 100"):
        print(line)
    condition = parse_where("teacher_score < -3", columns=("sequence_id", "num_tokens", "teacher_score"))

``--where`` is an SQL condition over one row per sequence: ``sequence_id``, ``num_tokens`` (the sequence's
length) and the store's per-sequence scores (``Store.score_columns``: the build's ``teacher_score``; after
``kdstore score`` also ``reference_score`` and ``num_positions``, read from the score files). polars turns it
into an expression (``pl.sql_expr``) once ``parse_where`` has checked every word: comparisons, AND / OR /
NOT, IN (...), BETWEEN, LIKE / ILIKE, IS [NOT] NULL, arithmetic, numbers and 'strings'. Nothing else gets
through: no function, no subquery, no Python. polars' SQL runs a subquery such as
``(SELECT ... FROM read_csv('/any/file'))`` while parsing, so the words are checked before polars sees them.
Rows are read through ``Store.iter_tables`` (verified row groups) and decoded by ``Store.iter_sequences``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from kdstore.errors import KdstoreError, first_line
from kdstore.format import SCORE_COLUMNS, TABLE_GENERATIONS, TABLE_LOGITS
from kdstore.generation_view import generation_head
from kdstore.store import Store, open_store

# the words --where accepts besides column names (case-insensitive)
SQL_KEYWORDS = frozenset({"and", "or", "not", "in", "between", "like", "ilike", "is", "null", "true", "false"})
_TOKEN = re.compile(r"""\s+|(?P<string>'(?:[^']|'')*')|(?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
                        |(?P<word>[A-Za-z_][A-Za-z0-9_]*)|(?P<operator><=|>=|<>|!=|=|<|>|\+|-|\*|/|%|\(|\)|,)""",
                    re.VERBOSE)
_WHERE_HINT = ("--where takes an SQL condition: comparisons (< <= = != >= >), AND, OR, NOT, IN (...), BETWEEN, LIKE, "
               "IS NULL and arithmetic over {columns}; e.g. --where \"teacher_score < -3 AND num_tokens > 100\"")


def load_store_tokenizer(store: Store) -> Any | None:
    """The tokenizer saved in the store, or None when it has none."""
    if store.tokenizer_path is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(store.tokenizer_path, local_files_only=True)


def where_columns(store: Store) -> tuple[str, ...]:
    """The per-sequence columns ``--where`` can name in ``store``."""
    return ("sequence_id", "num_tokens", *(name for name in store.score_columns() if name != "sequence_id"))


def parse_where(text: str, columns: tuple[str, ...]) -> Any:
    """``text`` as a polars expression, after checking that every word is a column, a keyword, a number, a
    'string' or an operator (module docstring); KdstoreError naming the first word that is not."""
    import polars as pl

    hint = _WHERE_HINT.format(columns=", ".join(columns))
    if not text.strip():
        raise KdstoreError("--where is empty", hint=hint)
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise KdstoreError(f"--where {text!r}: {text[position]!r} at character {position + 1} is not part of "
                               "the condition language", hint=hint)
        word, after = match.group("word"), text[match.end():].lstrip()
        if word is not None and word.lower() not in SQL_KEYWORDS and word not in columns:
            why = " (Python is not accepted: pl.col('x') is x in SQL)" if after.startswith(".") else \
                " (functions are not accepted)" if after.startswith("(") else ""
            raise KdstoreError(f"--where {text!r}: {word!r} is not a column of this store{why}", hint=hint)
        position = match.end()
    try:
        return pl.sql_expr(text)
    except pl.exceptions.PolarsError as exc:
        raise KdstoreError(f"--where {text!r} does not parse: {first_line(exc)}", hint=hint) from None


def matching_ids(store: Store, where: str) -> tuple[list[str], int]:
    """The sequence ids of ``store`` that satisfy ``where``, in store order, and the number of sequences read.
    Reads only ``sequence_id``, the scores the condition names and, for ``num_tokens``, ``input_ids``."""
    import polars as pl

    columns = where_columns(store)
    condition = parse_where(where, columns)
    frame = sequence_frame(store, set(condition.meta.root_names()))
    try:
        hits = frame.filter(condition)
    except pl.exceptions.PolarsError as exc:
        raise KdstoreError(f"--where {where!r} cannot be evaluated: {first_line(exc)}",
                           hint=_WHERE_HINT.format(columns=", ".join(columns))) from None
    return hits.get_column("sequence_id").to_list(), frame.height


def sequence_frame(store: Store, names: set[str]) -> Any:
    """A polars DataFrame, one row per sequence in store order: ``sequence_id``, the score columns in ``names``
    (``Store.score_table``) and, when named, ``num_tokens`` (read from ``input_ids``)."""
    import polars as pl
    import pyarrow as pa
    import pyarrow.compute as pc

    table = store.score_table([name for name in store.score_columns() if name in names])
    if "num_tokens" in names:
        lengths = [pc.list_value_length(t.column("input_ids")).cast(pa.int64()) for t in store.iter_tables(["input_ids"])]
        table = table.append_column("num_tokens", pa.chunked_array(lengths, pa.int64()))
    return pl.from_arrow(table)


def find_sequence(store: Store, sequence_id: str | None) -> dict[str, Any] | None:
    """The decoded sequence ``sequence_id`` (None: the first one), or None when the store does not hold it."""
    return next((s for s in store.iter_sequences() if sequence_id in (None, s["sequence_id"])), None)


def format_head(path: str | os.PathLike[str], num_positions: int, top: int, sequence_id: str | None = None,
                storage_options: dict[str, Any] | None = None, where: str | None = None) -> Iterator[str]:
    """Lines showing ``num_positions`` positions of one sequence: next token, its p, top alternatives.

    The sequence: ``sequence_id``, else the first that satisfies ``where``, else the store's first."""
    for flag, value in (("-n", num_positions), ("--top", top)):
        if value < 1:  # checked before the store is opened: a remote one costs a round trip
            raise KdstoreError(f"{flag} {value}: expected 1 or more", hint=f"pass {flag} 1 or more")
    if sequence_id is not None and where is not None:
        raise KdstoreError("--id and --where both pick the sequence", hint="pass one of them")
    store = open_store(path, storage_options, tables=(TABLE_LOGITS, TABLE_GENERATIONS))
    if store.manifest.table == TABLE_GENERATIONS:  # one prompt and its completions (kdstore/generation_view.py)
        if where is not None:
            raise KdstoreError("--where reads logits stores; a generations store is picked by --id PROMPT_ID",
                               hint="filter completions with polars on the shards (docs/generate.md)")
        yield from generation_head(store, sequence_id, num_positions, top, load_store_tokenizer(store))
        return
    header = ""
    if where is not None:
        found, num_read = matching_ids(store, where)
        if not found:
            raise KdstoreError(f"no sequence of {path} satisfies --where {where!r} ({num_read:,} sequences read)",
                               hint="loosen the condition; `kdstore head STORE --id ID` shows any one sequence")
        others = ", ".join(found[1:6]) + (", ..." if len(found) > 6 else "")
        header = f"; the first of {len(found):,} satisfying {where}" + (f" (the others: {others})" if others else "")
        sequence_id = found[0]
    sequence = find_sequence(store, sequence_id)
    if sequence is None:
        raise KdstoreError(f"no sequence {sequence_id!r} in {path}" if sequence_id else f"{path} holds no sequences",
                           hint="omit --id to show the first sequence" if sequence_id else "")
    yield from _positions(store, sequence, num_positions, top, header)


def _positions(store: Store, sequence: dict[str, Any], num_positions: int, top: int, header: str) -> Iterator[str]:
    tokenizer = load_store_tokenizer(store)
    show = (lambda i: repr(tokenizer.decode([int(i)]))) if tokenizer else (lambda i: f"#{int(i)}")
    scores = "".join(f", {name} {float(sequence[name]):.3f}" for name in SCORE_COLUMNS if name in sequence)
    yield f"sequence {sequence['sequence_id']}: {len(sequence['input_ids'])} tokens{scores}{header}"
    tokens, ids, values = sequence["input_ids"], sequence["topk_ids"], sequence["topk_logprobs"]
    for t in range(min(num_positions, len(ids))):
        order = np.argsort(-values[t])[:top]
        alternatives = "  ".join(f"{show(ids[t, j])} {np.exp(values[t, j]):.3f}" for j in order)
        target = f" p={np.exp(sequence['target_logprob'][t]):.3f}" if "target_logprob" in sequence else ""
        tail = f" | tail {np.exp(sequence['tail_logmass'][t]):.3f}" if "tail_logmass" in sequence else ""
        yield f"{t:>5} {show(tokens[t])} -> {show(tokens[t + 1])}{target} | {alternatives}{tail}"
