"""Loader benchmark: collated positions/s per worker at K=64, on-disk bytes, and RSS over a pass, in one run.

    python benchmarks/loader.py [--sequences 1500] [--scale 4] [--batch-size 16] [--shuffle-window ROWS] [--workdir DIR]

Builds two stores with the real ``kdstore build`` (a tiny random Llama over a 32,000-word vocabulary, its
output layer scaled so its distributions are peaked like a trained model's; a Zipf-distributed word
corpus; K=64, 256-token sequences): a small one and one ``--scale`` times larger. Then, on the larger
store, one process ("per worker"), shuffle on, the same index batches and the same padded tensors
(int32 ids, uint16 codes, as ``kdstore.collate.Collator`` makes them) through:
  (a) kdstore MemoryMappedDataset + EpochBatchSampler;
  (b) kdstore StreamingDataset (Parquet row groups);
  (c) HF datasets: load_dataset("parquet") of the same shards, shuffled access, numpy and torch formats;
  (d) plain pyarrow: the shards read into memory as one chunk once (not timed), Table.take per batch.
It checks (b), (c) and (d) give the same tensors as (a) for the first batch, prints positions/s and
the ratios, the bytes on disk of the store, the Arrow copy and HF's cache, and the RSS of a child
process doing one pass of (a) and of (b) over each store: before the pass (mostly torch's import),
peak, and the growth during the pass.
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
from kdstore.arrow_copy import convert_to_arrow  # noqa: E402
from kdstore.build import BuildConfig, build  # noqa: E402
from kdstore.collate import Collator  # noqa: E402
from kdstore.loader import EpochBatchSampler, MemoryMappedDataset, StreamingDataset  # noqa: E402
from kdstore.shuffle import EpochPlan, PlanConfig  # noqa: E402
from kdstore.store import StoredRows, open_store  # noqa: E402

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


def pyarrow_table(store: Path):
    """The whole store read into memory once (timed apart: HF's one-off conversion is not timed either)."""
    import pyarrow.parquet as pq

    start = time.perf_counter()
    table = pq.read_table([str(store / s.path) for s in open_store(store).manifest.shards])
    # one chunk: Table.take over a chunked list column concatenates every chunk on each call (~17x slower
    # per batch here), which would make this baseline a straw man
    table = table.combine_chunks()
    print(f"  (plain pyarrow: pq.read_table + combine_chunks of the whole store took {time.perf_counter() - start:.1f} s, "
          "not timed)")
    return table


def pyarrow_batches(table, codec, index_batches, collate: Collator):
    for indices in index_batches:
        rows = StoredRows(codec, table.take(indices).combine_chunks().to_batches()[0], 0)
        samples = [dict(rows.sample(i), index=index) for i, index in enumerate(indices)]
        yield collate(samples)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def rss_child(store: str, kind: str, plan: PlanConfig) -> None:
    """One pass over ``store`` with one dataset kind; prints RSS before the pass, peak and final, in MiB."""
    collate = Collator(open_store(store).codec)
    if kind == "mmap":
        dataset = MemoryMappedDataset(store)
        source = ([dataset[i] for i in idx] for idx in EpochBatchSampler(dataset.group_sizes, plan, 0, 1))
    else:
        source = iter(StreamingDataset(store, plan, rank=0, num_ranks=1))
    before = rss_mib()["VmRSS"]
    for samples in source:
        collate(samples)
    after = rss_mib()
    print(before, after["VmHWM"], after["VmRSS"])


def rss_mib() -> dict[str, int]:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {key: int(status[key].split()[0]) // 1024 for key in ("VmRSS", "VmHWM")}


def print_windows(stores: tuple[Path, Path], plan: PlanConfig) -> None:
    """The streaming dataset holds the row groups of one or two shuffle windows: say how many each store spans.

    A store within about one window is read whole, so its streaming RSS grows with it: such a comparison
    says nothing about larger stores (the default window is 8 row groups' worth, a few hundred sequences here).
    """
    spans = []
    for store in stores:
        sizes = StreamingDataset(store, plan, rank=0, num_ranks=1).group_sizes
        window = EpochPlan(sizes, plan, 0, 0, 1).window
        spans.append(sum(sizes) / window)
        print(f"{store.name}: {len(sizes)} row groups, shuffle window {window} sequences, {spans[-1]:.1f} windows")
    if spans[0] < 4:
        print(f"  NOTE: the small store spans only {spans[0]:.1f} shuffle windows, so a streaming pass holds most of it; "
              "the streaming RSS comparison is meaningful with more --sequences or a smaller --shuffle-window")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=1500, help="sequences of 256 tokens in the small store")
    parser.add_argument("--scale", type=int, default=4, help="the large store holds about this many times more")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per batch")
    parser.add_argument("--workdir", default=None, help="keeps the teacher, stores and HF cache; reused when run again")
    parser.add_argument("--shuffle-window", type=int, default=None,
                        help="rows shuffled together (default: 8 row groups' worth, which depends on the store)")
    parser.add_argument("--rss-child", nargs=2, metavar=("STORE", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        return rss_child(*args.rss_child, PlanConfig(batch_size=args.batch_size, seed=0, shuffle_window=args.shuffle_window))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kdstore-loader-bench-"))
    teacher = workdir / "teacher"
    if not (teacher / "config.json").exists():
        make_teacher(teacher)
    small = make_store(workdir, teacher, "small", args.sequences)
    large = make_store(workdir, teacher, "large", int(args.sequences * args.scale * 1.05))  # chunking varies: stay >= scale
    plan = PlanConfig(batch_size=args.batch_size, seed=0, shuffle_window=args.shuffle_window)

    measure_throughput(large, workdir, plan)  # the larger store: more batches, steadier numbers
    print_windows((small, large), plan)
    for kind in ("mmap", "stream"):
        measure_rss((small, large), kind, args)


def measure_throughput(store: Path, workdir: Path, plan: PlanConfig) -> None:
    """Positions/s of each path over the same index batches (checked to give the same tensors), and bytes on disk."""
    dataset = MemoryMappedDataset(store)  # makes the Arrow copy (not timed)
    collate = Collator(dataset.store.codec)
    index_batches = list(EpochBatchSampler(dataset.group_sizes, plan, 0, 1))
    print(f"throughput on {store} ({len(dataset)} sequences, K=64, batch {plan.batch_size}, shuffle on, 1 process):")
    mmap_rate, mmap_first = timed("kdstore MemoryMappedDataset", (collate([dataset[i] for i in idx]) for idx in index_batches))
    streamed = map(collate, StreamingDataset(store, plan, rank=0, num_ranks=1))
    stream_rate, stream_first = timed("kdstore StreamingDataset", streamed)
    assert same(stream_first, mmap_first), "the streaming dataset gave other tensors"
    hf_rates = {}
    for fmt in ("numpy", "torch"):
        hf = hf_dataset(store, fmt, workdir / "hf")  # converted to HF's Arrow cache once (not timed)
        hf_rates[fmt], hf_first = timed(f"HF datasets ({fmt} format)", hf_batches(hf, index_batches, collate))
        assert same(hf_first, mmap_first), f"HF {fmt} gave other tensors"
    table = pyarrow_table(store)
    pa_rate, pa_first = timed("plain pyarrow (in memory)", pyarrow_batches(table, dataset.store.codec, index_batches, collate))
    assert same(pa_first, mmap_first), "pyarrow gave other tensors"
    best_hf = max(hf_rates.values())
    print(f"  memory-mapped / best HF = {mmap_rate / best_hf:.2f}x; streaming / best HF = {stream_rate / best_hf:.2f}x; "
          f"memory-mapped / pyarrow = {mmap_rate / pa_rate:.2f}x; streaming / pyarrow = {stream_rate / pa_rate:.2f}x")
    store_bytes = open_store(store).manifest.total_bytes
    print(f"on disk ({store.name}): store {store_bytes:,} B; kdstore Arrow copy {dataset.path.stat().st_size:,} B; "
          f"HF Arrow cache {hf_cache_bytes(hf):,} B ({hf_cache_bytes(hf) / store_bytes:.1f}x the store)")


def measure_rss(stores: tuple[Path, Path], kind: str, args: argparse.Namespace) -> None:
    """RSS of a child process doing one pass of dataset ``kind`` over each store."""
    peaks, growth = [], []
    for store in stores:
        if kind == "mmap":
            convert_to_arrow(store)  # the copy is made outside the measured child
        window = [] if args.shuffle_window is None else ["--shuffle-window", str(args.shuffle_window)]
        out = subprocess.run([sys.executable, __file__, "--rss-child", str(store), kind, "--batch-size",
                              str(args.batch_size), *window], capture_output=True, text=True, check=True)
        before, peak, final = map(int, out.stdout.split()[-3:])
        peaks.append(peak)
        growth.append(peak - before)
        manifest = open_store(store).manifest
        print(f"RSS {kind:<6} {store.name:<5} ({manifest.num_sequences:>6} sequences, {manifest.total_bytes:>12,} B): "
              f"before the pass {before} MiB, peak {peak} MiB (+{peak - before}), end {final} MiB")
    # most of the process's RSS is torch & co. (the "before" figure); the growth during the pass is what could scale
    print(f"  {kind}: large / small peak RSS = {peaks[1] / peaks[0]:.3f}; growth during the pass {growth[0]} -> {growth[1]} MiB")


if __name__ == "__main__":
    main()
