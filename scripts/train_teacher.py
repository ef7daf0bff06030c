"""Train the tiny teacher bundled with kdstore (kdstore/assets/teacher/).

What it does, top to bottom:

1. Reads the sample corpus (``kdstore/assets/corpus/*.txt``; documents are
   blocks of lines separated by blank lines) and holds out ~5% of the
   documents (chosen with the seed) for validation.
2. Trains a byte-level BPE tokenizer (``tokenizers``; vocab 4096; special
   tokens ``<pad>`` ``<s>`` ``</s>`` ``<unk>`` = ids 0 1 2 3) on the training
   documents and wraps it as a ``transformers.PreTrainedTokenizerFast`` that
   adds ``<s>`` in front of every encoding (Llama style; no ``</s>`` at the end).
3. Builds a tiny ``LlamaForCausalLM`` (hidden 128, 4 layers, 4 heads,
   intermediate 512, tied embeddings, max positions 1024) -- about 1.6M
   parameters, about 6 MB in float32.
4. Trains it on random 256-token windows of the training documents, each
   encoded as ``<s> text </s>`` and all joined into one stream (AdamW, linear
   warmup then cosine decay, training-only dropout, fixed seed, 2 CPU threads),
   reporting train and validation loss at intervals next to the unigram
   baseline. Unless ``--steps`` is given, the number of steps is the smaller
   of what fits in ``--minutes`` (measured on the first steps, still inside the
   warmup, so the run is the same as one started with that ``--steps``) and
   ``--max-epochs`` passes over the training tokens; it is printed, and the
   model card records it so the exact run can be repeated. Training stops
   early after ``--patience`` evaluations without a better validation loss.
5. Saves the checkpoint with the best validation loss (float32 safetensors),
   the tokenizer and a README.md model card into ``--out``.

Run it from the repository root (about 10 minutes on 2 CPU cores; never more
than ``--minutes``, default 20)::

    .venv/bin/python scripts/train_teacher.py                # choose --steps from the budget
    .venv/bin/python scripts/train_teacher.py --steps 640    # exact, repeatable run

Given the same corpus, seed, ``--steps`` and thread count the result is
bit-for-bit the same on the same machine and library versions.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0, 1, 2, 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=REPO / "kdstore/assets/corpus", help="folder of .txt files")
    p.add_argument("--out", type=Path, default=REPO / "kdstore/assets/teacher", help="output folder")
    p.add_argument("--minutes", type=float, default=20.0, help="wall-time budget for training")
    p.add_argument("--steps", type=int, default=None, help="exact number of optimizer steps (overrides the estimate)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--dropout", type=float, default=0.2, help="training-only dropout on embeddings and sublayer outputs")
    p.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--max-epochs", type=float, default=40.0,
                   help="cap on passes over the training tokens when --steps is not given (the corpus is small)")
    p.add_argument("--patience", type=int, default=4,
                   help="stop after this many evaluations without a new best validation loss (0: never)")
    p.add_argument("--val-fraction", type=float, default=0.05)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- corpus

def read_documents(corpus: Path) -> list[tuple[str, str]]:
    """(file name, document) for every blank-line-separated block of every .txt file, in sorted file order."""
    docs = []
    files = sorted(corpus.glob("*.txt"))
    if not files:
        sys.exit(f"no .txt files in {corpus}")
    for path in files:
        text = path.read_text(encoding="utf-8")
        for block in re.split(r"\n[ \t]*\n", text):
            block = block.strip("\n")
            if block.strip():
                docs.append((path.name, block))
    return docs


def split_documents(docs: list[tuple[str, str]], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out whole documents, chosen at random with the seed, until ~fraction of the characters."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    total = sum(len(d) for _, d in docs)
    held, held_chars = set(), 0
    for i in order:
        if held_chars >= fraction * total:
            break
        held.add(i)
        held_chars += len(docs[i][1])
    train = [d for i, (_, d) in enumerate(docs) if i not in held]
    val = [d for i, (_, d) in enumerate(docs) if i in held]
    return train, val


# ----------------------------------------------------------------------------- tokenizer

def train_tokenizer(train_docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))  # byte-level: <unk> is never produced
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_docs, trainer=trainer)
    bos = tok.token_to_id("<s>")
    # Llama style: <s> in front of every sequence, nothing at the end.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=1024,
        padding_side="right",
    )


def encode_documents(tokenizer, docs: list[str]):
    """One stream of ``<s> doc </s>`` for all docs (the same rule kdstore.corpus applies at build time)."""
    import numpy as np

    stream = []
    for ids in tokenizer(docs, add_special_tokens=True)["input_ids"]:
        if not ids or ids[0] != tokenizer.bos_token_id:
            ids = [tokenizer.bos_token_id] + ids
        if ids[-1] != tokenizer.eos_token_id:
            ids = ids + [tokenizer.eos_token_id]
        stream.extend(ids)
    return np.asarray(stream, dtype=np.int64)


def unigram_cross_entropy(train_ids, val_ids, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the validation targets under add-one-smoothed training unigram frequencies."""
    import numpy as np

    counts = np.bincount(train_ids[1:], minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val_ids[1:]].mean())


# ----------------------------------------------------------------------------- model

def build_model(args, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attention_dropout=0.0,
        initializer_range=0.02,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    return model


def add_training_dropout(model, p: float) -> None:
    """Dropout on the token embeddings and on every attention and MLP output, in training mode only.

    Llama has no such dropout of its own; forward hooks add it here so the saved
    model stays a plain LlamaForCausalLM (hooks are not saved, and they do
    nothing in eval mode). On a corpus this small it delays overfitting a lot.
    """
    import torch.nn.functional as F

    if p <= 0:
        return

    def drop(module, inputs, output):
        if not module.training:
            return output
        if isinstance(output, tuple):
            return (F.dropout(output[0], p, True),) + tuple(output[1:])
        return F.dropout(output, p, True)

    model.model.embed_tokens.register_forward_hook(drop)
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(drop)
        layer.mlp.register_forward_hook(drop)


def lr_at(step: int, total: int, args) -> float:
    """Linear warmup over args.warmup steps, then cosine decay to 10% of the peak at `total`."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, total - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def evaluate(model, val_ids, seq_len: int) -> float:
    """Mean next-token NLL (nats) over the validation stream cut into consecutive windows of seq_len + 1."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    stream = torch.from_numpy(val_ids)
    with torch.no_grad():
        for start in range(0, len(stream) - 1, seq_len):
            window = stream[start : start + seq_len + 1]
            if len(window) < 2:
                break
            logits = model(input_ids=window[None, :-1]).logits[0]
            total += F.cross_entropy(logits.float(), window[1:], reduction="sum").item()
            count += len(window) - 1
    model.train()
    return total / count


# ----------------------------------------------------------------------------- model card

def write_model_card(out: Path, info: dict) -> None:
    losses = "\n".join(f"| {s} | {tr:.3f} | {tc:.3f} | {va:.3f} |" for s, tr, tc, va in info["history"])
    card = f"""# kdstore tiny teacher

A deliberately tiny causal language model bundled with kdstore so that
`kdstore build` works offline on a fresh machine. It is a test and demo
teacher: it has learned the sample corpus's vocabulary, spelling and short-range
grammar, and its predictions carry real uncertainty, but it is not useful for
anything beyond exercising the pipeline.

## Architecture

`LlamaForCausalLM` ({info['params']:,} parameters, float32 safetensors, {info['model_bytes'] / 1e6:.1f} MB):
hidden size {info['hidden']}, {info['layers']} layers, {info['heads']} attention heads (head dim
{info['hidden'] // info['heads']}), intermediate size {4 * info['hidden']}, RoPE, RMSNorm, vocabulary {info['vocab']},
max positions 1024, input and output embeddings tied.

## Tokenizer

Byte-level BPE (Hugging Face `tokenizers`) with {info['vocab']} entries, trained on the
training split of the corpus. Special tokens: `<pad>` = {info['pad']}, `<s>` = {info['bos']} (BOS),
`</s>` = {info['eos']} (EOS), `<unk>` = {info['unk']} (never produced: every byte has a token).
The tokenizer adds `<s>` at the start of every encoding and nothing at the end:
`tokenizer("hello").input_ids == {info['hello_ids']}`.

## Training data

`kdstore/assets/corpus/` ({info['files']} files, {info['corpus_bytes']:,} bytes, {info['docs']:,}
blank-line-separated documents): original English text written for kdstore and
dedicated to the public domain (CC0): fables and short stories, how-to
explanations, simple science and history explainers, dialogues, letters,
recipes, lists and arithmetic word problems. {info['val_docs']} documents
({info['val_tokens']:,} tokens) chosen with the seed were held out for
validation; the model was trained on the other {info['train_docs']} ({info['train_tokens']:,} tokens).
Each document is encoded as `<s> text </s>` and the documents are joined into
one stream, from which random windows of {info['seq_len']} tokens are drawn.

## Training

{info['steps']} steps of batch {info['batch_size']} x {info['seq_len']} tokens
({info['steps'] * info['batch_size'] * info['seq_len']:,} tokens, about {info['epochs']:.0f} passes over the training split),
AdamW (lr {info['lr']}, betas 0.9/0.95, weight decay {info['weight_decay']}), {info['warmup']} warmup steps then cosine
decay to 10% of the peak, gradient clipping at 1.0, dropout {info['dropout']} on the embeddings and on every
attention and MLP output during training only (forward hooks in the training script; the saved model is a
plain `LlamaForCausalLM` without dropout), seed {info['seed']}, {info['threads']} CPU threads,
{info['minutes']:.1f} minutes{info['early']}. The saved weights are those of the evaluation with
the lowest validation loss (step {info['best_step']}): with only {info['train_tokens']:,} training tokens the
model starts to memorise the training split after a few dozen passes, so validation loss bottoms out before
the end of the schedule.

| | nats/token |
|---|---|
| unigram baseline (add-one-smoothed training frequencies) on validation | {info['unigram']:.3f} |
| final train loss (step {info['best_step']}, no dropout, first {info['probe_tokens']:,} training tokens) | {info['best_train']:.3f} |
| final validation loss (step {info['best_step']}) | {info['best_val']:.3f} |

Loss during training (train: mean over the preceding interval, with dropout;
train, no dropout: the first {info['probe_tokens']:,} tokens of the training stream scored like
validation; validation: the whole held-out split):

| step | train | train, no dropout | validation |
|---|---|---|---|
{losses}

## Reproduce

```bash
{info['command']}
```

Library versions: torch {info['torch']}, transformers {info['transformers']}, tokenizers {info['tokenizers']}.
"""
    (out / "README.md").write_text(card, encoding="utf-8")


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import numpy as np
    import tokenizers
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    t_start = time.monotonic()

    # 1. corpus
    docs = read_documents(args.corpus)
    train_docs, val_docs = split_documents(docs, args.val_fraction, args.seed)
    files = len({name for name, _ in docs})
    corpus_bytes = sum(p.stat().st_size for p in args.corpus.glob("*.txt"))
    print(f"corpus: {files} files, {corpus_bytes:,} bytes, {len(docs)} documents "
          f"({len(train_docs)} train, {len(val_docs)} validation)")

    # 2. tokenizer
    tokenizer = train_tokenizer(train_docs, args.vocab_size)
    train_ids = encode_documents(tokenizer, train_docs)
    val_ids = encode_documents(tokenizer, val_docs)
    unigram = unigram_cross_entropy(train_ids, val_ids, args.vocab_size)
    print(f"tokenizer: vocab {len(tokenizer)}, {corpus_bytes / (len(train_ids) + len(val_ids)):.2f} bytes/token; "
          f"{len(train_ids):,} train tokens, {len(val_ids):,} validation tokens")
    print(f"unigram baseline on validation: {unigram:.3f} nats/token")

    # 3. model
    model = build_model(args, tokenizer)
    add_training_dropout(model, args.dropout)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: LlamaForCausalLM, {params:,} parameters")

    # 4. training
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    data = torch.from_numpy(train_ids)
    train_probe = train_ids[: 4 * len(val_ids)]  # a fixed slice of the training stream, scored like validation
    gen = torch.Generator().manual_seed(args.seed)
    budget_s = args.minutes * 60.0
    total_steps = args.steps
    calibrate_at = min(20, args.warmup)  # the schedule before warmup ends does not depend on total_steps
    history, best = [], None
    stopped_at = None
    interval_losses: list[float] = []
    t_train = time.monotonic()
    eval_s = 0.0
    step = 0
    model.train()
    while total_steps is None or step < total_steps:
        if total_steps is None and step == calibrate_at:
            per_step = (time.monotonic() - t_train) / step
            eval_tokens = len(val_ids) + len(train_probe)
            est_eval = per_step * eval_tokens / (args.batch_size * args.seq_len) / 3  # forward only, ~1/3 of a step
            remaining = budget_s - (time.monotonic() - t_start)
            total_steps = max(step + 1, int(0.95 * remaining / (per_step + est_eval / args.eval_every)) + step)
            epoch_cap = int(args.max_epochs * len(train_ids) / (args.batch_size * args.seq_len))
            total_steps = max(min(total_steps, epoch_cap), args.warmup + 1)
            print(f"{per_step:.2f} s/step; {epoch_cap} steps = {args.max_epochs:g} epochs -> {total_steps} steps "
                  f"within {args.minutes:g} minutes (repeat this run exactly with --steps {total_steps})")
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total_steps or 10**9, args)
        starts = torch.randint(0, len(data) - args.seq_len, (args.batch_size,), generator=gen)
        batch = torch.stack([data[s : s + args.seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        interval_losses.append(loss.item())
        step += 1
        if step % args.eval_every == 0 or step == total_steps:
            t_eval = time.monotonic()
            val = evaluate(model, val_ids, args.seq_len)
            train_clean = evaluate(model, train_probe, args.seq_len)
            eval_s += time.monotonic() - t_eval
            train = sum(interval_losses) / len(interval_losses)
            interval_losses = []
            history.append((step, train, train_clean, val))
            elapsed = (time.monotonic() - t_start) / 60
            mark = ""
            if best is None or val < best["val"]:
                best = {"step": step, "train": train_clean, "val": val, "state": copy.deepcopy(model.state_dict())}
                mark = " *"
            print(f"step {step:5d}/{total_steps}  lr {optimizer.param_groups[0]['lr']:.2e}  "
                  f"train {train:.3f} (no dropout {train_clean:.3f})  val {val:.3f}  ({elapsed:.1f} min){mark}", flush=True)
            if args.patience and step - best["step"] >= args.patience * args.eval_every and step < total_steps:
                print(f"no better validation loss for {args.patience} evaluations: stopping early at step {step}")
                stopped_at = step
                break
    minutes = (time.monotonic() - t_start) / 60

    # 5. save the best checkpoint, the tokenizer and the model card
    model.load_state_dict(best["state"])
    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in ("pytorch_model.bin", "model.safetensors"):
        (args.out / stale).unlink(missing_ok=True)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(args.out)  # transformers >= 5 always writes safetensors (float32 here)
    tokenizer.save_pretrained(args.out)
    # transformers 5 records its new class name "TokenizersBackend"; the old alias loads on 4.x and 5.x alike.
    config_path = args.out / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
    for path in args.out.iterdir():
        path.chmod(0o644)

    command = f".venv/bin/python scripts/train_teacher.py --steps {total_steps}"
    for name in ("corpus", "out"):
        default = parse_args([]).__dict__[name]
        if getattr(args, name).resolve() != default:
            path = getattr(args, name).resolve()
            command += f" --{name} {path.relative_to(REPO) if path.is_relative_to(REPO) else path}"
    for name in ("seed", "hidden", "layers", "heads", "batch_size", "lr", "weight_decay", "dropout", "warmup",
                 "eval_every", "patience", "threads"):
        if getattr(args, name) != parse_args([]).__dict__[name]:
            command += f" --{name.replace('_', '-')} {getattr(args, name)}"
    info = {
        "params": params, "model_bytes": (args.out / "model.safetensors").stat().st_size,
        "hidden": args.hidden, "layers": args.layers, "heads": args.heads, "vocab": args.vocab_size,
        "pad": tokenizer.pad_token_id, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id, "hello_ids": tokenizer("hello").input_ids,
        "files": files, "corpus_bytes": corpus_bytes, "docs": len(docs),
        "train_docs": len(train_docs), "val_docs": len(val_docs),
        "train_tokens": len(train_ids), "val_tokens": len(val_ids), "probe_tokens": len(train_probe),
        "seq_len": args.seq_len, "batch_size": args.batch_size, "steps": total_steps,
        "epochs": total_steps * args.batch_size * args.seq_len / len(train_ids),
        "lr": args.lr, "weight_decay": args.weight_decay, "dropout": args.dropout, "warmup": args.warmup, "seed": args.seed,
        "threads": args.threads, "minutes": minutes,
        "early": f" (stopped early at step {stopped_at}: no better validation loss in {args.patience} evaluations)"
                 if stopped_at else "", "best_step": best["step"],
        "best_train": best["train"], "best_val": best["val"], "unigram": unigram,
        "history": history, "command": command,
        "torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
    }
    write_model_card(args.out, info)
    summary = {k: v for k, v in info.items() if k not in ("history",)}
    print(json.dumps(summary, indent=1))
    print(f"saved to {args.out} ({minutes:.1f} minutes in all)")


if __name__ == "__main__":
    main()
