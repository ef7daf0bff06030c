"""Positions/s of both loaders over two passes in a fresh process: run it from two checkouts to compare versions.

    python benchmarks/passes.py STORE [codes|wide]
    git worktree add /tmp/before 00f6c07 && PYTHONPATH=/tmp/before python benchmarks/passes.py STORE_BUILT_THERE

Prints the checkout's folder, the output, and collated positions/s: memory-mapped pass 1 and pass 2, streaming
pass 1 and pass 2 (batch 16, shuffle on, one process). Pass 1 of a fresh process pays whatever a loader does
once (the memory-mapped dataset's first-touch hashes); alternate the two checkouts and take the best of a few
runs each, since one process's figures move with what else the machine runs.
"""

from __future__ import annotations

import sys
import time

import kdstore
from kdstore.collate import Collator
from kdstore.loader import EpochBatchSampler, MemoryMappedDataset, StreamingDataset
from kdstore.shuffle import PlanConfig


def rate(batches) -> float:
    start, total = time.perf_counter(), 0
    for batch in batches:
        total += int(batch["attention_mask"].sum()) - len(batch["attention_mask"])
    return total / (time.perf_counter() - start)


def main() -> None:
    store, output = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "codes"
    plan = PlanConfig(batch_size=16, seed=0)
    mapped = MemoryMappedDataset(store)
    collate = Collator(mapped.store.codec, output=output)
    rates = []
    for epoch in (0, 1):
        sampler = EpochBatchSampler(mapped.group_sizes, plan, 0, 1)
        sampler.set_epoch(epoch)
        rates.append(rate(collate([mapped[i] for i in indices]) for indices in sampler))
    streamed = StreamingDataset(store, plan, rank=0, num_ranks=1)
    for epoch in (0, 1):
        streamed.set_epoch(epoch)
        rates.append(rate(collate(samples) for samples in streamed))
    checkout = kdstore.__file__.rsplit("/", 2)[0]
    print(checkout, output, "mmap", f"{rates[0]:,.0f}", f"{rates[1]:,.0f}", "stream", f"{rates[2]:,.0f}", f"{rates[3]:,.0f}")


if __name__ == "__main__":
    main()
