"""Fidelity: does distilling from a stored sparse teacher match online full-vocabulary KD?

    .venv/bin/python benchmarks/fidelity.py                       # every variant, one seed: ~10 min on 2 CPU cores
    .venv/bin/python benchmarks/fidelity.py --steps 20 --quick    # smoke run, a minute or two
    .venv/bin/python benchmarks/fidelity.py --seeds 0,1,2,3 --timing-rounds 0   # mean +- SEM over seeds

With the bundled teacher and a smaller student (a 2-layer, 64-wide Llama, ~0.39M parameters, same
4096-token vocabulary), the same initial weights, the same batches in the same order (kdstore.train's
plan: each sequence its own shuffle group, so every store yields the same batches), the same token
budget, optimizer and schedule, it trains:

  (a) ce          next-token cross-entropy only
  (b) online      full-vocabulary forward KL, the teacher run on every batch (dense_forward_kl)
  (c) top-K       forward KL from stores at K = 8, 32, 64 with the tail bucket
  (d) sampled     sampled_kl from stores of 16 / 64 draws from the full teacher (plus the minimum K=1 head)
  (e) head+tail   sampled_kl mode "tail": exact top-8 (top-16) head plus 16 (64) draws from the teacher's tail
  (d'), (e')      the same with systematic draws (codec.sampled.scheme, docs/format.md) instead of iid ones;
                  (d') also with 128 and 192 draws
  (f) diagnostic  64 fresh iid draws from the online teacher at every step: what (d) would give if a store's
                  draws were not reused on every pass

The teacher's held-out documents (scripts/train_teacher.py's 5% split, seed 0) are the validation set;
the stores are built from its training documents. Reported per variant: validation CE (nats/token), the
fraction of (b)'s improvement over (a) it recovers, the store's bytes/token (manifest total_bytes /
num_tokens), median wall time per step (loader included); then the cosine between each variant's
gradient and the full-KD gradient on one batch (at the initial student and at the online-KD-trained
one); then the step-time ratio of a KD step at K=64 to a CE-only step, timed interleaved on the same
batches (the machine is shared, so only interleaved medians are comparable).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdstore.build import DEFAULT_CORPUS, DEFAULT_TEACHER, BuildConfig, build
from kdstore.collate import Collator, widen
from kdstore.loader import MemoryMappedDataset, make_dataloader
from kdstore.losses import LossConfig, dense_forward_kl, distillation_loss
from kdstore.shuffle import PlanConfig
from kdstore.store import open_store
from kdstore.teacher import load_teacher
from kdstore.train import Sequences, TrainConfig, batch_stream, lr_multiplier, validation_loss

REPO = Path(__file__).resolve().parents[1]
# store name -> BuildConfig fields. K=1 is the codec's minimum head; the sampled variants ignore it.
IID, SYSTEMATIC = {"sampled_scheme": "iid"}, {"sampled_scheme": "systematic"}
STORES = {"k8": {"k": 8}, "k32": {"k": 32}, "k64": {"k": 64},
          "sampled16": {"k": 1, "sampled_draws": 16, **IID}, "sampled64": {"k": 1, "sampled_draws": 64, **IID},
          "k8+tail16": {"k": 8, "sampled_draws": 16, "sampled_mode": "tail", **IID},
          "sampled128": {"k": 1, "sampled_draws": 128, **IID},
          "k16+tail64": {"k": 16, "sampled_draws": 64, "sampled_mode": "tail", **IID},
          "sys-sampled16": {"k": 1, "sampled_draws": 16, **SYSTEMATIC},
          "sys-sampled64": {"k": 1, "sampled_draws": 64, **SYSTEMATIC},
          "sys-k8+tail16": {"k": 8, "sampled_draws": 16, "sampled_mode": "tail", **SYSTEMATIC},
          "sys-k16+tail64": {"k": 16, "sampled_draws": 64, "sampled_mode": "tail", **SYSTEMATIC},
          "sys-sampled128": {"k": 1, "sampled_draws": 128, **SYSTEMATIC},
          "sys-sampled192": {"k": 1, "sampled_draws": 192, **SYSTEMATIC}}
# variant -> (store, loss): "ce" and "online" read only input ids (from the k8 store)
VARIANTS = {
    "(a) ce": ("k8", "ce"),
    "(b) online full KD": ("k8", "online"),
    "(c) top-8 + tail": ("k8", LossConfig("forward_kl")),
    "(c) top-32 + tail": ("k32", LossConfig("forward_kl")),
    "(c) top-64 + tail": ("k64", LossConfig("forward_kl")),
    "(d) sampled 16 draws": ("sampled16", LossConfig("sampled_kl")),
    "(d) sampled 64 draws": ("sampled64", LossConfig("sampled_kl")),
    "(e) top-8 + 16 tail draws": ("k8+tail16", LossConfig("sampled_kl", sampled_mode="tail")),
    "(d) sampled 128 draws": ("sampled128", LossConfig("sampled_kl")),
    "(e) top-16 + 64 tail draws": ("k16+tail64", LossConfig("sampled_kl", sampled_mode="tail")),
    "(d') systematic 16 draws": ("sys-sampled16", LossConfig("sampled_kl")),
    "(d') systematic 64 draws": ("sys-sampled64", LossConfig("sampled_kl")),
    "(e') top-8 + 16 systematic tail draws": ("sys-k8+tail16", LossConfig("sampled_kl", sampled_mode="tail")),
    "(e') top-16 + 64 systematic tail draws": ("sys-k16+tail64", LossConfig("sampled_kl", sampled_mode="tail")),
    "(d') systematic 128 draws": ("sys-sampled128", LossConfig("sampled_kl")),
    "(d') systematic 192 draws": ("sys-sampled192", LossConfig("sampled_kl")),
    # diagnostic, not a store: 64 fresh draws from the teacher at every step (the teacher run online), to tell the
    # noise of a draw from the cost of reusing a store's fixed draws on every pass
    "(f) online 64 fresh draws": ("k8", "online-draws-64"),
}
QUICK = ("(a) ce", "(b) online full KD", "(c) top-64 + tail", "(d) sampled 16 draws")


def teacher_split(folder: Path) -> tuple[Path, Path]:
    """The teacher's own train / validation documents (scripts/train_teacher.py, 5%, seed 0) as two corpora."""
    spec = importlib.util.spec_from_file_location("train_teacher", REPO / "scripts" / "train_teacher.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    train_docs, val_docs = script.split_documents(script.read_documents(Path(DEFAULT_CORPUS)), 0.05, 0)
    paths = []
    for name, docs in (("train", train_docs), ("val", val_docs)):
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / f"{name}.txt").write_text("\n\n".join(docs) + "\n")
        paths.append(folder / name)
    return paths[0], paths[1]


def build_stores(workdir: Path, names: set[str], seq_len: int) -> dict[str, Path]:
    """Every store in ``names`` plus "val" (K=1), built from the teacher's split; reused when already there."""
    train_corpus, val_corpus = teacher_split(workdir / "corpus")
    wanted = {**{n: (train_corpus, STORES[n]) for n in names}, "val": (val_corpus, {"k": 1})}
    for name, (corpus, fields) in wanted.items():
        out = workdir / "stores" / name
        if not (out / "manifest.json").exists():
            started = time.perf_counter()
            build(BuildConfig(corpus=(str(corpus),), out=str(out), seq_len=seq_len, device="cpu", progress=False,
                              **fields))
            print(f"built {name}: {time.perf_counter() - started:.0f} s", flush=True)
    return {name: workdir / "stores" / name for name in wanted}


def bytes_per_token(store: Path) -> float:
    manifest = open_store(store).manifest
    return manifest.total_bytes / manifest.num_tokens


def make_student(seed: int, hidden: int = 64, layers: int = 2) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config)


def loss_of(loss: str | LossConfig, teacher: torch.nn.Module, seed: int = 0):
    """(student logits [B, T, V], widened batch) -> scalar loss, for one variant."""
    generator = torch.Generator().manual_seed(seed)

    def compute(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if loss == "ce":
            return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())
        if isinstance(loss, str):
            with torch.inference_mode():
                teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            if loss == "online":
                return dense_forward_kl(logits, teacher_logits.clone(), batch["labels"])
            return fresh_draws_loss(logits, teacher_logits.clone(), batch["labels"], int(loss.rsplit("-", 1)[1]),
                                    generator)
        return distillation_loss(logits, batch, loss)[0]
    return compute


def fresh_draws_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, draws: int,
                     generator: torch.Generator) -> torch.Tensor:
    """Random-sampling KD with new draws on every call: mean over positions of -sum_i (counts_i / draws) log q_i."""
    vocab_size = logits.shape[-1]
    probs = torch.softmax(teacher_logits.float().reshape(-1, vocab_size), -1)
    drawn = torch.multinomial(probs, draws, replacement=True, generator=generator)
    share = torch.zeros_like(probs).scatter_add_(-1, drawn, torch.full(drawn.shape, 1.0 / draws))
    keep = (labels.flatten() != -100).float()
    per_position = -(share * torch.log_softmax(logits.float().reshape(-1, vocab_size), -1)).sum(-1)
    return (per_position * keep).sum() / keep.sum().clamp(min=1.0)


def loader_for(store: Path, args: argparse.Namespace):
    """(loader, collator) over every sequence of ``store``, in kdstore.train's plan."""
    dataset = MemoryMappedDataset(store)
    collate = Collator(dataset.store.codec, sampled=bool(dataset.store.codec.sampled_draws))
    loader = make_dataloader(Sequences(dataset, np.arange(len(dataset))), PlanConfig(args.batch_size, seed=args.seed),
                             collator=collate)
    return loader, collate


def train_variant(store: Path, loss: str | LossConfig, teacher: torch.nn.Module, val: tuple, args: argparse.Namespace):
    """Train a fresh student; returns (model, validation CE, training seconds, first-batch input ids)."""
    schedule = TrainConfig(store=str(store), student="", steps=args.steps, warmup_steps=args.steps // 10)
    model = make_student(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, schedule))
    loader, collate = loader_for(store, args)
    compute, batches, seconds, first = loss_of(loss, teacher, args.seed), batch_stream(loader, 0), [], None
    for _ in range(args.steps):
        started = time.perf_counter()
        batch = widen(next(batches), collate.logprob_table)
        first = batch["input_ids"] if first is None else first
        loss_value = compute(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch)
        optimizer.zero_grad(set_to_none=True)
        loss_value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        seconds.append(time.perf_counter() - started)
    val_ce = validation_loss(model, *val, 16, torch.device("cpu"))
    return model, val_ce, sum(seconds), first


def flat_gradient(model: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
    grads = torch.autograd.grad(loss, [p for p in model.parameters()], allow_unused=True)
    return torch.cat([g.flatten() for g in grads if g is not None])


def gradient_cosines(model: torch.nn.Module, stores: dict[str, Path], teacher: torch.nn.Module,
                     args: argparse.Namespace) -> dict[str, float]:
    """Cosine between each KD variant's gradient and the full-KD gradient, on the first batch of the plan."""
    batches = {}
    for name in {s for s, loss in VARIANTS.values() if isinstance(loss, LossConfig)} | {"k8"}:
        loader, collate = loader_for(stores[name], args)
        batches[name] = widen(next(iter(loader)), collate.logprob_table)
    cosines = {}
    reference = None
    for variant, (store, loss) in VARIANTS.items():
        if loss == "ce" or store not in batches:
            continue
        batch = batches[store]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        gradient = flat_gradient(model, loss_of(loss, teacher)(logits, batch))
        if loss == "online":
            reference = gradient
        cosines[variant] = float(F.cosine_similarity(gradient, reference, dim=0))
    return cosines


def step_times(stores: dict[str, Path], teacher: torch.nn.Module, args: argparse.Namespace, hidden: int,
               layers: int) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds of one training step per variant: next batch from its store, widen, forward,
    loss, backward, AdamW. Variants take turns round by round on the same batches, so a busy shared machine
    slows them alike (separate runs' timings are not comparable here)."""
    models = {variant: make_student(args.seed, hidden, layers) for variant in VARIANTS}
    optimizers = {variant: torch.optim.AdamW(m.parameters(), lr=1e-4) for variant, m in models.items()}
    streams = {}
    for variant, (store, _) in VARIANTS.items():
        loader, collate = loader_for(stores[store], args)
        streams[variant] = (batch_stream(loader, 0), collate)
    times: dict[str, list[tuple[float, float]]] = {variant: [] for variant in VARIANTS}
    for round_index in range(args.timing_rounds + 2):  # the first two rounds warm up
        for variant, (_, loss) in VARIANTS.items():
            wall, cpu = time.perf_counter(), time.process_time()
            stream, collate = streams[variant]
            batch = widen(next(stream), collate.logprob_table)
            logits = models[variant](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            optimizers[variant].zero_grad(set_to_none=True)
            loss_of(loss, teacher)(logits, batch).backward()
            optimizers[variant].step()
            if round_index >= 2:
                times[variant].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {variant: {"wall_s": statistics.median(t[0] for t in values), "cpu_s": statistics.median(t[1] for t in values)}
            for variant, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (e.g. 0,1,2,3): every variant per seed, "
                        "then the mean and standard error of each variant's recovered fraction")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timing-rounds", type=int, default=10, help="0: skip the step-time comparison")
    parser.add_argument("--workdir", default="/tmp/kdstore-fidelity", help="stores are kept here and reused")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--variants", default=None,
                        help="comma-separated variant names to run (default: all); (a) and (b) are always run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    chosen = None if args.variants is None else {v.strip() for v in args.variants.split(",")} | set(QUICK[:2])
    variants = {k: v for k, v in VARIANTS.items() if (not args.quick or k in QUICK) and (chosen is None or k in chosen)}
    VARIANTS.clear()
    VARIANTS.update(variants)
    stores = build_stores(Path(args.workdir), {store for store, _ in variants.values()}, args.seq_len)
    teacher = load_teacher(DEFAULT_TEACHER, "float32", "cpu").model
    val_dataset = MemoryMappedDataset(stores["val"])
    val = (val_dataset, np.arange(len(val_dataset)), Collator(val_dataset.store.codec))
    num_tokens = open_store(stores["k8"]).manifest.num_tokens
    print(f"student {sum(p.numel() for p in make_student(0).parameters()):,} parameters; {args.steps} steps of "
          f"{args.batch_size} sequences (train store: {num_tokens:,} tokens); validation: "
          f"{val_dataset.store.manifest.num_tokens:,} held-out tokens", flush=True)

    seeds = [int(seed) for seed in args.seeds.split(",")] if args.seeds else [args.seed]
    results, cosines = {}, {}
    for seed in seeds:
        args.seed = seed
        results[seed], cosines[seed] = run_seed(stores, teacher, val, args)
    timing = {f"hidden {h}, {n} layers": step_times(stores, teacher, args, h, n) for h, n in ((64, 2), (128, 4))
              } if args.timing_rounds else {}  # timed once, with the last seed's students
    report(results, cosines, timing, args, time.perf_counter() - started)


def run_seed(stores: dict[str, Path], teacher: torch.nn.Module, val: tuple, args: argparse.Namespace
             ) -> tuple[dict, dict]:
    """Every variant trained from args.seed's student on args.seed's batch order, and the gradient cosines."""
    results, trained, first_ids = {}, {}, None
    for variant, (store, loss) in VARIANTS.items():
        model, val_ce, seconds, ids = train_variant(stores[store], loss, teacher, val, args)
        first_ids = ids if first_ids is None else first_ids
        assert torch.equal(ids, first_ids), "every variant must see the same batches"
        trained[variant] = model
        results[variant] = {"val_ce": val_ce, "train_s": seconds,
                            "bytes_per_token": None if isinstance(loss, str) else bytes_per_token(stores[store])}
        print(f"seed {args.seed}: {variant:<28} validation CE {val_ce:.4f}  (trained in {seconds:.0f} s)", flush=True)
    ce, online = results["(a) ce"]["val_ce"], results["(b) online full KD"]["val_ce"]
    for entry in results.values():
        entry["recovered"] = (ce - entry["val_ce"]) / (ce - online)
    cosines = {"init": gradient_cosines(make_student(args.seed), stores, teacher, args),
               "trained": gradient_cosines(trained["(b) online full KD"], stores, teacher, args)}
    return results, cosines


def report(results: dict, cosines: dict, timing: dict, args: argparse.Namespace, seconds: float) -> None:
    for seed, by_variant in results.items():
        main_student = next(iter(timing), None) if seed == next(iter(results)) else None  # timed once
        print(f"\nseed {seed}" + (f"; ms/step: {main_student} student, interleaved medians, loader included "
                                   "(wall / CPU)" if main_student else ""))
        print("| variant | B/token | val CE | recovered | ms/step | grad cos (init) | grad cos (trained) |")
        print("|---|---|---|---|---|---|---|")
        for variant, entry in by_variant.items():
            size = "-" if entry["bytes_per_token"] is None else f"{entry['bytes_per_token']:.1f}"
            cos = [f"{cosines[seed][when][variant]:.3f}" if variant in cosines[seed][when] else "-"
                   for when in ("init", "trained")]
            step = timing[main_student][variant] if main_student else None
            ms = f"{1000 * step['wall_s']:.0f} / {1000 * step['cpu_s']:.0f}" if step else "-"
            print(f"| {variant} | {size} | {entry['val_ce']:.4f} | {100 * entry['recovered']:.1f} % | {ms} | "
                  f"{cos[0]} | {cos[1]} |")
    if len(results) > 1:
        print(f"\nover seeds {', '.join(map(str, results))}: mean +- standard error of the mean (n = {len(results)})")
        print("| variant | B/token | val CE | recovered | recovered, each seed | grad cos (trained) |")
        print("|---|---|---|---|---|---|")
        for variant, entry in next(iter(results.values())).items():
            ces = [results[seed][variant]["val_ce"] for seed in results]
            recovered = [100 * results[seed][variant]["recovered"] for seed in results]
            cos = [cosines[seed]["trained"][variant] for seed in results if variant in cosines[seed]["trained"]]
            size = "-" if entry["bytes_per_token"] is None else f"{entry['bytes_per_token']:.1f}"
            print(f"| {variant} | {size} | {_mean_sem(ces, 4)} | {_mean_sem(recovered, 1)} % | "
                  f"{' / '.join(f'{r:.0f}' for r in recovered)} | {_mean_sem(cos, 3) if cos else '-'} |")
    if timing:
        print("\nstep time ratios (interleaved medians, wall / CPU):")
    for student, medians in timing.items():
        pairs = [(variant, "(a) ce") for variant in medians if variant != "(a) ce"] + [
            (variant, "(b) online full KD") for variant in medians if variant not in ("(a) ce", "(b) online full KD")]
        ratios = [(f"{a} / {b}", [medians[a][c] / medians[b][c] for c in ("wall_s", "cpu_s")]) for a, b in pairs
                  if a in medians and b in medians]
        print(f"  {student}: " + "; ".join(f"{name} = {w:.2f} / {c:.2f}" for name, (w, c) in ratios))
    print(f"\ntotal {seconds / 60:.1f} min")
    out = Path(args.workdir) / "fidelity.json"
    out.write_text(json.dumps({"args": vars(args), "results": results, "cosines": cosines, "timing": timing}, indent=1))
    print(f"numbers: {out}")
    if not all(math.isfinite(e["val_ce"]) for by_variant in results.values() for e in by_variant.values()):
        raise SystemExit("a variant diverged")


def _mean_sem(values: list[float], digits: int) -> str:
    mean = statistics.fmean(values)
    sem = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return f"{mean:.{digits}f} +- {sem:.{digits}f}"


if __name__ == "__main__":
    main()
