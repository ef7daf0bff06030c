"""Open a store, read it back (Arrow, numpy or torch, with column projection), verify it.

    store = kdstore.open_store("store")
    for batch in store.iter_batches(columns=["input_ids", "topk_ids", "topk_logprobs"]):
        ...                     # one row group: ragged arrays + offsets
    problems = store.verify()   # [] when every check passes

A decoded batch is "ragged": all positions of its sequences stacked, with
offsets saying where each sequence starts (docs/format.md lists the keys).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
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
    StoreNotFoundError,
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
    logits_schema,
    safe_relative_path,
    sha256_file,
)

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


def open_store(path: str | os.PathLike[str]) -> Store:
    """Open the store at ``path`` (a folder holding ``manifest.json``)."""
    root = Path(path)
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        if not root.exists():
            raise StoreNotFoundError(f"no store at {root}: the folder does not exist")
        records = list((root / PARTITION_DIR).glob("part-*.json"))
        if records or (root / "shards").is_dir():
            raise StoreNotFoundError(
                f"{root} holds an unfinished store ({len(records)} partition(s) finished, no manifest yet)",
                hint="rerun the build to resume it, or finish the missing partitions",
            )
        raise StoreNotFoundError(f"{root} is not a kdstore store: it has no {MANIFEST_NAME}")
    return Store(root, Manifest.from_json(manifest_path.read_text(), str(manifest_path)))


@dataclass
class Store:
    root: Path
    manifest: Manifest

    def __post_init__(self) -> None:
        if self.manifest.table != TABLE_LOGITS:
            raise ManifestError(f"{self.root} is a {self.manifest.table!r} store; "
                                "only 'logits' stores can be read in this version")
        self.codec: CodecConfig = self.manifest.codec_config()
        scores = tuple(c for c in self.manifest.columns if c in SCORE_COLUMNS)
        self.schema = logits_schema(self.codec, scores)
        if list(self.schema.names) != list(self.manifest.columns):
            raise ManifestError(f"manifest columns {self.manifest.columns} do not match its codec {self.schema.names}")

    @property
    def tokenizer_path(self) -> Path | None:
        path = self.root / TOKENIZER_DIR
        return path if path.is_dir() else None

    def summary(self) -> dict[str, Any]:
        """What ``kdstore info`` prints."""
        m = self.manifest
        return {
            "path": str(self.root),
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
            "bytes_per_token": round(m.total_bytes / m.num_tokens, 2) if m.num_tokens else None,
            "num_shards": len(m.shards),
            "num_partitions": m.num_partitions,
            "created_at": m.created_at,
            "kdstore_version": m.kdstore_version,
        }

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

    def open_shard(self, shard: ShardInfo) -> pq.ParquetFile:
        path = self.root / safe_relative_path(shard.path)
        if not path.is_file():
            raise ShardMissingError(f"shard {shard.path} listed in the manifest is missing from {self.root}")
        try:
            return pq.ParquetFile(path, page_checksum_verification=True)
        except (OSError, pa.ArrowException) as exc:
            raise ShardCorruptError(f"shard {shard.path} cannot be opened: {exc}") from None

    def iter_tables(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """Stored (encoded) columns, one Table per row group, in manifest order."""
        stored = self.stored_columns(columns)
        for shard in self.manifest.shards:
            parquet = self.open_shard(shard)
            for group in range(parquet.num_row_groups):
                try:
                    yield parquet.read_row_group(group, columns=stored)
                except (OSError, pa.ArrowException) as exc:
                    raise ShardCorruptError(f"shard {shard.path} row group {group} cannot be read: {exc}") from None

    def iter_batches(self, columns: list[str] | None = None, format: str = "numpy") -> Iterator[dict[str, Any]]:
        """Decoded ragged batches, one per row group. ``format``: "numpy" or "torch"."""
        for table in self.iter_tables(columns):
            batch = decode_table(self.codec, table)
            yield _to_torch(batch) if format == "torch" else batch

    def iter_sequences(self, columns: list[str] | None = None, format: str = "numpy") -> Iterator[dict[str, Any]]:
        """One dict per sequence: input_ids [T], topk_ids [T-1, K], topk_logprobs [T-1, K], ..."""
        for batch in self.iter_batches(columns, format):
            yield from split_batch(batch)

    def verify(self) -> list[str]:
        """Check every shard fully; return every problem found (empty list: the store is sound)."""
        from kdstore.verify import verify_store  # the checks live in their own module

        return verify_store(self)


def _present(store: Store, name: str) -> bool:
    return all(c in store.manifest.columns for c in DECODED_COLUMNS[name])


def list_parts(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A list column -> (flat values, offsets [rows+1] starting at 0), zero-copy where possible."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = array.offsets.to_numpy()
    return array.flatten().to_numpy(), (offsets - offsets[0]).astype(np.int64)


def decode_table(codec: CodecConfig, table: pa.Table) -> dict[str, Any]:
    """Stored columns of some rows -> a ragged batch of decoded arrays.

    Keys (each only when its column was read): ``sequence_id`` list[str];
    ``input_ids`` [N_tok] int32 with ``token_offsets`` [B+1]; per position
    ``topk_ids`` [N_pos, K] int32, ``topk_logprobs`` [N_pos, K] float32,
    ``tail_logmass`` / ``target_logprob`` [N_pos] float32 with
    ``position_offsets`` [B+1]; ``sampled_ids`` / ``sampled_counts`` flat with
    ``sampled_offsets`` [N_pos+1]; ``teacher_score`` / ``reference_score`` [B].
    """
    batch: dict[str, Any] = {}
    columns: dict[str, np.ndarray] = {}
    for name in table.column_names:
        column = table[name]
        if name == "sequence_id":
            batch[name] = column.to_pylist()
        elif name in SCORE_COLUMNS:
            batch[name] = column.to_numpy(zero_copy_only=False).astype(np.float32)
        else:
            values, offsets = list_parts(column)
            if name == "input_ids":
                batch["input_ids"], batch["token_offsets"] = values, offsets
            else:
                columns[name] = values
                if name == "topk_id_deltas" or name == "topk_logprob_codes":
                    batch["position_offsets"] = offsets // codec.k
                elif name != "sampled_id_deltas" and name != "sampled_counts":
                    batch["position_offsets"] = offsets
    batch.update(decode_positions(codec, columns))
    return batch


def split_batch(batch: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A ragged batch -> one dict per sequence (views, no copies)."""
    token_offsets = batch.get("token_offsets")
    position_offsets = batch.get("position_offsets")
    for row in range(_num_rows(batch)):
        item: dict[str, Any] = {}
        for key, value in batch.items():
            if key.endswith("_offsets"):
                continue
            if key in ("sequence_id", *SCORE_COLUMNS):
                item[key] = value[row]
            elif key == "input_ids":
                item[key] = value[token_offsets[row]:token_offsets[row + 1]]
            elif key in ("sampled_ids", "sampled_counts"):
                starts = batch["sampled_offsets"]
                lo, hi = position_offsets[row], position_offsets[row + 1]
                item[key] = value[starts[lo]:starts[hi]]
                item["sampled_offsets"] = starts[lo:hi + 1] - starts[lo]
            else:
                item[key] = value[position_offsets[row]:position_offsets[row + 1]]
        yield item


def _num_rows(batch: dict[str, Any]) -> int:
    for key in ("token_offsets", "position_offsets"):
        if key in batch:
            return len(batch[key]) - 1
    for key in ("sequence_id", *SCORE_COLUMNS):
        if key in batch:
            return len(batch[key])
    return 0


def _to_torch(batch: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def shard_essentials(store: Store, shard: ShardInfo) -> dict[str, Any]:
    """The kdstore key-value metadata of one shard's footer."""
    metadata = store.open_shard(shard).schema_arrow.metadata or {}
    if METADATA_KEY not in metadata:
        raise SchemaError(f"shard {shard.path} has no kdstore metadata in its footer")
    return json.loads(metadata[METADATA_KEY])


def check_shard_file(store: Store, shard: ShardInfo) -> None:
    """Size and sha256 of one shard against the manifest; raises on the first mismatch."""
    path = store.root / safe_relative_path(shard.path)
    if not path.is_file():
        raise ShardMissingError(f"shard {shard.path} listed in the manifest is missing from {store.root}")
    size = path.stat().st_size
    if size != shard.num_bytes:
        raise ChecksumError(f"shard {shard.path} has {size} bytes; the manifest says {shard.num_bytes} (truncated or replaced)")
    if sha256_file(path) != shard.sha256:
        raise ChecksumError(f"shard {shard.path} does not match its sha256 in the manifest")
