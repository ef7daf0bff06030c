"""The shard writer: rows in, atomic Parquet shards out, the manifest last.

    with ShardWriter("store", manifest, partition=0, num_partitions=1) as writer:
        writer.write(table)            # a pyarrow Table in the store's schema

* Rows are buffered into row groups of ~``row_group_bytes`` (uncompressed
  Arrow bytes) and row groups into shards of ~``shard_bytes``. Both cuts depend
  only on the rows written since the shard began, so the same rows always give
  the same shards.
* A shard is written as ``<name>.tmp``, fsynced, then renamed: a file with a
  final name is always complete.
* On a clean exit the writer records its partition in ``_partitions/`` and,
  when every partition has finished, writes ``manifest.json`` (atomically) as
  their union. On an exception (Ctrl-C included) no partition record and no
  manifest are written, and the half-written shard is deleted. Finished
  shards stay on disk, unlisted, so a rerun resumes from them: rows of one
  partition are written in a fixed order, so the committed rows are a prefix
  of that order (``num_committed_rows``).
* One writer per partition at a time (an advisory lock); a store made with a
  different teacher, tokenizer, codec or build config is refused.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kdstore import __version__
from kdstore.errors import KdstoreError, ShardCorruptError, StoreLockedError, StoreMismatchError
from kdstore.format import (
    LOCK_DIR,
    MANIFEST_NAME,
    METADATA_KEY,
    PARTITION_DIR,
    SHARD_DIR,
    TOKENIZER_DIR,
    Manifest,
    ShardInfo,
    new_created_at,
    partition_record_name,
    sha256_file,
    shard_name,
)

DEFAULT_SHARD_BYTES = 256 << 20  # uncompressed; ~100 MB on disk at the default codec
DEFAULT_ROW_GROUP_BYTES = 4 << 20  # ~1-2 MB compressed: one seek-and-read per random access
DEFAULT_ZSTD_LEVEL = 9  # measured in benchmarks/codec.py: level 19 saves ~3 % more at 5x the time

# Per-column Parquet encodings. BYTE_STREAM_SPLIT puts the k-th bytes of all
# values together, so the mostly-zero high bytes of small ids and gaps become
# long runs zstd removes (-24 % bytes on 128k-vocabulary ids, benchmarks/codec.py).
# Parquet stores uint8/uint16 codes as 4-byte INT32, so the code columns gain
# the same way: -21 % on the top-K log-prob codes at K=64 (75 -> 59 B/position).
_SPLIT_COLUMNS = ("input_ids", "topk_id_deltas", "topk_logprob_codes", "tail_logmass_codes", "target_logprob_codes",
                  "sampled_id_deltas", "sampled_counts", "sampled_num_ids")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
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
    ) -> None:
        if not 0 <= partition < num_partitions:
            raise KdstoreError(f"partition {partition} is outside 0..{num_partitions - 1}",
                               hint="pass --partition i with 0 <= i < --num-partitions")
        if row_group_bytes <= 0 or shard_bytes < row_group_bytes:
            raise KdstoreError("need 0 < row_group_bytes <= shard_bytes")
        self.root = Path(path)
        self.manifest = replace(manifest, shards=[], num_partitions=num_partitions,
                                columns=list(schema.names), kdstore_version=__version__)
        self.schema = schema
        self.partition = partition
        self.shard_bytes = shard_bytes
        self.row_group_bytes = row_group_bytes
        self.zstd_level = zstd_level
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else None
        self.shards: list[ShardInfo] = []
        self.num_committed_rows = 0
        self.finalized: Manifest | None = None  # the manifest, once every partition has finished
        self._lock_file: Any = None
        self._buffer: list[pa.Table] = []
        self._buffer_bytes = 0
        self._parquet: pq.ParquetWriter | None = None
        self._shard_rows = 0
        self._shard_tokens = 0
        self._shard_raw_bytes = 0

    # -- context manager ---------------------------------------------------
    def __enter__(self) -> ShardWriter:
        for sub in (SHARD_DIR, PARTITION_DIR, LOCK_DIR):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._lock_file = _lock(self.root / LOCK_DIR / f"part-{self.partition:05d}.lock", blocking=False)
        try:
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
            write_atomic(self.root / partition_record_name(self.partition), json.dumps(record, indent=1))
            self.finalized = finalize(self.root)
        finally:
            self._release()

    # -- writing -----------------------------------------------------------
    def write(self, table: pa.Table) -> None:
        """Append rows (a Table in ``self.schema``); they are committed with their shard."""
        if not table.schema.equals(self.schema, check_metadata=False):
            raise KdstoreError(f"rows do not match the store schema: got {table.schema}, want {self.schema}")
        if table.num_rows == 0:
            return
        self._buffer.append(table)
        self._buffer_bytes += table.nbytes
        if self._buffer_bytes >= self.row_group_bytes:
            self._flush_row_group()
            if self._shard_raw_bytes >= self.shard_bytes:
                self._commit_shard()

    def _flush_row_group(self) -> None:
        if not self._buffer:
            return
        rows = pa.concat_tables(self._buffer).combine_chunks()
        self._buffer, self._buffer_bytes = [], 0
        if self._parquet is None:
            self._parquet = self._open_parquet(self._tmp_path())
        self._parquet.write_table(rows, row_group_size=rows.num_rows)
        self._shard_rows += rows.num_rows
        self._shard_raw_bytes += rows.nbytes
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

    def _tmp_path(self) -> Path:
        return self.root / (shard_name(self.partition, len(self.shards)) + ".tmp")

    def _commit_shard(self) -> None:
        if self._parquet is None:
            return
        self._parquet.add_key_value_metadata(
            {"kdstore_shard": json.dumps({"num_rows": self._shard_rows, "num_tokens": self._shard_tokens})}
        )
        self._parquet.close()
        self._parquet = None
        tmp = self._tmp_path()
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        final = tmp.with_name(tmp.name[: -len(".tmp")])
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        relative = final.relative_to(self.root).as_posix()
        self.shards.append(ShardInfo(relative, self._shard_rows, self._shard_tokens, final.stat().st_size, sha256_file(final)))
        self.num_committed_rows += self._shard_rows
        self._shard_rows = self._shard_tokens = self._shard_raw_bytes = 0

    def _abort_shard(self) -> None:
        self._buffer, self._buffer_bytes = [], 0
        if self._parquet is not None:
            try:
                self._parquet.close()
            finally:
                self._parquet = None
                self._tmp_path().unlink(missing_ok=True)

    # -- recovery ----------------------------------------------------------
    def _check_existing_store(self) -> None:
        """Refuse to mix stores: compare with the manifest and other partitions' records."""
        wanted = self.manifest.identity()
        sources = [self.root / MANIFEST_NAME] if (self.root / MANIFEST_NAME).exists() else []
        sources += sorted((self.root / PARTITION_DIR).glob("part-*.json"))
        for source in sources:
            data = json.loads(source.read_text())
            found = {key: data.get(key) for key in wanted}
            if source.name == MANIFEST_NAME:
                found["num_partitions"] = wanted["num_partitions"]  # a finished store may be extended
            _refuse_if_different(found, wanted, source)

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
            _refuse_if_different({key: essentials.get(key) for key in wanted}, wanted, path)
            counts = json.loads(pq.read_metadata(path).metadata[b"kdstore_shard"])
            self.shards.append(ShardInfo(relative, counts["num_rows"], counts["num_tokens"],
                                         path.stat().st_size, sha256_file(path)))
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


def _refuse_if_different(found: dict[str, Any], wanted: dict[str, Any], source: Path) -> None:
    different = [key for key in wanted if found.get(key) != wanted[key]]
    if different:
        raise StoreMismatchError(f"{source.parent if source.suffix == '.json' else source} holds a store with a "
                                 f"different {', '.join(different)} than this build")


def _lock(path: Path, blocking: bool) -> Any:
    handle = open(path, "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        handle.close()
        raise StoreLockedError(f"{path.parent.parent} partition {path.stem} is being written by another process") from None
    return handle


def _copy_tree_atomic(source: Path, target: Path) -> None:
    if target.exists():
        return
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    os.replace(tmp, target)


def finalize(root: str | os.PathLike[str]) -> Manifest | None:
    """Write ``manifest.json`` as the union of all partition records, if all are there.

    Returns the manifest, or None while partitions are still missing. Safe to
    call from several processes: a lock serialises them and the write is atomic.
    """
    root = Path(root)
    records = sorted((root / PARTITION_DIR).glob("part-*.json"))
    if not records:
        return None
    with _lock(root / LOCK_DIR / "finalize.lock", blocking=True):
        datas = [json.loads(p.read_text()) for p in records]
        first = datas[0]
        if len(datas) < first["num_partitions"]:
            return None
        shards: list[ShardInfo] = []
        shared = [k for k in first if k not in ("partition", "shards")]
        for source, data in zip(records, datas):
            _refuse_if_different({k: data.get(k) for k in shared}, {k: first[k] for k in shared}, source)
            shards += [ShardInfo(**s) for s in data["shards"]]
        fields = {k: first[k] for k in shared}
        manifest = Manifest(**fields, shards=sorted(shards, key=lambda s: s.path),
                            kdstore_version=__version__, created_at=new_created_at())
        write_atomic(root / MANIFEST_NAME, manifest.to_json())
        write_atomic(root / "README.md", dataset_card(manifest))
        return manifest


def dataset_card(manifest: Manifest) -> str:
    """A short README.md for the store folder, for people who find it without kdstore."""
    codec = manifest.codec
    return (
        f"# kdstore {manifest.table} store\n\n"
        f"Teacher `{manifest.teacher['model']}` ({manifest.teacher['dtype']}, vocabulary {manifest.teacher['vocab_size']}), "
        f"tokenizer `{manifest.tokenizer['name']}`.\n"
        f"{manifest.num_sequences} sequences, {manifest.num_tokens} tokens, top-{codec['k']} log-probs per position, "
        f"{len(manifest.shards)} Parquet shards, {manifest.total_bytes} bytes.\n\n"
        "Read it with `kdstore.open_store(path)`, or with any Parquet reader: ids are delta-coded "
        "within each position (cumsum every K values) and log-probs are 8-bit codes "
        "(`manifest.json` codec.logprobs.table[code]). The format is described in kdstore's docs/format.md.\n"
    )
