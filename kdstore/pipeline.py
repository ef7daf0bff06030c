"""The host path of a teacher pass: sparse teacher outputs on their way from the device into the shard writer.

    with HostPipeline(writer, codec, schema) as pipeline:
        pipeline.put_unit(sequences, batches, skip)   # batches: SparseBatch, as the teacher produces them

Three stages, each on a thread of its own behind a bounded queue, so the device does not wait on the host and
memory stays flat:

* the caller's thread runs the teacher and the device-side top-K, starts each batch's device -> host copy
  (``kdstore.teacher.HostCopy``: pinned memory on a side stream on CUDA) and moves on to the next forward;
* ``kdstore-encode`` waits for a batch's copy, encodes all its positions in one call
  (``kdstore.codec.encode_positions``) and assembles one Arrow table per batch from flat arrays and offsets
  (``batch_table``); at the end of a work unit it puts the unit's rows back in sequence order (one Arrow
  ``take``) and drops the prefix a resumed partition had already committed;
* ``kdstore-write`` hands tables to ``ShardWriter.write``: row groups, zstd, shard files, sha256.

numpy and pyarrow release the GIL in their loops, so the two stages overlap with each other and with the
forward. No Python runs per position or per top-K entry; per sequence only the offsets arithmetic (vectorised)
and one ``np.mean`` for ``teacher_score`` (kept per row: numpy's pairwise float32 sum, which stores built
before this module used, differs in the last bit from any segmented sum; ~2 us a row, 0.1 % at 200k tokens/s).
The rows and bytes written are exactly those a row-by-row encoder writes (tests/unit/test_pipeline.py).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from kdstore.codec import CodecConfig, encode_positions
from kdstore.errors import BuildError, KdstoreError
from kdstore.format import rows_to_table
from kdstore.teacher import HostCopy
from kdstore.writer import ShardWriter

# Batches in flight between the teacher and the encoder, and tables between the encoder and the writer: enough to
# ride out a slow row group (zstd 9 takes ~15 ms over a 1 MiB row group here) without letting memory grow with the corpus.
ENCODE_QUEUE_DEPTH = 8
WRITE_QUEUE_DEPTH = 4
_END = object()


@dataclass
class SparseBatch:
    """The teacher's outputs for one batch: ``indices`` [B] of its sequences in the unit's list, and the sparse
    arrays of all their positions, row after row (``topk_ids`` [N, K], ``topk_logprobs`` [N, K], ``tail_logmass``,
    ``target_logprob`` and ``lse`` [N], optionally ``sampled_ids`` / ``sampled_counts`` [N, D]), N = sum of
    (length - 1), possibly still being copied from the device."""

    indices: np.ndarray
    copy: HostCopy


@dataclass
class _Rows:
    rows: list[dict[str, Any]]  # finished rows of another table kind (kdstore generate's completions)
    encode: Callable[[dict[str, Any]], dict[str, Any]]  # one row -> its stored columns


@dataclass
class _UnitEnd:
    skip: int  # rows of the unit (in sequence order) already committed by an earlier run


def batch_table(codec: CodecConfig, schema: pa.Schema, sequences: Sequence[Any], arrays: dict[str, np.ndarray]) -> pa.Table:
    """Rows of ``sequences`` (objects with ``sequence_id`` and ``input_ids``) from their positions' sparse arrays
    (``SparseBatch``'s layout, host numpy) -> a Table in ``schema``, rows in the order given."""
    columns = encode_positions(codec, arrays["topk_ids"], arrays["topk_logprobs"], arrays.get("tail_logmass"),
                               arrays.get("target_logprob"), arrays.get("sampled_ids"), arrays.get("sampled_counts"))
    return assemble_table(codec, schema, sequences, columns, arrays.get("target_logprob"))


def assemble_table(codec: CodecConfig, schema: pa.Schema, sequences: Sequence[Any], columns: dict[str, np.ndarray],
                   target: np.ndarray | None) -> pa.Table:
    """``batch_table`` after encoding: the flat stored ``columns`` of all positions (``encode_positions``) and the
    float ``target`` log-probs (for ``teacher_score``) -> one Arrow row per sequence, from offsets."""
    lengths = np.fromiter((len(s.input_ids) for s in sequences), dtype=np.int64, count=len(sequences))
    positions = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum(lengths - 1, out=positions[1:])
    tokens = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum(lengths, out=tokens[1:])
    offsets = {"input_ids": tokens, "topk_id_deltas": positions * codec.k, "topk_logprob_codes": positions * codec.k,
               "tail_logmass_codes": positions, "target_logprob_codes": positions, "sampled_num_ids": positions}
    if "sampled_num_ids" in columns:  # one entry per distinct drawn id: a row's entries end where its positions do
        entries = np.zeros(len(columns["sampled_num_ids"]) + 1, dtype=np.int64)
        np.cumsum(columns["sampled_num_ids"], out=entries[1:])
        offsets["sampled_id_deltas"] = offsets["sampled_counts"] = entries[positions]
    values = {"input_ids": np.concatenate([s.input_ids for s in sequences]) if len(sequences) else np.zeros(0), **columns}
    out = []
    for field in schema:
        if field.name == "sequence_id":
            out.append(pa.array([s.sequence_id for s in sequences], type=field.type))
        elif field.name == "teacher_score":
            scores = [float(np.mean(part)) if len(part) else None for part in np.split(target, positions[1:-1])]
            out.append(pa.array(scores if len(sequences) else [], type=field.type))
        elif field.name in values:
            flat = pa.array(np.ascontiguousarray(values[field.name]), type=field.type.value_type)
            out.append(pa.ListArray.from_arrays(pa.array(offsets[field.name].astype(np.int32)), flat, type=field.type))
        else:
            raise KdstoreError(f"the build does not produce column {field.name!r} of its schema")
    return pa.Table.from_arrays(out, schema=schema)


def unit_rows(parts: Sequence[tuple[np.ndarray, pa.Table]], skip: int = 0) -> pa.Table:
    """A work unit's batch tables, each with the unit indices of its rows -> the unit's rows in sequence order,
    less the first ``skip`` (one Arrow ``take``: no per-row Python)."""
    order = np.argsort(np.concatenate([indices for indices, _ in parts]), kind="stable")
    return pa.concat_tables([table for _, table in parts]).take(order).slice(skip)


def check_finite(arrays: dict[str, np.ndarray], sequences: Sequence[Any]) -> None:
    """BuildError naming the first sequence whose logits held NaN or inf (their log-sum-exp ``lse`` is not finite)."""
    bad = ~np.isfinite(arrays["lse"])
    if bad.any():
        first = int(np.argmax(bad))
        row = int(np.searchsorted(np.cumsum([len(s.input_ids) - 1 for s in sequences]), first, side="right"))
        raise BuildError(f"the teacher produced NaN or inf logits for sequence {sequences[row].sequence_id}",
                         hint="try --dtype float32; check the teacher weights")


class _Stage:
    """A thread applying ``work`` to each item of a bounded queue; its first error stops it and is kept."""

    def __init__(self, name: str, work: Callable[[Any], None], depth: int) -> None:
        self.work = work
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.stopping = False  # set when the producer failed: what is still queued is dropped
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def put(self, item: Any, check: Callable[[], None]) -> None:
        while True:
            check()
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        try:
            while (item := self.queue.get()) is not _END:
                if not self.stopping:
                    self.work(item)
        except BaseException as exc:  # handed to the producing thread, which re-raises it
            self.error = exc
            while self.queue.get() is not _END:  # drain so the producer never blocks
                pass

    def close(self) -> None:
        self.queue.put(_END)
        self.thread.join()


class HostPipeline:
    """Encodes teacher outputs and writes them on two threads; errors surface on the caller's thread."""

    def __init__(self, writer: ShardWriter, codec: CodecConfig, schema: pa.Schema) -> None:
        self.writer, self.codec, self.schema = writer, codec, schema
        self._encode = _Stage("kdstore-encode", self._encode_item, ENCODE_QUEUE_DEPTH)
        self._write = _Stage("kdstore-write", writer.write, WRITE_QUEUE_DEPTH)
        self._unit: list[tuple[np.ndarray, pa.Table]] = []  # the open unit's tables (encode thread only)

    def __enter__(self) -> HostPipeline:
        self._write.thread.start()
        self._encode.thread.start()
        return self

    def put_unit(self, sequences: Sequence[Any], batches: Iterable[SparseBatch], skip: int = 0) -> None:
        """Queue the batches of one work unit as ``batches`` yields them; its rows are written in the order of
        ``sequences``, minus the first ``skip``."""
        for batch in batches:
            self._encode.put((sequences, batch), self._raise_if_failed)
        self._encode.put(_UnitEnd(skip), self._raise_if_failed)

    def put_rows(self, rows: list[dict[str, Any]], encode: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        """Queue finished rows: each is encoded by ``encode`` on the encode thread; they are written in order."""
        self._encode.put(_Rows(rows, encode), self._raise_if_failed)

    def _encode_item(self, item: Any) -> None:
        if isinstance(item, _Rows):
            table = rows_to_table(self.schema, [item.encode(row) for row in item.rows])
            if table.num_rows:
                self._write.put(table, self._raise_if_write_failed)
            return
        if isinstance(item, _UnitEnd):
            table, self._unit = unit_rows(self._unit, item.skip), []
            if table.num_rows:
                self._write.put(table, self._raise_if_write_failed)
            return
        sequences, batch = item
        arrays = batch.copy.wait()
        chosen = [sequences[i] for i in batch.indices]
        check_finite(arrays, chosen)
        self._unit.append((batch.indices, batch_table(self.codec, self.schema, chosen, arrays)))

    def _raise_if_write_failed(self) -> None:
        if self._write.error is not None:
            raise self._write.error

    def _raise_if_failed(self) -> None:
        for stage in (self._encode, self._write):
            if stage.error is not None:
                raise stage.error

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self._encode.stopping = self._write.stopping = True
        self._encode.close()
        if self._encode.error is not None:
            self._write.stopping = True
        self._write.close()
        if exc_type is None:
            self._raise_if_failed()
