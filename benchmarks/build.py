"""Build benchmark: full `kdstore build` throughput against the bare teacher forward, in the same run.

    python benchmarks/build.py [--teachers bundled,100m] [--dtype float32] [--device auto] [--rss]

For each teacher, over the same sequences (the bundled corpus, cut by the same
code as a build) and the same length-sorted batches:
  (a) bare forward: model(input_ids, attention_mask).logits, nothing else;
  (a') the forward work a build cannot avoid: the decoder, then the output head
      over the build's position chunks (never the whole [B, T, V] at once);
  (b) full build: kdstore.build.build() into a fresh store (teacher forward,
      device-side top-K/tail/target, background encode + Parquet write),
      timed from the first unit to the closed store (teacher loading excluded,
      reported separately).
It prints tokens/s of each, (b)/(a) and (b)/(a'): (b)/(a') is the cost of
top-K, tail, target, encoding and writing on top of the forward itself. "100m" is a randomly initialised
~100M-parameter Llama with a 131,072-token vocabulary, saved and loaded with
save_pretrained / from_pretrained like a real teacher.
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

import torch

from kdstore.build import DEFAULT_CORPUS, DEFAULT_TEACHER, BuildConfig, _batches, build
from kdstore.corpus import iter_units, tokenize_unit


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


def bare_forward(config: BuildConfig, chunked_head: bool = False) -> tuple[float, int]:
    """Seconds and tokens of the teacher forward alone over the build's sequences and batches.

    ``chunked_head=False``: model(...).logits, the usual full [B, T, V] forward.
    ``chunked_head=True``: the work a build cannot avoid -- the decoder once, then the output head over
    the same position chunks the build uses (kdstore.teacher.teacher_logits_chunks), nothing else.
    """
    from transformers import AutoTokenizer

    from kdstore.teacher import load_teacher, teacher_logits_chunks

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
                    for _, _, logits in teacher_logits_chunks(teacher, ids, mask):
                        del logits  # each chunk is made, then dropped: what the build's head costs
                else:
                    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                    del logits
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds += time.perf_counter() - start
                num_tokens += int(mask.sum())
    return seconds, num_tokens


def compare(name: str, config: BuildConfig) -> None:
    bare_seconds, bare_tokens = bare_forward(config)
    chunked_seconds, _ = bare_forward(config, chunked_head=True)
    shutil.rmtree(config.out, ignore_errors=True)
    result = build(config)
    bare_rate, chunked_rate = bare_tokens / bare_seconds, bare_tokens / chunked_seconds
    build_rate = result.num_tokens / result.compute_seconds
    print(f"{name:>8} {config.dtype:>8} {str(config.device):>6} | (a) bare forward {bare_rate:>9,.0f} tok/s | "
          f"(a') decoder + chunked head {chunked_rate:>9,.0f} tok/s | (b) build {build_rate:>9,.0f} tok/s | "
          f"b/a {build_rate / bare_rate:.3f} | b/a' {build_rate / chunked_rate:.3f} | "
          f"{result.num_tokens} tokens, teacher load {result.seconds - result.compute_seconds:.1f} s")


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
        if args.rss:
            copies = work / "corpus-10x"
            for i in range(10):
                shutil.copytree(DEFAULT_CORPUS, copies / f"copy{i}")
            small = peak_rss([DEFAULT_CORPUS], work / "rss-1x")
            large = peak_rss([str(copies)], work / "rss-10x")
            print(f"peak RSS: default corpus {small:.0f} MB, 10x corpus {large:.0f} MB ({large / small:.2f}x)")


if __name__ == "__main__":
    main()
