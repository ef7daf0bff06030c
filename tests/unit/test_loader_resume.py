"""Exact resume: stop after any batch, load the state into a fresh loader, get exactly the batches of an uninterrupted run."""

from __future__ import annotations

import random

import pytest

from conftest import write_store
from kdstore.loader import MemoryMappedDataset, StreamingDataset, make_dataloader, set_epoch
from kdstore.shuffle import PlanConfig

pytest.importorskip("torchdata", reason="exact resume is tested with torchdata's StatefulDataLoader")

PLAN = PlanConfig(batch_size=3, seed=11, shuffle_window=7)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from kdstore.codec import CodecConfig

    # 5 shards of uneven row groups, 53 sequences: the last batches are padded
    return write_store(tmp_path_factory.mktemp("resume") / "store", CodecConfig(k=8, vocab_size=300),
                       num_sequences=53, shard_bytes=4000, row_group_bytes=900)


def loader_for(kind, store, rank, epoch=0):
    if kind == "mapped":
        loader = make_dataloader(MemoryMappedDataset(store), PLAN, rank=rank, num_ranks=2, num_workers=2)
    else:
        loader = make_dataloader(StreamingDataset(store, PLAN, rank=rank, num_ranks=2), num_workers=2)
    set_epoch(loader, epoch)
    return loader


def as_bytes(batch):
    return {k: v.numpy().tobytes() for k, v in batch.items()}


@pytest.mark.parametrize("kind", ["mapped", "streaming"])
def test_resuming_at_three_random_stop_points_on_two_ranks_by_two_workers_is_byte_identical(kind, store):
    rng = random.Random(0)
    for rank in (0, 1):
        uninterrupted = [as_bytes(b) for b in loader_for(kind, store, rank)]
        assert len(uninterrupted) == 9  # ceil(53 / (2 ranks * 3)) batches on every rank
        for stop in sorted(rng.sample(range(1, len(uninterrupted)), 3)):
            first = loader_for(kind, store, rank)
            iterator = iter(first)
            head = [as_bytes(next(iterator)) for _ in range(stop)]
            state = first.state_dict()
            del iterator, first
            resumed = loader_for(kind, store, rank, epoch=5)  # the saved state's epoch wins
            resumed.load_state_dict(state)
            tail = [as_bytes(b) for b in resumed]
            assert head + tail == uninterrupted, f"{kind} rank {rank} stop {stop}"


@pytest.mark.parametrize("kind", ["mapped", "streaming"])
def test_a_state_saved_at_the_end_of_an_epoch_resumes_into_the_epoch_set_next(kind, store):
    loader = loader_for(kind, store, 0)
    list(loader)
    resumed = loader_for(kind, store, 0)
    resumed.load_state_dict(loader.state_dict())
    set_epoch(resumed, 1)
    expected = [as_bytes(b) for b in loader_for(kind, store, 0, epoch=1)]
    assert [as_bytes(b) for b in resumed] == expected


def test_resume_without_workers_is_exact_too(store):
    make = lambda: make_dataloader(StreamingDataset(store, PLAN, rank=1, num_ranks=2))  # noqa: E731
    everything = [as_bytes(b) for b in make()]
    first = make()
    iterator = iter(first)
    head = [as_bytes(next(iterator)) for _ in range(4)]
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert head + [as_bytes(b) for b in resumed] == everything
