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
   rebuilds, K and machines); training reads the rest. Each sequence is its own shuffle group, so the
   batches depend on the training sequences, batch size, ranks and seed only, not on how the store was
   cut into row groups: stores of different K give the same batches.
3. Student: ``from_config`` for a config file (or a folder without weights), ``from_pretrained`` for a
   model folder, initialised from ``seed``; its output dimension must equal the store's vocabulary. A
   student that looks like a local path but is not there is refused before the store is opened; only a
   string that can be a hub id (``org/name``) goes to the hub.
4. AdamW, linear warmup then cosine decay to ``min_lr_ratio`` of the peak.
5. Steps of ``grad_accum`` micro-batches, ``kdstore.losses.distillation_loss`` (loss and CE mixing from
   ``config.loss``), gradient clipping; a NaN or inf loss or gradient stops the run (naming the step and
   the batch) before the optimizer touches the weights, so the last checkpoint stays the last good one.
6. Every ``val_every`` steps the validation cross-entropy; every ``checkpoint_every`` steps (and at the
   end) RUN_DIR/checkpoint/, written atomically by ``kdstore.checkpoint`` as JSON and safetensors (no
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
from typing import Annotated, Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
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
from kdstore.collate import IGNORE_INDEX, Collator, widen
from kdstore.config_file import check_config, read_toml_config
from kdstore.errors import NonFiniteLossError, ResumeMismatchError, StudentMismatchError, TrainError
from kdstore.loader import MemoryMappedDataset, Sequences, batch_stream, make_dataloader
from kdstore.losses import LossConfig, distillation_loss
from kdstore.shuffle import PlanConfig
from kdstore.store import Store
from kdstore.taid import TaidState
from kdstore.teacher import TOKENIZER_FILES, resolve_device
from kdstore.vocab import compare_vocab, require_compatible

RESUME_MAY_CHANGE = ("out", "device", "log_every", "cache_dir")  # fields that do not change what is computed


@dataclass(frozen=True)
class TrainConfig:
    """A training run. TOML: these keys at the top level and LossConfig's under ``[loss]``.

    Types and ranges are checked on construction (kdstore.config_file.check_config), before any model loads.
    """

    store: str
    student: str  # a transformers config.json, or a folder (with weights: from_pretrained), or a hub id
    out: str = "kdstore-run"
    loss: LossConfig = field(default_factory=LossConfig)
    steps: Annotated[int, Field(ge=1)] = 1000  # optimizer steps
    batch_size: Annotated[int, Field(ge=1)] = 8  # sequences per micro-batch per rank
    grad_accum: Annotated[int, Field(ge=1)] = 1  # micro-batches per optimizer step
    lr: Annotated[float, Field(gt=0)] = 1e-3
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1  # cosine decays to lr * this
    warmup_steps: Annotated[int, Field(ge=0)] = 50
    weight_decay: Annotated[float, Field(ge=0)] = 0.1
    grad_clip: Annotated[float, Field(ge=0)] = 1.0  # max global gradient norm; 0 = no clipping
    seed: Annotated[int, Field(ge=0)] = 0  # the loader's shuffle seeds numpy, which takes no negative seeds
    val_store: str = ""  # "": hold out val_fraction of STORE instead
    cache_dir: str = ""  # the Arrow copies' folder; "": STORE/_cache/arrow, or RUN_DIR/_cache for a store at a URL
    val_fraction: Annotated[float, Field(ge=0, le=1)] = 0.05  # strictly between 0 and 1 without a val_store
    val_every: Annotated[int, Field(ge=0)] = 100  # steps; 0 = only at the end
    checkpoint_every: Annotated[int, Field(ge=0)] = 100  # steps; 0 = only at the end
    log_every: Annotated[int, Field(ge=0)] = 10  # steps; 0 = only at the end
    num_workers: Annotated[int, Field(ge=0)] = 0  # DataLoader workers per rank
    device: str = "auto"

    def __post_init__(self) -> None:
        for name, value in check_config(type(self), vars(self), TrainError).items():
            object.__setattr__(self, name, value)  # an int given for a float becomes a float
        if not self.val_store and not 0 < self.val_fraction < 1:
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
          storage_options: dict[str, Any] | None = None) -> TrainResult:
    """Train (or, with ``resume``, continue) the run ``config`` describes; rank 0 logs through ``log``.

    ``storage_options``: fsspec options for stores at URLs (kept out of the config: they may hold secrets,
    and the config is saved in the checkpoint)."""
    started = time.perf_counter()
    rank, world, device, owns_group = _init_distributed(config.device)  # 1
    def say(line: str | None) -> None:
        if rank == 0 and line is not None:
            log(line)

    try:
        check_paths(config)  # before the store: a mistyped path fails at once
        data = open_data(config, storage_options)  # 2
        loader = make_dataloader(Sequences(data.dataset, data.train_rows), PlanConfig(config.batch_size, seed=config.seed),
                                 collator=data.collate, num_workers=config.num_workers)
        student = load_student(config.student, data.dataset.store, config.seed).to(device)  # 3
        model = torch.nn.parallel.DistributedDataParallel(student) if world > 1 else student
        optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, betas=(0.9, 0.95),  # 4
                                      weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, config))
        taid = TaidState(config.loss) if config.loss.name == "taid" else None
        trainables = Trainables(student, optimizer, scheduler, loader, taid)
        run = RunState()
        if resume:
            run = resume_run(config, world, rank, trainables)
            say(f"resumed {config.out} at step {run.step}")
        elif has_checkpoint(Path(config.out)):
            raise TrainError(f"{config.out} already holds a checkpoint", hint="pass --resume, or pick a new --out")
        Path(config.out).mkdir(parents=True, exist_ok=True)
        say(f"training {config.student} ({sum(p.numel() for p in student.parameters()):,} parameters) on "
            f"{len(data.train_rows)} sequences of {config.store}, validating on {len(data.val_rows)}; "
            f"{world} rank(s), {device}")
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
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    loss, metrics = distillation_loss(logits, batch, config.loss, state=taid)
                    (loss / config.grad_accum).backward()
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
            say(report(config, run, meter, scheduler.get_last_lr()[0], lambda: validation_loss(
                student, data.val_dataset, data.val_rows, data.val_collate, config.batch_size, device)))  # 6
            if _due(run.step, config.checkpoint_every, config):
                save_checkpoint(Path(config.out), {"config": config.flat(), **asdict(run)}, trainables, rank)
        if rank == 0:  # 7
            export_student(student, data.dataset.store.tokenizer_path, Path(config.out, STUDENT_DIR))
        result = _result(config, run, meter, started)
        say(f"done: step {result.step}, validation loss {result.val_loss:.4f} nats/token, "
            f"{result.tokens_per_second:,.0f} tokens/s; student saved to {Path(config.out, STUDENT_DIR)}")
        return result
    finally:
        if owns_group:
            dist.destroy_process_group()


def report(config: TrainConfig, run: RunState, meter: Meter, lr: float, validate: Callable[[], float]) -> str | None:
    """Log and validate when due: appends to ``run.history`` and returns the line to print (None if not due)."""
    entry = meter.report(run.step, lr) if _due(run.step, config.log_every, config) else {}
    if _due(run.step, config.val_every, config):
        entry = {"step": run.step, **entry, "val_loss": validate()}
    if not entry:
        return None
    run.history.append(entry)
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items())


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
def held_out(sequence_id: str, fraction: float) -> bool:
    """Whether a sequence is held out for validation: a hash of its id, so stable across rebuilds and K."""
    return int.from_bytes(hashlib.sha256(sequence_id.encode()).digest()[:8], "little") < fraction * 2.0**64


@dataclass
class Data:
    dataset: MemoryMappedDataset  # STORE
    train_rows: np.ndarray  # rows of STORE to train on
    val_dataset: MemoryMappedDataset  # STORE, or val_store
    val_rows: np.ndarray
    collate: Collator  # STORE's, for training
    val_collate: Collator


def open_data(config: TrainConfig, storage_options: dict[str, Any] | None = None) -> Data:
    """STORE and the validation sequences: all of ``val_store``, or the held-out ``val_fraction`` of STORE."""
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
        return Data(dataset, np.arange(len(dataset)), val_dataset, np.arange(len(val_dataset)),
                    collate, Collator(val_dataset.store.codec))
    ids = [i for table in dataset.store.iter_tables(["sequence_id"]) for i in table.column("sequence_id").to_pylist()]
    is_val = np.array([held_out(i, config.val_fraction) for i in ids], dtype=bool)
    if is_val.all() or not is_val.any():
        raise TrainError(f"val_fraction {config.val_fraction} leaves {int(is_val.sum())} of {len(ids)} sequences for "
                         "validation", hint="pick a val_fraction that leaves sequences on both sides, or a val_store")
    return Data(dataset, np.flatnonzero(~is_val), dataset, np.flatnonzero(is_val), collate, collate)


# -- student and schedule ---------------------------------------------------
def check_paths(config: TrainConfig) -> None:
    """The run folder and the student, checked before the store is opened."""
    if Path(config.out).exists() and not Path(config.out).is_dir():
        raise TrainError(f"the run folder {config.out} is a file",
                         hint="pick another --out: the checkpoint and the student are written into a folder")
    check_student_source(config.student)


def check_student_source(source: str) -> None:
    """Refuse at once a student that looks like a local path and is not there, or that cannot be a hub id:
    transformers would take it for a hub id and retry the network for ~26 s before failing."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(source).expanduser().exists():
        return
    try:
        validate_repo_id(source)  # "org/name" or "name": letters, digits, - _ . ; at most one "/"
        hub_id = True
    except HFValidationError:
        hub_id = False
    if not hub_id or source.endswith(".json") or source.startswith(("./", "../", "~")):
        raise TrainError(f"student {source} does not exist",
                         hint="pass a transformers config.json, a model folder, or a hub id like org/name")


def load_student(source: str, store: Store, seed: int) -> torch.nn.Module:
    """A causal LM from a config file / folder (``from_config``) or a model folder (``from_pretrained``);
    the hub only for a ``source`` that is no local path (``check_student_source``).

    Its output layer must cover the store's vocabulary (more logits, a padded superset, are fine: the KD loss
    normalises over the student's own). A folder that ships tokenizer files must fit the store's tokenizer
    (``kdstore.vocab``, the report of ``kdstore check``); a student made from a config uses the store's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_student_source(source)
    local = Path(source).expanduser()
    torch.manual_seed(seed)  # the same initial weights on every rank and in every run with this seed
    try:
        if local.is_dir() and (any(local.glob("*.safetensors")) or any(local.glob("*.bin"))):
            student = AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32)
        else:
            student = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(local if local.exists() else source))
    except (OSError, ValueError) as exc:
        raise TrainError(f"cannot load student {source!r}: {str(exc).splitlines()[0]}",
                         hint="pass a transformers config.json or a model folder") from None
    num_logits, vocab_size = student.get_output_embeddings().weight.shape[0], store.codec.vocab_size
    if num_logits < vocab_size:
        raise StudentMismatchError(f"the store's vocabulary has {vocab_size} tokens but student {source} has "
                                   f"{num_logits} output logits")
    if local.is_dir() and any((local / name).is_file() for name in TOKENIZER_FILES):
        require_compatible(compare_vocab(store, local, student_vocab_size=num_logits))
    return student.train()


def lr_multiplier(step: int, config: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from 1 to ``min_lr_ratio`` at ``steps``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def validation_loss(model: torch.nn.Module, dataset: MemoryMappedDataset, rows: np.ndarray, collate: Collator,
                    batch_size: int, device: torch.device) -> float:
    """Mean next-token cross-entropy (nats/token) over ``rows``, split across ranks.

    ``model`` is the bare module, not its DDP wrapper: DDP's forward broadcasts buffers, a collective that
    ranks with unequal shares of ``rows`` would wait on forever.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of NLL, tokens]
    model.eval()
    mine = rows[rank::world]
    for start in range(0, len(mine), batch_size):
        batch = collate([dataset[int(r)] for r in mine[start:start + batch_size]])
        ids, mask, labels = (batch[k].to(device, torch.int64) for k in ("input_ids", "attention_mask", "labels"))
        logits = model(input_ids=ids, attention_mask=mask).logits
        totals[0] += F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum")
        totals[1] += (labels != IGNORE_INDEX).sum()
    model.train()
    if dist.is_initialized():
        dist.all_reduce(totals)
    return float(totals[0] / totals[1].clamp(min=1))


# -- bookkeeping ------------------------------------------------------------
class Meter:
    """Metrics and tokens since the last report, and where this step's micro-batches came from."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.interval: list[dict[str, float]] = []  # every micro-batch's metrics since the last report
        self.step: list[tuple[dict[str, float], tuple[int, int, list[int]]]] = []  # (metrics, (epoch, batch, rows))
        self.tokens = self.total_tokens = 0
        self.started = self.since = time.perf_counter()

    def add(self, loss: torch.Tensor, metrics: dict[str, float], batch: dict[str, torch.Tensor], epoch: int,
            index: int) -> None:
        record = {"loss": float(loss), **metrics}
        self.interval.append(record)
        self.step.append((record, (epoch, index, batch["sequence_index"].tolist())))
        tokens = int(batch["attention_mask"].sum())
        self.tokens, self.total_tokens = self.tokens + tokens, self.total_tokens + tokens

    def finite(self) -> bool:
        return all(math.isfinite(record["loss"]) for record, _ in self.step)

    def step_kd(self) -> float:
        return float(np.mean([record["kd"] for record, _ in self.step]))

    def describe(self, rank: int, dataset: MemoryMappedDataset) -> str:
        """The micro-batches of this step with a non-finite loss (else all of them): epoch, batch, rows and ids."""
        bad = [where for record, where in self.step if not math.isfinite(record["loss"])] or [w for _, w in self.step]
        return "; ".join(f"rank {rank} epoch {epoch} batch {index}: store rows {rows} "
                         f"(sequence ids {', '.join(str(dataset[r].get('sequence_id', r)) for r in rows)})"
                         for epoch, index, rows in bad)

    def report(self, step: int, lr: float) -> dict[str, Any]:
        """Step, mean metrics and tokens/s (every rank's tokens) since the last report; starts a new interval."""
        tokens = torch.tensor([float(self.tokens)], dtype=torch.float64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(tokens)
        now = time.perf_counter()
        means = {k: float(np.mean([r[k] for r in self.interval])) for k in self.interval[0]}
        entry = {"step": step, **means, "lr": lr, "tokens_per_s": float(tokens[0]) / max(now - self.since, 1e-9)}
        self.interval, self.tokens, self.since = [], 0, now
        return entry


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
