"""The Arrow copy: a local, uncompressed Arrow IPC file of a store that MemoryMappedDataset maps, checked before use.

    path = convert_to_arrow("store")                              # STORE/_cache/arrow/store-<fingerprint>.arrow
    path = convert_to_arrow("s3://bucket/store", "/scratch/kd")   # a remote store needs a local cache_dir
    copy = ArrowCopy(store, path)                                 # mapped; schema and layout checked
    copy.check_batch(3)                                           # hash of record batch 3, once per process
    # or on the command line: kdstore convert STORE --to arrow [--cache-dir DIR]

One record batch per Parquet row group, the stored columns as they are
(delta-coded ids, log-prob codes), so a sample is a few slices of the mapped
file. Its name is a fingerprint of the manifest (identity and shard list): a
rebuilt or edited store gets a new copy and the old one is deleted. The rows
are read through ``Store.open_shard``, so every byte copied was checked
against the manifest's checksums on the way.

Next to the copy, ``<copy>.sums.json`` records the fingerprint, the file's
size and, per record batch, its rows, the place and size of every buffer in
the file, its null counts and the XXH3-128 hash of the bytes those buffers
span. ``ArrowCopy`` compares the schema and every batch's layout with the
sidecar when it maps the file (a damaged header moves buffers) and a batch's
hash the first time a sample of it is read, before its values reach a batch.
A copy whose sidecar is missing, unreadable or stale is made again; a copy
that fails a check raises ArrowCopyError.

Why XXH3 and not sha256, as for the shards: the copy is a local cache, made
from verified shards, and what can damage it (a disk, a crash, a stale or
misplaced file) is caught by any strong checksum; whoever can forge the copy
can rewrite its sidecar too, so a cryptographic hash adds no protection. The
memory-mapped loader reads ~1 GB/s of the copy on one core; sha256 runs at
~2 GB/s here and would slow the first pass over a store by about half,
XXH3-128 at ~27 GB/s costs a few percent (benchmarks/loader.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import xxhash

from kdstore.errors import ArrowCopyError, KdstoreError, StorageError
from kdstore.format import Manifest
from kdstore.store import Store, open_store
from kdstore.writer import temporary_name

CACHE_DIR = "_cache/arrow"  # under the store folder
SIDECAR_SUFFIX = ".sums.json"
LOCK_NAME = ".lock"  # in the copy's folder: concurrent ranks convert one at a time


def store_fingerprint(manifest: Manifest) -> str:
    """Changes whenever the manifest's identity, columns or shards change: names the Arrow copy."""
    shards = [[s.path, s.sha256, s.footer_sha256, s.row_group_sha256] for s in manifest.shards]
    chosen = [manifest.view["selection"]["sha256"]] if manifest.view else []  # a view: its chosen sequences
    text = json.dumps([manifest.identity(), manifest.columns, shards, *chosen], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def copy_path(store: Store, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the Arrow copy of ``store`` lives (it may not exist yet)."""
    if cache_dir is None and store.local_root is None:
        raise KdstoreError(f"{store.location} is remote; its Arrow copy needs a local cache_dir",
                           hint="pass cache_dir=... (--cache-dir), a local folder, or use StreamingDataset")
    folder = Path(cache_dir) if cache_dir is not None else store.local_root / CACHE_DIR
    return folder / f"store-{store_fingerprint(store.manifest)}.arrow"


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def convert_to_arrow(store: str | os.PathLike[str] | Store, cache_dir: str | os.PathLike[str] | None = None,
                     storage_options: dict[str, Any] | None = None) -> Path:
    """Write (once) the uncompressed Arrow IPC copy that MemoryMappedDataset maps; return its path.

    ``store``: a local path, an fsspec URL (then ``cache_dir``, a local folder, is required; fsspec
    options such as ``endpoint_url`` go in ``storage_options``) or a Store. Written under a unique
    temporary name then renamed, under a lock so concurrent ranks convert once; copies of older
    manifests in the folder are removed.
    """
    store = open_store(store, storage_options)
    path = copy_path(store, cache_dir)
    if _usable(store, path):
        return path
    made = _missing(path.parent / LOCK_NAME)
    try:
        _convert_under_lock(store, path)
    except BaseException as exc:
        _remove(made)  # a failed first conversion (a damaged shard, Ctrl-C) leaves no _cache folder behind
        if isinstance(exc, OSError):  # a cache_dir inside a file, a read-only or full disk
            raise StorageError(f"cannot write the Arrow copy in {path.parent}: {exc.strerror or exc}",
                               hint="pass cache_dir=... (--cache-dir), a local folder you can write to with room "
                                    "for the copy") from None
        raise
    return path


def _convert_under_lock(store: Store, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / LOCK_NAME, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not _usable(store, path):
            _write_arrow_copy(store, path)
            for stale in path.parent.glob("store-*.arrow*"):
                if stale not in (path, sidecar_path(path)) and not stale.name.endswith(".tmp"):
                    stale.unlink(missing_ok=True)


def _missing(lock: Path) -> list[Path]:
    """The lock file and the folders above it that do not exist yet, deepest first."""
    return [p for p in (lock, *lock.parents) if not p.exists()]


def _remove(made: list[Path]) -> None:
    """Remove what ``_missing`` listed, deepest first, stopping at a folder that another process has written into."""
    for item in made:
        try:
            if item.is_dir():
                item.rmdir()
            else:
                item.unlink(missing_ok=True)
        except OSError:
            return


def _usable(store: Store, path: Path) -> bool:
    """The copy and its sidecar are there, agree on size and fingerprint, and map with the recorded layout."""
    try:
        ArrowCopy(store, path).close()
        return True
    except (ArrowCopyError, OSError):
        return False


def _write_arrow_copy(store: Store, path: Path) -> None:
    tmp, sums_tmp = temporary_name(path), temporary_name(sidecar_path(path))
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, store.schema) as writer:
            for table in store.iter_tables():
                writer.write_batch(table.combine_chunks().to_batches()[0])
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            batches = _mapped_batches(mapped)
            base = pa.py_buffer(mapped).address
            sums = {"fingerprint": store_fingerprint(store.manifest), "num_bytes": len(mapped),
                    "batches": [{**_layout(b, base), "xxh3_128": _digest(_span(mapped, b, base))} for b in batches]}
            del batches
        finally:
            mapped.close()
        with open(sums_tmp, "w") as handle:
            json.dump(sums, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(sums_tmp, sidecar_path(path))  # the sidecar first: a copy is never there without its sums
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        sums_tmp.unlink(missing_ok=True)


def _digest(data: memoryview) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def _mapped_batches(mapped: mmap.mmap) -> list[pa.RecordBatch]:
    reader = pa.ipc.open_file(pa.py_buffer(mapped))
    return [reader.get_batch(i) for i in range(reader.num_record_batches)]


def _buffers(batch: pa.RecordBatch) -> list[pa.Buffer | None]:
    return [b for column in batch.columns for b in column.buffers()]


def _layout(batch: pa.RecordBatch, base: int) -> dict[str, Any]:
    """Rows, null counts and (offset, size) in the file of every buffer: what a damaged header would change."""
    return {"num_rows": batch.num_rows, "null_counts": [c.null_count for c in batch.columns],
            "buffers": [[b.address - base, b.size] if b is not None else None for b in _buffers(batch)]}


def _span(mapped: mmap.mmap, batch: pa.RecordBatch, base: int) -> memoryview:
    """The bytes of the file from a batch's first buffer to the end of its last."""
    start, end = batch_span(batch, base)
    return memoryview(mapped)[start:end]


def batch_span(batch: pa.RecordBatch, base: int) -> tuple[int, int]:
    spans = [(b.address - base, b.address - base + b.size) for b in _buffers(batch) if b is not None and b.size]
    return (min(s for s, _ in spans), max(e for _, e in spans)) if spans else (0, 0)


def _read_sidecar(path: Path) -> dict[str, Any]:
    """The sidecar of the copy at ``path``, its shape checked: ArrowCopyError when missing or damaged."""
    try:
        sums = json.loads(sidecar_path(path).read_text())
        valid = (isinstance(sums["fingerprint"], str) and isinstance(sums["num_bytes"], int)
                 and all(isinstance(b["xxh3_128"], str) and isinstance(b["num_rows"], int)
                         and isinstance(b["null_counts"], list) and isinstance(b["buffers"], list) for b in sums["batches"]))
    except (OSError, ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        raise ArrowCopyError(f"the Arrow copy {path} has no readable {SIDECAR_SUFFIX} sidecar")
    return sums


class ArrowCopy:
    """The Arrow copy at ``path`` mapped read-only, its structure checked against its sidecar.

    ``batches``: the record batches (zero-copy views of the mapping); ``check_batch(i)`` compares batch i's
    bytes with its recorded hash the first time it is called in this process.
    """

    def __init__(self, store: Store, path: Path) -> None:
        self.path = path
        sums = _read_sidecar(path)
        expected = (sums["fingerprint"], sums["num_bytes"], len(sums["batches"]))
        with open(path, "rb") as handle:
            self.map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._check(store, sums, expected)
        except BaseException:
            self.close()
            raise

    def _check(self, store: Store, sums: dict[str, Any], expected: tuple[str, int, int]) -> None:
        if expected[:2] != (store_fingerprint(store.manifest), len(self.map)):
            raise ArrowCopyError(f"the Arrow copy {self.path} was made for another manifest or has changed size")
        try:
            reader = pa.ipc.open_file(pa.py_buffer(self.map))
            if not reader.schema.equals(store.schema, check_metadata=False) or reader.num_record_batches != expected[2]:
                raise ArrowCopyError(f"the Arrow copy {self.path} has a schema or batch count other than its sidecar's")
            self.batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        except (OSError, pa.ArrowException) as exc:
            raise ArrowCopyError(f"the Arrow copy {self.path} cannot be read: {exc}") from None
        self.base = pa.py_buffer(self.map).address
        self._digests = [entry["xxh3_128"] for entry in sums["batches"]]
        for index, (batch, entry) in enumerate(zip(self.batches, sums["batches"])):
            if _layout(batch, self.base) != {k: entry.get(k) for k in ("num_rows", "null_counts", "buffers")}:
                raise ArrowCopyError(f"the Arrow copy {self.path}: record batch {index} is not laid out as its sidecar says")
        self._checked: set[int] = set()

    def check_batch(self, index: int) -> bool:
        """Raise ArrowCopyError unless record batch ``index``'s bytes match their hash; True when it hashed them now.

        Each batch is hashed once per process (the first time it is touched)."""
        if index in self._checked:
            return False
        if _digest(_span(self.map, self.batches[index], self.base)) != self._digests[index]:
            raise ArrowCopyError(f"the Arrow copy {self.path}: record batch {index} does not match its checksum")
        self._checked.add(index)
        return True

    def check_all(self) -> None:
        for index in range(len(self.batches)):
            self.check_batch(index)

    def close(self) -> None:
        self.batches = []
        try:
            self.map.close()
        except BufferError:  # views of it are still alive somewhere: the mapping goes with them
            pass


__all__ = ["CACHE_DIR", "ArrowCopy", "convert_to_arrow", "copy_path", "sidecar_path", "store_fingerprint"]
