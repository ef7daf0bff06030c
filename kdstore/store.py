"""The one owner of store I/O: open a store (a local folder or any fsspec URL), list, check and read its shards.

    store = kdstore.open_store("store")                          # or "s3://bucket/store", storage_options={...}
    for batch in store.iter_batches(columns=["input_ids", "topk_ids", "topk_logprobs"]):
        ...                     # one row group: ragged arrays + offsets
    parquet = store.open_shard(0)                                # checked footer, schema and essentials
    table = store.read_row_group(parquet, 0, group=3, columns=["input_ids"])

Every read goes through ``open_shard``, which serves the Parquet reader only
bytes whose sha256 matched the manifest (kdstore.integrity), and checks the
shard's schema and footer essentials against the manifest before a row is
read. A decoded batch is "ragged": all positions of its sequences stacked,
with offsets saying where each sequence starts (docs/format.md lists the keys).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdstore.codec import CodecConfig, decode_positions
from kdstore.errors import (
    ChecksumError,
    KdstoreError,
    ManifestError,
    SchemaError,
    ShardCorruptError,
    ShardMissingError,
    StorageError,
    StoreNotFoundError,
    UnsafeFileError,
    VerifyError,
)
from kdstore.format import (
    MANIFEST_NAME,
    METADATA_KEY,
    PARTITION_DIR,
    SCORE_COLUMNS,
    TABLE_LOGITS,
    TOKENIZER_DIR,
    Manifest,
    ShardInfo,
    safe_relative_path,
    sha256_named_files,
    table_schema,
)
from kdstore.integrity import RangeReader, VerifiedShardFile, local_reader, shard_checksums

HASH_CHUNK_BYTES = 4 << 20  # a whole-file sha256 reads this much at a time

# decoded name -> stored columns it needs
DECODED_COLUMNS: dict[str, tuple[str, ...]] = {
    "sequence_id": ("sequence_id",),
    "input_ids": ("input_ids",),
    "topk_ids": ("topk_id_deltas",),
    "topk_logprobs": ("topk_logprob_codes",),
    "tail_logmass": ("tail_logmass_codes",),
    "target_logprob": ("target_logprob_codes",),
    "sampled": ("sampled_num_ids", "sampled_id_deltas", "sampled_counts"),
    **{name: (name,) for name in SCORE_COLUMNS},
}


# an fsspec scheme -> the package that implements it, for the "install ..." line
_BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "hf": "huggingface_hub", "az": "adlfs",
             "abfs": "adlfs", "abfss": "adlfs", "http": "aiohttp", "https": "aiohttp"}


def is_url(location: str | os.PathLike[str]) -> bool:
    return "://" in str(location)


def filesystem(location: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) of a local path or URL; a missing backend names its package."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(str(location), **(storage_options or {}))
    except ImportError:
        scheme = str(location).split("://", 1)[0]
        package = _BACKENDS.get(scheme, f"the fsspec backend for {scheme}://")
        raise StorageError(f"reading {scheme}:// URLs such as {location} needs {package}, which is not installed",
                           hint=f"pip install {package}") from None
    except (ValueError, TypeError) as exc:
        raise StorageError(f"cannot open {location}: {exc}") from None
    return fs, path.rstrip("/") or path


def open_store(location: str | os.PathLike[str] | Store, storage_options: dict[str, Any] | None = None,
               tables: tuple[str, ...] = (TABLE_LOGITS,)) -> Store:
    """Open the store at ``location``: a local folder or an fsspec URL (``s3://``, ``gs://``, ``hf://``, ``file://``).

    ``tables``: the table kinds the caller reads; a generations store has completion positions only (docs/format.md),
    so readers that assume T - 1 positions a sequence get the one-line refusal instead of wrong rows."""
    if isinstance(location, Store):
        return location
    text = str(location)
    fs, root = filesystem(text, storage_options)
    store_is_local = is_local_filesystem(fs)
    if store_is_local and not os.path.isdir(root):
        reason = "the folder does not exist" if not os.path.exists(root) else "it is a file, not a store folder"
        raise StoreNotFoundError(f"no store at {text}: {reason}")
    try:
        manifest_text = fs.cat_file(f"{root}/{MANIFEST_NAME}").decode()
    except FileNotFoundError:
        _refuse_unfinished(fs, root, text)
        if not store_is_local and not _exists(fs, root):
            raise StoreNotFoundError(f"no store at {text}: nothing is there (no such bucket, or an empty prefix)") from None
        raise StoreNotFoundError(f"{text} is not a kdstore store: it has no {MANIFEST_NAME}") from None
    except UnicodeDecodeError:
        raise ManifestError(f"{text}/{MANIFEST_NAME} is not text") from None
    except Exception as exc:  # noqa: BLE001  every backend has its own errors (botocore, aiohttp, ...): name the URL once
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise StorageError(f"cannot read {text}/{MANIFEST_NAME}: {type(exc).__name__}: {first_line}",
                           hint=_access_hint(text)) from None
    manifest = Manifest.from_json(manifest_text, f"{text}/{MANIFEST_NAME}")
    store = Store(text, manifest, None if store_is_local else dict(storage_options or {}), root, fs, tables)
    if manifest.view is not None:  # a selection: its parent opened and checked, its chosen rows loaded
        from kdstore.selection import attach_parent

        attach_parent(store)
    return store


def is_local_filesystem(fs: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _access_hint(location: str) -> str:
    if location.startswith(("s3://", "s3a://")):
        return ("check the bucket name and credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE, or "
                "--storage-option key=... secret=... endpoint_url=...")
    if location.startswith(("gs://", "gcs://")):
        return "check the bucket name and GOOGLE_APPLICATION_CREDENTIALS, or --storage-option token=..."
    if location.startswith("hf://"):
        return "check the repo id and HF_TOKEN"
    return "check the URL, its credentials (--storage-option KEY=VALUE) and the network"


def _exists(fs: Any, path: str) -> bool:
    try:
        return bool(fs.exists(path))
    except Exception:  # noqa: BLE001  only refines a message
        return True


def _refuse_unfinished(fs: Any, root: str, location: str) -> None:
    try:
        records = fs.glob(f"{root}/{PARTITION_DIR}/part-*.json")
        has_shards = fs.isdir(f"{root}/shards")
    except Exception:  # noqa: BLE001  only refines the message below
        return
    if records or has_shards:
        raise StoreNotFoundError(
            f"{location} holds an unfinished store ({len(records)} partition(s) finished, no manifest yet)",
            hint="rerun the build to resume it, or finish the missing partitions")


class Store:
    """An opened store: its manifest, codec and schema, and the filesystem its files live in.

    ``location``: as given (for messages); ``root``: the folder inside ``fs``; ``storage_options``: None for a
    local store, else the fsspec options a worker process needs to reach it again.
    """

    def __init__(self, location: str, manifest: Manifest, storage_options: dict[str, Any] | None, root: str,
                 fs: Any = None, tables: tuple[str, ...] = (TABLE_LOGITS,)) -> None:
        self.location, self.manifest, self.storage_options, self.root = location, manifest, storage_options, root
        self._fs = (os.getpid(), fs) if fs is not None else None
        self._checked_whole: set[str] = set()  # version 1 shards whose whole-file sha256 matched, this process
        # a selection view (kdstore.selection.attach_parent): the parent store, whose shards it reads, and per
        # shard index the chosen rows (ascending) with their token counts
        self.parent: Store | None = None
        self.chosen: dict[int, tuple[np.ndarray, int]] = {}
        if manifest.table not in tables:
            raise ManifestError(f"{location} is a {manifest.table!r} store; only {' or '.join(map(repr, tables))} "
                                "stores can be read here", hint="info, verify and head read every table kind; "
                                "the store itself is fine")
        self.codec: CodecConfig = manifest.codec_config()
        self.schema = table_schema(manifest.table, self.codec, manifest.columns)
        if list(self.schema.names) != list(manifest.columns):
            raise ManifestError(f"manifest columns {manifest.columns} do not match its codec {self.schema.names}")

    @property
    def fs(self) -> Any:
        """The fsspec filesystem, made once per process.

        A forked DataLoader worker must not use its parent's: fsspec's async filesystems (s3fs, gcsfs)
        raise "This class is not fork-safe" there (tests/integration/test_remote.py met it).
        """
        if self._fs is None or self._fs[0] != os.getpid():
            self._fs = (os.getpid(), filesystem(self.location, self.storage_options)[0])
        return self._fs[1]

    def __getstate__(self) -> dict[str, Any]:  # a spawned worker makes its own filesystem and checks
        return {**self.__dict__, "_fs": None, "_checked_whole": set()}

    @property
    def is_local(self) -> bool:
        return self.storage_options is None

    @property
    def local_root(self) -> Path | None:
        """The store's folder on this machine, or None for a remote store."""
        return Path(self.root) if self.is_local else None

    @property
    def tokenizer_path(self) -> Path | None:
        path = Path(self.root) / TOKENIZER_DIR if self.is_local else None
        return path if path is not None and path.is_dir() else None

    @contextmanager
    def local_tokenizer(self) -> Iterator[Path | None]:
        """The tokenizer files the manifest lists, in a local folder and checked against its ``files_sha256``:
        STORE/tokenizer/, or a temporary copy of a remote store's. None when the manifest lists none (then
        STORE/tokenizer/ as it is, if there is one). VerifyError when the files are not the recorded ones."""
        listed = self.manifest.tokenizer.get("files") or []
        if not listed:
            yield self.tokenizer_path
            return
        if self.is_local:
            for name in listed:
                self.file_path(name)  # a symbolic link or a path outside the store is refused
            self._check_tokenizer(Path(self.root) / TOKENIZER_DIR)
            yield Path(self.root) / TOKENIZER_DIR
            return
        with tempfile.TemporaryDirectory(prefix="kdstore-tokenizer-") as scratch:
            for name in listed:
                try:
                    data = self.fs.cat_file(self.file_path(name))
                except FileNotFoundError:
                    raise VerifyError(f"the tokenizer files of {self.location}: {name} is missing") from None
                (Path(scratch) / Path(name).name).write_bytes(data)
            self._check_tokenizer(Path(scratch))
            yield Path(scratch)

    def _check_tokenizer(self, folder: Path) -> None:
        """VerifyError unless ``folder`` holds exactly the listed tokenizer files, hashed as the build hashed them."""
        where = f"{self.location}/{TOKENIZER_DIR}"
        wanted = sorted(Path(name).name for name in self.manifest.tokenizer.get("files") or [])
        found = sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
        if found != wanted:
            raise VerifyError(f"the tokenizer files in {where} are {found or 'none'}; the manifest lists {wanted}")
        recorded = self.manifest.tokenizer.get("files_sha256")
        if recorded is not None and sha256_named_files([folder / name for name in wanted]) != recorded:
            raise VerifyError(f"the tokenizer files in {where} do not match the manifest's files_sha256")

    def summary(self) -> dict[str, Any]:
        """What ``kdstore info`` prints."""
        m = self.manifest
        return {
            "path": self.location,
            "format_version": m.format_version,
            "table": m.table,
            "teacher": m.teacher["model"],
            "teacher_dtype": m.teacher["dtype"],
            "tokenizer": m.tokenizer["name"],
            "vocab_size": self.codec.vocab_size,
            "k": self.codec.k,
            "sampled": m.codec.get("sampled"),  # None, or {"draws", "mode", "scheme"}
            "columns": m.columns,
            "num_sequences": m.num_sequences,
            "num_tokens": m.num_tokens,
            "num_positions": m.num_tokens - m.num_sequences,
            "total_bytes": m.total_bytes,
            # of the shards read (a view: the parent's, so per token of the parent)
            "bytes_per_token": round(m.total_bytes / shard_tokens, 2) if (shard_tokens := sum(
                s.num_tokens for s in m.shards)) else None,
            "num_shards": len(m.shards),
            "num_partitions": m.num_partitions,
            "created_at": m.created_at,
            "kdstore_version": m.kdstore_version,
            **({"view_of": self.parent.location, "view_rule": m.view.get("rule")} if self.parent is not None else {}),
            **({"scores": m.scores["columns"], "reference": m.scores["reference"]["model"],
                "score_bytes": sum(f["num_bytes"] for f in m.scores["files"])} if m.scores else {}),
        }

    # -- files -------------------------------------------------------------
    def file_path(self, relative: str) -> str:
        """Path inside ``fs`` of a file the manifest names; a local one must be a regular file inside the store."""
        path = f"{self.root}/{safe_relative_path(relative)}"
        if self.is_local and os.path.lexists(path):
            real, inside = os.path.realpath(path), os.path.realpath(self.root)
            if os.path.islink(path) or os.path.commonpath([real, inside]) != inside:
                raise UnsafeFileError(f"{relative} in {self.location} is a symbolic link or lies outside the store")
        return path

    def read_listed_file(self, relative: str, sha256: str, num_bytes: int | None = None) -> bytes:
        """A small file the manifest lists with its sha256 (a score file, a view's selection), read and checked whole."""
        try:
            data = self.fs.cat_file(self.file_path(relative))
        except FileNotFoundError:
            raise ShardMissingError(f"{relative} listed in the manifest is missing from {self.location}") from None
        except OSError as exc:
            raise StorageError(f"cannot read {relative} of {self.location}: {exc}", hint=_access_hint(self.location)) \
                from None
        if (num_bytes is not None and len(data) != num_bytes) or hashlib.sha256(data).hexdigest() != sha256:
            raise ChecksumError(f"{relative} in {self.location} does not match its sha256 in the manifest")
        return data

    def _shard(self, shard: ShardInfo | int) -> ShardInfo:
        return self.manifest.shards[shard] if isinstance(shard, int) else shard

    def _index(self, shard: ShardInfo | int) -> int:
        return shard if isinstance(shard, int) else [s.path for s in self.manifest.shards].index(shard.path)

    def shard_counts(self, shard: ShardInfo | int) -> tuple[int, int]:
        """(sequences, tokens) this store reads from ``shard``: all of it, or a view's chosen rows."""
        if self.parent is None:
            info = self._shard(shard)
            return info.num_rows, info.num_tokens
        rows, tokens = self.chosen.get(self._index(shard), (np.zeros(0, np.int64), 0))
        return len(rows), tokens

    def row_group_sizes(self, shard: ShardInfo | int, parquet: pq.ParquetFile | None = None) -> list[int]:
        """Rows this store reads from each row group of ``shard`` (a view: only the chosen ones)."""
        metadata = (parquet or self.open_shard(shard)).metadata
        sizes = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
        if self.parent is None:
            return sizes
        rows = self.chosen.get(self._index(shard), (np.zeros(0, np.int64), 0))[0]
        return np.diff(np.searchsorted(rows, np.concatenate([[0], np.cumsum(sizes)]))).tolist()

    def score_columns(self) -> tuple[str, ...]:
        """The per-sequence score columns of this store: the score files' (kdstore score), else the shards'."""
        from kdstore.score_table import score_columns

        return score_columns(self)

    def score_table(self, columns: list[str] | None = None) -> pa.Table:
        """``sequence_id`` and the per-sequence ``columns`` (None: all of ``score_columns``), in store order:
        read from the score files (checked against their sha256 in the manifest) or the shards."""
        from kdstore.score_table import read_score_table

        return read_score_table(self, columns)

    def _reader(self, shard: ShardInfo) -> RangeReader:
        path, fs, location = self.file_path(shard.path), self.fs, self.location
        ranged = local_reader(path) if self.is_local else lambda start, end: fs.cat_file(path, start=start, end=end)

        def read(start: int, end: int) -> bytes:
            try:
                return ranged(start, end)
            except FileNotFoundError:
                raise ShardMissingError(f"shard {shard.path} listed in the manifest is missing from {location}") from None
            except OSError as exc:
                raise StorageError(f"cannot read shard {shard.path} of {location}: {exc}", hint=_access_hint(location)) from None
        return read

    def _size(self, shard: ShardInfo) -> int:
        path = self.file_path(shard.path)
        try:
            size = os.path.getsize(path) if self.is_local else self.fs.size(path)
        except FileNotFoundError:
            raise ShardMissingError(f"shard {shard.path} listed in the manifest is missing from {self.location}") from None
        except OSError as exc:
            raise StorageError(f"cannot read shard {shard.path} of {self.location}: {exc}",
                               hint=_access_hint(self.location)) from None
        if size != shard.num_bytes:
            raise ChecksumError(f"shard {shard.path} has {size} bytes; the manifest says {shard.num_bytes} "
                                "(truncated or replaced)")
        return size

    def check_shard_file(self, shard: ShardInfo | int) -> None:
        """The whole file against the manifest: size, sha256, and (format 2) footer and row-group checksums."""
        if self.parent is not None:  # a view reads its parent's shards, whose hashes it recorded
            return self.parent.check_shard_file(self._index(shard))
        shard = self._shard(shard)
        size = self._size(shard)
        read = self._reader(shard)
        digest = hashlib.sha256()
        for start in range(0, size, HASH_CHUNK_BYTES):
            digest.update(read(start, min(size, start + HASH_CHUNK_BYTES)))
        if digest.hexdigest() != shard.sha256:
            raise ChecksumError(f"shard {shard.path} does not match its sha256 in the manifest")
        if shard.footer_sha256 is not None:
            footer, row_groups = shard_checksums(read, size, shard.path)
            if (footer, row_groups) != (shard.footer_sha256, shard.row_group_sha256):
                raise ChecksumError(f"shard {shard.path} matches its sha256 but not its footer or row-group checksums")
        self._checked_whole.add(shard.path)

    def open_shard(self, shard: ShardInfo | int) -> pq.ParquetFile:
        """A shard as a ParquetFile that reads only verified bytes, its schema and essentials checked."""
        if self.parent is not None:
            return self.parent.open_shard(self._index(shard))
        shard = self._shard(shard)
        size = self._size(shard)
        if shard.footer_sha256 is not None:
            verified = VerifiedShardFile(self._reader(shard), size, shard.footer_sha256, shard.row_group_sha256 or [],
                                         shard.path)
            parquet = _parquet_file(verified, shard, metadata=verified.metadata)
        else:  # version 1: no per-row-group checksums, so the whole file is checked once per process
            if shard.path not in self._checked_whole:
                self.check_shard_file(shard)
            parquet = _parquet_file(self.fs.open(self.file_path(shard.path), "rb"), shard)
        self._check_footer(shard, parquet)
        return parquet

    def _check_footer(self, shard: ShardInfo, parquet: pq.ParquetFile) -> None:
        metadata = parquet.schema_arrow.metadata or {}
        try:
            essentials = json.loads(metadata[METADATA_KEY])
        except (KeyError, ValueError):
            raise SchemaError(f"shard {shard.path} has no readable kdstore metadata in its footer") from None
        identity = self.manifest.identity()
        different = [key for key in identity if essentials.get(key) != identity[key]]
        if different:
            raise ManifestError(f"shard {shard.path}: its footer and the manifest disagree on {', '.join(different)}")
        found = parquet.schema_arrow.remove_metadata()
        if not found.equals(self.schema):
            raise SchemaError(f"shard {shard.path}: schema {describe_schema(found)} differs from the manifest's "
                              f"{describe_schema(self.schema)}")
        rows = parquet.metadata.num_rows
        if rows != shard.num_rows:
            raise ManifestError(f"shard {shard.path} holds {rows} rows, the manifest says {shard.num_rows}")

    def read_row_group(self, parquet: pq.ParquetFile, shard: ShardInfo | int, group: int,
                       columns: list[str] | None = None) -> pa.Table:
        """Row group ``group`` of an opened shard; a damaged one is a named error naming shard and row group."""
        shard = self._shard(shard)
        try:
            table = parquet.read_row_group(group, columns=columns)
        except KdstoreError:
            raise
        except (OSError, pa.ArrowException) as exc:  # a page checksum, a bad encoding, ...
            raise ShardCorruptError(f"shard {shard.path} row group {group} cannot be read: {exc}") from None
        if self.parent is None:
            return table
        sizes = [parquet.metadata.row_group(g).num_rows for g in range(group + 1)]
        first = sum(sizes[:-1])
        rows = self.chosen.get(self._index(shard), (np.zeros(0, np.int64), 0))[0]
        inside = rows[np.searchsorted(rows, first):np.searchsorted(rows, first + sizes[-1])] - first
        return table.take(pa.array(inside, pa.int64()))

    # -- reading -----------------------------------------------------------
    def stored_columns(self, columns: list[str] | None) -> list[str]:
        """Decoded names (None: all) -> the stored columns to read."""
        names = columns if columns is not None else [c for c in DECODED_COLUMNS if _present(self, c)]
        stored: list[str] = []
        for name in names:
            if name not in DECODED_COLUMNS:
                raise KdstoreError(f"unknown column {name!r}; choose from {', '.join(DECODED_COLUMNS)}")
            if not _present(self, name):
                raise KdstoreError(f"this store has no {name!r} column (see `kdstore info`)")
            stored += [c for c in DECODED_COLUMNS[name] if c not in stored]
        return stored

    def iter_tables(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """Stored (encoded) columns, one Table per row group, in manifest order."""
        stored = self.stored_columns(columns)
        for shard in self.manifest.shards:
            parquet = self.open_shard(shard)
            for group in range(parquet.num_row_groups):
                table = self.read_row_group(parquet, shard, group, stored)
                if table.num_rows or self.parent is None:  # a view skips the row groups it chose nothing from
                    yield table

    def iter_batches(self, columns: list[str] | None = None, format: str = "numpy") -> Iterator[dict[str, Any]]:
        """Decoded ragged batches, one per row group. ``format``: "numpy" or "torch".

        Keys (each only when its column was read): ``sequence_id`` list[str]; ``input_ids`` [N_tok] int32 with
        ``token_offsets`` [B+1]; per position ``topk_ids`` [N_pos, K] int32, ``topk_logprobs`` [N_pos, K]
        float32, ``tail_logmass`` / ``target_logprob`` [N_pos] float32 with ``position_offsets`` [B+1];
        ``sampled_ids`` / ``sampled_counts`` flat with ``sampled_offsets`` [N_pos+1]; the scores [B].
        """
        for table in self.iter_tables(columns):
            batch = StoredRows(self.codec, table).ragged()
            yield _to_torch(batch) if format == "torch" else batch

    def iter_sequences(self, columns: list[str] | None = None, format: str = "numpy") -> Iterator[dict[str, Any]]:
        """One dict per sequence: input_ids [T], topk_ids [T-1, K], topk_logprobs [T-1, K], ... (StoredRows.sample)."""
        for table in self.iter_tables(columns):
            rows = StoredRows(self.codec, table)
            for row in range(rows.num_rows):
                sample = rows.sample(row, decode_codes=True)
                del sample["index"]
                yield _to_torch(sample) if format == "torch" else sample


def _parquet_file(source: Any, shard: ShardInfo, metadata: pq.FileMetaData | None = None) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(source, metadata=metadata, page_checksum_verification=True)
    except KdstoreError:
        raise
    except (OSError, pa.ArrowException) as exc:
        raise ShardCorruptError(f"shard {shard.path} cannot be opened: {exc}") from None


def describe_schema(schema: pa.Schema) -> str:
    return "(" + ", ".join(f"{f.name}: {f.type}" for f in schema) + ")"


def _present(store: Store, name: str) -> bool:
    return all(c in store.manifest.columns for c in DECODED_COLUMNS[name])


def list_parts(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A list column -> (flat values, offsets [rows+1] starting at 0), zero-copy where possible."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = array.offsets.to_numpy()
    return array.flatten().to_numpy(), (offsets - offsets[0]).astype(np.int64)


class StoredRows:
    """The rows of one row group (a Parquet row group read, or a mapped Arrow record batch): the one row decoder.

    Holds zero-copy numpy views of the stored list columns; the loaders, ``iter_sequences``, ``iter_batches``
    and ``verify`` all cut rows out of these, and ``kdstore.codec`` decodes them.
    """

    # the stored columns with values per position, as sample() hands them to the collator
    POSITION_COLUMNS = ("topk_id_deltas", "topk_logprob_codes", "tail_logmass_codes", "target_logprob_codes")

    def __init__(self, codec: CodecConfig, batch: pa.RecordBatch | pa.Table, first_row: int = 0) -> None:
        self.codec, self.first_row, self.num_rows = codec, first_row, batch.num_rows
        self.sequence_ids = batch.column("sequence_id") if "sequence_id" in batch.column_names else None
        self.scores = {name: batch.column(name) for name in SCORE_COLUMNS if name in batch.column_names}
        self.parts = {name: list_parts(batch.column(name)) for name in batch.column_names
                      if pa.types.is_list(batch.schema.field(name).type)}
        # what sample() cuts, worked out once per row group rather than per sample (with the id decoding left to
        # the collator, sample() went from ~13 to ~3 us at K=64 on the bundled store):
        # (name in the sample, flat values, offsets, positions' width K or 0 for one value per position or token)
        widths = {"topk_id_deltas": codec.k, "topk_logprob_codes": codec.k}
        self._cuts = [(name, values, offsets, widths.get(name, 0)) for name, (values, offsets) in self.parts.items()
                      if not name.startswith("sampled_")]
        self._sampled = {name: part for name, part in self.parts.items() if name.startswith("sampled_")}

    def sample(self, row: int, decode_codes: bool = False) -> dict[str, Any]:
        """Row ``row`` as kdstore.collate takes it: ``index``, ``sequence_id``, the scores, ``input_ids`` [T] int32,
        per position the stored ``topk_id_deltas`` [P, K] uint32 and ``*_codes`` ([P, K] / [P]) as zero-copy views
        (the collator decodes them straight into its padded batch), and the sampled ids/counts/offsets decoded.
        With ``decode_codes`` (the store reader): ``topk_ids`` [P, K] int32 and float32 ``topk_logprobs`` [P, K],
        ``tail_logmass`` / ``target_logprob`` [P] instead of the stored columns."""
        out: dict[str, Any] = {"index": self.first_row + row}
        if self.sequence_ids is not None:
            out["sequence_id"] = self.sequence_ids[row].as_py()
        for name, column in self.scores.items():
            out[name] = column[row].as_py()
        for name, values, offsets, width in self._cuts:
            stored = values[offsets[row]:offsets[row + 1]]
            out[name] = stored.reshape(-1, width) if width else stored
        if decode_codes:
            out.update(decode_positions(self.codec, {name: out.pop(name) for name in self.POSITION_COLUMNS if name in out}))
        if self._sampled:
            out.update(decode_positions(self.codec, {name: values[offsets[row]:offsets[row + 1]]
                                                     for name, (values, offsets) in self._sampled.items()}))
        return out

    def ragged(self) -> dict[str, Any]:
        """All rows decoded at once, positions stacked (see ``Store.iter_batches`` for the keys)."""
        batch: dict[str, Any] = {}
        if self.sequence_ids is not None:
            batch["sequence_id"] = self.sequence_ids.to_pylist()
        batch.update({name: column.to_numpy(zero_copy_only=False).astype(np.float32) for name, column in self.scores.items()})
        for name, (values, offsets) in self.parts.items():
            if name == "input_ids":
                batch["input_ids"], batch["token_offsets"] = values, offsets
            elif name in ("topk_id_deltas", "topk_logprob_codes"):
                batch["position_offsets"] = offsets // self.codec.k
            elif name not in ("sampled_id_deltas", "sampled_counts"):
                batch["position_offsets"] = offsets
        batch.update(decode_positions(self.codec, {name: values for name, (values, _) in self.parts.items()
                                                   if name != "input_ids"}))
        return batch


def _to_torch(batch: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
