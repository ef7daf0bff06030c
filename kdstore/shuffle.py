"""Epoch plans: which sequences each rank and DataLoader worker reads, and in which order.

Everything here is a pure function of (rows per row group, seed, epoch) and the
partition (ranks, batch size, drop_last), so every process computes the same
plan without talking to the others, and a resumed run recomputes it exactly.

One epoch, step by step (docs/loader.md draws it):

1. ``row_group_order``: the store's row groups in a random order. One global
   permutation, so shard order and row-group order are both shuffled and
   neighbouring row groups come from different shards (no locality is lost:
   a row group is one seek-and-read whichever shard it is in).
2. The rows of the groups, in that order, form the epoch stream of N sequences.
3. ``EpochPlan``: the stream is cut to R * nb * B sequences (R ranks, nb
   batches per rank, B sequences per batch): with ``drop_last`` nb =
   floor(N / (R * B)) and fewer than R * B sequences are left out this epoch;
   without it nb = ceil(N / (R * B)) and the stream is padded by repeating its
   first sequences (fewer than R * B). Every rank gets the same nb, so no DDP
   collective waits on a rank that ran out. Rank r takes the contiguous span
   [r * nb * B, (r + 1) * nb * B).
4. ``window_permutation``: inside its span, a rank's rows are shuffled within
   consecutive windows of ``shuffle_window`` rows (bounded memory for streaming).
5. Batch i of the rank is rows [i * B, (i + 1) * B) of the shuffled span;
   ``worker_batches`` gives DataLoader worker w a contiguous block of them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kdstore.errors import PartitionError

DEFAULT_WINDOW_GROUPS = 8  # window = 8 row groups' worth of rows: ~32 MB of decoded rows at 4 MB row groups


@dataclass(frozen=True)
class PlanConfig:
    """How an epoch is cut into batches. The same config on every rank gives a consistent plan."""

    batch_size: int
    shuffle: bool = True
    seed: int = 0
    drop_last: bool = False  # False: pad by repeating the first sequences of the epoch stream
    shuffle_window: int | None = None  # rows shuffled together; None: DEFAULT_WINDOW_GROUPS row groups' worth

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise PartitionError(f"batch_size must be at least 1, got {self.batch_size}", hint="pass batch_size >= 1")
        if self.shuffle_window is not None and self.shuffle_window < 1:
            raise PartitionError(f"shuffle_window must be at least 1, got {self.shuffle_window}",
                                 hint="pass None for the default window")


def distributed_rank(rank: int | None = None, num_ranks: int | None = None) -> tuple[int, int]:
    """(rank, num_ranks): the arguments where given, else torch.distributed when initialised, else RANK /
    WORLD_SIZE, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        found = dist.get_rank(), dist.get_world_size()
    else:
        found = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return found[0] if rank is None else rank, found[1] if num_ranks is None else num_ranks


def _rng(*key: int) -> np.random.Generator:
    """A generator seeded by a tuple of non-negative ints: the same key gives the same stream everywhere."""
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def row_group_order(num_groups: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Row-group indices (store order 0..num_groups-1) in this epoch's order: [num_groups] int64."""
    if not shuffle:
        return np.arange(num_groups, dtype=np.int64)
    return _rng(seed, epoch, 0).permutation(num_groups).astype(np.int64)


def window_block(length: int, window: int, key: tuple[int, ...], index: int) -> np.ndarray:
    """Block ``index`` of ``window_permutation``, computed alone: positions [index*window, ...) in shuffled order."""
    start = index * window
    block = np.arange(start, min(start + window, length), dtype=np.int64)
    _rng(*key, index).shuffle(block)
    return block


def window_permutation(length: int, window: int, key: tuple[int, ...]) -> np.ndarray:
    """A permutation of range(length) that moves rows only within consecutive blocks of ``window``.

    Returns [length] int64 ``perm``: shuffled position i holds original position perm[i]. Each block
    is drawn from its own generator (``key`` + block index), so any block can be computed alone.
    """
    return np.concatenate([window_block(length, window, key, i) for i in range(math.ceil(length / window))])


def worker_batches(num_batches: int, worker: int, num_workers: int) -> range:
    """Batch indices of DataLoader worker ``worker``: a contiguous block, the first workers one longer."""
    base, extra = divmod(num_batches, num_workers)
    start = worker * base + min(worker, extra)
    return range(start, start + base + (worker < extra))


def interleave_workers(num_batches: int, num_workers: int) -> list[int]:
    """The order a DataLoader yields the batches of ``worker_batches``: worker 0's first, worker 1's first, ...

    torch's DataLoader takes one batch from each live worker in turn (in_order=True).
    """
    blocks = [list(worker_batches(num_batches, w, max(1, num_workers))) for w in range(max(1, num_workers))]
    return [block[i] for i in range(max(map(len, blocks))) for block in blocks if i < len(block)]


class EpochPlan:
    """The batches of one rank in one epoch, as global row indices (row r of the store, in manifest order).

    ``group_sizes`` [G]: rows per row group in store order (shards in manifest order, then row groups).
    """

    def __init__(self, group_sizes: Sequence[int], config: PlanConfig, epoch: int, rank: int, num_ranks: int) -> None:
        sizes = np.asarray(group_sizes, dtype=np.int64)
        self.num_rows = int(sizes.sum())
        if self.num_rows == 0:
            raise PartitionError("the store has no sequences", hint="build a store with at least one sequence")
        if not 0 <= rank < num_ranks:
            raise PartitionError(f"rank {rank} is outside 0..{num_ranks - 1}", hint="check RANK and WORLD_SIZE")
        if num_ranks > len(sizes):
            raise PartitionError(f"{num_ranks} ranks but the store has only {len(sizes)} row groups; "
                                 "every rank would read the same row groups")
        self.config, self.epoch, self.rank, self.num_ranks = config, epoch, rank, num_ranks
        per_step = num_ranks * config.batch_size
        self.num_batches = self.num_rows // per_step if config.drop_last else math.ceil(self.num_rows / per_step)
        if self.num_batches == 0:
            raise PartitionError(f"{self.num_rows} sequences cannot fill one batch of {config.batch_size} on each of "
                                 f"{num_ranks} ranks with drop_last")
        self.window = config.shuffle_window or max(1, round(DEFAULT_WINDOW_GROUPS * self.num_rows / len(sizes)))
        order = row_group_order(len(sizes), config.seed, epoch, config.shuffle)
        self._group_first_row = np.concatenate(([0], np.cumsum(sizes)[:-1]))[order]  # store row of each group's row 0
        self._stream_starts = np.concatenate(([0], np.cumsum(sizes[order])))  # epoch-stream offset of each group
        self._span_start = rank * self.num_batches * config.batch_size
        self._last_window: tuple[int, np.ndarray] = (-1, np.zeros(0, dtype=np.int64))

    @property
    def span_rows(self) -> int:
        return self.num_batches * self.config.batch_size

    @property
    def window_key(self) -> tuple[int, ...]:
        """Seeds the rank's window shuffle: (seed, epoch, 1, rank); 0 in third place seeds the row-group order."""
        return (self.config.seed, self.epoch, 1, self.rank)

    def _window(self, index: int) -> np.ndarray:
        if self._last_window[0] == index:  # consecutive batches mostly share a window
            return self._last_window[1]
        if self.config.shuffle:
            block = window_block(self.span_rows, self.window, self.window_key, index)
        else:
            start = index * self.window
            block = np.arange(start, min(start + self.window, self.span_rows), dtype=np.int64)
        self._last_window = (index, block)
        return block

    def span_positions(self, start: int, stop: int) -> np.ndarray:
        """Shuffled span positions [start, stop) -> unshuffled positions in the rank's span: [stop-start] int64."""
        first, last = start // self.window, (stop - 1) // self.window
        perms = np.concatenate([self._window(w) for w in range(first, last + 1)])
        return perms[start - first * self.window:stop - first * self.window]

    def batch_rows(self, start: int, stop: int) -> np.ndarray:
        """Global row indices of this rank's batches [start, stop): [stop-start, batch_size] int64."""
        size = self.config.batch_size
        stream = (self._span_start + self.span_positions(start * size, stop * size)) % self.num_rows  # % pads by wrapping
        group = np.searchsorted(self._stream_starts, stream, side="right") - 1
        rows = self._group_first_row[group] + (stream - self._stream_starts[group])
        return rows.reshape(stop - start, size)
