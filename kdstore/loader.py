"""Datasets that stream a store into any PyTorch trainer: memory-mapped or streamed, shuffled, partitioned, resumable.

    from kdstore.loader import MemoryMappedDataset, StreamingDataset, make_dataloader
    from kdstore.shuffle import PlanConfig

    plan = PlanConfig(batch_size=16, seed=0)
    loader = make_dataloader(MemoryMappedDataset("store"), plan, num_workers=2)   # local, random access
    loader = make_dataloader(StreamingDataset("s3://bucket/store", plan))       # any fsspec URL, no local copy
    for epoch in range(3):
        set_epoch(loader, epoch)
        for batch in loader:           # padded tensors (kdstore.collate); loader.state_dict() resumes exactly
            ...

Both datasets follow one epoch plan (kdstore.shuffle), so with the same store,
PlanConfig, rank and number of ranks they yield byte-identical batches;
``MemoryMappedDataset`` in batch order 0, 1, 2, ..., ``StreamingDataset`` with
W DataLoader workers in the order ``interleave_workers`` gives (the same
order when W <= 1). docs/loader.md has the details.

* ``MemoryMappedDataset`` reads a local uncompressed Arrow IPC copy of the
  store (made on first use, or by ``kdstore convert STORE --to arrow``) through
  ``mmap``: a sample is a few slices of the mapped file, and the pages it
  touched are handed back to the kernel every ``release_bytes`` so the
  process's RSS does not grow with the store.
* ``StreamingDataset`` reads Parquet row groups directly, locally or through
  fsspec, holding only the row groups of one or two consecutive shuffle windows.
* ``Sequences`` takes chosen rows of a ``MemoryMappedDataset``, each sequence
  its own shuffle group, so the batches do not depend on how the store was cut
  into row groups; ``batch_stream`` yields a loader's batches epoch after epoch.

Both read through ``kdstore.store.Store`` (local or fsspec): every byte they
serve was checked against the manifest's checksums, per Parquet row group or
per record batch of the Arrow copy (kdstore.arrow_copy), and every shard's
schema and footer against the manifest, before its values reach a batch.
"""

from __future__ import annotations

import bisect
import mmap
import os
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset, IterableDataset, Sampler, get_worker_info

from kdstore.arrow_copy import ArrowCopy, convert_to_arrow
from kdstore.collate import Collator
from kdstore.errors import (
    ChecksumError,
    EmptyStoreError,
    KdstoreError,
    ResumeError,
    ShardCorruptError,
    ShardMissingError,
)
from kdstore.shuffle import EpochPlan, PlanConfig, distributed_rank, worker_batches
from kdstore.store import Store, StoredRows, open_store

FAULT_AROUND_BYTES = 16 * mmap.PAGESIZE  # Linux maps up to fault_around_bytes (default 64 KiB) per fault
DEFAULT_RELEASE_BYTES = 16 << 20  # bytes mapped in (see _mapped_bytes) between MADV_DONTNEED calls: RSS stays ~flat


# -- the map-style dataset --------------------------------------------------
class MemoryMappedDataset(Dataset):
    """Random access by sequence index (store order) over the memory-mapped Arrow copy of a store.

    ``dataset[i]`` is one sample (kdstore.collate describes the keys); ``len(dataset)`` the number of
    sequences. Draw batches with ``EpochBatchSampler(dataset.group_sizes, plan)`` (``make_dataloader`` does).
    ``store``: a local path, a Store, or an fsspec URL with a local ``cache_dir``.
    """

    def __init__(self, store: str | os.PathLike[str] | Store, *, columns: list[str] | None = None,
                 cache_dir: str | os.PathLike[str] | None = None, student_tokenizer: Any = None,
                 allow_tokenizer_mismatch: bool = False, release_bytes: int = DEFAULT_RELEASE_BYTES,
                 storage_options: dict[str, Any] | None = None) -> None:
        self.store = _open_nonempty(store, storage_options)
        if student_tokenizer is not None:
            check_tokenizer(self.store, student_tokenizer, allow_tokenizer_mismatch)
        self.columns = self.store.stored_columns(columns)
        self.path = convert_to_arrow(self.store, cache_dir)
        self.release_bytes = release_bytes
        self._open()

    def _open(self) -> None:
        self._copy = ArrowCopy(self.store, self.path)  # schema and layout checked; contents on first touch
        self._map = self._copy.map
        batches = [b.select(self.columns) for b in self._copy.batches]
        self.group_sizes = [b.num_rows for b in batches]
        self._group_starts = np.cumsum([0] + self.group_sizes)
        if self._group_starts[-1] != self.store.manifest.num_sequences:
            raise ShardCorruptError(f"the Arrow copy {self.path} holds {self._group_starts[-1]} sequences, the manifest "
                                    f"{self.store.manifest.num_sequences}", hint=f"delete {self.path}; it is remade on next use")
        self._groups = [StoredRows(self.store.codec, b, int(s)) for b, s in zip(batches, self._group_starts)]
        self._group_pages = [_mapped_pages(b, self._copy.base) for b in self._copy.batches]
        # first row of each group as a list: bisect finds a sample's group in ~0.3 us, np.searchsorted in ~1.5
        self._first_rows = self._group_starts[:-1].tolist()
        self._num_sequences = int(self._group_starts[-1])
        # _mapped_bytes per row, per group, worked out when the group is first read (8 bytes a sequence; the
        # StoredRows offsets already hold 8 a list column)
        self._row_bytes: list[np.ndarray | None] = [None] * len(self._groups)
        # a group's rows share pages, so together they map at most its pages and a fault-around window either side
        self._group_caps = [length + 2 * FAULT_AROUND_BYTES for _, length in self._group_pages]
        self._touched: dict[int, int] = {}  # group -> bytes counted for it since the last release
        self._bytes_since_release = 0

    def __getstate__(self) -> dict[str, Any]:  # spawned workers map the file themselves
        return {k: v for k, v in self.__dict__.items() if k not in ("_map", "_groups", "_copy")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return int(self._group_starts[-1])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self._num_sequences:
            raise IndexError(f"sequence index {index} is outside 0..{self._num_sequences - 1}")
        group = bisect.bisect_right(self._first_rows, index) - 1
        rows, row = self._groups[group], index - self._first_rows[group]
        row_bytes = self._row_bytes[group]
        if row_bytes is None:
            row_bytes = self._row_bytes[group] = _mapped_bytes(rows)
        counted = self._touched.pop(group, 0)  # re-inserted below: the dict runs from least to most recently read
        if self._copy.check_batch(group):  # XXH3 of the whole batch, once per process: maps it all in
            now = self._group_caps[group]
        else:
            now = min(counted + int(row_bytes[row]), self._group_caps[group])
        sample = rows.sample(row)
        self._touched[group] = now
        self._bytes_since_release += now - counted
        if self._bytes_since_release >= self.release_bytes:
            # drop the pages of the least recently read groups (the page cache keeps them) until half the budget
            # is left: RSS stays flat over any store size, and the groups of the current shuffle window stay
            # mapped rather than faulted in again (bundled store: ~3 of ~24 us a sample went to releasing all)
            for touched in list(self._touched):
                self._map.madvise(mmap.MADV_DONTNEED, *self._group_pages[touched])
                self._bytes_since_release -= self._touched.pop(touched)
                if self._bytes_since_release <= self.release_bytes // 2:
                    break
        return sample


def _mapped_bytes(rows: StoredRows) -> np.ndarray:
    """Per row of ``rows``, about how many bytes of the mapping reading it adds to RSS (an upper bound, not just
    the bytes read), int64; worked out once per row group, not per sample (that was ~4 us of Python at K=64).

    A page fault maps up to 16 neighbouring pages (Linux fault-around): per list column the values slice plus
    one window where it straddles a window edge and one for the two offsets read; two for the sequence id.
    Counting only the bytes read let RSS grow ~2.4x past ``release_bytes`` (benchmarks/loader.py, K=64).
    """
    windows = 2 * len(rows.parts) + (2 if rows.sequence_ids is not None else 0)
    row_bytes = np.full(rows.num_rows, windows * FAULT_AROUND_BYTES, dtype=np.int64)
    for data, offsets in rows.parts.values():
        row_bytes += np.diff(offsets) * data.itemsize
    return row_bytes


def _mapped_pages(batch: pa.RecordBatch, base_address: int) -> tuple[int, int]:
    """(start, length) in the mapped file of the pages holding a record batch's buffers, start page-aligned."""
    spans = [(b.address, b.address + b.size) for column in batch.columns for b in column.buffers() if b is not None]
    start = (min(s for s, _ in spans) - base_address) // mmap.PAGESIZE * mmap.PAGESIZE
    return start, max(e for _, e in spans) - base_address - start


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of sequence indices for one rank of a MemoryMappedDataset, following kdstore.shuffle's plan.

    ``set_epoch(e)`` before each epoch reshuffles. Stateful: ``state_dict()`` / ``load_state_dict()``
    (torchdata's StatefulDataLoader calls them) resume after the last batch handed out.
    """

    def __init__(self, group_sizes: list[int], plan: PlanConfig, rank: int | None = None,
                 num_ranks: int | None = None) -> None:
        self.group_sizes, self.plan = list(group_sizes), plan
        self.rank, self.num_ranks = distributed_rank(rank, num_ranks)
        self.epoch, self._resume_at, self._yielded = 0, 0, 0
        self._num_batches = self._epoch_plan().num_batches  # validates eagerly

    def _epoch_plan(self) -> EpochPlan:
        return EpochPlan(self.group_sizes, self.plan, self.epoch, self.rank, self.num_ranks)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._num_batches

    def __iter__(self) -> Iterator[list[int]]:
        start, self._resume_at = self._resume_at, 0
        self._yielded = start
        return self._batches(self._epoch_plan(), start)

    def _batches(self, plan: EpochPlan, start: int) -> Iterator[list[int]]:
        for index in range(start, plan.num_batches):
            self._yielded = index + 1
            yield plan.batch_rows(index, index + 1)[0].tolist()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_yielded": self._yielded, **_plan_identity(self.plan, self.num_ranks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_identity(state, _plan_identity(self.plan, self.num_ranks))
        if state["batches_yielded"] < self._num_batches:  # a finished epoch restores nothing: set_epoch decides the next
            self.epoch, self._resume_at, self._yielded = state["epoch"], state["batches_yielded"], state["batches_yielded"]


def _plan_identity(plan: PlanConfig, num_ranks: int, **more: int) -> dict[str, Any]:
    return {"plan": [plan.batch_size, plan.shuffle, plan.seed, plan.drop_last, plan.shuffle_window, num_ranks],
            **more}


def _check_identity(state: dict[str, Any], expected: dict[str, Any]) -> None:
    for key, value in expected.items():
        if state.get(key) != value:
            raise ResumeError(f"the saved loader state has {key}={state.get(key)}, this run {value}")


class Sequences(Dataset):
    """The sequences ``rows`` of a dataset, each its own shuffle group (random access makes row groups moot)."""

    def __init__(self, dataset: MemoryMappedDataset, rows: np.ndarray) -> None:
        self.dataset, self.rows, self.store = dataset, rows, dataset.store
        self.group_sizes = [1] * len(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.dataset[int(self.rows[index])]


# -- the iterable dataset ---------------------------------------------------
class StreamingDataset(IterableDataset):
    """Streams Parquet row groups (local or fsspec URL) and yields lists of ``batch_size`` samples for this rank.

    Use with ``DataLoader(dataset, batch_size=None, collate_fn=Collator(...))`` (``make_dataloader`` does).
    Every rank yields ``len(dataset)`` batches per epoch; DataLoader worker w of W reads the contiguous
    block ``worker_batches(len, w, W)`` and holds only the row groups of one or two consecutive shuffle windows.
    A row group that cannot be read raises ShardCorruptError naming shard and row group; with
    ``skip_bad_row_groups=True`` it is skipped with a warning and its rows' places in a batch are
    filled by repeating the batch's readable rows, so every rank still yields the same number of batches.
    """

    def __init__(self, store: str | os.PathLike[str] | Store, plan: PlanConfig, *, columns: list[str] | None = None,
                 rank: int | None = None, num_ranks: int | None = None, student_tokenizer: Any = None,
                 allow_tokenizer_mismatch: bool = False, skip_bad_row_groups: bool = False,
                 storage_options: dict[str, Any] | None = None) -> None:
        self.store = _open_nonempty(store, storage_options)
        self.plan, self.skip_bad_row_groups = plan, skip_bad_row_groups
        if student_tokenizer is not None:
            check_tokenizer(self.store, student_tokenizer, allow_tokenizer_mismatch)
        self.columns = self.store.stored_columns(columns)
        self.rank, self.num_ranks = distributed_rank(rank, num_ranks)
        self._groups = self._row_group_index()  # [(shard index, row group, first row)]
        self.group_sizes = [int(n) for n in np.diff([g[2] for g in self._groups] + [self.store.manifest.num_sequences])]
        self._num_batches = EpochPlan(self.group_sizes, plan, 0, self.rank, self.num_ranks).num_batches
        self.epoch, self._resume_at, self._yielded = 0, 0, 0

    def _row_group_index(self) -> list[tuple[int, int, int]]:
        groups, first_row = [], 0
        for index, shard in enumerate(self.store.manifest.shards):
            sizes = self.store.row_group_sizes(index)  # a selection view: its chosen rows only
            if sum(sizes) != self.store.shard_counts(index)[0]:
                raise ShardCorruptError(f"shard {shard.path} holds {sum(sizes)} rows, the manifest says {shard.num_rows}")
            for group, size in enumerate(sizes):
                if size == 0:  # a view chose nothing here
                    continue
                groups.append((index, group, first_row))
                first_row += size
        return groups

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._num_batches

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        start, self._resume_at = self._resume_at, 0
        self._yielded = start
        plan = EpochPlan(self.group_sizes, self.plan, self.epoch, self.rank, self.num_ranks)
        return self._batches(plan, worker_batches(plan.num_batches, *self._worker()), start)

    def _batches(self, plan: EpochPlan, block: range, start: int) -> Iterator[list[dict[str, Any]]]:
        first_rows = np.array([g[2] for g in self._groups])
        loaded: dict[int, StoredRows | None] = {}  # None: unreadable, skipped
        files: dict[int, pq.ParquetFile] = {}  # open shards, so a footer is read once per window, not per row group
        chunk = max(1, plan.window // self.plan.batch_size)  # about one shuffle window of batches at a time
        # chunks are fixed relative to the block, so a resumed run fills skipped rows the same way
        for chunk_start in range(block.start + start // chunk * chunk, block.stop, chunk):
            rows = plan.batch_rows(chunk_start, min(chunk_start + chunk, block.stop))
            groups = np.searchsorted(first_rows, rows, side="right") - 1
            needed = set(np.unique(groups).tolist())
            for group in set(loaded) - needed:
                del loaded[group]
            for group in sorted(needed - set(loaded)):
                loaded[group] = self._load(group, files)
            for shard in list(files)[:-8]:  # keep the 8 most recently opened shards
                del files[shard]
            readable = np.array([loaded[g] is not None for g in groups.reshape(-1)]).reshape(groups.shape)
            spare = rows[readable]  # fills the places of skipped rows, in plan order
            for offset, (batch_rows, batch_groups) in enumerate(zip(rows, groups)):
                if chunk_start + offset < block.start + start:
                    continue
                if not readable[offset].all():
                    batch_rows, batch_groups = _fill_skipped(batch_rows, readable[offset], spare, first_rows)
                self._yielded += 1
                yield [loaded[g].sample(r - loaded[g].first_row) for r, g in zip(batch_rows, batch_groups)]

    def _load(self, group: int, files: dict[int, pq.ParquetFile]) -> StoredRows | None:
        shard_index, row_group, first_row = self._groups[group]
        shard_path = self.store.manifest.shards[shard_index].path
        try:
            if shard_index not in files:
                files[shard_index] = self.store.open_shard(shard_index)
            table = self.store.read_row_group(files[shard_index], shard_index, row_group, self.columns)
        except (ShardCorruptError, ShardMissingError, ChecksumError) as exc:
            if not self.skip_bad_row_groups:
                raise
            warnings.warn(f"skipping shard {shard_path} row group {row_group}: {exc}", stacklevel=2)
            return None
        return StoredRows(self.store.codec, table, first_row)

    def state_dict(self) -> dict[str, Any]:
        worker, num_workers = self._worker()
        return {"epoch": self.epoch, "batches_yielded": self._yielded,
                **_plan_identity(self.plan, self.num_ranks, worker=worker, num_workers=num_workers)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        worker, num_workers = self._worker()
        _check_identity(state, _plan_identity(self.plan, self.num_ranks, worker=worker, num_workers=num_workers))
        # in the main process a finished epoch restores nothing (set_epoch decides the next); a worker whose
        # block is done must stay done while the others finish (torchdata restarts finished loaders afresh)
        if get_worker_info() is not None or state["batches_yielded"] < self._num_batches:
            self.epoch, self._resume_at, self._yielded = state["epoch"], state["batches_yielded"], state["batches_yielded"]


def _fill_skipped(rows: np.ndarray, readable: np.ndarray, spare: np.ndarray,
                  first_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Replace a batch's unreadable rows by readable rows of the same shuffle window (cycling in plan order)."""
    if spare.size == 0:
        raise ShardCorruptError(f"every row of a shuffle window of {rows.size}+ rows lies in unreadable row groups",
                                hint="restore the damaged shards (`kdstore verify STORE` lists them)")
    filled = rows.copy()
    filled[~readable] = spare[np.arange((~readable).sum()) % spare.size]
    return filled, np.searchsorted(first_rows, filled, side="right") - 1


# -- rows and checks shared by both datasets -------------------------------
def _open_nonempty(store: str | os.PathLike[str] | Store, storage_options: dict[str, Any] | None) -> Store:
    opened = open_store(store, storage_options)
    if opened.manifest.num_sequences == 0:
        raise EmptyStoreError(f"store {opened.location} has no sequences")
    return opened


def check_tokenizer(store: Store, student_tokenizer: Any, allow_mismatch: bool = False) -> None:
    """Refuse a student tokenizer (a local folder or a tokenizer object) whose ids do not mean the store's tokens:
    TokenizerMismatchError with the ``kdstore check`` verdict (kdstore.vocab), a warning when ``allow_mismatch``."""
    from kdstore.vocab import compare_vocab, require_compatible

    require_compatible(compare_vocab(store, student_tokenizer), allow_mismatch, stacklevel=3)


# -- wiring -----------------------------------------------------------------
def make_dataloader(dataset: MemoryMappedDataset | StreamingDataset, plan: PlanConfig | None = None, *,
                    collator: Collator | None = None, num_workers: int = 0, rank: int | None = None,
                    num_ranks: int | None = None, **loader_args: Any) -> Any:
    """A torchdata StatefulDataLoader over either dataset, collating with ``collator`` (default: compact codes).

    For a MemoryMappedDataset pass ``plan`` (and rank / num_ranks, else torch.distributed or RANK /
    WORLD_SIZE); a StreamingDataset carries its own. ``loader_args`` go to the DataLoader (pin_memory, ...).
    """
    from torchdata.stateful_dataloader import StatefulDataLoader

    collator = collator or Collator(dataset.store.codec)
    common = {"collate_fn": collator, "num_workers": num_workers, "persistent_workers": False, **loader_args}
    if isinstance(dataset, StreamingDataset):
        # workers get a fresh copy of the dataset (and so its epoch) at each iter()
        batching = {"batch_size": None}
    elif plan is None:
        raise KdstoreError("a MemoryMappedDataset needs a PlanConfig", hint="pass plan=PlanConfig(batch_size=...)")
    else:
        batching = {"batch_sampler": EpochBatchSampler(dataset.group_sizes, plan, rank, num_ranks)}
    with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated in torch 2.13: noise
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
        return StatefulDataLoader(dataset, **batching, **common)


def set_epoch(loader: Any, epoch: int) -> None:
    """Reshuffle for ``epoch``: sets it on the loader's batch sampler and dataset, where they take one."""
    for part in (getattr(loader, "batch_sampler", None), loader.dataset):
        if hasattr(part, "set_epoch"):
            part.set_epoch(epoch)


def batch_stream(loader: Any, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
    """The loader's batches from ``epoch`` on, epoch after epoch, reshuffled each time."""
    while True:
        set_epoch(loader, epoch)
        yield from loader
        epoch += 1


__all__ = ["EpochBatchSampler", "MemoryMappedDataset", "Sequences", "StreamingDataset", "batch_stream",
           "check_tokenizer", "make_dataloader", "set_epoch"]
