"""Export a store for another trainer: its decoded teacher outputs as plain Parquet that HF ``datasets`` loads.

    kdstore export my-store --format axolotl --out my-store-axolotl
    datasets.load_dataset("parquet", data_files="my-store-axolotl/data/*.parquet", split="train")

Two formats; docs/export.md states each column contract and, for axolotl, the axolotl files it was read from:

* ``axolotl``: the pre-tokenized columns axolotl's knowledge-distillation plugin (``axolotl.integrations.kd``)
  trains on: ``input_ids``, ``attention_mask``, ``labels``, ``position_ids`` [T] and ``target_token_ids``,
  ``target_logprobs``, ``target_mask`` [T][K]. Row t of the targets is the teacher's distribution over token
  t+1 (the store's own convention, and what axolotl's loss compares with the student's logits at t); the last
  row of every sequence has no next token and is padding with mask 0. Log-probs are renormalised over the K
  ids at ``temperature`` (axolotl's loss expects them "already temp-scaled and normalized") and each row is
  sorted by descending probability, as vLLM/sglang top-logprobs arrive.
* ``hf``: every decoded column of the store as it decodes (``Store.iter_sequences``), nested per position, and
  a scored store's ``reference_score`` from its score files (``Store.score_table``).

The export streams: one row group of the store is decoded and written at a time, as one row group of the
output file made from that store shard. Files are written under unique temporary names and renamed only once
every one is complete; ``export.json`` (what was exported, from what) is written last. On any error, Ctrl-C
included, the temporary files and the folders this export made are removed; a user's folder is never written
into unless it is empty.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdstore import __version__
from kdstore.errors import EmptyStoreError, ExportError
from kdstore.format import new_created_at, sha256_file
from kdstore.store import DECODED_COLUMNS, Store, StoredRows, is_url, open_store
from kdstore.writer import temporary_name, write_atomic

FORMATS = ("axolotl", "hf")
DATA_DIR = "data"
EXPORT_RECORD = "export.json"  # written last: a folder without it is not a finished export
CARD_NAME = "README.md"
METADATA_KEY = b"kdstore_export"  # Parquet key-value metadata of every exported file: what it is, from what
# axolotl's DataCollatorForKD pads target rows with these values (src/axolotl/integrations/kd/collator.py);
# the row after each sequence's last token uses them too, so a padded row looks the same wherever it came from
PAD_TOKEN_ID = 0
PAD_LOGPROB = -1e9
# decoded float32 log-probs barely compress: on a K=8 store of the bundled teacher (71k tokens, 55 B/token exported)
# level 9 wrote 0.4 % fewer bytes than level 3, and level 19 1.5 % fewer at 2.6x the time
ZSTD_LEVEL = 3

AXOLOTL_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("attention_mask", pa.list_(pa.int8())),
    ("labels", pa.list_(pa.int32())),
    ("position_ids", pa.list_(pa.int32())),
    ("target_token_ids", pa.list_(pa.list_(pa.int32()))),
    ("target_logprobs", pa.list_(pa.list_(pa.float32()))),
    ("target_mask", pa.list_(pa.list_(pa.int8()))),
])

# decoded name -> its exported type, in output order; a store exports the ones it holds
_HF_TYPES: dict[str, pa.DataType] = {
    "sequence_id": pa.string(),
    "input_ids": pa.list_(pa.int32()),
    "topk_ids": pa.list_(pa.list_(pa.int32())),
    "topk_logprobs": pa.list_(pa.list_(pa.float32())),
    "tail_logmass": pa.list_(pa.float32()),
    "target_logprob": pa.list_(pa.float32()),
    "sampled_ids": pa.list_(pa.list_(pa.int32())),
    "sampled_counts": pa.list_(pa.list_(pa.int32())),
    "teacher_score": pa.float32(),  # the build's; a scored store adds reference_score from its score files
}
_HF_SOURCES = {"sampled_ids": "sampled", "sampled_counts": "sampled"}  # exported name -> decoded name to read


@dataclass(frozen=True)
class ExportResult:
    """What ``export_store`` wrote."""

    out: Path
    format: str
    num_rows: int
    num_files: int
    num_bytes: int

    def summary_lines(self) -> list[str]:
        return [f"exported {self.num_rows:,} sequences as {self.format} into {self.num_files} Parquet file(s), "
                f"{self.num_bytes:,} bytes: {self.out}",
                f"load it with datasets.load_dataset(\"parquet\", data_files=\"{self.out / DATA_DIR}/*.parquet\")"]


def export_store(store: str | os.PathLike[str] | Store, out: str | os.PathLike[str], format: str, *,
                 temperature: float | None = None, top_k_only: bool = False,
                 storage_options: dict[str, Any] | None = None) -> ExportResult:
    """Write ``store`` decoded into ``out`` (a new or empty local folder) in ``format`` ("axolotl" or "hf").

    ``temperature`` (axolotl only, default 1): target_logprobs = log softmax(log p / temperature) over the K
    ids; give axolotl's ``kd_temperature``. ``top_k_only`` (axolotl only): export a store that also holds sampled
    draws by its top-K alone. Everything is checked before the first file is created.
    """
    temperature = _check_options(format, temperature, top_k_only)
    out_path = _check_out(out)
    opened = open_store(store, storage_options)
    _check_store(opened, format, top_k_only)
    schema, columns, build_rows = _plan(opened, format, temperature)
    metadata = {METADATA_KEY: json.dumps(_describe(opened, format, temperature), sort_keys=True).encode()}
    made = _make_folders(out_path)
    written: list[tuple[Path, Path]] = []  # (temporary, final)
    try:
        num_rows = 0
        for index, tables in enumerate(_shard_tables(opened, columns)):
            final = out_path / DATA_DIR / f"part-{index:05d}.parquet"
            written.append((temporary_name(final), final))
            num_rows += _write_file(written[-1][0], schema.with_metadata(metadata), (build_rows(t) for t in tables))
        for tmp, final in written:
            os.replace(tmp, final)
        files = [{"path": final.relative_to(out_path).as_posix(), "num_bytes": final.stat().st_size,
                  "sha256": sha256_file(final)} for _, final in written]
        record = {**_describe(opened, format, temperature), "num_rows": num_rows, "files": files,
                  "columns": {field.name: str(field.type) for field in schema}, "created_at": new_created_at()}
        write_atomic(out_path / CARD_NAME, _card(opened, format, temperature, num_rows))
        write_atomic(out_path / EXPORT_RECORD, json.dumps(record, indent=1) + "\n")
    except BaseException:
        for tmp, final in written:
            tmp.unlink(missing_ok=True)
            final.unlink(missing_ok=True)
        for path in (out_path / EXPORT_RECORD, out_path / CARD_NAME):  # ours: the folder was new or empty
            path.unlink(missing_ok=True)
        for folder in reversed(made):
            _remove_if_empty(folder)
        raise
    return ExportResult(out_path, format, num_rows, len(files), sum(f["num_bytes"] for f in files))


# -- checks, all before anything is created ----------------------------------------
def _check_options(format: str, temperature: float | None, top_k_only: bool) -> float:
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose from {', '.join(FORMATS)}")
    if format == "hf" and (temperature is not None or top_k_only):
        flag = "--temperature" if temperature is not None else "--top-k-only"
        raise ExportError(f"{flag} applies to --format axolotl only; --format hf exports the stored values as they "
                          "decode (temperature 1, full vocabulary)", hint="leave the flag out, or export --format axolotl")
    value = 1.0 if temperature is None else float(temperature)
    if not math.isfinite(value) or value <= 0:
        raise ExportError(f"--temperature {temperature}: expected a number above 0",
                          hint="give axolotl's kd_temperature, or leave --temperature out for 1")
    return value


def _check_out(out: str | os.PathLike[str]) -> Path:
    if is_url(out):
        raise ExportError(f"--out {out}: exports are written to a local folder",
                          hint="export to a local folder, then upload it (e.g. huggingface-cli upload)")
    path = Path(out)
    hint = "pick a new or empty --out folder: kdstore export overwrites nothing"
    if path.is_file() or (path.exists() and not path.is_dir()):
        raise ExportError(f"--out {path} is a file, not a folder", hint=hint)
    if path.is_dir():
        entries = sorted(entry.name for entry in path.iterdir())
        if entries:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise ExportError(f"--out {path} is not empty ({shown})", hint=hint)
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ExportError(f"--out {path} lies inside {parent}, which is a file", hint=hint)
            if not os.access(parent, os.W_OK):
                raise ExportError(f"--out {path}: cannot create folders in {parent} (permission denied)", hint=hint)
            break
    return path


def _check_store(store: Store, format: str, top_k_only: bool) -> None:
    if store.manifest.num_sequences == 0:
        raise EmptyStoreError(f"{store.location} holds no sequences; there is nothing to export")
    sampled = store.manifest.codec.get("sampled")
    if format == "axolotl" and sampled and not top_k_only:
        raise ExportError(
            f"{store.location} holds {sampled['draws']} sampled draws per position (mode {sampled['mode']}) besides "
            f"its top-{store.codec.k}; axolotl's format has no column for draws, so they would be dropped",
            hint="export --format hf, which keeps the draws, or pass --top-k-only to export the top-K alone")


# -- the two formats ------------------------------------------------------------------
def _plan(store: Store, format: str, temperature: float) -> tuple[pa.Schema, list[str], Callable[[pa.Table], pa.Table]]:
    """(output schema, decoded columns to read, stored table -> output table) for ``format``."""
    codec = store.codec
    if format == "axolotl":
        return AXOLOTL_SCHEMA, ["input_ids", "topk_ids", "topk_logprobs"], \
            lambda table: axolotl_rows(StoredRows(codec, table).ragged(), codec.k, temperature)
    present = [name for name in _HF_TYPES if _HF_SOURCES.get(name, name) in _decoded_names(store)]
    stored = pa.schema([(name, _HF_TYPES[name]) for name in present])
    scores = _score_file_columns(store, present)
    schema = pa.schema([*stored, *scores.schema.remove(0)]) if scores is not None else stored
    index = {} if scores is None else {s: row for row, s in enumerate(scores["sequence_id"].to_pylist())}
    return schema, list(dict.fromkeys(_HF_SOURCES.get(n, n) for n in present)), \
        lambda table: _with_scores(hf_rows(StoredRows(codec, table).ragged(), stored), scores, index)


def _score_file_columns(store: Store, present: list[str]) -> pa.Table | None:
    """``sequence_id`` and the per-sequence scores the store's score files (kdstore score) add to its shards'
    columns (``reference_score``; ``teacher_score`` when the shards lack it), in store order; None without."""
    from kdstore.score_table import has_score_files

    if not has_score_files(store):
        return None
    return store.score_table([name for name in ("teacher_score", "reference_score") if name not in present])


def _with_scores(rows: pa.Table, scores: pa.Table | None, index: dict[str, int]) -> pa.Table:
    """``rows`` with the score columns of its sequences appended (``index``: sequence id -> row of ``scores``)."""
    if scores is None:
        return rows
    taken = scores.take(pa.array([index[s] for s in rows["sequence_id"].to_pylist()], pa.int64()))
    for name in taken.column_names[1:]:
        rows = rows.append_column(taken.schema.field(name), taken[name])
    return rows


def _decoded_names(store: Store) -> list[str]:
    return [name for name, stored in DECODED_COLUMNS.items() if all(c in store.manifest.columns for c in stored)]


def axolotl_rows(batch: dict[str, Any], k: int, temperature: float) -> pa.Table:
    """A decoded ragged batch -> axolotl's columns (AXOLOTL_SCHEMA), one row per sequence.

    A sequence of T tokens has T-1 positions; target row t (t < T-1) is position t, sorted by descending
    probability, log-probs renormalised over its K ids at ``temperature``; row T-1 is padding with mask 0.
    """
    input_ids, token_offsets = batch["input_ids"], batch["token_offsets"]
    num_tokens = len(input_ids)
    _check_positions(batch)
    logprobs = batch["topk_logprobs"].astype(np.float64)
    order = np.argsort(-logprobs, axis=1, kind="stable")  # ties keep the stored (ascending id) order
    scaled = np.take_along_axis(logprobs, order, axis=1) / temperature
    scaled -= np.logaddexp.reduce(scaled, axis=1, keepdims=True)
    is_pad = np.zeros(num_tokens, dtype=bool)
    is_pad[token_offsets[1:] - 1] = True  # each sequence's last token predicts nothing
    target_ids = np.full((num_tokens, k), PAD_TOKEN_ID, dtype=np.int32)
    target_ids[~is_pad] = np.take_along_axis(batch["topk_ids"], order, axis=1)
    target_logprobs = np.full((num_tokens, k), PAD_LOGPROB, dtype=np.float32)
    target_logprobs[~is_pad] = scaled
    target_mask = np.repeat((~is_pad).astype(np.int8)[:, None], k, axis=1)
    starts = np.repeat(token_offsets[:-1], np.diff(token_offsets))
    columns = {
        "input_ids": _lists(token_offsets, input_ids.astype(np.int32)),
        "attention_mask": _lists(token_offsets, np.ones(num_tokens, dtype=np.int8)),
        "labels": _lists(token_offsets, input_ids.astype(np.int32)),  # every token is trained on
        "position_ids": _lists(token_offsets, (np.arange(num_tokens) - starts).astype(np.int32)),
        "target_token_ids": _nested(token_offsets, target_ids),
        "target_logprobs": _nested(token_offsets, target_logprobs),
        "target_mask": _nested(token_offsets, target_mask),
    }
    return pa.Table.from_pydict(columns, schema=AXOLOTL_SCHEMA)


def hf_rows(batch: dict[str, Any], schema: pa.Schema) -> pa.Table:
    """A decoded ragged batch -> every decoded column, nested per position (``schema`` names which)."""
    _check_positions(batch)
    positions = batch.get("position_offsets")
    columns: dict[str, pa.Array] = {}
    for name in schema.names:
        value = batch[name]
        if name == "sequence_id":
            columns[name] = pa.array(value, pa.string())
        elif name == "teacher_score":
            columns[name] = pa.array(value, pa.float32())
        elif name == "input_ids":
            columns[name] = _lists(batch["token_offsets"], value)
        elif name in ("sampled_ids", "sampled_counts"):
            per_position = pa.ListArray.from_arrays(pa.array(batch["sampled_offsets"], pa.int32()), pa.array(value))
            columns[name] = pa.ListArray.from_arrays(pa.array(positions, pa.int32()), per_position)
        elif value.ndim == 2:
            columns[name] = _nested(positions, value)
        else:
            columns[name] = _lists(positions, value)
    return pa.Table.from_pydict(columns, schema=schema)


def _check_positions(batch: dict[str, Any]) -> None:
    tokens, positions = batch.get("token_offsets"), batch.get("position_offsets")
    if tokens is not None and positions is not None and not np.array_equal(np.diff(tokens) - 1, np.diff(positions)):
        raise ExportError("the store has a sequence whose positions are not its tokens minus one",
                          hint="run `kdstore verify STORE`; rebuild the store if it lists problems")


def _lists(offsets: np.ndarray, values: np.ndarray) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values))


def _nested(offsets: np.ndarray, rows: np.ndarray) -> pa.Array:
    """[N, K] rows grouped into lists by ``offsets`` [B+1] -> list<list<...>> of B lists of N_b lists of K."""
    num, k = rows.shape
    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, num * k + 1, k), pa.int32()), pa.array(rows.reshape(-1)))
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), inner)


# -- files ---------------------------------------------------------------------------
def _shard_tables(store: Store, columns: list[str]) -> Iterator[Iterator[pa.Table]]:
    """Per store shard, its row groups' stored columns, read one at a time through the store's checks."""
    stored = store.stored_columns(columns)
    for shard in store.manifest.shards:
        parquet = store.open_shard(shard)
        yield (store.read_row_group(parquet, shard, group, stored) for group in range(parquet.num_row_groups))


def _write_file(path: Path, schema: pa.Schema, tables: Iterator[pa.Table]) -> int:
    """Write ``tables`` as one row group each; fsync; return the row count."""
    num_rows = 0
    with pq.ParquetWriter(path, schema, compression="zstd", compression_level=ZSTD_LEVEL) as writer:
        for table in tables:
            writer.write_table(table.replace_schema_metadata(schema.metadata), row_group_size=max(1, table.num_rows))
            num_rows += table.num_rows
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
    return num_rows


def _make_folders(out: Path) -> list[Path]:
    """Create ``out``/data; return the folders created, outermost first (removed again on failure)."""
    made = [p for p in (*reversed(out.absolute().parents), out.absolute(), (out / DATA_DIR).absolute()) if not p.exists()]
    try:
        for folder in made:
            folder.mkdir()
    except OSError as exc:
        for folder in reversed(made):
            _remove_if_empty(folder)
        raise ExportError(f"cannot create --out {out}: {exc.strerror or exc}",
                          hint="pick a new or empty --out folder in a place you can write to") from None
    return made


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty (someone else's files appeared) or already gone: leave it


def _describe(store: Store, format: str, temperature: float) -> dict[str, Any]:
    m = store.manifest
    codec = {key: value for key, value in m.codec.items() if key != "logprobs"}
    codec["max_abs_logprob_error"] = m.codec["logprobs"].get("max_abs_logprob_error")
    return {"format": format, "contract": "kdstore docs/export.md", "kdstore_version": __version__,
            "temperature": temperature if format == "axolotl" else 1.0,
            "source": {"location": store.location, "teacher": m.teacher, "tokenizer": m.tokenizer, "codec": codec,
                       "num_sequences": m.num_sequences, "num_tokens": m.num_tokens,
                       "shards_sha256": [s.sha256 for s in m.shards]}}


def _card(store: Store, format: str, temperature: float, num_rows: int) -> str:
    m = store.manifest
    what = ("axolotl knowledge-distillation columns (input_ids, attention_mask, labels, position_ids, "
            f"target_token_ids, target_logprobs, target_mask); target log-probs renormalised over the top-{store.codec.k} "
            f"at temperature {temperature:g}; target row t is the teacher's distribution over token t+1"
            if format == "axolotl" else "the store's decoded columns (full-vocabulary log-probs at temperature 1)")
    return (
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
        f"    path: {DATA_DIR}/*.parquet\n---\n\n"
        f"# kdstore export ({format})\n\n"
        f"{num_rows} sequences of the kdstore store `{store.location}`: teacher `{m.teacher['model']}`, "
        f"tokenizer `{m.tokenizer['name']}` (train the student with this tokenizer).\n\n"
        f"Columns: {what}. `{EXPORT_RECORD}` records the source and the column types; kdstore's docs/export.md "
        "gives the full contract.\n"
    )
