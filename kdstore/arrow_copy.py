"""The Arrow copy: a local, uncompressed Arrow IPC file of a store that MemoryMappedDataset maps.

    path = convert_to_arrow("store")                              # STORE/_cache/arrow/store-<fingerprint>.arrow
    path = convert_to_arrow("s3://bucket/store", "/scratch/kd")   # a remote store needs a local cache_dir
    # or on the command line: kdstore convert STORE --to arrow [--cache-dir DIR]

One record batch per Parquet row group, the stored columns as they are
(delta-coded ids, log-prob codes), so a sample is a few slices of the mapped
file. Its name is a fingerprint of the manifest's shard list: a rebuilt store
gets a new copy and the old one is deleted. Every shard is checked against its
size and sha256 in the manifest before it is copied; a remote shard is
downloaded to a temporary local file for that check, then copied from there.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kdstore.errors import KdstoreError, ShardMissingError
from kdstore.format import Manifest, safe_relative_path
from kdstore.sources import StoreSource, load_store, read_row_group
from kdstore.store import Store, check_shard_file

CACHE_DIR = "_cache/arrow"  # under the store folder


def store_fingerprint(manifest: Manifest) -> str:
    """Changes whenever a shard or the column set changes: names the Arrow copy."""
    text = json.dumps([manifest.columns, [(s.path, s.sha256) for s in manifest.shards]])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def convert_to_arrow(store: str | os.PathLike[str] | Store | StoreSource,
                     cache_dir: str | os.PathLike[str] | None = None,
                     storage_options: dict[str, Any] | None = None) -> Path:
    """Write (once) the uncompressed Arrow IPC copy that MemoryMappedDataset maps; return its path.

    ``store``: a local path, an fsspec URL (then ``cache_dir``, a local folder, is required; fsspec
    options such as ``endpoint_url`` go in ``storage_options``), a Store or a StoreSource. Written as
    ``<name>.tmp-<pid>`` then renamed, under a lock so concurrent ranks convert once; copies of older
    manifests in the folder are removed.
    """
    source = store if isinstance(store, StoreSource) else load_store(store, storage_options)
    if source.fs is not None and cache_dir is None:
        raise KdstoreError(f"{source.location} is remote; its Arrow copy needs a local cache_dir",
                           hint="pass cache_dir=... (a local folder), or use StreamingDataset")
    folder = Path(cache_dir) if cache_dir is not None else source.store.root / CACHE_DIR
    path = folder / f"store-{store_fingerprint(source.store.manifest)}.arrow"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not path.is_file():
            _write_arrow_copy(source, path)
            for stale in folder.glob("store-*.arrow"):
                if stale != path:
                    stale.unlink(missing_ok=True)
    return path


def _write_arrow_copy(source: StoreSource, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    downloads = path.with_name(f"downloads.tmp-{os.getpid()}")  # remote shards, one at a time
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, source.store.schema) as writer:
            for index, shard in enumerate(source.store.manifest.shards):
                parquet = _checked_shard(source, index, downloads)
                for group in range(parquet.num_row_groups):
                    table = read_row_group(parquet, shard.path, group, None)
                    writer.write_batch(table.combine_chunks().to_batches()[0])
                parquet.close()
                shutil.rmtree(downloads, ignore_errors=True)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        shutil.rmtree(downloads, ignore_errors=True)


def _checked_shard(source: StoreSource, index: int, downloads: Path) -> pq.ParquetFile:
    """Shard ``index`` opened from a local file whose size and sha256 match the manifest (remote: downloaded first)."""
    shard = source.store.manifest.shards[index]
    if source.fs is None:
        check_shard_file(source.store, shard)
        return source.store.open_shard(shard)
    local = Store(downloads, source.store.manifest)
    target = downloads / safe_relative_path(shard.path)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        source.fs.get_file(source.shard_url(index), str(target))
    except FileNotFoundError:
        raise ShardMissingError(f"shard {shard.path} listed in the manifest is missing from {source.location}") from None
    check_shard_file(local, shard)
    return local.open_shard(shard)


__all__ = ["CACHE_DIR", "convert_to_arrow", "store_fingerprint"]
