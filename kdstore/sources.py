"""Where a loader's rows come from: a store opened locally or through fsspec, checked, read row group by row group.

    source = load_store("s3://bucket/store", {"endpoint_url": ...})   # or a local path, or a Store
    parquet = source.open_parquet(0)                                  # shard 0 of the manifest
    rows = RowGroup(source.store.codec, read_row_group(parquet, "shards/...", 0, None), first_row=0)
    sample = rows.sample(3)                                           # one sequence, ids decoded

Both datasets of kdstore.loader and the Arrow copy (kdstore.arrow_copy) read
through here, so a missing shard, an unreadable row group, an empty store and
a student tokenizer other than the store's are refused the same way everywhere.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kdstore.codec import CodecConfig, decode_positions
from kdstore.errors import (
    EmptyStoreError,
    ShardCorruptError,
    ShardMissingError,
    StoreNotFoundError,
    TokenizerMismatchError,
)
from kdstore.format import MANIFEST_NAME, Manifest, safe_relative_path
from kdstore.store import Store, list_parts, open_store


@dataclass
class StoreSource:
    """An opened store and where its files are: a local folder, or an fsspec URL and its storage options."""

    store: Store
    location: str
    storage_options: dict[str, Any] | None = None  # None: a local folder
    fs_root: str = ""  # the store's folder inside ``fs``
    _fs: tuple[int, Any] | None = field(default=None, repr=False, compare=False)  # (pid that made it, filesystem)

    @property
    def fs(self) -> Any:
        """The fsspec filesystem (None for a local store), made once per process.

        A forked DataLoader worker must not use its parent's: fsspec's async filesystems (s3fs, gcsfs)
        raise "This class is not fork-safe" there (tests/integration/test_remote.py met it).
        """
        if self.storage_options is None:
            return None
        if self._fs is None or self._fs[0] != os.getpid():
            import fsspec

            self._fs = (os.getpid(), fsspec.core.url_to_fs(self.location, **self.storage_options)[0])
        return self._fs[1]

    def __getstate__(self) -> dict[str, Any]:  # a spawned worker makes its own filesystem too
        return {**self.__dict__, "_fs": None}

    def shard_url(self, index: int) -> str:
        """Path of shard ``index`` inside ``fs`` (remote stores only)."""
        return f"{self.fs_root}/{safe_relative_path(self.store.manifest.shards[index].path)}"

    def open_parquet(self, index: int) -> pq.ParquetFile:
        """Shard ``index`` of the manifest as a ParquetFile (page checksums on)."""
        shard = self.store.manifest.shards[index]
        if self.fs is None:
            return self.store.open_shard(shard)
        try:
            handle = self.fs.open(self.shard_url(index), "rb")
            return pq.ParquetFile(handle, page_checksum_verification=True)
        except FileNotFoundError:
            raise ShardMissingError(f"shard {shard.path} listed in the manifest is missing from {self.location}") from None
        except (OSError, pa.ArrowException) as exc:
            raise ShardCorruptError(f"shard {shard.path} cannot be opened: {exc}") from None


def load_store(store: str | os.PathLike[str] | Store, storage_options: dict[str, Any] | None = None) -> StoreSource:
    """A local path or an fsspec URL (``s3://``, ``gs://``, ``file://``, ...) -> StoreSource; refuses an empty store."""
    if isinstance(store, Store):
        source = StoreSource(store, str(store.root))
    elif "://" in str(store):
        import fsspec

        options = dict(storage_options or {})
        fs, root = fsspec.core.url_to_fs(str(store), **options)
        root = root.rstrip("/")
        try:
            text = fs.cat_file(f"{root}/{MANIFEST_NAME}").decode()
        except FileNotFoundError:
            raise StoreNotFoundError(f"{store} is not a kdstore store: it has no {MANIFEST_NAME}") from None
        manifest = Manifest.from_json(text, f"{store}/{MANIFEST_NAME}")
        source = StoreSource(Store(Path(root), manifest), str(store), options, root, (os.getpid(), fs))
    else:
        source = StoreSource(open_store(store), str(store))
    if source.store.manifest.num_sequences == 0:
        raise EmptyStoreError(f"store {source.location} has no sequences")
    return source


def check_tokenizer(store: Store, student_tokenizer: Any, allow_mismatch: bool = False) -> None:
    """Refuse a student tokenizer (a folder, hub id or tokenizer object) whose files hash differs from the store's."""
    from transformers import AutoTokenizer

    from kdstore.build import tokenizer_info  # the same hash the build recorded

    tokenizer = student_tokenizer
    if isinstance(student_tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(student_tokenizer)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        student = tokenizer_info(tokenizer, Path(scratch))
    recorded = store.manifest.tokenizer
    if recorded.get("files_sha256") == student["files_sha256"]:
        return
    name = str(student_tokenizer) if isinstance(student_tokenizer, (str, os.PathLike)) else student["name"]
    message = (f"the store was made with tokenizer {recorded.get('name')!r} (files sha256 "
               f"{str(recorded.get('files_sha256'))[:12]}), the student tokenizer {name!r} has {student['files_sha256'][:12]}")
    if not allow_mismatch:
        raise TokenizerMismatchError(message)
    warnings.warn(f"{message}; going on because allow_tokenizer_mismatch=True", stacklevel=3)


def read_row_group(parquet: pq.ParquetFile, shard_path: str, group: int, columns: list[str] | None) -> pa.Table:
    """Row group ``group`` of an opened shard; a damaged one is a ShardCorruptError naming shard and row group."""
    try:
        return parquet.read_row_group(group, columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise ShardCorruptError(f"shard {shard_path} row group {group} cannot be read: {exc}") from None


class RowGroup:
    """The rows of one row group (a Parquet row group read, or a mapped Arrow record batch) as samples.

    Holds zero-copy numpy views of the list columns; ``sample`` slices them and decodes the top-K ids.
    """

    def __init__(self, codec: CodecConfig, batch: pa.RecordBatch | pa.Table, first_row: int) -> None:
        self.codec, self.first_row, self.num_rows = codec, first_row, batch.num_rows
        self.sequence_ids = batch.column("sequence_id") if "sequence_id" in batch.column_names else None
        self.parts = {name: list_parts(batch.column(name)) for name in batch.column_names
                      if pa.types.is_list(batch.schema.field(name).type)}

    def sample(self, row: int) -> dict[str, Any]:
        """Row ``row`` of the group: input_ids [T] int32, topk_ids [P, K] int32, the *_codes columns, index, ..."""
        out: dict[str, Any] = {"index": self.first_row + row}
        if self.sequence_ids is not None:
            out["sequence_id"] = self.sequence_ids[row].as_py()
        stored = {name: values[offsets[row]:offsets[row + 1]] for name, (values, offsets) in self.parts.items()}
        codes = {name: stored.pop(name) for name in list(stored) if name.endswith("_codes")}  # left to the collator
        if "topk_logprob_codes" in codes:
            codes["topk_logprob_codes"] = codes["topk_logprob_codes"].reshape(-1, self.codec.k)
        if "input_ids" in stored:
            out["input_ids"] = stored.pop("input_ids")
        out.update(codes)
        out.update(decode_positions(self.codec, stored))  # topk_ids [P, K] int32; sampled ids and counts
        return out


__all__ = ["EmptyStoreError", "RowGroup", "StoreSource", "TokenizerMismatchError", "check_tokenizer", "load_store",
           "read_row_group"]
