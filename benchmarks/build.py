"""Build benchmark: full `kdstore build` throughput against the bare teacher forward, in the same run.

    python benchmarks/build.py [--teachers bundled,100m] [--dtype float32] [--device auto] [--rss]

For each teacher, over the same sequences (the bundled corpus, cut by the same
code as a build) and the same length-sorted batches:
  (a) bare forward: model(input_ids, attention_mask).logits, nothing else;
  (a') the forward work a build cannot avoid: the decoder, then the output head
      over the build's position chunks (never the whole [B, T, V] at once);
  (a'') (a') plus the device-side top-K, log-sum-exp, tail and target
      (kdstore.teacher.sparsify), left on the device: all a build does before its host path;
  (b) full build: kdstore.build.build() into a fresh store (teacher forward,
      device-side top-K/tail/target, then the host path: copy, encode, Parquet write),
      timed from the first unit to the closed store (teacher loading excluded,
      reported separately).
It prints tokens/s of each and (b)/(a), (b)/(a'), (b)/(a''): (b)/(a'') is what the host path costs the
device; (b)/(a') adds top-K, tail and target. Before timing (a), every batch shape is run once: the first
pass over new shapes ran several times slower on the CPU. "100m" is a randomly initialised
~100M-parameter Llama with a 131,072-token vocabulary, saved and loaded with
save_pretrained / from_pretrained like a real teacher.
Host path (on by default; --no-stages skips it): the stages after the device-side top-K, each timed alone on
precomputed top-K arrays (the bundled teacher's own outputs over the corpus, --repeat times over), then all
of them behind kdstore.pipeline.HostPipeline as a build runs them (threads overlapping):
  copy      HostCopy(...).wait(): device -> host (pinned, side stream) on CUDA; a view on the CPU
  encode    kdstore.codec.encode_positions over each whole batch
  assemble  kdstore.pipeline.assemble_table: one Arrow row per sequence from flat arrays and offsets
  order     kdstore.pipeline.unit_rows: a unit's rows back in sequence order
  (before)  the same rows encoded one sequence at a time and assembled by format.rows_to_table, as builds did
            before kdstore.pipeline: the baseline of encode + assemble + order
  write     ShardWriter.write + close: row groups, zstd, shard files, fsync, sha256, manifest; at the default
            zstd level and at level 3 (BuildConfig.zstd_level)
Each figure is the best of --trials runs (a shared machine's load moves single runs by 2x).
--rss also builds the default corpus and a 10x copy in child processes and
prints each one's peak RSS, to show memory does not grow with corpus size.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kdstore.build import DEFAULT_CORPUS, DEFAULT_TEACHER, BuildConfig, _batches, build, run_teacher
from kdstore.codec import CodecConfig, encode_positions
from kdstore.corpus import iter_units, tokenize_unit
from kdstore.format import Manifest, logits_schema, rows_to_table
from kdstore.pipeline import HostPipeline, SparseBatch, assemble_table, unit_rows
from kdstore.teacher import HostCopy, load_teacher, load_tokenizer
from kdstore.writer import DEFAULT_ZSTD_LEVEL, ShardWriter


def make_100m_teacher(folder: Path) -> Path:
    """Random Llama: hidden 512, 12 layers, vocab 131072 (tied) -> ~100M parameters; bundled tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=131072, hidden_size=512, intermediate_size=1536, num_hidden_layers=12,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(DEFAULT_TEACHER).save_pretrained(folder)
    print(f"100m teacher: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    return folder


def bare_forward(config: BuildConfig, chunked_head: bool = False, top_k: bool = False) -> tuple[float, int]:
    """Seconds and tokens of the teacher forward alone over the build's sequences and batches.

    ``chunked_head=False``: model(...).logits, the usual full [B, T, V] forward.
    ``chunked_head=True``: the work a build cannot avoid -- the decoder once, then the output head over
    the same position chunks the build uses (kdstore.teacher.teacher_logits_chunks), nothing else.
    """
    from transformers import AutoTokenizer

    from kdstore.teacher import sparsify, teacher_logits_chunks

    teacher = load_teacher(config.teacher, config.dtype, config.device)  # as the build loads it
    model, device = teacher.model, teacher.device
    tokenizer = AutoTokenizer.from_pretrained(config.teacher)
    units = list(iter_units(config.corpus, config.corpus_config()))
    num_tokens, seconds = 0, 0.0
    with torch.inference_mode():
        for unit in units:
            sequences = tokenize_unit(unit, tokenizer, config.corpus_config())
            for batch in _batches(sequences, config.batch_tokens):
                width = len(sequences[batch[0]].input_ids)
                ids = torch.zeros((len(batch), width), dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, index in enumerate(batch):
                    tokens = torch.from_numpy(sequences[index].input_ids).long()
                    ids[row, :len(tokens)], mask[row, :len(tokens)] = tokens, 1
                ids, mask = ids.to(device), mask.to(device)
                start = time.perf_counter()
                if chunked_head:
                    for r, p, logits in teacher_logits_chunks(teacher, ids, mask):
                        if top_k:  # (a''): the device-side top-K, tail and target too, left on the device
                            sparsify(logits, ids[r, p + 1], config.k, overwrite=True)
                        del logits  # each chunk is made, then dropped: what the build's head costs
                else:
                    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                    del logits
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds += time.perf_counter() - start
                num_tokens += int(mask.sum())
    return seconds, num_tokens


def compare(name: str, config: BuildConfig) -> dict[str, float]:
    """Tokens/s of (a), (a') and (b) over the same batches, printed as one line and returned."""
    bare_forward(config, chunked_head=True)  # warm-up: the first batch of each shape costs several times the next
    bare_seconds, bare_tokens = bare_forward(config)
    chunked_seconds, _ = bare_forward(config, chunked_head=True)
    device_seconds, _ = bare_forward(config, chunked_head=True, top_k=True)
    shutil.rmtree(config.out, ignore_errors=True)
    result = build(config)
    bare_rate, chunked_rate = bare_tokens / bare_seconds, bare_tokens / chunked_seconds
    device_rate, build_rate = bare_tokens / device_seconds, result.num_tokens / result.compute_seconds
    print(f"{name:>8} {config.dtype:>8} {str(config.device):>6} | (a) bare forward {bare_rate:>9,.0f} tok/s | "
          f"(a') decoder + chunked head {chunked_rate:>9,.0f} | (a'') + device-side top-K {device_rate:>9,.0f} | "
          f"(b) build {build_rate:>9,.0f} | b/a {build_rate / bare_rate:.3f} | b/a' {build_rate / chunked_rate:.3f} | "
          f"b/a'' {build_rate / device_rate:.3f} | {result.num_tokens} tokens, "
          f"teacher load {result.seconds - result.compute_seconds:.1f} s")
    return {"bare": bare_rate, "chunked": chunked_rate, "device": device_rate, "build": build_rate,
            "tokens": result.num_tokens}


def precomputed_units(config: BuildConfig, repeat: int) -> tuple[CodecConfig, list[tuple[list, list]]]:
    """The teacher's sparse outputs over the corpus, on the host: per unit (sequences, [(indices, arrays)])."""
    tokenizer, teacher = load_tokenizer(config.teacher), load_teacher(config.teacher, config.dtype, config.device)
    codec = CodecConfig(k=config.k, vocab_size=teacher.vocab_size)
    units = []
    for unit in iter_units(config.corpus, config.corpus_config()):
        sequences = tokenize_unit(unit, tokenizer, config.corpus_config())
        units.append((sequences, [(b.indices, b.copy.wait()) for b in run_teacher(teacher, sequences, config)]))
    return codec, units * repeat


def stage_rates(config: BuildConfig, work: Path, repeat: int, trials: int) -> None:
    """Tokens/s of each host stage alone, of their sum, and of HostPipeline running them together."""
    codec, units = precomputed_units(config, repeat)
    schema = logits_schema(codec, ("teacher_score",))
    teacher = load_teacher(config.teacher, config.dtype, config.device)
    tokenizer = {"name": "bundled", "files_sha256": None, "vocab_size": codec.vocab_size, "special_ids": {}}
    manifest = Manifest(table="logits", teacher=teacher.info(), tokenizer=tokenizer, codec=codec.to_dict(), build={})
    num_tokens = sum(len(s.input_ids) for sequences, _ in units for s in sequences)
    device = teacher.device
    on_device = [[{n: torch.from_numpy(a).to(device) for n, a in arrays.items()} for _, arrays in parts]
                 for _, parts in units]

    def copy() -> None:
        for tensors in (t for unit in on_device for t in unit):
            HostCopy(tensors).wait()

    encoded: list = []
    def encode() -> None:
        encoded[:] = [[encode_positions(codec, a["topk_ids"], a["topk_logprobs"], a["tail_logmass"], a["target_logprob"])
                       for _, a in parts] for _, parts in units]

    tables: list = []
    def assemble() -> None:
        tables[:] = [[(i, assemble_table(codec, schema, [seqs[j] for j in i], cols, a["target_logprob"]))
                      for (i, a), cols in zip(parts, unit_cols)] for (seqs, parts), unit_cols in zip(units, encoded)]

    ordered: list = []
    def order() -> None:
        ordered[:] = [unit_rows(parts) for parts in tables]

    def write(level: int) -> None:
        shutil.rmtree(work / "stage-store", ignore_errors=True)
        with ShardWriter(work / "stage-store", manifest, schema, zstd_level=level) as writer:
            for table in ordered:
                writer.write(table)

    def together(level: int) -> None:
        shutil.rmtree(work / "pipeline-store", ignore_errors=True)
        with ShardWriter(work / "pipeline-store", manifest, schema, zstd_level=level) as writer, \
                HostPipeline(writer, codec, schema) as pipe:
            for (sequences, parts), tensors in zip(units, on_device):
                pipe.put_unit(sequences, (SparseBatch(i, HostCopy(t)) for (i, _), t in zip(parts, tensors)))

    def row_by_row() -> None:  # the baseline: what builds did before kdstore.pipeline (one sequence at a time)
        for sequences, parts in units:
            for indices, a in parts:
                cuts = np.cumsum([len(sequences[i].input_ids) - 1 for i in indices])[:-1]
                split = {name: np.split(values, cuts) for name, values in a.items()}
                rows = [{"sequence_id": sequences[i].sequence_id, "input_ids": sequences[i].input_ids,
                         "teacher_score": float(np.mean(split["target_logprob"][j])),
                         **encode_positions(codec, *(split[n][j] for n in ("topk_ids", "topk_logprobs", "tail_logmass",
                                                                            "target_logprob")))}
                        for j, i in enumerate(indices)]
                rows_to_table(schema, rows)

    rates: dict[str, float] = {}
    for name, stage in (("copy", copy), ("encode", encode), ("assemble", assemble), ("order", order)):
        rates[name] = num_tokens / min(_seconds(stage) for _ in range(trials))
    baseline = num_tokens / min(_seconds(row_by_row) for _ in range(trials))
    print(f"host stages at K={codec.k}, {num_tokens:,} tokens, {device} (tokens/s, best of {trials}): "
          + " | ".join(f"{n} {rates[n]:,.0f}" for n in rates)
          + f" | encode + assemble + order {1 / sum(1 / rates[n] for n in ('encode', 'assemble', 'order')):,.0f}"
          f" vs row by row (before) {baseline:,.0f}")
    for level in (DEFAULT_ZSTD_LEVEL, 3):
        write_rate = num_tokens / min(_seconds(write, level) for _ in range(trials))
        serial = 1 / (sum(1 / r for r in rates.values()) + 1 / write_rate)
        pipeline_rate = num_tokens / min(_seconds(together, level) for _ in range(trials))
        print(f"  zstd {level}: write {write_rate:,.0f} | all stages one after another {serial:,.0f} | "
              f"HostPipeline (threads) {pipeline_rate:,.0f} | {_bytes_per_token(work / 'pipeline-store'):.1f} bytes/token")


def _seconds(stage, *args) -> float:
    start = time.perf_counter()
    stage(*args)
    return time.perf_counter() - start


def _bytes_per_token(store: Path) -> float:
    manifest = Manifest.from_json((store / "manifest.json").read_text())
    return manifest.total_bytes / max(1, manifest.num_tokens)




def peak_rss(corpus: list[str], out: Path) -> float:
    """Peak RSS (MB) of a `kdstore build` child process over ``corpus``."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork + exec, so a child of this
    # (large) benchmark process would report the parent's peak, not its own.
    code = ("from pathlib import Path; from kdstore.build import BuildConfig, build; "
            f"build(BuildConfig(corpus=tuple({corpus!r}), out={str(out)!r}, progress=False, device='cpu')); "
            "print([l.split()[1] for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM')][0])")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(output.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", default="bundled,100m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rss", action="store_true")
    parser.add_argument("--no-stages", action="store_true", help="skip the host-path stage timings")
    parser.add_argument("--repeat", type=int, default=4, help="copies of the corpus's top-K fed to the host stages")
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        for name in filter(None, args.teachers.split(",")):  # --teachers "" runs --rss alone
            teacher = DEFAULT_TEACHER if name == "bundled" else str(make_100m_teacher(work / "teacher-100m"))
            corpus = (DEFAULT_CORPUS,)
            if name == "100m":  # a slice of the corpus keeps the CPU run to minutes
                files = sorted(Path(DEFAULT_CORPUS).glob("*.txt"))[:2]
                corpus = tuple(str(f) for f in files)
            config = BuildConfig(corpus=corpus, teacher=teacher, out=str(work / f"store-{name}"), seq_len=args.seq_len,
                                 dtype=args.dtype, device=args.device, progress=False)
            compare(name, config)
            if name == "bundled" and not args.no_stages:
                stage_rates(config, work, args.repeat, args.trials)
        if args.rss:
            copies = work / "corpus-10x"
            for i in range(10):
                shutil.copytree(DEFAULT_CORPUS, copies / f"copy{i}")
            small = peak_rss([DEFAULT_CORPUS], work / "rss-1x")
            large = peak_rss([str(copies)], work / "rss-10x")
            print(f"peak RSS: default corpus {small:.0f} MB, 10x corpus {large:.0f} MB ({large / small:.2f}x)")


if __name__ == "__main__":
    main()
