"""The training checkpoint and the exported student: what ``kdstore train`` leaves in RUN_DIR.

    save_checkpoint(run_dir / CHECKPOINT_NAME, {"config": config.flat(), **asdict(run)}, trainables, rank)
    saved = read_checkpoint(run_dir / CHECKPOINT_NAME)
    differ = config_differences(saved["config"], config.flat(), may_change=("out", "device", "log_every"))
    run = restore_checkpoint(saved, rank, trainables)           # RunState: step, epoch, batches_in_epoch, history
    export_student(student, store.tokenizer_path, run_dir / STUDENT_DIR)

RUN_DIR/checkpoint.pt is one ``torch.save`` dict, written by rank 0 under a temporary name, fsynced and
renamed, so a crash leaves the previous checkpoint whole. Its keys: ``config`` (the flat resolved config),
``step``, ``epoch``, ``batches_in_epoch``, ``history``, ``world_size``, ``model``, ``optimizer``,
``scheduler``, ``taid`` (None unless the loss is TAID) and ``ranks``: one ``{"loader", "rng"}`` per rank,
gathered from every rank, since each has its own loader position and RNG streams.

No kdstore error is raised here: the caller (``kdstore.train``) decides which differences refuse a resume.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from kdstore.taid import TaidState

CHECKPOINT_NAME = "checkpoint.pt"
STUDENT_DIR = "student"


@dataclass
class RunState:
    """Where the run is, besides the weights: saved in the checkpoint next to them."""

    step: int = 0
    epoch: int = 0  # the epoch of the next batch
    batches_in_epoch: int = 0  # this rank's batches of ``epoch`` consumed
    history: list[dict[str, float]] = field(default_factory=list)

    def advance_batch(self, num_batches: int) -> None:
        self.batches_in_epoch += 1
        if self.batches_in_epoch == num_batches:  # the loader's state now says "epoch done": the next one starts
            self.epoch, self.batches_in_epoch = self.epoch + 1, 0


@dataclass
class Trainables:
    """The stateful objects a checkpoint saves and restores (``optimizer``, ``scheduler``, ``loader``: torch's)."""

    student: torch.nn.Module  # the bare module, not its DDP wrapper, so the keys carry no "module." prefix
    optimizer: Any
    scheduler: Any
    loader: Any  # a kdstore DataLoader: its state_dict is this rank's position in the epoch
    taid: TaidState | None = None


def capture_rng_state() -> dict[str, Any]:
    """This process's torch, CUDA (when present), numpy and Python RNG states."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo ``capture_rng_state``; a checkpoint written on CUDA restores on CPU without its CUDA state."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, run: dict[str, Any], trainables: Trainables, rank: int) -> None:
    """Write ``path`` atomically (temporary name, fsync, rename). Every rank calls it; rank 0 writes.

    ``run``: ``config`` (the flat resolved config) and the RunState fields, stored as given.
    """
    ranks = [{"loader": trainables.loader.state_dict(), "rng": capture_rng_state()}]
    if dist.is_initialized():
        mine, ranks = ranks[0], [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
    if rank != 0:
        return
    taid = trainables.taid
    state = {**run, "world_size": len(ranks), "model": trainables.student.state_dict(),
             "optimizer": trainables.optimizer.state_dict(), "scheduler": trainables.scheduler.state_dict(),
             "taid": taid.state_dict() if taid is not None else None, "ranks": ranks}
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Everything ``save_checkpoint`` wrote, on the CPU."""
    return torch.load(path, map_location="cpu", weights_only=False)  # our own file: RNG states are not tensors


def config_differences(saved: dict[str, Any], now: dict[str, Any], may_change: tuple[str, ...]) -> list[str]:
    """One line per flat config field outside ``may_change`` whose value differs, naming both values."""
    return [f"{k} = {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now"
            for k in sorted(set(now) | set(saved)) if k not in may_change and saved.get(k) != now.get(k)]


def restore_checkpoint(saved: dict[str, Any], rank: int, trainables: Trainables) -> RunState:
    """Load ``saved`` into ``trainables`` and this rank's loader and RNG; returns where the run was."""
    trainables.student.load_state_dict(saved["model"])
    trainables.optimizer.load_state_dict(saved["optimizer"])
    trainables.scheduler.load_state_dict(saved["scheduler"])
    if trainables.taid is not None:
        trainables.taid.load_state_dict(saved["taid"])
    trainables.loader.load_state_dict(saved["ranks"][rank]["loader"])
    restore_rng_state(saved["ranks"][rank]["rng"])
    return RunState(**{f.name: saved[f.name] for f in fields(RunState)})


def describe_checkpoint(path: Path) -> str:
    """The checkpoint at ``path`` and its step, for messages."""
    if not path.is_file():
        return "none (no checkpoint was written yet)"
    return f"{path} (step {read_checkpoint(path)['step']})"


def export_student(student: torch.nn.Module, tokenizer_dir: Path | None, folder: Path) -> None:
    """``save_pretrained`` plus the store's tokenizer into ``folder``, replacing it only once complete."""
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    for path in tokenizer_dir.iterdir() if tokenizer_dir else ():
        shutil.copy2(path, tmp / path.name)
    old = folder.with_name(f"{folder.name}.old-{os.getpid()}")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
