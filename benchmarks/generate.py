"""Generation benchmark: `kdstore generate` against plain `model.generate` with the same settings, in the same run.

    python benchmarks/generate.py [--teacher PATH] [--prompts N] [-n 2] [--max-new-tokens 48] [--rounds 3]
                                  [--device auto] [--dtype float32] [--threads N] [--rss]

Over the same prompts (the bundled held-out problems, kdstore/assets/problems/held_out.jsonl), the same
samples per prompt, batch size, temperature, top-p and max_new_tokens:
  (a) plain: ``model.generate(do_sample=True, ...)`` on the same length-sorted, left-padded batches, tokens only;
  (b) kdstore: ``kdstore.generate.generate()`` into a fresh store: sampling with the KV cache, the teacher's top-K,
      tail and token log-prob over the full vocabulary at every step, answers and votes, background encoding and
      Parquet writing, timed from the first batch to the closed store (teacher loading excluded).
Rounds alternate (a) and (b); it prints generated tokens/s of each and (b)/(a) per round and the median, by
wall time and by this process's CPU time (all threads; (b)'s writer thread included, and for both the teacher
loading, ~0.1 s for the bundled one): on a machine shared with other work the wall-time rates swing with the
neighbours' load, the CPU-time ratio much less.
Generated tokens are counted up to and including each row's end-of-sequence token. The two draw different
random tokens, so their completion lengths differ a little: the ratio is of rates, not of times.
--rss also runs (b) on N and 4N prompts in child processes and prints each one's peak memory (RSS, and CUDA
max allocated on a GPU), to show memory does not grow with the number of prompts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kdstore.build import ASSETS, DEFAULT_TEACHER
from kdstore.generate import GenerateConfig, generate
from kdstore.prompts import prompt_token_ids, read_prompts
from kdstore.teacher import load_teacher, load_tokenizer

PROBLEMS = ASSETS / "problems" / "held_out.jsonl"


def prompt_subset(folder: Path, count: int) -> Path:
    """The first ``count`` held-out problems (repeated with new ids past 200) as a JSONL file in ``folder``."""
    lines = PROBLEMS.read_text().splitlines()
    path = folder / f"prompts-{count}.jsonl"
    records = []
    for i in range(count):
        record = json.loads(lines[i % len(lines)])
        records.append(json.dumps({**record, "id": f"{record['id']}-{i // len(lines)}"}))
    path.write_text("\n".join(records) + "\n")
    return path


def plain_generate(config: GenerateConfig) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and generated tokens of model.generate over the prompts, batched as kdstore
    batches them."""
    cpu_started = time.process_time()
    teacher = load_teacher(config.teacher, config.dtype, config.device)
    tokenizer = load_tokenizer(config.teacher)
    prompts = [prompt_token_ids(p, tokenizer, False, None) for p in read_prompts(config.prompts)]
    samples = sorted([ids for ids in prompts for _ in range(config.n)], key=lambda ids: -len(ids))
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id or 0
    torch.manual_seed(0)
    _sync(teacher.device)
    started, generated = time.perf_counter(), 0
    for begin in range(0, len(samples), config.batch_size):
        batch = samples[begin:begin + config.batch_size]
        width = max(len(ids) for ids in batch)
        ids = torch.tensor([[pad] * (width - len(x)) + x for x in batch], device=teacher.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch], device=teacher.device)
        with torch.inference_mode():
            out = teacher.model.generate(ids, attention_mask=mask, do_sample=config.temperature > 0,
                                         temperature=config.temperature or None, top_p=config.top_p, top_k=config.top_k,
                                         max_new_tokens=config.max_new_tokens, pad_token_id=pad, eos_token_id=eos)
        new = out[:, width:].cpu()
        for row in new.tolist():
            generated += row.index(eos) + 1 if eos in row else len(row)
    _sync(teacher.device)
    return time.perf_counter() - started, time.process_time() - cpu_started, generated


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kdstore_generate(config: GenerateConfig) -> tuple[float, float, int]:
    cpu_started = time.process_time()
    result = generate(config)
    return result.compute_seconds, time.process_time() - cpu_started, result.num_tokens


def peak_memory_child(config: GenerateConfig) -> dict[str, float]:
    """Run kdstore generate in a fresh process; its peak RSS (MiB) and CUDA max allocated (MiB)."""
    code = (
        "import json, resource, sys, torch\n"
        "from kdstore.generate import GenerateConfig, generate\n"
        "generate(GenerateConfig(**json.loads(sys.argv[1])))\n"
        "cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0\n"
        "print(json.dumps({'rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 'cuda_mib': cuda}))\n")
    fields = {k: v for k, v in vars(config).items()}
    fields["stop"] = list(fields["stop"])
    done = subprocess.run([sys.executable, "-c", code, json.dumps(fields)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=DEFAULT_TEACHER)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("-n", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("-k", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); 1 makes "
                        "CPU rates steadier on a shared machine")
    parser.add_argument("--rss", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        prompts = prompt_subset(folder, args.prompts)

        def settings(out: str, count_prompts: Path = prompts) -> GenerateConfig:
            return GenerateConfig(prompts=str(count_prompts), teacher=args.teacher, out=out, n=args.n, k=args.k,
                                  temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                                  batch_size=args.batch_size, unit_prompts=max(1, args.batch_size // args.n),
                                  device=args.device, dtype=args.dtype, progress=False)

        print(f"teacher {args.teacher}, {args.prompts} prompts x {args.n} samples, {args.max_new_tokens} new tokens at "
              f"most, temperature {args.temperature}, batch {args.batch_size}, K {args.k}, device {args.device}")
        ratios, cpu_ratios = [], []
        for round_index in range(args.rounds):
            plain_seconds, plain_cpu, plain_tokens = plain_generate(settings(str(folder / "unused")))
            ours_seconds, ours_cpu, ours_tokens = kdstore_generate(settings(str(folder / f"store-{round_index}")))
            plain_rate, ours_rate = plain_tokens / plain_seconds, ours_tokens / ours_seconds
            ratios.append(ours_rate / plain_rate)
            cpu_ratios.append((ours_tokens / ours_cpu) / (plain_tokens / plain_cpu))
            print(f"round {round_index}: model.generate {plain_tokens} tokens {plain_rate:,.0f} tokens/s "
                  f"({plain_tokens / plain_cpu:,.0f} per CPU s) | kdstore generate {ours_tokens} tokens "
                  f"{ours_rate:,.0f} tokens/s ({ours_tokens / ours_cpu:,.0f} per CPU s) | ratio {ratios[-1]:.2f}x "
                  f"(CPU time {cpu_ratios[-1]:.2f}x)")
        print(f"median kdstore / model.generate: {statistics.median(ratios):.2f}x by wall time, "
              f"{statistics.median(cpu_ratios):.2f}x by CPU time (target >= 0.85x)")
        if args.rss:
            for count in (args.prompts, 4 * args.prompts):
                memory = peak_memory_child(settings(str(folder / f"rss-{count}"), prompt_subset(folder, count)))
                print(f"{count} prompts: peak RSS {memory['rss_mib']:,.0f} MiB, CUDA max allocated "
                      f"{memory['cuda_mib']:,.0f} MiB")


if __name__ == "__main__":
    main()
