"""``kdstore select``: keep the sequences of a store worth distilling (MiniPLM difference sampling), as a view or
a new store.

    result = select(SelectConfig(store="my-store", out="half", by="difference", keep=0.5))

Scores are per-sequence means of the next token's log-prob (kdstore.score), in nats per predicted token:

    difference      reference NLL - teacher NLL = teacher_score - reference_score   (MiniPLM; the default)
    teacher-nll     -teacher_score
    reference-nll   -reference_score
    ratio           reference NLL / teacher NLL

``keep`` (0, 1] of the sequences that pass ``where`` (an SQL condition over the per-sequence columns and these
scores, kdstore.inspect.parse_where) are kept: the highest scores (``lowest``: the lowest), or with ``sample``
a draw without replacement with probability proportional to exp(score / sample) (Gumbel top-k, seeded). The
kept sequences stay in corpus (store) order.

A view (the default) is a folder holding ``manifest.json`` (format 3: the parent's path and its shards with the
hashes they had), ``selection.parquet`` (sequence id, shard, row and tokens of each kept sequence) and a copy
of the tokenizer; ``kdstore.store.open_store`` opens it like a store, refusing it once the parent's shards
changed. ``materialize`` writes the kept rows as a new store (kdstore.writer) instead.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from kdstore import __version__
from kdstore.config_file import check_config
from kdstore.errors import KdstoreError, SelectionError, ViewParentChangedError, first_line
from kdstore.format import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    SELECTION_NAME,
    TOKENIZER_DIR,
    new_created_at,
)
from kdstore.store import Store, is_url, open_store

BY = ("difference", "teacher-nll", "reference-nll", "ratio")
_NEEDS = {"difference": ("teacher_score", "reference_score"), "teacher-nll": ("teacher_score",),
          "reference-nll": ("reference_score",), "ratio": ("teacher_score", "reference_score")}
SELECTION_SCHEMA = pa.schema([pa.field("sequence_id", pa.string(), nullable=False),
                              pa.field("shard", pa.int32(), nullable=False),  # index into the manifest's shards
                              pa.field("row", pa.int64(), nullable=False),  # row inside that shard
                              pa.field("num_tokens", pa.int32(), nullable=False)])


@dataclass(frozen=True)
class SelectConfig:
    store: str
    out: str
    by: Literal["difference", "teacher-nll", "reference-nll", "ratio"] = "difference"
    keep: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5  # fraction of the sequences that pass ``where``
    sample: Annotated[float, Field(gt=0.0)] | None = None  # temperature; None: the top fraction
    lowest: bool = False  # keep the lowest scores instead
    where: str | None = None
    seed: int = 0  # of ``sample``
    materialize: bool = False

    def __post_init__(self) -> None:
        check_config(type(self), vars(self), SelectionError, what="invalid select settings")

    def rule(self) -> dict[str, Any]:
        """What the view's manifest records about how its sequences were chosen."""
        return {k: v for k, v in asdict(self).items() if k not in ("store", "out", "materialize")}


@dataclass
class SelectResult:
    out: str
    num_candidates: int  # the sequences that passed ``where``
    num_sequences: int  # kept
    num_tokens: int
    materialized: bool

    def summary_lines(self) -> list[str]:
        kind = "store" if self.materialized else "view"
        return [f"kept {self.num_sequences:,} of {self.num_candidates:,} sequences ({self.num_tokens:,} tokens) in "
                f"{kind} {self.out} (kdstore info {self.out})"]


# -- scores -------------------------------------------------------------------
def selection_scores(frame: Any, by: str) -> np.ndarray:
    """The ``by`` score of each row of a frame holding ``teacher_score`` / ``reference_score`` [N] float64."""
    teacher = -frame.get_column("teacher_score").to_numpy().astype(np.float64) if "teacher_score" in frame.columns \
        else None
    reference = -frame.get_column("reference_score").to_numpy().astype(np.float64) if "reference_score" in \
        frame.columns else None
    if by == "difference":
        return reference - teacher
    if by == "teacher-nll":
        return teacher
    if by == "reference-nll":
        return reference
    return reference / np.maximum(teacher, 1e-6)  # ratio; a teacher NLL of 0 is a sequence it knows by heart


def choose(scores: np.ndarray, keep: float, sample: float | None, lowest: bool, seed: int) -> np.ndarray:
    """Indices (ascending: corpus order) of round(keep * N) (at least 1) of ``scores`` [N]: the highest (``lowest``:
    the lowest), or drawn without replacement with P ∝ exp(score / sample) (Gumbel top-k)."""
    num = len(scores)
    count = min(num, max(1, int(round(keep * num)))) if num else 0
    keys = -scores if lowest else scores.copy()
    if sample is not None:
        keys = keys / sample + np.random.default_rng(seed).gumbel(size=num)
    order = np.argsort(-keys, kind="stable")  # ties: the earlier sequence first
    return np.sort(order[:count])


def candidates(store: Store, config: SelectConfig) -> Any:
    """Every sequence of ``store`` as a polars frame with the scores and ``num_tokens``, filtered by ``where``."""
    import polars as pl

    from kdstore.inspect import parse_where, sequence_frame
    from kdstore.score_table import missing_score_hint

    available = store.score_columns()
    for name in _NEEDS[config.by]:
        if name not in available:
            raise SelectionError(f"--by {config.by} needs the {name!r} score, which {store.location} does not have",
                                 hint=missing_score_hint(name))
    frame = sequence_frame(store, {*available, "num_tokens"})
    frame = frame.with_row_index("position").with_columns(
        **{name.replace("-", "_"): pl.Series(selection_scores(frame, name)) for name in BY
           if all(c in available for c in _NEEDS[name])})
    if config.where is None:
        return frame
    columns = tuple(c for c in frame.columns if c != "position")
    condition = parse_where(config.where, columns)
    try:
        return frame.filter(condition)
    except pl.exceptions.PolarsError as exc:
        raise SelectionError(f"--where {config.where!r} cannot be evaluated: {first_line(exc)}") from None


# -- the pass -------------------------------------------------------------------
def select(config: SelectConfig) -> SelectResult:
    """Choose sequences of ``config.store`` and write the view (or, ``materialize``, the store) at ``config.out``."""
    out = Path(config.out)
    if is_url(config.out):
        raise SelectionError(f"--out {config.out}: a selection is written to a local folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SelectionError(f"--out {config.out} exists and is not an empty folder", hint="pick a new --out folder")
    source = open_store(config.store)
    root = source.parent or source
    _require_verified(root, config.store)
    frame = candidates(source, config)
    if frame.height == 0:
        raise SelectionError(f"no sequence of {config.store} passes --where {config.where!r}",
                             hint="loosen the condition; `kdstore head STORE --where ...` tries one")
    column = config.by.replace("-", "_")
    kept = frame[choose(frame.get_column(column).to_numpy(), config.keep, config.sample, config.lowest, config.seed)]
    positions = parent_positions(source)[kept.get_column("position").to_numpy()]
    starts = np.cumsum([0] + [s.num_rows for s in root.manifest.shards])
    shards = np.searchsorted(starts, positions, side="right") - 1
    table = pa.table({"sequence_id": kept.get_column("sequence_id").to_arrow(),
                      "shard": pa.array(shards, pa.int32()), "row": pa.array(positions - starts[shards], pa.int64()),
                      "num_tokens": pa.array(kept.get_column("num_tokens").to_numpy(), pa.int32())},
                     schema=SELECTION_SCHEMA)
    made = not out.exists()
    try:
        if config.materialize:
            _write_store(root, table, config)
        else:
            _write_view(root, table, config)
    except BaseException:
        if made:
            shutil.rmtree(out, ignore_errors=True)  # nothing half-written: the manifest was the last file
        raise
    return SelectResult(config.out, frame.height, table.num_rows, int(np.sum(table["num_tokens"])), config.materialize)


def _require_verified(store: Store, location: str) -> None:
    from kdstore.verify import verify_store

    problems = verify_store(store)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise SelectionError(f"{location} fails verify: {problems[0]}{more}",
                             hint=f"run `kdstore verify {location}`, and build or copy the store again")


def parent_positions(store: Store) -> np.ndarray:
    """For each sequence of ``store`` in order, its row number across the root parent's shards."""
    if store.parent is None:
        return np.arange(store.manifest.num_sequences, dtype=np.int64)
    starts = np.cumsum([0] + [s.num_rows for s in store.manifest.shards])
    rows = [store.chosen[i][0] + starts[i] for i in sorted(store.chosen)]
    return np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)


def _table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", write_page_checksum=True)
    return sink.getvalue().to_pybytes()


def _write_view(parent: Store, table: pa.Table, config: SelectConfig) -> None:
    from kdstore.writer import write_atomic

    out = Path(config.out)
    if not parent.is_local:
        raise SelectionError(f"a view names its parent by path; {parent.location} is remote",
                             hint="pass --materialize to write the kept sequences as a new store")
    out.mkdir(parents=True, exist_ok=True)
    data = _table_bytes(table)
    write_atomic(out / SELECTION_NAME, data)
    with parent.local_tokenizer() as folder:
        if folder is not None:
            (out / TOKENIZER_DIR).mkdir()
            for file in sorted(p for p in folder.iterdir() if p.is_file()):
                write_atomic(out / TOKENIZER_DIR / file.name, file.read_bytes())
    view = {"parent": os.path.relpath(Path(parent.root).resolve(), out.resolve()),
            "shards_format_version": parent.manifest.shards_format_version,
            "selection": {"file": SELECTION_NAME, "sha256": hashlib.sha256(data).hexdigest(),
                          "num_sequences": table.num_rows, "num_tokens": int(np.sum(table["num_tokens"]))},
            "rule": config.rule()}
    manifest = replace(parent.manifest, scores=None, view=view, format_version=FORMAT_VERSION,
                       kdstore_version=__version__, created_at=new_created_at())
    write_atomic(out / MANIFEST_NAME, manifest.to_json())  # last: the view exists once this is there


def _write_store(parent: Store, table: pa.Table, config: SelectConfig) -> None:
    from kdstore.format import LOGITS_FORMAT_VERSION
    from kdstore.writer import ShardWriter

    view = Store(parent.location, parent.manifest, parent.storage_options, parent.root)
    view.parent = parent
    view.chosen = _chosen(table)
    build = {**parent.manifest.build, "selection": {"parent": parent.location, **config.rule()}}
    manifest = replace(parent.manifest, build=build, scores=None, view=None,
                       format_version=parent.manifest.shards_format_version or LOGITS_FORMAT_VERSION)
    with parent.local_tokenizer() as folder, ShardWriter(config.out, manifest, parent.schema,
                                                         tokenizer_dir=folder) as writer:
        for rows in view.iter_tables():
            writer.write(rows)


def _chosen(table: pa.Table) -> dict[int, tuple[np.ndarray, int]]:
    shards, rows, tokens = (table[name].to_numpy() for name in ("shard", "row", "num_tokens"))
    return {int(s): (rows[shards == s].astype(np.int64), int(tokens[shards == s].sum())) for s in np.unique(shards)}


# -- opening a view (kdstore.store.open_store) --------------------------------------
def attach_parent(view: Store) -> None:
    """Open the parent of ``view``, check that its shards are the ones selected from, and load the chosen rows."""
    recorded = view.manifest.view or {}
    parent_path = recorded["parent"]
    if not is_url(parent_path) and not os.path.isabs(parent_path):
        if not view.is_local:
            raise SelectionError(f"the view {view.location} names its parent by a local path ({parent_path})")
        parent_path = os.path.normpath(os.path.join(view.root, parent_path))
    try:
        parent = open_store(parent_path, view.storage_options)
    except KdstoreError as exc:
        raise ViewParentChangedError(f"the parent {parent_path} of view {view.location} cannot be opened: {exc}") \
            from None
    if parent.parent is not None:
        raise ViewParentChangedError(f"the parent {parent_path} of view {view.location} is itself a view")
    now = {s.path: s for s in parent.manifest.shards}
    for shard in view.manifest.shards:
        current = now.get(shard.path)
        if current is None:
            raise ViewParentChangedError(f"view {view.location}: its parent {parent_path} no longer holds shard "
                                         f"{shard.path}")
        if current != shard:
            raise ViewParentChangedError(f"view {view.location}: shard {shard.path} of its parent {parent_path} has "
                                         f"changed since the selection (sha256 {current.sha256[:16]}..., recorded "
                                         f"{shard.sha256[:16]}...)")
    if [s.path for s in parent.manifest.shards] != [s.path for s in view.manifest.shards] or \
            parent.manifest.identity() != view.manifest.identity():
        raise ViewParentChangedError(f"view {view.location}: its parent {parent_path} has changed since the selection "
                                     "(other shards, teacher or codec)")
    view.parent, view.chosen = parent, _chosen(_read_selection(view))


def _read_selection(view: Store) -> pa.Table:
    import io

    recorded = view.manifest.view["selection"]
    data = view.read_listed_file(recorded["file"], recorded["sha256"])
    table = pq.read_table(io.BytesIO(data))
    if not table.schema.equals(SELECTION_SCHEMA, check_metadata=False) or table.num_rows != recorded["num_sequences"]:
        raise SelectionError(f"{recorded['file']} of view {view.location} is not the selection its manifest describes")
    rows = table["row"].to_numpy()
    limits = np.array([s.num_rows for s in view.manifest.shards])
    shards = table["shard"].to_numpy()
    if len(shards) and (shards.min() < 0 or shards.max() >= len(limits) or (rows < 0).any()
                        or (rows >= limits[shards]).any()):
        raise SelectionError(f"{recorded['file']} of view {view.location} names rows its parent does not hold")
    return table
