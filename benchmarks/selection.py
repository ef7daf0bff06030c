"""MiniPLM difference sampling at toy scale: does distilling the difference-selected half beat a random half?

    .venv/bin/python benchmarks/selection.py --work DIR   # 13 min of CPU (24 wall on 2 busy shared cores)
    .venv/bin/python benchmarks/selection.py --subsets teacher-easy --work DIR   # the control, same files: 4 min
    .venv/bin/python benchmarks/selection.py --seeds 2 --steps 10 --reference-steps 20   # a smoke run, under a minute

Top to bottom, in one process and one temporary folder (``--work`` keeps it):

1. The bundled corpus split exactly as scripts/train_teacher.py split it for the bundled teacher (the same 5 %
   of documents held out, seed 0); the held-out documents never reach the teacher, reference or students.
2. A reference model much smaller than the teacher (``REFERENCE`` below), trained the way the teacher was
   (scripts/train_teacher.py's model, dropout, schedule and windows; the teacher's own tokenizer, so it reads
   the store's ids), in about a minute.
3. ``kdstore build`` of the training documents with the bundled teacher (packed 128-token sequences, K 16), and
   of the held-out documents (the validation store: its input ids are the held-out text).
4. ``kdstore score`` with the reference, timed against a bare forward of the reference over the same sequences
   in the same batches; and the bytes the score files add per sequence, without and with ``--per-token``.
5. ``kdstore select``: the half with the largest difference (reference NLL - teacher NLL), and a random half
   (``--sample`` at a temperature of 1e9: uniform, a new half per seed).
6. Students (``STUDENT``) trained by ``kdstore.train`` on each of difference half, random half and everything
   (``--subsets``; ``teacher-easy``, the half the teacher finds easiest, is a control),
   with the same steps x batch x sequence length (same tokens: every sequence is packed to 128), with CE
   (``ce_weight`` 1) and with forward-KL KD from the store (``ce_weight`` 0), several seeds; validation loss =
   the student's cross-entropy on the held-out text, mean ± SEM over seeds.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this file's folder comes first on sys.path, and this file's name would shadow the standard
# library's `select` module (which subprocess, hence torch, imports)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import train_teacher  # noqa: E402  (scripts/: the teacher's own recipe, reused for the reference)

# the reference: hidden 32 and 2 layers against the teacher's 128 and 4 (about 1/10 of its parameters, nearly
# all of them the 4096 x 32 tied embedding); trained like the teacher (AdamW 3e-3, warmup then cosine, dropout
# 0.2, random 256-token windows of the training stream) for 120 steps of 16 windows (~7 passes)
REFERENCE = {"hidden": 32, "layers": 2, "heads": 2, "steps": 120, "batch_size": 16, "seq_len": 256, "lr": 3e-3,
             "warmup": 15, "weight_decay": 0.1, "dropout": 0.2, "seed": 0}
# the students: hidden 64, 2 layers (between the reference and the teacher)
STUDENT = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 4096, "hidden_size": 64,
           "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
           "max_position_embeddings": 256, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
           "pad_token_id": 0}
SEQ_LEN = 128
TEACHER = REPO / "kdstore" / "assets" / "teacher"


def split_corpus(work: Path) -> tuple[Path, Path, list[str]]:
    """The teacher's train / held-out split of the bundled corpus, written as two one-file corpora."""
    docs = train_teacher.read_documents(REPO / "kdstore" / "assets" / "corpus")
    train, held_out = train_teacher.split_documents(docs, 0.05, 0)
    folders = []
    for name, part in (("train", train), ("held-out", held_out)):
        folder = work / f"corpus-{name}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.txt").write_text("\n\n".join(re.sub(r"\n[ \t]*\n", "\n", d) for d in part) + "\n")
        folders.append(folder)
    return folders[0], folders[1], train


def train_reference(work: Path, train_docs: list[str]) -> tuple[Path, int, float]:
    """The reference model in work/reference (kept when already there): (folder, parameters, seconds)."""
    import torch
    from transformers import AutoTokenizer

    out = work / "reference"
    if (out / "trained.json").exists():
        done = json.loads((out / "trained.json").read_text())
        return out, done["parameters"], done["seconds"]
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(TEACHER)
    args = argparse.Namespace(vocab_size=len(tokenizer), **REFERENCE)
    torch.manual_seed(args.seed)
    model = train_teacher.build_model(args, tokenizer)
    train_teacher.add_training_dropout(model, args.dropout)
    data = torch.from_numpy(train_teacher.encode_documents(tokenizer, train_docs))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = train_teacher.lr_at(step, args.steps, args)
        starts = torch.randint(0, len(data) - args.seq_len, (args.batch_size,), generator=generator)
        batch = torch.stack([data[s:s + args.seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.eval()
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the teacher's files: the store's tokenizer
        (out / name).write_bytes((TEACHER / name).read_bytes())
    done = {"parameters": sum(p.numel() for p in model.parameters()), "seconds": time.perf_counter() - started,
            "config": REFERENCE}
    (out / "trained.json").write_text(json.dumps(done))
    return out, done["parameters"], done["seconds"]


def build_stores(work: Path, train: Path, held_out: Path) -> tuple[Path, Path]:
    from kdstore.build import BuildConfig, build

    stores = []
    for name, corpus in (("store", train), ("validation", held_out)):
        out = work / name
        if not (out / "manifest.json").exists():
            build(BuildConfig(corpus=(str(corpus),), teacher=str(TEACHER), out=str(out), k=16, seq_len=SEQ_LEN,
                              pack=True, device="cpu", progress=False))
        stores.append(out)
    return stores[0], stores[1]


def bare_forward_seconds(reference: Path, store: Path) -> float:
    """A bare forward of the reference (logits, nothing else) over the store's sequences, batched as score does."""
    import torch

    from kdstore.store import open_store
    from kdstore.teacher import load_teacher

    model = load_teacher(str(reference), device="cpu")
    sequences = [b["input_ids"][b["token_offsets"][i]:b["token_offsets"][i + 1]]
                 for b in open_store(store).iter_batches(["input_ids"]) for i in range(len(b["token_offsets"]) - 1)]
    started = time.perf_counter()
    with torch.inference_mode():
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        per_batch = max(1, 8192 // SEQ_LEN)
        for start in range(0, len(order), per_batch):
            chunk = [sequences[i] for i in order[start:start + per_batch]]
            ids = torch.zeros((len(chunk), len(chunk[0])), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, tokens in enumerate(chunk):
                ids[row, :len(tokens)], mask[row, :len(tokens)] = torch.from_numpy(tokens.astype(np.int64)), 1
            model.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    return time.perf_counter() - started


def score(work: Path, store: Path, reference: Path, repeats: int = 3) -> dict[str, float]:
    """Score the store, timed against a bare forward of the reference: ``repeats`` alternating rounds, each
    pass on a fresh copy, the fastest of each kept (the machine is shared). Then a copy with --per-token (bytes)."""
    import shutil

    from kdstore.score import ScoreConfig, score_store
    from kdstore.store import open_store

    opened = open_store(store)
    figures: dict[str, float] = {"num_sequences": opened.manifest.num_sequences, "num_tokens": opened.manifest.num_tokens,
                                 "score_seconds": math.inf, "forward_seconds": math.inf, "bare_forward_seconds": math.inf}

    def fresh(name: str) -> Path:
        copy = work / name
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(store, copy, ignore=shutil.ignore_patterns("scores", "_cache"))
        manifest = json.loads((copy / "manifest.json").read_text())
        if "scores" in manifest:  # the store as built
            manifest["format_version"] = manifest.pop("scores")["shards_format_version"]
            (copy / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        return copy

    for _ in range(repeats):
        copy = fresh("store-timed")
        started = time.perf_counter()
        result = score_store(ScoreConfig(store=str(copy), reference=str(reference), device="cpu", progress=False))
        figures["score_seconds"] = min(figures["score_seconds"], time.perf_counter() - started)
        figures["forward_seconds"] = min(figures["forward_seconds"], result.forward_seconds)
        figures["bare_forward_seconds"] = min(figures["bare_forward_seconds"], bare_forward_seconds(reference, store))
    if opened.manifest.scores is None:
        score_store(ScoreConfig(store=str(store), reference=str(reference), device="cpu", progress=False))
    per_token = fresh("store-per-token")
    score_store(ScoreConfig(store=str(per_token), reference=str(reference), device="cpu", per_token=True,
                            progress=False))
    for name, folder in (("score_bytes", store), ("per_token_score_bytes", per_token)):
        figures[name] = sum(f["num_bytes"] for f in json.loads((folder / "manifest.json").read_text())["scores"]["files"])
    return figures


def held_out_nll(reference: Path, validation: Path) -> tuple[float, float]:
    """(teacher, reference) mean NLL per predicted token on the held-out text (the validation store)."""
    from kdstore.score import reference_logprobs
    from kdstore.store import open_store
    from kdstore.teacher import load_teacher

    batches = list(open_store(validation).iter_batches(["input_ids", "target_logprob"]))
    sequences = [b["input_ids"][b["token_offsets"][i]:b["token_offsets"][i + 1]]
                 for b in batches for i in range(len(b["token_offsets"]) - 1)]
    teacher = -float(np.concatenate([b["target_logprob"] for b in batches]).astype(np.float64).mean())
    values = reference_logprobs(load_teacher(str(reference), device="cpu"), sequences, 8192)
    return teacher, -float(np.concatenate(values).astype(np.float64).mean())


def train_students(work: Path, subsets: dict[str, list[Path]], validation: Path, seeds: int, steps: int) -> dict:
    from kdstore.losses import LossConfig
    from kdstore.train import TrainConfig, train

    student = work / "student.json"
    student.write_text(json.dumps(STUDENT))
    losses: dict[tuple[str, str], list[float]] = {}
    for subset, stores in subsets.items():
        for loss, ce_weight in (("CE", 1.0), ("KD", 0.0)):
            for seed in range(seeds):
                out = work / "runs" / f"{subset}-{loss}-{seed}"
                config = TrainConfig(store=str(stores[seed]), student=str(student), out=str(out), steps=steps,
                                     batch_size=8, lr=3e-3, warmup_steps=max(1, steps // 10), seed=seed,
                                     val_store=str(validation), val_every=0, checkpoint_every=0, log_every=0,
                                     device="cpu", loss=LossConfig(name="forward_kl", ce_weight=ce_weight))
                result = train(config, log=lambda line: None, progress=False, log_steps=False)
                losses.setdefault((subset, loss), []).append(result.val_loss)
                print(f"  {subset:10s} {loss} seed {seed}: validation {result.val_loss:.4f} nats/token", flush=True)
    return losses


def mean_sem(values: list[float]) -> str:
    mean = float(np.mean(values))
    sem = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return f"{mean:.3f} ± {sem:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=None, help="keep everything in this folder (default: temporary)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=80, help="student optimizer steps of 8 x 128 tokens")
    parser.add_argument("--reference-steps", type=int, default=REFERENCE["steps"])
    parser.add_argument("--subsets", default="difference,random,all",
                        help="which students to train, of difference, random, all and teacher-easy (the half the "
                             "teacher finds easiest: --by teacher-nll --lowest, a control)")
    args = parser.parse_args()
    REFERENCE["steps"] = args.reference_steps
    import torch

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="kdstore-select-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        run(work, args.seeds, args.steps, args.subsets.split(","))


def run(work: Path, seeds: int, steps: int, wanted: list[str]) -> None:
    from kdstore.selection import SelectConfig, select
    from kdstore.store import open_store

    started = time.perf_counter()
    train, held_out, train_docs = split_corpus(work)
    reference, reference_params, reference_seconds = train_reference(work, train_docs)
    store, validation = build_stores(work, train, held_out)
    figures = score(work, store, reference)
    table = open_store(store).score_table()
    difference = table["teacher_score"].to_numpy() - table["reference_score"].to_numpy()
    subsets: dict[str, list[Path]] = {"difference": [], "random": [], "all": [store] * seeds, "teacher-easy": []}
    rules = {"difference": {"by": "difference"}, "random": {"by": "difference", "sample": 1e9},
             "teacher-easy": {"by": "teacher-nll", "lowest": True}}
    for seed in range(seeds):
        for name, rule in rules.items():
            out = work / f"{name}-{seed}"
            if not (out / "manifest.json").exists():
                select(SelectConfig(store=str(store), out=str(out), keep=0.5, seed=seed, **rule))
            subsets[name].append(out)
    chosen = [open_store(p).score_table() for p in (subsets["difference"][0], subsets["random"][0])]
    print(f"reference: {reference_params:,} parameters ({reference_seconds:.0f} s to train); teacher 1,574,016; "
          f"student {student_params():,}")
    teacher_nll, reference_nll = held_out_nll(reference, validation)
    print(f"held-out NLL (nats/token; the teacher's from its stored, quantised target log-probs): teacher "
          f"{teacher_nll:.3f}, reference {reference_nll:.3f}")
    n, tokens = int(figures["num_sequences"]), int(figures["num_tokens"])
    kept = [float(np.mean(t["teacher_score"].to_numpy() - t["reference_score"].to_numpy())) for t in chosen]
    print(f"store: {n} sequences, {tokens:,} tokens; difference (reference NLL - teacher NLL, nats/token): mean "
          f"{difference.mean():.3f} over all, {kept[0]:.3f} over the kept half, {kept[1]:.3f} over a random half")
    print(f"score pass: {tokens / figures['score_seconds']:,.0f} tokens/s end to end (loading the reference, reading "
          f"the store, writing the files; {tokens / figures['forward_seconds']:,.0f} tokens/s in its forward with the "
          f"log-softmax); bare reference forward (logits only) {tokens / figures['bare_forward_seconds']:,.0f} "
          f"tokens/s; end to end / bare = {figures['bare_forward_seconds'] / figures['score_seconds']:.2f}, "
          f"forward / bare = {figures['bare_forward_seconds'] / figures['forward_seconds']:.2f} (best of 3 each)")
    print(f"score files: {figures['score_bytes'] / n:.1f} bytes/sequence; with --per-token "
          f"{figures['per_token_score_bytes'] / n:.1f} bytes/sequence ({figures['per_token_score_bytes'] / tokens:.2f} "
          f"bytes/token); logits shards {open_store(store).manifest.total_bytes / n:,.0f} bytes/sequence")
    subsets = {name: subsets[name] for name in wanted}
    losses = train_students(work, subsets, validation, seeds, steps)
    print(f"\nvalidation loss (nats/token, held-out text), {seeds} seeds, {steps} steps x 8 x {SEQ_LEN} tokens:")
    print("| data | CE | KD |\n|---|---|---|")
    for subset in subsets:
        print(f"| {subset} | {mean_sem(losses[(subset, 'CE')])} | {mean_sem(losses[(subset, 'KD')])} |")
    print(f"\n{time.perf_counter() - started:.0f} s in all")


def student_params() -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    return sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**STUDENT)).parameters())


if __name__ == "__main__":
    main()
