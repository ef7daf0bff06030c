"""Reading a store's per-sequence scores: the score files ``kdstore score`` writes (kdstore.score), or the
build's ``teacher_score`` column, as one table in store order.

    table = open_store("my-store").score_table(["teacher_score", "reference_score"])   # via Store

``Store.score_columns`` and ``Store.score_table`` call these; a view reads its parent's and keeps its rows.
Each score file is checked whole against its sha256 in the manifest before a row of it is used.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdstore.errors import ChecksumError, KdstoreError
from kdstore.format import SCORE_COLUMNS
from kdstore.store import Store

PER_SEQUENCE = ("num_positions", "teacher_score", "reference_score")


def has_score_files(store: Store) -> bool:
    """Whether ``store`` (a view: its parent) has score files (kdstore score)."""
    return bool((store.parent or store).manifest.scores)


def score_columns(store: Store) -> tuple[str, ...]:
    """The per-sequence score columns of ``store`` (a view: its parent's)."""
    if store.parent is not None:
        return score_columns(store.parent)
    if store.manifest.scores:
        return PER_SEQUENCE
    return tuple(name for name in SCORE_COLUMNS if name in store.manifest.columns)


def read_score_table(store: Store, columns: list[str] | None = None) -> pa.Table:
    """``sequence_id`` and ``columns`` of every sequence, in store order (see ``Store.score_table``)."""
    if store.parent is not None:
        table = read_score_table(store.parent, columns)
        starts = np.cumsum([0] + [s.num_rows for s in store.manifest.shards])
        rows = [store.chosen[i][0] + starts[i] for i in sorted(store.chosen)]
        return table.take(pa.array(np.concatenate(rows) if rows else np.zeros(0, np.int64), pa.int64()))
    available = score_columns(store)
    wanted = list(available) if columns is None else list(columns)
    allowed = (*available, "reference_logprobs") if store.manifest.scores and store.manifest.scores["reference"].get(
        "per_token") else available
    for name in wanted:
        if name not in allowed:
            raise KdstoreError(f"{store.location} has no {name!r} score", hint=missing_score_hint(name))
    if not store.manifest.scores:
        tables = list(store.iter_tables(["sequence_id", *wanted]))
        return pa.concat_tables(tables) if tables else pa.table({"sequence_id": pa.array([], pa.string())})
    return pa.concat_tables([_read_score_file(store, entry, ["sequence_id", *wanted])
                             for entry in store.manifest.scores["files"]])


def padded_reference_logprobs(reference_logprobs: Any, sequence_index: np.ndarray, width: int) -> np.ndarray:
    """Per-token reference log-probs laid out like a collated batch's ``labels``: float32 [B, width], row b holding
    the log-probs of sequence ``sequence_index[b]`` (store order) at positions 0 .. P-1 (position t predicts token
    t+1, as ``labels[b, t]``), 0 elsewhere. ``reference_logprobs``: one array per sequence of the store, e.g.
    ``store.score_table(["reference_logprobs"])["reference_logprobs"].to_numpy(zero_copy_only=False)``.
    The result (as a tensor) is what ``kdstore.losses.select_tokens_by_gap`` takes as the reference."""
    out = np.zeros((len(sequence_index), width), np.float32)
    for row, index in enumerate(np.asarray(sequence_index)):
        values = np.asarray(reference_logprobs[int(index)], np.float32)[:width]
        out[row, :len(values)] = values
    return out


def missing_score_hint(name: str) -> str:
    if name == "reference_logprobs":
        return "kdstore score STORE --reference MODEL --per-token adds per-token reference log-probs"
    return "kdstore score STORE --reference MODEL adds the reference and teacher scores"


def _read_score_file(store: Store, entry: dict[str, Any], columns: list[str]) -> pa.Table:
    data = store.read_listed_file(entry["path"], entry["sha256"], entry["num_bytes"])
    table = pq.read_table(io.BytesIO(data), columns=columns)
    if table.num_rows != entry["num_rows"]:
        raise ChecksumError(f"score file {entry['path']} holds {table.num_rows} rows, the manifest says "
                            f"{entry['num_rows']}")
    return table


def score_file_problems(store: Store) -> list[str]:
    """What ``kdstore verify`` says about the score files: each against its sha256, rows and its shard's ids."""
    problems = []
    shards = {s.path: s for s in store.manifest.shards}
    for entry in (store.manifest.scores or {}).get("files", []):
        try:
            table = _read_score_file(store, entry, ["sequence_id"])
            shard = shards.get(entry["shard"])
            if shard is None or shard.sha256 != entry["shard_sha256"]:
                problems.append(f"score file {entry['path']}: scores {entry['shard']} as it was, not the shard listed now")
            elif table.num_rows != shard.num_rows:
                problems.append(f"score file {entry['path']}: {table.num_rows} rows for {shard.num_rows} sequences")
        except KdstoreError as exc:
            problems.append(str(exc))
    return problems
