"""Loader benchmark: collated positions/s per worker at K=64, on-disk bytes, and RSS over a pass, in one run.

    python benchmarks/loader.py [--sequences 1500] [--scale 4] [--batch-size 16] [--workdir DIR]

Builds two stores with the real ``kdstore build`` (a tiny random Llama over a 32,000-word vocabulary, its
output layer scaled so its distributions are peaked like a trained model's; a Zipf-distributed word
corpus; K=64, 256-token sequences): a small one and one ``--scale`` times larger. Then, on the larger
store, one process ("per worker"), shuffle on, the same index batches and the same padded tensors
(int32 ids, uint16 codes, as ``kdstore.collate.Collator`` makes them) through:
  (a) kdstore MemoryMappedDataset + EpochBatchSampler;
  (b) kdstore StreamingDataset (Parquet row groups);
  (c) HF datasets: load_dataset("parquet") of the same shards, shuffled access, numpy and torch formats;
  (d) plain pyarrow: the shards read into memory, Table.take per batch.
It checks (a), (c) and (d) give identical tensors for the first batch, prints positions/s, the bytes
on disk of the store, the Arrow copy and HF's cache, and the peak RSS of a child process doing one
pass of (a) and of (b) over each store.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from conftest import save_tiny_teacher  # noqa: E402  (the test suite's tiny Llama + word tokenizer)
from kdstore.build import BuildConfig, build  # noqa: E402
from kdstore.collate import Collator  # noqa: E402
from kdstore.loader import EpochBatchSampler, MemoryMappedDataset, RowGroup, StreamingDataset, convert_to_arrow  # noqa: E402
from kdstore.shuffle import PlanConfig  # noqa: E402
from kdstore.store import open_store  # noqa: E402

VOCAB = 32000
OUTPUT_SCALE = 25.0  # random init gives logits of std ~0.1 (near-uniform); x25 gives a trained model's peakiness


def make_teacher(folder: Path) -> Path:
    from transformers import AutoModelForCausalLM

    save_tiny_teacher(folder, vocab_size=VOCAB, hidden=64, layers=2)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.lm_head.weight.mul_(OUTPUT_SCALE)
    model.save_pretrained(folder)
    return folder


def make_corpus(folder: Path, num_tokens: int, seed: int) -> Path:
    """Documents of Zipf-distributed words (frequent words have small ids, as with real tokenizers)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    words = np.minimum(rng.zipf(1.2, num_tokens), VOCAB - 4) - 1
    cuts = np.cumsum(rng.integers(200, 2000, num_tokens // 200))
    docs = [" ".join(f"w{w}" for w in doc) for doc in np.split(words, cuts[cuts < num_tokens]) if len(doc)]
    (folder / "corpus.txt").write_text("\n\n".join(docs) + "\n")
    return folder


def make_store(workdir: Path, teacher: Path, name: str, num_sequences: int) -> Path:
    out = workdir / name
    if not (out / "manifest.json").exists():
        corpus = make_corpus(workdir / f"{name}-corpus", num_sequences * 256, seed=len(name))
        start = time.perf_counter()
        # unit_documents=8: ~40 sequences per write, so the writer cuts ~4 MB row groups (it does not split
        # a larger write: with the default 256 documents a unit became one 70 MB row group)
        build(BuildConfig(corpus=(str(corpus),), teacher=str(teacher), out=str(out), k=64, seq_len=256,
                          unit_documents=8, device="cpu", progress=False))
        print(f"built {name}: {open_store(out).manifest.num_sequences} sequences in {time.perf_counter() - start:.0f} s")
    return out


def positions(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["attention_mask"].sum()) - len(batch["attention_mask"])


def timed(name: str, batches) -> tuple[float, dict[str, torch.Tensor]]:
    start, total, first = time.perf_counter(), 0, None
    for batch in batches:
        first = first if first is not None else batch
        total += positions(batch)
    rate = total / (time.perf_counter() - start)
    print(f"  {name:<34} {rate:>12,.0f} positions/s")
    return rate, first


def hf_dataset(store: Path, fmt: str, cache_dir: Path):
    from datasets import load_dataset

    shards = [str(store / s.path) for s in open_store(store).manifest.shards]
    return load_dataset("parquet", data_files=shards, split="train", cache_dir=str(cache_dir)).with_format(fmt)


def hf_cache_bytes(dataset) -> int:
    return sum(Path(f["filename"]).stat().st_size for f in dataset.cache_files)


def hf_batches(dataset, index_batches, collate: Collator):
    """The same tensors from HF rows: the ids' deltas decoded by kdstore's codec, padded by the same Collator."""
    from kdstore.codec import decode_positions

    codec = collate.codec

    def to_np(x):
        return x.numpy() if hasattr(x, "numpy") else np.asarray(x)

    for indices in index_batches:
        rows = dataset[indices]  # shuffled access: the sampler's indices
        samples = []
        for i, index in enumerate(indices):
            decoded = decode_positions(codec, {"topk_id_deltas": to_np(rows["topk_id_deltas"][i])})
            samples.append({"index": index, "input_ids": to_np(rows["input_ids"][i]), **decoded,
                            "topk_logprob_codes": to_np(rows["topk_logprob_codes"][i]).reshape(-1, codec.k),
                            "tail_logmass_codes": to_np(rows["tail_logmass_codes"][i]),
                            "target_logprob_codes": to_np(rows["target_logprob_codes"][i])})
        yield collate(samples)


def pyarrow_batches(store: Path, index_batches, collate: Collator):
    import pyarrow.parquet as pq

    opened = open_store(store)
    table = pq.read_table([str(store / s.path) for s in opened.manifest.shards])
    for indices in index_batches:
        rows = RowGroup(opened.codec, table.take(indices).combine_chunks().to_batches()[0], 0)
        samples = [dict(rows.sample(i), index=index) for i, index in enumerate(indices)]
        yield collate(samples)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def rss_child(store: str, kind: str, batch_size: int) -> None:
    """One pass over ``store`` with one dataset kind; prints peak and final RSS in MiB."""
    plan = PlanConfig(batch_size=batch_size, seed=0)
    collate = Collator(open_store(store).codec)
    if kind == "mmap":
        dataset = MemoryMappedDataset(store)
        source = ([dataset[i] for i in idx] for idx in EpochBatchSampler(dataset.group_sizes, plan, 0, 1))
    else:
        source = iter(StreamingDataset(store, plan, rank=0, num_ranks=1))
    for samples in source:
        collate(samples)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    print(int(status["VmHWM"].split()[0]) // 1024, int(status["VmRSS"].split()[0]) // 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=1500)
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--rss-child", nargs=2, metavar=("STORE", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        return rss_child(*args.rss_child, args.batch_size)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kdstore-loader-bench-"))
    teacher = workdir / "teacher"
    if not (teacher / "config.json").exists():
        make_teacher(teacher)
    small = make_store(workdir, teacher, "small", args.sequences)
    large = make_store(workdir, teacher, "large", int(args.sequences * args.scale * 1.05))  # chunking varies: stay >= scale

    measured = large  # throughput on the larger store: more batches, steadier numbers
    dataset = MemoryMappedDataset(measured)  # makes the Arrow copy (not timed)
    collate = Collator(dataset.store.codec)
    plan = PlanConfig(batch_size=args.batch_size, seed=0)
    index_batches = list(EpochBatchSampler(dataset.group_sizes, plan, 0, 1))
    print(f"throughput on {measured} ({len(dataset)} sequences, K=64, batch {args.batch_size}, shuffle on, 1 process):")
    mmap_rate, mmap_first = timed("kdstore MemoryMappedDataset", (collate([dataset[i] for i in idx]) for idx in index_batches))
    stream_rate, _ = timed("kdstore StreamingDataset", map(collate, StreamingDataset(measured, plan, rank=0, num_ranks=1)))
    hf_rates = {}
    for fmt in ("numpy", "torch"):
        hf = hf_dataset(measured, fmt, workdir / "hf")  # converted to HF's Arrow cache once (not timed)
        hf_rates[fmt], hf_first = timed(f"HF datasets ({fmt} format)", hf_batches(hf, index_batches, collate))
        assert same(hf_first, mmap_first), f"HF {fmt} gave other tensors"
    pa_rate, pa_first = timed("plain pyarrow (in memory)", pyarrow_batches(measured, index_batches, collate))
    assert same(pa_first, mmap_first), "pyarrow gave other tensors"
    best_hf = max(hf_rates.values())
    print(f"  memory-mapped / best HF = {mmap_rate / best_hf:.2f}x; streaming / best HF = {stream_rate / best_hf:.2f}x")

    store_bytes = open_store(measured).manifest.total_bytes
    print(f"on disk ({measured.name}): store {store_bytes:,} B; kdstore Arrow copy {dataset.path.stat().st_size:,} B; "
          f"HF Arrow cache {hf_cache_bytes(hf):,} B ({hf_cache_bytes(hf) / store_bytes:.1f}x the store)")
    for kind in ("mmap", "stream"):
        peaks = []
        for store in (small, large):
            if kind == "mmap":
                convert_to_arrow(store)  # the copy is made outside the measured child
            out = subprocess.run([sys.executable, __file__, "--rss-child", str(store), kind,
                                  "--batch-size", str(args.batch_size)], capture_output=True, text=True, check=True)
            peak, final = map(int, out.stdout.split()[-2:])
            peaks.append(peak)
            print(f"RSS {kind:<6} {store.name:<5} ({open_store(store).manifest.num_sequences:>6} sequences, "
                  f"{open_store(store).manifest.total_bytes:>12,} B): peak {peak} MiB, end {final} MiB")
        print(f"  {kind}: large / small peak RSS = {peaks[1] / peaks[0]:.3f}")


if __name__ == "__main__":
    main()
