"""Distil a tiny student from a kdstore store with a plain loop under torchrun (CPU, gloo), resumable exactly.

    kdstore build --out demo-store
    torchrun --standalone --nproc-per-node 2 examples/train_ddp.py demo-store --steps 20 --checkpoint ckpt.pt
    torchrun --standalone --nproc-per-node 2 examples/train_ddp.py demo-store --steps 40 --checkpoint ckpt.pt  # resumes

Every rank reads its own part of each epoch (kdstore.shuffle) and steps the same number of times, so the
DDP all-reduce never waits on a rank that ran out. Ranks are handed whole row groups, so the store needs at
least one per rank: the demo store has 26 (1 MiB each, `row_group_bytes` in kdstore build's build.toml).
The loss is the teacher's top-K cross-entropy plus the ordinary next-token loss; the student is a small
Llama made from a config (no download).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from kdstore.collate import Collator, widen
from kdstore.loader import MemoryMappedDataset, StreamingDataset, make_dataloader, set_epoch
from kdstore.shuffle import PlanConfig


def make_student(vocab_size: int, seed: int = 0) -> torch.nn.Module:
    """A 2-layer, 64-wide Llama over the teacher's vocabulary, randomly initialised (the same on every rank)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096)
    return LlamaForCausalLM(config)


def topk_kd_loss(student_logits: torch.Tensor, batch: dict[str, torch.Tensor], hard_weight: float = 0.1) -> torch.Tensor:
    """Soft cross-entropy to the teacher's top-K (log-probs over the full vocabulary) + hard_weight * NLL.

    student_logits [B, T, V]; batch from ``widen``: topk_ids [B, T, K] int64, topk_logprobs [B, T, K]
    float32, labels [B, T] (-100 where no position). Mean over real positions; 0 when there are none.
    """
    logprobs = student_logits.float().log_softmax(-1)
    mask = batch["labels"] != -100
    soft = -(batch["topk_logprobs"].exp() * logprobs.gather(-1, batch["topk_ids"])).sum(-1)
    hard = F.nll_loss(logprobs.flatten(0, 1), batch["labels"].flatten(), reduction="none").view_as(soft)
    return ((soft + hard_weight * hard) * mask).sum() / mask.sum().clamp(min=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8, help="Sequences per rank per step.")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank.")
    parser.add_argument("--streaming", action="store_true", help="Stream Parquet row groups instead of the mmap copy.")
    parser.add_argument("--checkpoint", default=None, help="Save here at the end; resume from it if it exists.")
    args = parser.parse_args()

    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR
    rank = dist.get_rank()
    plan = PlanConfig(batch_size=args.batch_size, seed=0)
    dataset = StreamingDataset(args.store, plan) if args.streaming else MemoryMappedDataset(args.store)
    collate = Collator(dataset.store.codec)  # compact on the host: int32 ids, uint16 codes
    loader = make_dataloader(dataset, plan, collator=collate, num_workers=args.workers)
    model = DistributedDataParallel(make_student(dataset.store.codec.vocab_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    step, epoch, position = 0, 0, 0  # position: this rank's batches of ``epoch`` consumed
    if args.checkpoint and os.path.exists(args.checkpoint):
        saved = torch.load(args.checkpoint, weights_only=True)  # tensors and plain containers only: no code runs
        model.module.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        loader.load_state_dict(saved["loaders"][rank])  # each rank resumes its own stream
        step, epoch, position = saved["step"], saved["epoch"], saved["position"]

    while step < args.steps:
        set_epoch(loader, epoch)
        for batch in loader:
            batch = widen(batch, collate.logprob_table)  # on the device: int64 ids, float32 log-probs
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = topk_kd_loss(logits, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step, position = step + 1, position + 1
            if rank == 0:
                print(f"epoch {epoch} step {step} loss {loss.item():.4f}", flush=True)
            if position == len(loader):  # the epoch is done: a checkpoint taken now resumes at the next one
                epoch, position = epoch + 1, 0
            if step == args.steps:
                break

    if args.checkpoint:
        loaders = [None] * dist.get_world_size()
        dist.all_gather_object(loaders, loader.state_dict())
        if rank == 0:
            torch.save({"model": model.module.state_dict(), "optimizer": optimizer.state_dict(), "loaders": loaders,
                        "step": step, "epoch": epoch, "position": position}, args.checkpoint)
    if rank == 0:
        print(f"done: {step} steps on {dist.get_world_size()} ranks", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
