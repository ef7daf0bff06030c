"""GPU benchmark in one short run: build throughput against a bare teacher forward on the same GPU, peak GPU
memory, the host stages with real device -> host copies, and student step time CE vs KD at K=64.

    python benchmarks/gpu.py            # a CUDA machine: an estimated 4 minutes on one H200 (budget: under 8)
    python benchmarks/gpu.py --smoke    # tiny sizes on the CPU: proves the script runs (tests/integration/test_benchmarks.py)

The teacher is a randomly initialised Llama of TinyLlama-1.1B's shape (32,000-token vocabulary, 22 layers,
hidden 2048, grouped-query attention), made on the device, cast to bf16 and saved with save_pretrained into a
temporary folder: nothing is downloaded. The corpus is the bundled one, copied --corpus-copies times (each copy
is new sequences: ids hash the path), packed into sequences of --seq-len tokens. Random weights give flatter
distributions than a trained teacher, so the bytes/token printed are an upper bound for the codec.

Prints a markdown table for docs/build.md (add the date and the GPU's name, which the table states).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import build as build_bench  # noqa: E402  benchmarks/build.py: bare_forward, stage_rates

from kdstore.build import DEFAULT_CORPUS, DEFAULT_TEACHER, BuildConfig, build  # noqa: E402
from kdstore.collate import widen  # noqa: E402
from kdstore.loader import Sequences, make_dataloader  # noqa: E402
from kdstore.losses import LossConfig, distillation_loss  # noqa: E402
from kdstore.shuffle import PlanConfig  # noqa: E402
from kdstore.store import open_store  # noqa: E402
from kdstore.student import load_student  # noqa: E402
from kdstore.train import TrainConfig, open_data, train  # noqa: E402

# TinyLlama-1.1B's shape; "smoke" is small enough for a CPU test and keeps the bundled tokenizer's 4,096 ids
SIZES = {
    "full": {"teacher": {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                         "num_attention_heads": 32, "num_key_value_heads": 4},
             "corpus_copies": 16, "seq_len": 1024, "batch_tokens": 32768, "train_batch": 16, "train_steps": 20,
             "dtype": "bfloat16", "device": "cuda", "repeat": 8},
    "smoke": {"teacher": {"vocab_size": 4096, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "num_key_value_heads": 2},
              "corpus_copies": 1, "seq_len": 64, "batch_tokens": 2048, "train_batch": 4, "train_steps": 3,
              "dtype": "float32", "device": "cpu", "repeat": 1},
}


def make_teacher(folder: Path, shape: dict, dtype: str, device: str) -> int:
    """A random Llama of ``shape`` saved like a real teacher (weights in ``dtype``, the bundled tokenizer)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    with torch.device(device):  # initialising 1.1B parameters on the CPU alone takes a minute
        model = LlamaForCausalLM(config)
    model.to(getattr(torch, dtype)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(DEFAULT_TEACHER).save_pretrained(folder)
    num_parameters = sum(p.numel() for p in model.parameters())
    del model
    return num_parameters


def copy_corpus(folder: Path, copies: int, smoke: bool) -> Path:
    files = sorted(Path(DEFAULT_CORPUS).glob("*.txt"))[:2 if smoke else None]
    for i in range(copies):
        (folder / f"copy{i}").mkdir(parents=True)
        for file in files:
            shutil.copy(file, folder / f"copy{i}" / file.name)
    return folder


def peak_gib(device: torch.device, run) -> tuple[object, float]:
    """(run(), the peak GPU memory it allocated in GiB; 0 on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    value = run()
    return value, torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def step_seconds(store: str, size: dict, device: torch.device, loss: str, precision: str) -> float:
    """Seconds per optimizer step of the preset:quarter student on the store's batches, loss "ce" (labels only) or
    "kd" (forward KL on the stored top-K, kdstore.losses), bf16 autocast when ``precision`` says so."""
    config = TrainConfig(store=store, student="preset:quarter", batch_size=size["train_batch"], val_sequences=8,
                         device=str(device))
    data = open_data(config)
    student = load_student(config.student, open_store(store), seed=0).to(device)
    loader = make_dataloader(Sequences(data.dataset, data.train_rows), PlanConfig(size["train_batch"], seed=0),
                             collator=data.collate)
    batches = [widen({k: v.to(device) for k, v in b.items()}, data.collate.logprob_table)
               for b in islice(iter(loader), size["train_steps"] + 2)]
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    kd_config = LossConfig(name="forward_kl")

    def step(batch: dict) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            if loss == "ce":
                value = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(),
                                                          ignore_index=-100)
            else:
                value, _ = distillation_loss(logits, batch, kd_config)
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for batch in batches[:2]:  # warm-up: kernels chosen, allocator filled
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for batch in batches[2:]:
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / max(1, len(batches) - 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny teacher and corpus on the CPU")
    parser.add_argument("--corpus-copies", type=int, default=None)
    args = parser.parse_args()
    size = SIZES["smoke" if args.smoke else "full"]
    if size["device"] == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU; run it with --smoke to check it on the CPU")
    device = torch.device(size["device"])
    precision = "bf16" if size["dtype"] == "bfloat16" else "fp32"
    rows: list[tuple[str, str]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        num_parameters = make_teacher(work / "teacher", size["teacher"], size["dtype"], size["device"])
        corpus = copy_corpus(work / "corpus", args.corpus_copies or size["corpus_copies"], args.smoke)
        config = BuildConfig(corpus=(str(corpus),), teacher=str(work / "teacher"), out=str(work / "store"), k=64,
                             seq_len=size["seq_len"], pack=True, batch_tokens=size["batch_tokens"], dtype=size["dtype"],
                             device=size["device"], progress=False)
        build_bench.bare_forward(config, chunked_head=True)  # warm-up
        (bare_seconds, num_tokens), bare_peak = peak_gib(device, lambda: build_bench.bare_forward(config))
        chunked_seconds, _ = build_bench.bare_forward(config, chunked_head=True)
        device_seconds, _ = build_bench.bare_forward(config, chunked_head=True, top_k=True)
        result, build_peak = peak_gib(device, lambda: build(config))
        bare_rate, build_rate = num_tokens / bare_seconds, result.num_tokens / result.compute_seconds
        fast = build(dataclasses.replace(config, out=str(work / "store-zstd3"), zstd_level=3))  # the cheaper zstd
        fast_rate = fast.num_tokens / fast.compute_seconds
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU smoke run)"
        rows += [("device", gpu),
                 ("teacher", f"random Llama, {num_parameters / 1e6:,.1f}M parameters, V={size['teacher']['vocab_size']:,}, "
                             f"{size['dtype']}"),
                 ("tokens", f"{num_tokens:,} (seq_len {size['seq_len']}, packed, {size['batch_tokens']:,} tokens/batch)"),
                 ("(a) bare forward, model(...).logits", f"{bare_rate:,.0f} tokens/s"),
                 ("(a') decoder + chunked head", f"{num_tokens / chunked_seconds:,.0f} tokens/s"),
                 ("(a'') + device-side top-K, tail, target (K=64)", f"{num_tokens / device_seconds:,.0f} tokens/s"),
                 ("(b) kdstore build, K=64", f"{build_rate:,.0f} tokens/s"),
                 ("b / a (target >= 0.90)", f"{build_rate / bare_rate:.3f}"),
                 ("b / a'' (what the host path costs the GPU)", f"{build_rate * device_seconds / num_tokens:.3f}"),
                 ("(b) at zstd_level = 3: tokens/s, b / a", f"{fast_rate:,.0f} tokens/s, {fast_rate / bare_rate:.3f}"),
                 ("peak GPU memory: bare forward / build", f"{bare_peak:.1f} / {build_peak:.1f} GiB"),
                 ("store at zstd 9 / zstd 3", f"{result.total_bytes / max(1, result.store_tokens):.1f} / "
                                              f"{fast.total_bytes / max(1, fast.store_tokens):.1f} bytes/token")]
        stage_corpus = (str(corpus / "copy0"),) if args.smoke else (DEFAULT_CORPUS,)
        build_bench.stage_rates(BuildConfig(corpus=stage_corpus, device=size["device"], progress=False), work,
                                size["repeat"], 2)
        ce = step_seconds(config.out, size, device, "ce", precision)
        kd = step_seconds(config.out, size, device, "kd", precision)
        tokens_per_step = size["train_batch"] * size["seq_len"]
        rows += [(f"student step, CE only ({precision}, batch {size['train_batch']} x {size['seq_len']})",
                  f"{ce * 1e3:.1f} ms ({tokens_per_step / ce:,.0f} tokens/s)"),
                 ("student step, KD forward_kl at K=64", f"{kd * 1e3:.1f} ms ({tokens_per_step / kd:,.0f} tokens/s), "
                                                         f"{kd / ce:.2f}x CE")]
        run = train(TrainConfig(store=config.out, student="preset:quarter", out=str(work / "run"),
                                steps=size["train_steps"], batch_size=size["train_batch"], precision=precision,
                                val_sequences=8, val_every=0, checkpoint_every=0, log_every=0, warmup_steps=0,
                                device=size["device"]), log=lambda _: None, progress=False)
        rows.append(("kdstore train end to end (KD, checkpoint and export included)",
                     f"{run.tokens_per_second:,.0f} tokens/s over {run.step} steps"))
    rows.append(("this script's wall time", f"{time.perf_counter() - started:.0f} s"))
    print("\n| measured | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
