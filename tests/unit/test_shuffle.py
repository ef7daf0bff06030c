"""Epoch plans: each shuffle is a permutation that spreads rows; partitions lose and duplicate nothing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdstore.shuffle import (
    EpochPlan,
    PartitionError,
    PlanConfig,
    distributed_rank,
    interleave_workers,
    row_group_order,
    window_block,
    window_permutation,
    worker_batches,
)


def all_rows(sizes, config, num_ranks, epoch=0):
    plans = [EpochPlan(sizes, config, epoch, rank, num_ranks) for rank in range(num_ranks)]
    return plans, np.concatenate([p.batch_rows(0, p.num_batches).reshape(-1) for p in plans])


def test_row_group_order_is_a_seeded_permutation_that_changes_with_the_epoch():
    first = row_group_order(1000, seed=3, epoch=0)
    assert sorted(first) == list(range(1000))
    assert np.array_equal(first, row_group_order(1000, seed=3, epoch=0))
    assert not np.array_equal(first, row_group_order(1000, seed=3, epoch=1))
    assert not np.array_equal(first, row_group_order(1000, seed=4, epoch=0))
    assert np.array_equal(row_group_order(5, 3, 0, shuffle=False), np.arange(5))


@settings(max_examples=60, deadline=None)
@given(length=st.integers(1, 3000), window=st.integers(1, 500), seed=st.integers(0, 2**32 - 1))
def test_window_permutation_is_a_permutation_moving_rows_only_within_their_window(length, window, seed):
    perm = window_permutation(length, window, (seed, 0))
    assert np.array_equal(np.sort(perm), np.arange(length))
    assert np.array_equal(perm // window, np.arange(length) // window)
    last = (length - 1) // window
    assert np.array_equal(window_block(length, window, (seed, 0), last), perm[last * window:])


def test_window_permutation_spreads_rows_across_the_window():
    perm = window_permutation(100_000, 1000, (0, 0))
    moved = np.abs(perm - np.arange(perm.size))
    assert moved.mean() > 1000 / 4  # a uniform shuffle of a window moves a row ~window/3 on average
    assert np.mean(perm == np.arange(perm.size)) < 0.01
    within = perm[:1000]
    assert abs(np.corrcoef(within, np.arange(1000))[0, 1]) < 0.1


def test_an_epoch_order_has_low_correlation_with_store_order_and_moves_rows_far():
    sizes = [40] * 250  # 10,000 rows in 250 row groups
    _, rows = all_rows(sizes, PlanConfig(batch_size=10, seed=1), num_ranks=1)
    assert abs(np.corrcoef(rows, np.arange(rows.size))[0, 1]) < 0.1
    assert np.median(np.abs(rows - np.arange(rows.size))) > 1000
    _, again = all_rows(sizes, PlanConfig(batch_size=10, seed=1), num_ranks=1, epoch=1)
    assert abs(np.corrcoef(rows, again)[0, 1]) < 0.1


@settings(max_examples=80, deadline=None)
@given(sizes=st.lists(st.integers(1, 30), min_size=1, max_size=40), num_ranks=st.integers(1, 5),
       batch_size=st.integers(1, 9), drop_last=st.booleans(), window=st.one_of(st.none(), st.integers(1, 50)),
       seed=st.integers(0, 1000))
def test_partitions_lose_nothing_and_duplicate_only_the_documented_padding(sizes, num_ranks, batch_size, drop_last,
                                                                          window, seed):
    num_rows = sum(sizes)
    config = PlanConfig(batch_size=batch_size, seed=seed, drop_last=drop_last, shuffle_window=window)
    if num_ranks > len(sizes) or (drop_last and num_rows < num_ranks * batch_size):
        with pytest.raises(PartitionError):
            EpochPlan(sizes, config, 0, 0, num_ranks)
        return
    plans, rows = all_rows(sizes, config, num_ranks)
    assert len({p.num_batches for p in plans}) == 1  # every rank steps the same number of times: no DDP hang
    counts = np.bincount(rows, minlength=num_rows)
    if drop_last:
        assert counts.max() == 1 and num_rows - rows.size < num_ranks * batch_size
    else:
        assert counts.min() >= 1 and rows.size - num_rows < num_ranks * batch_size


def test_uneven_row_groups_over_two_ranks_give_each_rank_the_same_number_of_full_batches():
    plans, rows = all_rows([7, 1, 13, 2, 5], PlanConfig(batch_size=4), num_ranks=2)
    assert [p.num_batches for p in plans] == [4, 4]
    assert set(rows.tolist()) == set(range(28)) and rows.size == 32


@settings(max_examples=50, deadline=None)
@given(num_batches=st.integers(0, 50), num_workers=st.integers(1, 8))
def test_worker_blocks_cover_the_batches_once_and_interleave_in_dataloader_order(num_batches, num_workers):
    blocks = [list(worker_batches(num_batches, w, num_workers)) for w in range(num_workers)]
    assert sum(blocks, []) == list(range(num_batches))
    order = interleave_workers(num_batches, num_workers)
    assert sorted(order) == list(range(num_batches))
    assert order[:num_workers] == [b[0] for b in blocks if b][:num_workers]


def test_a_plan_is_the_same_whichever_process_computes_it_and_in_whatever_pieces():
    config = PlanConfig(batch_size=3, seed=7, shuffle_window=10)
    whole = EpochPlan([9, 9, 9, 9], config, 2, 1, 2).batch_rows(0, 6)
    pieces = EpochPlan([9, 9, 9, 9], config, 2, 1, 2)
    assert np.array_equal(np.concatenate([pieces.batch_rows(i, i + 1) for i in (0, 1, 2, 3, 4, 5)]), whole)


def test_shuffle_off_reads_the_store_in_order():
    plans, rows = all_rows([3, 3, 3], PlanConfig(batch_size=3, shuffle=False), num_ranks=1)
    assert rows.tolist() == list(range(9))


def test_bad_partitions_are_named_errors():
    with pytest.raises(PartitionError, match="3 ranks but the store has only 2 row groups"):
        EpochPlan([5, 5], PlanConfig(batch_size=1), 0, 0, 3)
    with pytest.raises(PartitionError, match="no sequences"):
        EpochPlan([0], PlanConfig(batch_size=1), 0, 0, 1)
    with pytest.raises(PartitionError, match="cannot fill one batch"):
        EpochPlan([3, 3], PlanConfig(batch_size=4, drop_last=True), 0, 0, 2)
    with pytest.raises(PartitionError, match="batch_size"):
        PlanConfig(batch_size=0)


def test_rank_comes_from_the_environment_without_torch_distributed(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert distributed_rank() == (3, 4)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert distributed_rank() == (0, 1)
