"""What the loaders' integrity checks cost: positions/s with the checks and without them, in one run.

    python benchmarks/integrity.py STORE [--rounds 5] [--batch-size 16]

On one store, one process, shuffle on, the same index batches and collated tensors (compact codes):
  memory-mapped: MemoryMappedDataset as shipped (each record batch of the Arrow copy hashed with XXH3-128 the
      first time it is touched, a fresh dataset per round so every round pays it) against the same dataset
      with that check switched off; the first pass of a process (all hashes paid in it) and the second;
  streaming: StreamingDataset as shipped (footer and row groups read through VerifiedShardFile, each hashed
      with sha256 before pyarrow sees it) against Parquet files opened directly, as before the checks existed.
Rounds alternate checked / unchecked and the best of each is compared, so load from other processes hits
both alike. Both variants are checked to give identical tensors. A store: `kdstore build --out demo-store`,
or the stores benchmarks/loader.py builds under its --workdir.
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager

import pyarrow.parquet as pq
import torch

from kdstore.arrow_copy import ArrowCopy
from kdstore.collate import Collator
from kdstore.loader import EpochBatchSampler, MemoryMappedDataset, StreamingDataset
from kdstore.shuffle import PlanConfig
from kdstore.store import Store


@contextmanager
def unchecked():
    """The loaders without their integrity checks: no Arrow-copy hashes, shards opened as plain Parquet."""
    check_batch, open_shard = ArrowCopy.check_batch, Store.open_shard

    def plain_open(self, shard):
        shard = self.manifest.shards[shard] if isinstance(shard, int) else shard
        return pq.ParquetFile(self.fs.open(self.file_path(shard.path), "rb"), page_checksum_verification=True)

    ArrowCopy.check_batch = lambda self, index: False
    Store.open_shard = plain_open
    try:
        yield
    finally:
        ArrowCopy.check_batch, Store.open_shard = check_batch, open_shard


def mapped_pass(store: str, plan: PlanConfig, epoch: int = 0) -> tuple[float, list[dict[str, torch.Tensor]]]:
    """Epoch ``epoch`` of a fresh dataset (its batches are hashed again on first touch); with ``epoch`` 1,
    after an untimed epoch 0, so the hashes are paid and only the per-sample cost of the checks is left."""
    dataset = MemoryMappedDataset(store)
    collate = Collator(dataset.store.codec)
    sampler = EpochBatchSampler(dataset.group_sizes, plan, 0, 1)
    for warm in range(epoch):
        sampler.set_epoch(warm)
        for indices in sampler:
            collate([dataset[i] for i in indices])
    sampler.set_epoch(epoch)
    start, positions, first = time.perf_counter(), 0, []
    for indices in sampler:
        batch = collate([dataset[i] for i in indices])
        positions += int(batch["attention_mask"].sum()) - len(indices)
        first = first or [batch]
    return positions / (time.perf_counter() - start), first


def mapped_second_pass(store: str, plan: PlanConfig) -> tuple[float, list[dict[str, torch.Tensor]]]:
    return mapped_pass(store, plan, epoch=1)


def streamed_pass(store: str, plan: PlanConfig) -> tuple[float, list[dict[str, torch.Tensor]]]:
    dataset = StreamingDataset(store, plan, rank=0, num_ranks=1)
    collate = Collator(dataset.store.codec)
    start, positions, first = time.perf_counter(), 0, []
    for samples in dataset:
        batch = collate(samples)
        positions += int(batch["attention_mask"].sum()) - len(samples)
        first = first or [batch]
    return positions / (time.perf_counter() - start), first


def compare(name: str, run, store: str, plan: PlanConfig, rounds: int) -> None:
    checked, plain = [], []
    for _ in range(rounds):
        rate, with_checks = run(store, plan)
        checked.append(rate)
        with unchecked():
            rate, without = run(store, plan)
        plain.append(rate)
        assert all(torch.equal(with_checks[0][k], without[0][k]) for k in with_checks[0]), "the variants differ"
    best_checked, best_plain = max(checked), max(plain)
    print(f"  {name:<15} checked {best_checked:>12,.0f} positions/s   unchecked {best_plain:>12,.0f} positions/s   "
          f"checked / unchecked = {best_checked / best_plain:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    plan = PlanConfig(batch_size=args.batch_size, seed=0)
    MemoryMappedDataset(args.store)  # makes the Arrow copy once, outside the timing
    print(f"integrity checks on {args.store} (best of {args.rounds} alternating rounds, 1 process, batch {args.batch_size}):")
    compare("mmap, 1st pass", mapped_pass, args.store, plan, args.rounds)
    compare("mmap, 2nd pass", mapped_second_pass, args.store, plan, args.rounds)
    compare("streaming", streamed_pass, args.store, plan, args.rounds)


if __name__ == "__main__":
    main()
