"""The shard writer: rows in, atomic Parquet shards out, the manifest last.

    with ShardWriter("store", manifest, partition=0, num_partitions=1) as writer:
        writer.write(table)            # a pyarrow Table in the store's schema

* Rows are cut into row groups of ~``row_group_bytes`` (uncompressed Arrow
  bytes, counted per row by ``row_bytes``) and row groups into shards of
  ~``shard_bytes``. A row group closes at the first row that brings it to
  ``row_group_bytes``, whatever tables the rows arrived in, and both cuts depend
  only on the rows written since the shard began: the same rows always give
  the same shards and row groups, also on resume.
* Every temporary file or folder has a name of its own (``<name>.<pid>-<random>.tmp``),
  so writers racing into one folder never share one. A shard is written under
  such a name, fsynced, then renamed: a file with a final name is always
  complete. The tokenizer copy is renamed into place by whichever writer comes
  first; the others check that it holds the same files.
* On a clean exit the writer records its partition in ``_partitions/`` and,
  when every partition has finished, writes ``manifest.json`` (atomically) as
  their union, and the dataset card ``README.md`` unless a README that is not
  a kdstore card is there. On an exception (Ctrl-C included) no partition
  record and no manifest are written, and the half-written shard is deleted.
  Finished shards stay on disk, unlisted, so a rerun resumes from them: rows
  of one partition are written in a fixed order, so the committed rows are a
  prefix of that order (``num_committed_rows``).
* Only a new or empty folder, or a kdstore store (finished or being built), is
  written into: a folder holding other files is refused before anything is
  created in it. One writer per partition at a time (an advisory lock); a
  store made with a different teacher, tokenizer, codec or build config is
  refused, naming the first field that differs and both values.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kdstore import __version__
from kdstore.card import dataset_card, is_kdstore_card
from kdstore.errors import (
    KdstoreError,
    ShardCorruptError,
    StoreLockedError,
    StoreMismatchError,
)
from kdstore.format import (
    LOCK_DIR,
    MANIFEST_NAME,
    METADATA_KEY,
    PARTITION_DIR,
    SHARD_DIR,
    TOKENIZER_DIR,
    Manifest,
    ShardInfo,
    partition_record_name,
    shard_info,
    shard_name,
)
from kdstore.records import check_output_folder, keep_scores, read_record, refuse_if_different, union_manifest

if TYPE_CHECKING:
    from kdstore.mirror import RemoteMirror

DEFAULT_SHARD_BYTES = 256 << 20  # uncompressed; ~100 MB on disk at the default codec
# 1 MiB of Arrow rows, ~0.29 MB compressed at the default codec: one seek-and-read per random access. The bundled
# demo store (`kdstore build`: 727 sequences, 27 MB of rows) gets 26 row groups, 6 or 7 per rank at 4 ranks; at
# 4 MiB it got 6 (the writer then cut only between work units: groups of 1.9-7.8 MB), too few for 8 ranks. The
# price: 100.8 instead of 98.7 bytes/token on that store (+2 %, more footer and smaller zstd windows).
DEFAULT_ROW_GROUP_BYTES = 1 << 20
DEFAULT_ZSTD_LEVEL = 9  # measured in benchmarks/codec.py: level 19 saves ~3 % more at 5x the time

# Per-column Parquet encodings. BYTE_STREAM_SPLIT puts the k-th bytes of all
# values together, so the mostly-zero high bytes of small ids and gaps become
# long runs zstd removes (-24 % bytes on 128k-vocabulary ids, benchmarks/codec.py).
# Parquet stores uint8/uint16 codes as 4-byte INT32, so the code columns gain
# the same way: -21 % on the top-K log-prob codes at K=64 (75 -> 59 B/position).
_SPLIT_COLUMNS = ("input_ids", "topk_id_deltas", "topk_logprob_codes", "tail_logmass_codes", "target_logprob_codes",
                  "sampled_id_deltas", "sampled_counts", "sampled_num_ids")


def temporary_name(path: Path) -> Path:
    """A name beside ``path`` that no other writer uses: ``<name>.<pid>-<8 random hex>.tmp``.

    The pid tells which process left it; the random part keeps names apart across machines sharing a folder.
    """
    return path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write ``content`` (text or bytes) to ``path`` via a temporary file of its own and a rename."""
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb" if isinstance(content, bytes) else "w") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def shard_metadata(manifest: Manifest, **extra: Any) -> dict[bytes, bytes]:
    """The manifest essentials every shard carries in its Parquet footer."""
    essentials = {"format": "kdstore", **manifest.identity(), "kdstore_version": manifest.kdstore_version, **extra}
    return {METADATA_KEY: json.dumps(essentials, sort_keys=True).encode()}


def read_shard_essentials(path: Path) -> dict[str, Any]:
    try:
        metadata = pq.read_metadata(path).metadata or {}
        return json.loads(metadata[METADATA_KEY])
    except (OSError, pa.ArrowInvalid, KeyError, ValueError) as exc:
        raise ShardCorruptError(f"{path} is not a readable kdstore shard: {exc}") from None


class ShardWriter:
    """Writes one partition of a store. See the module docstring."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        manifest: Manifest,
        schema: pa.Schema,
        *,
        partition: int = 0,
        num_partitions: int = 1,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES,
        zstd_level: int = DEFAULT_ZSTD_LEVEL,
        tokenizer_dir: str | os.PathLike[str] | None = None,
        mirror: RemoteMirror | None = None,
    ) -> None:
        if not 0 <= partition < num_partitions:
            raise KdstoreError(f"partition {partition} is outside 0..{num_partitions - 1}",
                               hint="pass --partition i with 0 <= i < --num-partitions")
        if row_group_bytes <= 0 or shard_bytes < row_group_bytes:
            raise KdstoreError(f"row_group_bytes must be above 0 and at most shard_bytes, got {row_group_bytes} and "
                               f"{shard_bytes}", hint=f"leave row_group_bytes at {DEFAULT_ROW_GROUP_BYTES} or set it lower")
        self.root = Path(path)
        self.manifest = replace(manifest, shards=[], num_partitions=num_partitions,
                                columns=list(schema.names), kdstore_version=__version__)
        self.schema = schema
        self.partition = partition
        self.shard_bytes = shard_bytes
        self.row_group_bytes = row_group_bytes
        self.zstd_level = zstd_level
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else None
        self.mirror = mirror  # a store at a URL: ``path`` is then a local staging folder (kdstore.mirror)
        self.shards: list[ShardInfo] = []
        self.num_committed_rows = 0
        self.finalized: Manifest | None = None  # the manifest, once every partition has finished
        self.notes: list[str] = []  # what finishing the store dropped (score files of changed shards)
        self._lock_file: Any = None
        self._buffer: list[pa.Table] = []
        self._buffer_bytes = 0
        self._parquet: pq.ParquetWriter | None = None
        self._tmp: Path | None = None  # the open shard's temporary name
        self._shard_rows = 0
        self._shard_tokens = 0
        self._shard_raw_bytes = 0

    # -- context manager ---------------------------------------------------
    def __enter__(self) -> ShardWriter:
        check_output_folder(self.root)
        for sub in (LOCK_DIR, PARTITION_DIR, SHARD_DIR):  # _locks first: it marks the folder as a store being built
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._lock_file = _lock(self.root / LOCK_DIR / f"part-{self.partition:05d}.lock", blocking=False)
        try:
            if self.mirror is not None:
                self.mirror.check_target(self.manifest.identity())
                self.shards = self.mirror.adopt(self.partition)
                self.num_committed_rows = sum(s.num_rows for s in self.shards)
                if self.tokenizer_dir is not None:
                    self.mirror.upload_tokenizer(self.tokenizer_dir)
            self._check_existing_store()
            self._recover_partition()
            if self.tokenizer_dir is not None:
                _copy_tree_atomic(self.tokenizer_dir, self.root / TOKENIZER_DIR)
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is not None:
                self._abort_shard()
                return
            self._flush_row_group()
            self._commit_shard()
            record = {"partition": self.partition, **self.manifest.identity(),
                      "columns": self.manifest.columns, "shards": [asdict(s) for s in self.shards]}
            if self.mirror is not None:
                self.finalized = self.mirror.finish(record)
                return
            write_atomic(self.root / partition_record_name(self.partition), json.dumps(record, indent=1))
            self.finalized = finalize(self.root, self.notes)
        finally:
            self._release()

    # -- writing -----------------------------------------------------------
    def write(self, table: pa.Table) -> None:
        """Append rows (a Table in ``self.schema``); they are committed with their shard."""
        if not table.schema.equals(self.schema, check_metadata=False):
            raise KdstoreError(f"rows do not match the store schema: got {table.schema}, want {self.schema}")
        ends = np.cumsum(row_bytes(table))  # ends[i]: bytes of rows 0..i of this table
        start = 0
        while start < table.num_rows:
            done = int(ends[start - 1]) if start else 0
            # the first row that brings the open row group to row_group_bytes closes it
            closing = int(np.searchsorted(ends, done + self.row_group_bytes - self._buffer_bytes, side="left"))
            stop = min(closing + 1, table.num_rows)
            self._buffer.append(table.slice(start, stop - start))
            self._buffer_bytes += int(ends[stop - 1]) - done
            start = stop
            if self._buffer_bytes >= self.row_group_bytes:
                self._flush_row_group()
                if self._shard_raw_bytes >= self.shard_bytes:
                    self._commit_shard()

    def _flush_row_group(self) -> None:
        if not self._buffer:
            return
        rows = pa.concat_tables(self._buffer).combine_chunks()
        self._shard_raw_bytes += self._buffer_bytes
        self._buffer, self._buffer_bytes = [], 0
        if self._parquet is None:
            self._tmp = temporary_name(self.root / shard_name(self.partition, len(self.shards)))
            self._parquet = self._open_parquet(self._tmp)
        self._parquet.write_table(rows, row_group_size=rows.num_rows)
        self._shard_rows += rows.num_rows
        if "input_ids" in rows.column_names:
            self._shard_tokens += int(pc.list_value_length(rows["input_ids"]).to_numpy().sum())

    def _open_parquet(self, path: Path) -> pq.ParquetWriter:
        names = set(self.schema.names)
        encodings = {f"{c}.list.element": "BYTE_STREAM_SPLIT" for c in _SPLIT_COLUMNS if c in names}
        return pq.ParquetWriter(
            path,
            self.schema.with_metadata(shard_metadata(self.manifest, partition=self.partition)),
            compression="zstd",
            compression_level=self.zstd_level,
            use_dictionary=["sequence_id"] if "sequence_id" in names else False,
            column_encoding=encodings or None,
            write_statistics=["sequence_id"] if "sequence_id" in names else False,
            write_page_checksum=True,
        )

    def _commit_shard(self) -> None:
        if self._parquet is None:
            return
        self._parquet.add_key_value_metadata(
            {"kdstore_shard": json.dumps({"num_rows": self._shard_rows, "num_tokens": self._shard_tokens})}
        )
        self._parquet.close()
        self._parquet = None
        tmp, self._tmp = self._tmp, None
        assert tmp is not None  # set with self._parquet
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        final = self.root / shard_name(self.partition, len(self.shards))
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        relative = final.relative_to(self.root).as_posix()
        self.shards.append(shard_info(final, relative, self._shard_rows, self._shard_tokens))
        if self.mirror is not None:  # uploaded whole, then its record; staging keeps no copy
            self.mirror.upload_shard(final, self.partition, len(self.shards) - 1, self.shards[-1])
            final.unlink()
        self.num_committed_rows += self._shard_rows
        self._shard_rows = self._shard_tokens = self._shard_raw_bytes = 0

    def _abort_shard(self) -> None:
        self._buffer, self._buffer_bytes = [], 0
        if self._parquet is not None:
            try:
                self._parquet.close()
            finally:
                self._parquet = None
                if self._tmp is not None:
                    self._tmp.unlink(missing_ok=True)
                    self._tmp = None

    # -- recovery ----------------------------------------------------------
    def _check_existing_store(self) -> None:
        """Refuse to mix stores: compare with the manifest and other partitions' records."""
        wanted = self.manifest.identity()
        sources = [self.root / MANIFEST_NAME] if (self.root / MANIFEST_NAME).exists() else []
        sources += sorted((self.root / PARTITION_DIR).glob("part-*.json"))
        for source in sources:
            data = read_record(source)
            found = {key: data.get(key) for key in wanted}
            if source.name == MANIFEST_NAME:
                found["num_partitions"] = wanted["num_partitions"]  # a finished store may be extended
                # score files make the manifest format 3; the shards are what this build writes
                found["format_version"] = (data.get("scores") or {}).get("shards_format_version",
                                                                         data.get("format_version"))
            refuse_if_different(found, wanted, source)

    def _recover_partition(self) -> None:
        """Drop half-written shards; adopt the finished ones of this partition."""
        prefix = f"part-{self.partition:05d}-"
        shard_dir = self.root / SHARD_DIR
        for tmp in shard_dir.glob(prefix + "*.tmp"):
            tmp.unlink()
        (self.root / partition_record_name(self.partition)).unlink(missing_ok=True)
        wanted = self.manifest.identity()
        for index, path in enumerate(sorted(shard_dir.glob(prefix + "*.parquet"))):
            relative = path.relative_to(self.root).as_posix()
            if relative != shard_name(self.partition, index):
                raise ShardCorruptError(f"{relative} breaks the shard numbering of partition {self.partition}",
                                        hint="delete the shards of this partition and rerun it")
            essentials = read_shard_essentials(path)
            refuse_if_different({key: essentials.get(key) for key in wanted}, wanted, path)
            counts = json.loads(pq.read_metadata(path).metadata[b"kdstore_shard"])
            self.shards.append(shard_info(path, relative, counts["num_rows"], counts["num_tokens"]))
            self.num_committed_rows += counts["num_rows"]

    def committed_sequence_ids(self) -> list[str]:
        """Sequence ids already committed by this partition, in write order (reads the shards)."""
        ids: list[str] = []
        for shard in self.shards:
            ids += pq.read_table(self.root / shard.path, columns=["sequence_id"])["sequence_id"].to_pylist()
        return ids

    def _release(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing the file drops the flock
            self._lock_file = None


def row_bytes(table: pa.Table) -> np.ndarray:
    """Uncompressed Arrow bytes of each row of ``table`` [num_rows] int64: values, plus 4 offset bytes per list or
    string. A function of the row alone, so the writer's cuts do not depend on how rows were grouped into tables."""
    sizes = np.zeros(table.num_rows, dtype=np.int64)
    for column in table.columns:
        kind = column.type
        if pa.types.is_list(kind) and _fixed_width(kind.value_type):
            lengths = pc.list_value_length(column).fill_null(0).to_numpy()
            sizes += 4 + lengths.astype(np.int64) * _fixed_width(kind.value_type)
        elif pa.types.is_string(kind) or pa.types.is_binary(kind):
            sizes += 4 + pc.binary_length(column).fill_null(0).to_numpy().astype(np.int64)
        elif _fixed_width(kind):
            sizes += _fixed_width(kind)
        else:  # nested (the generations table): Arrow's own count, a row at a time
            sizes += np.array([column.slice(i, 1).nbytes for i in range(len(column))], dtype=np.int64)
    return sizes


def _fixed_width(kind: pa.DataType) -> int:
    """Bytes per value of a fixed-width type (at least 1); 0 for variable-width and nested types."""
    try:
        return max(1, kind.bit_width // 8)
    except ValueError:
        return 0


def _lock(path: Path, blocking: bool) -> Any:
    handle = open(path, "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        handle.close()
        raise StoreLockedError(f"{path.parent.parent} partition {path.stem} is being written by another process") from None
    return handle


def _copy_tree_atomic(source: Path, target: Path) -> None:
    """Copy the files of folder ``source`` to ``target`` atomically, unless a copy is there already.

    Writers of several partitions race here: each copies into a folder of its own and renames it into place;
    a rename onto the folder another writer put there first fails (ENOTEMPTY/EEXIST), which is success when
    that folder holds the same files. Files are created under the umask (copytree would copy the source's mode,
    and a TemporaryDirectory is 0700).
    """
    if not target.exists():
        tmp = temporary_name(target)
        try:
            tmp.mkdir()
            for file in sorted(p for p in source.iterdir() if p.is_file()):
                with open(file, "rb") as reading, open(tmp / file.name, "wb") as writing:
                    shutil.copyfileobj(reading, writing)
                    writing.flush()
                    os.fsync(writing.fileno())
            os.rename(tmp, target)
            _fsync_dir(target.parent)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not target.is_dir():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if _file_contents(target) != _file_contents(source):
        raise StoreMismatchError(f"{target} holds other files than this build's tokenizer ({source})",
                                 hint="build into a new folder, or delete the store's tokenizer/ if it is stale")


def _file_contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def finalize(root: str | os.PathLike[str], notes: list[str] | None = None) -> Manifest | None:
    """Write ``manifest.json`` as the union of all partition records, if all are there.

    Returns the manifest, or None while partitions are still missing. Safe to
    call from several processes: a lock serialises them and the write is atomic.
    A manifest already there (a rerun over a finished store) passes on its score
    files while they score these very shards (records.keep_scores); when they
    no longer do, the note saying so is appended to ``notes``.
    """
    root = Path(root)
    records = sorted((root / PARTITION_DIR).glob("part-*.json"))
    if not records:
        return None
    with _lock(root / LOCK_DIR / "finalize.lock", blocking=True):
        manifest = union_manifest([(p, read_record(p)) for p in records])
        if manifest is None:
            return None
        previous = root / MANIFEST_NAME
        manifest, note = keep_scores(Manifest.from_json(previous.read_text(), str(previous)) if previous.exists()
                                     else None, manifest, str(root))
        if note is not None and notes is not None:
            notes.append(note)
        write_atomic(root / MANIFEST_NAME, manifest.to_json())
        card = root / "README.md"
        if not card.exists() or is_kdstore_card(card.read_text(errors="replace")):  # never a user's README
            write_atomic(card, dataset_card(manifest))
        return manifest
