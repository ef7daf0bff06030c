"""Loader benchmark: collated positions/s per worker at K=64, both outputs, on-disk bytes, and RSS over a pass, in one run.

    python benchmarks/loader.py [--teacher synthetic|bundled] [--sequences 1500] [--scale 4] [--batch-size 16]
                                [--repeats 5] [--shuffle-window ROWS] [--no-rss] [--workdir DIR]

Builds two stores with the real ``kdstore build`` (K=64, 256-token sequences), a small one and one about
``--scale`` times larger, from one of two teachers:
  synthetic (default): a tiny random Llama over a 32,000-word vocabulary, its output layer scaled so its
      distributions are peaked like a trained model's, over a Zipf-distributed word corpus of
      ``--sequences`` (small store) full-length sequences;
  bundled: the trained teacher bundled with kdstore (kdstore/assets/teacher, 4,096 tokens) over the bundled
      corpus (kdstore/assets/corpus, 727 sequences of 2 to 256 tokens, ~96 on average), copied once into
      the small store's corpus and ``--scale`` times into the large one's.
Then, on the larger store, one process ("per worker"), shuffle on, the same index batches, and for each
of the two outputs of ``kdstore.collate.Collator`` ("codes": int32 ids, uint16 codes; "wide": int64 ids,
float32 log-probs) the same padded tensors through:
  (a) kdstore MemoryMappedDataset + EpochBatchSampler (a fresh dataset per pass, so every pass pays the
      first-touch XXH3 check of each record batch, as a fresh DataLoader worker does);
  (b) kdstore StreamingDataset (Parquet row groups);
  (c) HF datasets: load_dataset("parquet") of the same shards, shuffled access, numpy and torch formats;
  (d) plain pyarrow: the shards read into memory as one chunk once (not timed), Table.take per batch.
Every batch of (b), (c) and (d) is checked equal to (a)'s (untimed), and the wide batch to ``widen`` of the
compact one. Each path is timed ``--repeats`` times, the paths taking turns so that load from other
processes falls on all of them alike; the best pass counts. Prints positions/s and the ratios to the best
HF path, the bytes on disk of the store, the Arrow copy and HF's cache, and the RSS of a child process
doing one pass of (a) and of (b) over each store: before the pass (mostly torch's import), peak, and the
growth during the pass.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from conftest import save_tiny_teacher  # noqa: E402  (the test suite's tiny Llama + word tokenizer)
from kdstore.arrow_copy import convert_to_arrow  # noqa: E402
from kdstore.build import DEFAULT_CORPUS, DEFAULT_TEACHER, BuildConfig, build  # noqa: E402
from kdstore.collate import Collator, widen  # noqa: E402
from kdstore.loader import EpochBatchSampler, MemoryMappedDataset, StreamingDataset  # noqa: E402
from kdstore.shuffle import EpochPlan, PlanConfig  # noqa: E402
from kdstore.store import StoredRows, open_store  # noqa: E402

VOCAB = 32000
OUTPUT_SCALE = 25.0  # random init gives logits of std ~0.1 (near-uniform); x25 gives a trained model's peakiness
OUTPUTS = ("codes", "wide")

Batch = dict[str, torch.Tensor]


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


def copy_bundled_corpus(folder: Path, copies: int) -> Path:
    """``copies`` copies of the bundled corpus, each in its own subfolder (so its sequence ids differ)."""
    for copy in range(copies):
        if not (folder / f"copy{copy}").exists():
            shutil.copytree(DEFAULT_CORPUS, folder / f"copy{copy}")
    return folder


def make_store(workdir: Path, teacher: str, name: str, size: int) -> Path:
    """``size``: sequences (synthetic teacher) or copies of the bundled corpus (bundled teacher)."""
    out = workdir / name
    if not (out / "manifest.json").exists():
        start = time.perf_counter()
        if teacher == "bundled":
            corpus = copy_bundled_corpus(workdir / f"{name}-corpus", size)
            config = BuildConfig(corpus=(str(corpus),), teacher=DEFAULT_TEACHER, out=str(out), k=64, seq_len=256,
                                 device="cpu", progress=False)
        else:
            corpus = make_corpus(workdir / f"{name}-corpus", size * 256, seed=len(name))
            # unit_documents=8: ~40 sequences per write, so the writer cuts ~4 MB row groups (it does not split
            # a larger write: with the default 256 documents a unit became one 70 MB row group)
            config = BuildConfig(corpus=(str(corpus),), teacher=teacher, out=str(out), k=64, seq_len=256,
                                 unit_documents=8, device="cpu", progress=False)
        build(config)
        print(f"built {name}: {open_store(out).manifest.num_sequences} sequences in {time.perf_counter() - start:.0f} s")
    return out


def positions(batch: Batch) -> int:
    return int(batch["attention_mask"].sum()) - len(batch["attention_mask"])


def rate(batches: Iterable[Batch]) -> float:
    """Collated positions/s of one pass."""
    start, total = time.perf_counter(), 0
    for batch in batches:
        total += positions(batch)
    return total / (time.perf_counter() - start)


def same(a: Batch, b: Batch) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def hf_dataset(store: Path, fmt: str, cache_dir: Path):
    from datasets import load_dataset

    shards = [str(store / s.path) for s in open_store(store).manifest.shards]
    return load_dataset("parquet", data_files=shards, split="train", cache_dir=str(cache_dir)).with_format(fmt)


def hf_cache_bytes(dataset) -> int:
    return sum(Path(f["filename"]).stat().st_size for f in dataset.cache_files)


def hf_batches(dataset, index_batches: list[list[int]], collate: Collator) -> Iterator[Batch]:
    """The same tensors from HF rows: samples in the form the kdstore datasets give, padded by the same Collator."""
    k = collate.codec.k

    def to_np(x):
        return x.numpy() if hasattr(x, "numpy") else np.asarray(x)

    for indices in index_batches:
        rows = dataset[indices]  # shuffled access: the sampler's indices
        yield collate([{"index": index, "input_ids": to_np(rows["input_ids"][i]),
                        "topk_id_deltas": to_np(rows["topk_id_deltas"][i]).reshape(-1, k),
                        "topk_logprob_codes": to_np(rows["topk_logprob_codes"][i]).reshape(-1, k),
                        "tail_logmass_codes": to_np(rows["tail_logmass_codes"][i]),
                        "target_logprob_codes": to_np(rows["target_logprob_codes"][i])}
                       for i, index in enumerate(indices)])


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


def pyarrow_batches(table, codec, index_batches: list[list[int]], collate: Collator) -> Iterator[Batch]:
    for indices in index_batches:
        rows = StoredRows(codec, table.take(indices).combine_chunks().to_batches()[0], 0)
        samples = [dict(rows.sample(i), index=index) for i, index in enumerate(indices)]
        yield collate(samples)


def mmap_batches(dataset: MemoryMappedDataset, index_batches: list[list[int]], collate: Collator) -> Iterator[Batch]:
    for indices in index_batches:
        yield collate([dataset[i] for i in indices])


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
    print(before, after["VmHWM"], after["VmRSS"], flush=True)  # before the interpreter's exit, which can abort


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
    parser.add_argument("--teacher", choices=("synthetic", "bundled"), default="synthetic",
                        help="a tiny random teacher over Zipf words, or kdstore's bundled trained teacher and corpus")
    parser.add_argument("--sequences", type=int, default=1500, help="synthetic: sequences of 256 tokens in the small store")
    parser.add_argument("--scale", type=int, default=4, help="the large store holds about this many times more")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per batch")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per path and output; the best counts")
    parser.add_argument("--workdir", default=None, help="keeps the teacher, stores and HF cache; reused when run again")
    parser.add_argument("--shuffle-window", type=int, default=None,
                        help="rows shuffled together (default: 8 row groups' worth, which depends on the store)")
    parser.add_argument("--no-rss", action="store_true", help="skip the RSS passes (throughput and bytes only)")
    parser.add_argument("--rss-child", nargs=2, metavar=("STORE", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        return rss_child(*args.rss_child, PlanConfig(batch_size=args.batch_size, seed=0, shuffle_window=args.shuffle_window))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kdstore-loader-bench-"))
    if args.teacher == "bundled":
        small = make_store(workdir, "bundled", "bundled-small", 1)
        large = make_store(workdir, "bundled", "bundled-large", args.scale)
    else:
        teacher = workdir / "teacher"
        if not (teacher / "config.json").exists():
            make_teacher(teacher)
        small = make_store(workdir, str(teacher), "small", args.sequences)
        # chunking varies: stay >= scale
        large = make_store(workdir, str(teacher), "large", int(args.sequences * args.scale * 1.05))
    plan = PlanConfig(batch_size=args.batch_size, seed=0, shuffle_window=args.shuffle_window)

    measure_throughput(large, workdir, plan, args.repeats)  # the larger store: more batches, steadier numbers
    if not args.no_rss:
        print_windows((small, large), plan)
        for kind in ("mmap", "stream"):
            measure_rss((small, large), kind, args)


def measure_throughput(store: Path, workdir: Path, plan: PlanConfig, repeats: int) -> None:
    """Positions/s of each path and output over the same index batches (checked to give the same tensors)."""
    codec = open_store(store).codec
    dataset = MemoryMappedDataset(store)  # makes the Arrow copy (not timed)
    index_batches = list(EpochBatchSampler(dataset.group_sizes, plan, 0, 1))
    hf = hf_dataset(store, "numpy", workdir / "hf")  # converts the shards to HF's Arrow cache once (not timed)
    sources = {"index_batches": index_batches, "table": pyarrow_table(store), "hf_cache": workdir / "hf",
               "stream": StreamingDataset(store, plan, rank=0, num_ranks=1)}
    num_positions = sum(positions(b) for b in mmap_batches(dataset, index_batches, Collator(codec)))
    print(f"throughput on {store} ({len(dataset)} sequences, {num_positions:,} positions, K={codec.k}, "
          f"batch {plan.batch_size}, shuffle on, 1 process, torch threads {torch.get_num_threads()}, "
          f"best of {repeats} passes):")
    for output in OUTPUTS:
        collate = Collator(codec, output=output)
        paths = make_paths(store, collate, **sources)
        check_same(paths)
        if output == "wide":  # the host's wide output is the device's widen() of the compact one
            compact = mmap_batches(dataset, index_batches, Collator(codec))
            for number, (wide, codes) in enumerate(zip(paths["kdstore MemoryMappedDataset"](), compact, strict=True)):
                assert same(widen(codes, collate.logprob_table), wide), f"widen() differs from output='wide' in batch {number}"
        rates = best_rates(paths, repeats)
        best_hf = max(r for name, r in rates.items() if name.startswith("HF"))
        print(f" output={output!r}:")
        for name, best in rates.items():
            print(f"  {name:<30} {best:>12,.0f} positions/s   {best / best_hf:5.2f}x the best HF path")
    store_bytes = open_store(store).manifest.total_bytes
    hf_bytes = hf_cache_bytes(hf)
    print(f"on disk ({store.name}): store {store_bytes:,} B; kdstore Arrow copy {dataset.path.stat().st_size:,} B; "
          f"HF Arrow cache {hf_bytes:,} B ({hf_bytes / store_bytes:.1f}x the store)")


def make_paths(store: Path, collate: Collator, index_batches: list[list[int]], table, stream: StreamingDataset,
               hf_cache: Path) -> dict[str, Callable[[], Iterator[Batch]]]:
    """Path name -> a function starting one pass (opening its dataset outside the timing); the memory-mapped
    path first (the others are checked against it).

    Each pass opens its dataset afresh, as a new DataLoader worker does each epoch: both memory-mapped paths
    start with nothing mapped, and kdstore's pays its first-touch XXH3 check of every record batch again.
    """
    return {
        "kdstore MemoryMappedDataset": lambda: mmap_batches(MemoryMappedDataset(store), index_batches, collate),
        "kdstore StreamingDataset": lambda: map(collate, stream),
        "HF datasets (numpy format)": lambda: hf_batches(hf_dataset(store, "numpy", hf_cache), index_batches, collate),
        "HF datasets (torch format)": lambda: hf_batches(hf_dataset(store, "torch", hf_cache), index_batches, collate),
        "plain pyarrow (in memory)": lambda: pyarrow_batches(table, collate.codec, index_batches, collate),
    }


def check_same(paths: dict[str, Callable[[], Iterator[Batch]]]) -> None:
    """Every batch of every path equals the first path's (the memory-mapped dataset's), batch by batch."""
    (_, make_reference), *others = paths.items()
    for name, make in others:
        count = 0
        for count, (batch, expected) in enumerate(zip(make(), make_reference(), strict=True), 1):
            assert same(batch, expected), f"{name} gave other tensors than the memory-mapped dataset in batch {count}"
        assert count > 0


def best_rates(paths: dict[str, Callable[[], Iterator[Batch]]], repeats: int) -> dict[str, float]:
    """The best positions/s of ``repeats`` passes per path, the paths taking turns."""
    rates: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, make in paths.items():
            batches = make()  # a fresh dataset, where the path makes one, outside the timing
            rates[name].append(rate(batches))
    return {name: max(values) for name, values in rates.items()}


def measure_rss(stores: tuple[Path, Path], kind: str, args: argparse.Namespace) -> None:
    """RSS of a child process doing one pass of dataset ``kind`` over each store."""
    peaks, growth = [], []
    for store in stores:
        if kind == "mmap":
            convert_to_arrow(store)  # the copy is made outside the measured child
        window = [] if args.shuffle_window is None else ["--shuffle-window", str(args.shuffle_window)]
        out = subprocess.run([sys.executable, __file__, "--rss-child", str(store), kind, "--batch-size",
                              str(args.batch_size), *window], capture_output=True, text=True)
        numbers = out.stdout.split()[-3:]
        if len(numbers) != 3 or not all(n.isdigit() for n in numbers):
            raise RuntimeError(f"the RSS child ({kind}, {store}) failed: {out.stderr[-2000:]}")
        if out.returncode:  # seen ~1 run in 8 of the streaming child: "terminate called without an active exception"
            print(f"  (the {kind} child printed its figures, then exited with {out.returncode}: "
                  f"{(out.stderr.strip().splitlines() or [''])[-1]})")
        before, peak, final = map(int, numbers)
        peaks.append(peak)
        growth.append(peak - before)
        manifest = open_store(store).manifest
        print(f"RSS {kind:<6} {store.name:<13} ({manifest.num_sequences:>6} sequences, {manifest.total_bytes:>12,} B): "
              f"before the pass {before} MiB, peak {peak} MiB (+{peak - before}), end {final} MiB")
    # most of the process's RSS is torch & co. (the "before" figure); the growth during the pass is what could scale
    print(f"  {kind}: large / small peak RSS = {peaks[1] / peaks[0]:.3f}; growth during the pass {growth[0]} -> {growth[1]} MiB")


if __name__ == "__main__":
    main()
