"""Distil a tiny student from a kdstore store with the Hugging Face ``Trainer`` (CPU is enough).

    kdstore build --out demo-store
    python examples/train_hf_trainer.py demo-store --steps 20 --out runs/hf

The Trainer gets kdstore's loader (``get_train_dataloader``) and a ``compute_loss`` that widens the compact
batch on the device and applies the teacher top-K loss of train_ddp.py. Batches arrive with compact dtypes
(int32 ids, uint16 codes) and ``labels`` already shifted, so the model's own loss is not used.
"""

from __future__ import annotations

import argparse

from train_ddp import make_student, topk_kd_loss  # the same student and loss as the torchrun recipe
from transformers import Trainer, TrainerCallback, TrainingArguments

from kdstore.collate import Collator, widen
from kdstore.loader import MemoryMappedDataset, make_dataloader, set_epoch
from kdstore.shuffle import PlanConfig


class KDTrainer(Trainer):
    """A Trainer that reads batches from a kdstore loader and trains on the teacher's top-K."""

    def __init__(self, *args, kd_loader, collate: Collator, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kd_loader, self.collate = kd_loader, collate

    def get_train_dataloader(self):
        return self.kd_loader

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = widen(inputs, self.collate.logprob_table)
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = topk_kd_loss(outputs.logits, batch)
        return (loss, outputs) if return_outputs else loss


class ReshuffleEachEpoch(TrainerCallback):
    def __init__(self, loader) -> None:
        self.loader = loader

    def on_epoch_begin(self, args, state, control, **kwargs):
        set_epoch(self.loader, int(state.epoch or 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="runs/hf-trainer")
    args = parser.parse_args()

    dataset = MemoryMappedDataset(args.store)
    collate = Collator(dataset.store.codec)
    loader = make_dataloader(dataset, PlanConfig(batch_size=args.batch_size, seed=0), collator=collate)
    training = TrainingArguments(output_dir=args.out, max_steps=args.steps, learning_rate=3e-3, logging_steps=1,
                                 save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = KDTrainer(model=make_student(dataset.store.codec.vocab_size), args=training, kd_loader=loader,
                        collate=collate, callbacks=[ReshuffleEachEpoch(loader)])
    result = trainer.train()
    print(f"done: {result.global_step} steps, final loss {result.training_loss:.4f}")


if __name__ == "__main__":
    main()
