"""``kdstore train``: distil a student causal LM from a store, one readable recipe from top to bottom.

    kdstore train my-store --student student.json --out run --loss forward_kl --steps 2000
    kdstore train my-store --student student.json --out run --steps 2000 --resume     # after a crash
    torchrun --nproc-per-node 4 -m kdstore.cli.main train my-store --student student.json --out run

    from kdstore.train import TrainConfig, train
    result = train(TrainConfig(store="my-store", student="student.json", out="run"))

The recipe (``train`` below):

1. Distributed set-up from torchrun's RANK / WORLD_SIZE (gloo on CPU, nccl on CUDA); device "auto".
2. Data: the store through ``MemoryMappedDataset``. Validation sequences are those of ``val_store``
   when given, else the ``val_fraction`` of STORE whose sequence id hashes below it (stable across
   rebuilds, K and machines); ``val_sequences = N`` takes the N with the lowest hashes instead. Training
   reads the rest. Each sequence is its own shuffle group, so the batches depend on the training
   sequences, batch size, ranks and seed only, not on how the store was cut into row groups: stores of
   different K give the same batches.
3. Student (``kdstore.student``): a config file, a model folder, a hub id or ``preset:quarter`` (a smaller
   copy of the teacher's config), initialised from ``seed``; its output dimension must cover the store's
   vocabulary. A student that looks like a local path but is not there is refused before the store opens.
4. AdamW, linear warmup then cosine decay to ``min_lr_ratio`` of the peak.
5. Steps of ``grad_accum`` micro-batches (under bf16 autocast with ``precision = "bf16"``),
   ``kdstore.losses.distillation_loss`` (loss and CE mixing from ``config.loss``), gradient clipping; a NaN or
   inf loss or gradient stops the run (naming the step and the batch) before the optimizer touches the
   weights, so the last checkpoint stays the last good one.
6. Every ``log_every`` steps a line, and the same values in RUN_DIR/metrics.jsonl (``kdstore.progress``: also
   the progress bar and TensorBoard); every ``val_every`` steps the validation cross-entropy on the stated
   number of sequences (a warning below 32); every ``checkpoint_every`` steps (and at the end)
   RUN_DIR/checkpoint/, written atomically by ``kdstore.checkpoint`` as JSON and safetensors (no
   pickle: reading it runs no code): model, optimizer, scheduler, every rank's loader state and RNG, TAID
   state, step, epoch and the resolved config. ``resume`` continues exactly (bit for bit on CPU) and
   refuses a config or number of ranks that differs in anything but RESUME_MAY_CHANGE.
7. At the end RUN_DIR/student/: the student (``save_pretrained``) with the store's tokenizer (``export_student``).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from pydantic import Field

from kdstore.checkpoint import (
    CHECKPOINT_NAME,
    STUDENT_DIR,
    RunState,
    Trainables,
    config_differences,
    describe_checkpoint,
    export_student,
    has_checkpoint,
    read_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from kdstore.collate import Collator, widen
from kdstore.completions import CompletionFilter, open_completion_data
from kdstore.config_file import check_config, read_toml_config
from kdstore.errors import NonFiniteLossError, ResumeMismatchError, TrainError
from kdstore.format import TABLE_GENERATIONS, TABLE_LOGITS
from kdstore.loader import MemoryMappedDataset, Sequences, batch_stream, make_dataloader
from kdstore.losses import LossConfig, distillation_loss
from kdstore.progress import Feedback, Meter, validation_loss
from kdstore.shuffle import PlanConfig
from kdstore.store import open_store
from kdstore.student import check_student_source, describe_student, load_student
from kdstore.taid import TaidState
from kdstore.teacher import resolve_device

# fields that do not change what is computed
RESUME_MAY_CHANGE = ("out", "device", "log_every", "cache_dir", "tensorboard")
TABLES = (TABLE_LOGITS, TABLE_GENERATIONS)  # kdstore train reads both kinds of store
MIN_VAL_SEQUENCES = 32  # fewer and the validation loss is noisy: warned about in the first lines


@dataclass(frozen=True)
class TrainConfig:
    """A training run. TOML: these keys at the top level and LossConfig's under ``[loss]``.

    Types and ranges are checked on construction (kdstore.config_file.check_config), before any model loads.
    """

    store: str
    student: str  # a transformers config.json, a folder (with weights: from_pretrained), a hub id, or preset:quarter
    out: str = "kdstore-run"
    loss: LossConfig = field(default_factory=LossConfig)
    steps: Annotated[int, Field(ge=1)] = 1000  # optimizer steps
    batch_size: Annotated[int, Field(ge=1)] = 8  # sequences per micro-batch per rank
    grad_accum: Annotated[int, Field(ge=1)] = 1  # micro-batches per optimizer step
    # "bf16": the student's forward and loss run under torch.autocast(bfloat16); weights, gradients and AdamW
    # states stay fp32 (no loss scaling needed, unlike fp16); the loss upcasts to fp32 inside (kdstore.losses)
    precision: Literal["fp32", "bf16"] = "fp32"
    lr: Annotated[float, Field(gt=0)] = 1e-3
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1  # cosine decays to lr * this
    warmup_steps: Annotated[int, Field(ge=0)] = 50
    weight_decay: Annotated[float, Field(ge=0)] = 0.1
    grad_clip: Annotated[float, Field(ge=0)] = 1.0  # max global gradient norm; 0 = no clipping
    seed: Annotated[int, Field(ge=0)] = 0  # the loader's shuffle seeds numpy, which takes no negative seeds
    val_store: str = ""  # "": hold out val_fraction of STORE instead
    cache_dir: str = ""  # the Arrow copies' folder; "": STORE/_cache/arrow, or RUN_DIR/_cache for a store at a URL
    val_fraction: Annotated[float, Field(ge=0, le=1)] = 0.05  # strictly between 0 and 1 without a val_store
    val_sequences: Annotated[int, Field(ge=0)] = 0  # N > 0: validate on the N lowest id hashes (not val_fraction)
    val_every: Annotated[int, Field(ge=0)] = 100  # steps; 0 = only at the end
    checkpoint_every: Annotated[int, Field(ge=0)] = 100  # steps; 0 = only at the end
    log_every: Annotated[int, Field(ge=0)] = 10  # steps; 0 = only at the end
    num_workers: Annotated[int, Field(ge=0)] = 0  # DataLoader workers per rank
    device: str = "auto"
    tensorboard: bool = False  # also log to RUN_DIR/tensorboard/ (needs the tensorboard package)
    # a generations store only (kdstore/completions.py): which completions to train on
    only_correct: bool = False  # completions whose answer matches the reference
    only_majority: bool = False  # completions that agree with their prompt's majority answer
    best_of: Annotated[int, Field(ge=0)] = 0  # then each prompt's N best by total_logprob; 0: all
    completion_where: str = ""  # then an SQL condition over the completion columns (docs/generate.md)

    def __post_init__(self) -> None:
        for name, value in check_config(type(self), vars(self), TrainError).items():
            object.__setattr__(self, name, value)  # an int given for a float becomes a float
        if not self.val_store and not self.val_sequences and not 0 < self.val_fraction < 1:
            raise TrainError(f"val_fraction = {self.val_fraction}: expected a number > 0 and < 1 (or a val_store)")

    def flat(self) -> dict[str, Any]:
        """Every field, the loss's as ``loss.<name>``: what a resumed run is compared on."""
        values = asdict(self)
        return {**{k: v for k, v in values.items() if k != "loss"}, **{f"loss.{k}": v for k, v in values["loss"].items()}}


def resolved_config(overrides: dict[str, Any], config_file: str | None = None) -> TrainConfig:
    """Defaults < TOML file < explicit overrides (flags; ``loss`` is the loss name, ``ce_weight`` its CE weight),
    every value checked (``check_config``: keys, types, ranges) before any model loads."""
    values: dict[str, Any] = read_toml_config(config_file, TrainError) if config_file else {}
    loss = values.pop("loss", {})
    if not isinstance(loss, dict):
        raise TrainError(f"loss = {loss!r} in {config_file}: expected a [loss] table",
                         hint='write the loss as [loss] name = "jsd", or pass --loss jsd')
    given = {k: v for k, v in overrides.items() if v is not None}
    loss = {**loss, **{k: given.pop(n) for n, k in (("loss", "name"), ("ce_weight", "ce_weight")) if n in given}}
    values.update(given)
    for name in ("store", "student"):
        if not values.get(name):
            raise TrainError(f"no {name} given", hint=f"pass --{name} or set {name} in the TOML file")
    what = f"invalid training settings{f' (from {config_file} and the flags)' if config_file else ''}"
    values = check_config(TrainConfig, values, TrainError, what=what)
    return TrainConfig(**values, loss=LossConfig(**check_config(LossConfig, loss, TrainError, prefix="loss.", what=what)))


@dataclass
class TrainResult:
    out: str
    step: int = 0
    seconds: float = 0.0  # this invocation's wall time
    tokens_per_second: float = 0.0  # over every rank, this invocation
    val_loss: float = math.nan  # the last validation cross-entropy, nats/token
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per log / validation step


# -- the recipe -------------------------------------------------------------
def train(config: TrainConfig, *, resume: bool = False, log: Callable[[str], None] = print,
          storage_options: dict[str, Any] | None = None, progress: bool | None = None,
          log_steps: bool = True) -> TrainResult:
    """Train (or, with ``resume``, continue) the run ``config`` describes; rank 0 logs through ``log``.

    ``storage_options``: fsspec options for stores at URLs (kept out of the config: they may hold secrets,
    and the config is saved in the checkpoint). ``progress``: rank 0's progress bar on stderr (None: when
    stderr is a terminal). ``log_steps``: a line per logged step (metrics.jsonl has them either way)."""
    started = time.perf_counter()
    rank, world, device, owns_group = _init_distributed(config.device)  # 1
    feedback: Feedback | None = None

    try:
        check_paths(config)  # before the store: a mistyped path fails at once
        # 3 before 2: a student that cannot be made fails from the manifest, before the store's Arrow copy is made
        student = load_student(config.student, open_store(config.store, storage_options, tables=TABLES),
                               config.seed).to(device)
        data = open_data(config, storage_options)  # 2
        loader = make_dataloader(Sequences(data.dataset, data.train_rows), PlanConfig(config.batch_size, seed=config.seed),
                                 collator=data.collate, num_workers=config.num_workers)
        model = torch.nn.parallel.DistributedDataParallel(student) if world > 1 else student
        optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, betas=(0.9, 0.95),  # 4
                                      weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, config))
        taid = TaidState(config.loss) if config.loss.name == "taid" else None
        trainables = Trainables(student, optimizer, scheduler, loader, taid)
        run = RunState()
        if resume:
            run = resume_run(config, world, rank, trainables)
        elif has_checkpoint(Path(config.out)):
            raise TrainError(f"{config.out} already holds a checkpoint", hint="pass --resume, or pick a new --out")
        Path(config.out).mkdir(parents=True, exist_ok=True)
        feedback = Feedback(config.out, config.steps, run.step, show_bar=progress, tensorboard=config.tensorboard,
                            log=log, log_steps=log_steps, active=rank == 0)  # metrics.jsonl cut back to run.step
        for line in start_lines(config, run, data, student, world, device):
            feedback.say(line)
        batches, meter = batch_stream(loader, run.epoch), Meter(device)
        while run.step < config.steps:  # 5
            optimizer.zero_grad(set_to_none=True)
            meter.step = []
            for micro in range(config.grad_accum):
                where = (run.epoch, run.batches_in_epoch)
                batch = widen({k: v.to(device, non_blocking=True) for k, v in next(batches).items()},
                              data.collate.logprob_table)
                run.advance_batch(len(loader))
                last = micro == config.grad_accum - 1
                with contextlib.nullcontext() if last or world == 1 else model.no_sync():  # all-reduce once per step
                    with autocast(config, device):
                        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                        loss, metrics = distillation_loss(logits, batch, config.loss, state=taid)
                    (loss / config.grad_accum).backward()  # each micro-batch's mean, so a step averages them
                meter.add(loss.detach(), metrics, batch, *where)
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip or math.inf)
            if _any_rank(not (meter.finite() and math.isfinite(grad_norm.item())), device):
                raise NonFiniteLossError(f"the loss or its gradient is not finite at step {run.step + 1} "
                                         f"({meter.describe(rank, data.dataset)}); the weights were not updated; "
                                         f"the last good checkpoint is {describe_checkpoint(Path(config.out))}")
            optimizer.step()
            scheduler.step()
            run.step += 1
            if taid is not None:
                taid.update(meter.step_kd())  # once per optimizer step (TaidState's contract)
            feedback.advance(run.step)
            feedback.record(report(config, run, meter, scheduler.get_last_lr()[0], lambda: validation_loss(
                student, data.val_dataset, data.val_rows, data.val_collate, config.batch_size, device)), run.epoch)  # 6
            if _due(run.step, config.checkpoint_every, config):
                save_checkpoint(Path(config.out), {"config": config.flat(), **asdict(run)}, trainables, rank)
        feedback.close()  # the bar ends here, before transformers' own while the student is written
        if rank == 0:  # 7
            export_student(student, data.dataset.store.tokenizer_path, Path(config.out, STUDENT_DIR))
        result = _result(config, run, meter, started)
        feedback.say(f"done: step {result.step}, validation loss {result.val_loss:.4f} nats/token, "
                     f"{result.tokens_per_second:,.0f} tokens/s; student saved to {Path(config.out, STUDENT_DIR)}")
        return result
    finally:
        if feedback is not None:
            feedback.close()
        if owns_group:
            dist.destroy_process_group()


def report(config: TrainConfig, run: RunState, meter: Meter, lr: float,
           validate: Callable[[], float]) -> dict[str, Any] | None:
    """Log and validate when due: appends to ``run.history`` and returns the entry (None if not due)."""
    entry = meter.report(run.step, lr) if _due(run.step, config.log_every, config) else {}
    if _due(run.step, config.val_every, config):
        entry = {"step": run.step, **entry, "val_loss": validate()}
    if not entry:
        return None
    run.history.append(entry)
    return entry


def start_lines(config: TrainConfig, run: RunState, data: Data, student: torch.nn.Module, world: int,
                device: torch.device) -> list[str]:
    """What the run is about to do, the number of validation sequences stated, and a warning when it is small."""
    num_val = len(data.val_rows)
    if config.val_sequences:
        source = f"val_sequences = {config.val_sequences}"
    else:
        source = f"all of val_store {config.val_store}" if config.val_store else f"val_fraction = {config.val_fraction}"
    lines = [f"resumed {config.out} at step {run.step}"] if run.step else []
    lines.append(f"training {describe_student(config.student, student)} on {len(data.train_rows)} sequences of "
                 f"{config.store}, validating on {num_val} sequences ({source}); {world} rank(s), {device}")
    if num_val < MIN_VAL_SEQUENCES:
        more = "with a val_store that holds them" if config.val_store else "or a larger val_fraction"
        lines.append(f"warning: only {num_val} validation sequences (fewer than {MIN_VAL_SEQUENCES}): the validation "
                     f"loss is noisy; set val_sequences = {MIN_VAL_SEQUENCES} or more, {more}")
    return lines


def _init_distributed(device_name: str) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether this call created the process group) from torchrun's environment."""
    device = resolve_device(device_name)
    world = int(os.environ.get("WORLD_SIZE", 1))
    created = world > 1 and not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return rank, world, device, created


def autocast(config: TrainConfig, device: torch.device) -> Any:
    """The student's forward and loss context: bf16 autocast on the run's device, or nothing for fp32."""
    if config.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _due(step: int, every: int, config: TrainConfig) -> bool:
    return step == config.steps or (every > 0 and step % every == 0)


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is True on any (so every rank stops together instead of hanging)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


# -- data -------------------------------------------------------------------
def id_hash(sequence_id: str) -> int:
    """A sequence's place in the validation order: sha256 of its id (first 8 bytes, little-endian), so the
    held-out sequences are the same across rebuilds, K and machines."""
    return int.from_bytes(hashlib.sha256(sequence_id.encode()).digest()[:8], "little")


def held_out(sequence_id: str, fraction: float) -> bool:
    """Whether a sequence is in the held-out ``fraction``."""
    return id_hash(sequence_id) < fraction * 2.0**64


def lowest_hashes(sequence_ids: list[str], count: int) -> np.ndarray:
    """A boolean mask of the ``count`` ids with the lowest ``id_hash`` (``val_sequences``)."""
    order = np.argsort(np.array([id_hash(i) for i in sequence_ids], dtype=np.uint64), kind="stable")
    mask = np.zeros(len(sequence_ids), dtype=bool)
    mask[order[:count]] = True
    return mask


@dataclass
class Data:
    dataset: MemoryMappedDataset  # STORE
    train_rows: np.ndarray  # rows of STORE to train on
    val_dataset: MemoryMappedDataset  # STORE, or val_store
    val_rows: np.ndarray
    collate: Collator  # STORE's, for training
    val_collate: Collator


def open_data(config: TrainConfig, storage_options: dict[str, Any] | None = None) -> Data:
    """STORE and the validation sequences: all of ``val_store``, or the held-out ``val_fraction`` of STORE;
    with ``val_sequences = N``, the N of either with the lowest id hashes."""
    if open_store(config.store, storage_options, tables=TABLES).manifest.table == TABLE_GENERATIONS:
        return open_completion_data(config, storage_options)  # completions as training sequences
    if CompletionFilter(config.only_correct, config.only_majority, config.best_of, config.completion_where).is_set():
        raise TrainError(f"only_correct, only_majority, best_of and completion_where choose completions of a "
                         f"generations store; {config.store} is a logits store", hint="drop them")

    def mapped(store: str) -> MemoryMappedDataset:
        cache_dir = config.cache_dir or (str(Path(config.out) / "_cache") if "://" in store else None)
        return MemoryMappedDataset(store, cache_dir=cache_dir, storage_options=storage_options)

    dataset = mapped(config.store)
    codec = dataset.store.codec
    if config.loss.name == "sampled_kl" and codec.sampled_draws and codec.sampled_mode != config.loss.sampled_mode:
        raise TrainError(f"loss.sampled_mode is {config.loss.sampled_mode!r} but the draws in {config.store} are "
                         f"mode {codec.sampled_mode!r}", hint=f"set sampled_mode = {codec.sampled_mode!r} under [loss]")
    collate = Collator(codec, sampled=config.loss.name == "sampled_kl")
    if config.val_store:
        val_dataset = mapped(config.val_store)
        if val_dataset.store.codec.vocab_size != codec.vocab_size:
            raise TrainError(f"the validation store has vocabulary {val_dataset.store.codec.vocab_size}, the training "
                             f"store {codec.vocab_size}", hint="use stores made with the same tokenizer")
        val_rows = np.arange(len(val_dataset))
        if config.val_sequences > len(val_dataset):
            raise TrainError(f"val_sequences = {config.val_sequences} but val_store {config.val_store} holds "
                             f"{len(val_dataset)} sequences", hint="lower val_sequences, or use a larger val_store")
        if config.val_sequences:
            val_rows = np.flatnonzero(lowest_hashes(_sequence_ids(val_dataset), config.val_sequences))
        return Data(dataset, np.arange(len(dataset)), val_dataset, val_rows, collate, Collator(val_dataset.store.codec))
    ids = _sequence_ids(dataset)
    if config.val_sequences and config.val_sequences >= len(ids):
        raise TrainError(f"val_sequences = {config.val_sequences} leaves nothing to train on: {config.store} holds "
                         f"{len(ids)} sequences", hint="lower val_sequences, or pass a val_store")
    is_val = lowest_hashes(ids, config.val_sequences) if config.val_sequences else \
        np.array([held_out(i, config.val_fraction) for i in ids], dtype=bool)
    if not config.val_sequences and (is_val.all() or not is_val.any()):
        raise TrainError(f"val_fraction {config.val_fraction} leaves {int(is_val.sum())} of {len(ids)} sequences for "
                         "validation", hint="pick a val_fraction that leaves sequences on both sides, or a val_store")
    return Data(dataset, np.flatnonzero(~is_val), dataset, np.flatnonzero(is_val), collate, collate)


def _sequence_ids(dataset: MemoryMappedDataset) -> list[str]:
    """The store's sequence ids in row order, read through its verified row groups."""
    return [i for table in dataset.store.iter_tables(["sequence_id"]) for i in table.column("sequence_id").to_pylist()]


# -- run folder and schedule ------------------------------------------------
def check_paths(config: TrainConfig) -> None:
    """The run folder and the student, checked before the store is opened."""
    if Path(config.out).exists() and not Path(config.out).is_dir():
        raise TrainError(f"the run folder {config.out} is a file",
                         hint="pick another --out: the checkpoint and the student are written into a folder")
    check_student_source(config.student)


def lr_multiplier(step: int, config: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from 1 to ``min_lr_ratio`` at ``steps``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# -- bookkeeping ------------------------------------------------------------
def resume_run(config: TrainConfig, world: int, rank: int, trainables: Trainables) -> RunState:
    """Restore RUN_DIR/checkpoint/ into ``trainables``; refuse one written with other settings or ranks,
    naming each differing field with both values."""
    saved = read_checkpoint(Path(config.out))
    differ = config_differences({**saved["config"], "world_size": saved["world_size"]},
                                {**config.flat(), "world_size": world}, RESUME_MAY_CHANGE)
    if differ:
        raise ResumeMismatchError(f"{Path(config.out, CHECKPOINT_NAME)} was written with other settings: {'; '.join(differ)}")
    return restore_checkpoint(saved, rank, trainables)


def _result(config: TrainConfig, run: RunState, meter: Meter, started: float) -> TrainResult:
    tokens = torch.tensor([float(meter.total_tokens)], dtype=torch.float64, device=meter.device)
    if dist.is_initialized():
        dist.all_reduce(tokens)
    val = [e["val_loss"] for e in run.history if "val_loss" in e]
    return TrainResult(out=config.out, step=run.step, seconds=time.perf_counter() - started,
                       tokens_per_second=float(tokens[0]) / max(time.perf_counter() - meter.started, 1e-9),
                       val_loss=val[-1] if val else math.nan, history=run.history)
