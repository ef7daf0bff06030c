"""Training feedback: what ``kdstore train`` measures, shows and keeps while it runs.

    meter = Meter(device)                        # losses and tokens since the last report (every rank)
    feedback = Feedback("run", total_steps=1000, start_step=0, show_bar=None, tensorboard=False, log=print)
    feedback.say("a log line")                   # printed above the bar, not through it
    feedback.advance(step)                       # the bar: step of total, elapsed, ETA
    feedback.record(meter.report(step, lr), epoch=0)   # a log line, RUN_DIR/metrics.jsonl, the bar's values, TensorBoard
    feedback.close()
    rows = read_metrics("run")                   # what the run recorded, one dict per logged step

The bar (tqdm, on stderr) shows the step out of the total, the elapsed time and ETA, and the last logged
loss, KD and CE parts, learning rate and tokens/s. Only rank 0 has one, and only when asked (``show_bar=None``:
when stderr is a terminal; the CLI's ``--quiet`` turns it and the per-step lines off).

``RUN_DIR/metrics.jsonl`` holds one JSON object per logged or validated step, in step order::

    {"step": 10, "loss": 3.54, "kd": 3.54, "ce": 7.16, "lr": 0.00041, "tokens_per_s": 21500.0, "epoch": 0, "time": 1.7e9}
    {"step": 20, ..., "val_loss": 7.05, "epoch": 1, "time": 1.7e9}

``loss``, ``kd``, ``ce`` (and TAID's ``taid_t``) are means over the micro-batches since the previous
logged step; ``tokens_per_s`` counts real tokens on every rank over that interval; ``val_loss`` (nats/token)
only on validation steps, where a step that validates without logging holds ``step``, ``val_loss``,
``epoch`` and ``time`` alone; ``epoch`` is the epoch of the next batch; ``time`` is Unix time in seconds.
A resumed run first drops the lines past its checkpoint's step (they are computed again), so the file
never holds a step twice. With ``tensorboard = true`` the same values go to RUN_DIR/tensorboard/
(``train/<name>``, ``val/loss``) when the tensorboard package is installed.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from kdstore.collate import IGNORE_INDEX, Collator
from kdstore.errors import TrainError
from kdstore.loader import MemoryMappedDataset
from kdstore.writer import write_atomic

METRICS_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_SHOWN = (("loss", "loss"), ("kd", "kd"), ("ce", "ce"), ("lr", "lr"), ("tokens_per_s", "tok/s"), ("val_loss", "val"))


# -- measuring ----------------------------------------------------------------
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

    def describe(self, rank: int, dataset: Any) -> str:
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


# -- showing and keeping ------------------------------------------------------
class Feedback:
    """Rank 0's log lines, progress bar, RUN_DIR/metrics.jsonl and TensorBoard writer; ``active=False`` (the
    other ranks) does nothing at all. ``show_bar=None``: a bar when stderr is a terminal. ``log_steps``: a
    line per recorded step through ``log`` (metrics.jsonl has them either way)."""

    def __init__(self, run_dir: str | Path, total_steps: int, start_step: int, *, show_bar: bool | None,
                 tensorboard: bool, log: Callable[[str], None], log_steps: bool = True, active: bool = True) -> None:
        from tqdm import tqdm

        self.log, self.log_steps, self.active = log, log_steps, active
        self.path = Path(run_dir) / METRICS_NAME
        show_bar = sys.stderr.isatty() if show_bar is None else show_bar
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", desc="train", dynamic_ncols=True,
                        disable=not (active and show_bar), mininterval=0.5)
        self.writer: Any = None
        self.shown: dict[str, Any] = {}  # the latest value of each quantity the bar shows
        if active:
            truncate_metrics(self.path, start_step)
            self.file = open(self.path, "a")  # one handle for the whole run, closed in close()
            self.writer = _tensorboard(Path(run_dir) / TENSORBOARD_DIR, start_step, self.say) if tensorboard else None

    def say(self, line: str) -> None:
        """Print ``line`` through ``log``, above the bar."""
        if not self.active:
            return
        if self.bar.disable:
            self.log(line)
            return
        with self.bar.external_write_mode():
            self.log(line)

    def advance(self, step: int) -> None:
        """Move the bar to ``step`` (ETA from the steps of this invocation)."""
        if self.active:
            self.bar.update(step - self.bar.n)

    def record(self, entry: dict[str, Any] | None, epoch: int) -> None:
        """One logged step (None: nothing to record): a log line, a line of metrics.jsonl, the bar's values,
        TensorBoard's scalars."""
        if not self.active or entry is None:
            return
        if self.log_steps:
            self.say(format_entry(entry))
        self.file.write(json.dumps({**entry, "epoch": epoch, "time": time.time()}) + "\n")
        self.file.flush()
        self.shown.update(entry)  # a validation-only step keeps the last loss on the bar
        self.bar.set_postfix_str("  ".join(f"{label} {_short(self.shown[key])}" for key, label in _SHOWN
                                           if key in self.shown))
        if self.writer is not None:
            for key, value in entry.items():
                if key != "step":
                    self.writer.add_scalar("val/loss" if key == "val_loss" else f"train/{key}", value, entry["step"])

    def close(self) -> None:
        """Close the bar, metrics.jsonl and TensorBoard's files; again is harmless. ``say`` still prints."""
        self.bar.close()
        if self.active:
            self.file.close()
            if self.writer is not None:
                self.writer.close()
                self.writer = None


def format_entry(entry: dict[str, Any]) -> str:
    """A logged step as a log line: ``step 10  loss 3.548  kd 3.548  ce 7.166  lr 0.0004109  tokens_per_s 5628``."""
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items())


def _short(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _tensorboard(log_dir: Path, start_step: int, say: Callable[[str], None]) -> Any:
    """A SummaryWriter into ``log_dir``, or None with one line when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's module imports the tensorboard package, which kdstore does not depend on
        say(f"tensorboard = true, but the tensorboard package is not installed: metrics go to "
            f"{log_dir.parent / METRICS_NAME} only (pip install tensorboard)")
        return None
    say(f"TensorBoard: tensorboard --logdir {log_dir}")
    return SummaryWriter(str(log_dir), purge_step=start_step + 1 if start_step else None)  # drop a crashed tail


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines of ``path`` up to ``step`` (a resumed run's checkpoint; 0 for a new run) and drop the rest,
    a half-written last line included, so the continued run appends without repeating a step."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.endswith("\n") and _step(line) is not None and _step(line) <= step]
    if len(kept) < len(lines):
        write_atomic(path, "".join(kept))


def _step(line: str) -> int | None:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return None
    return value.get("step") if isinstance(value, dict) and isinstance(value.get("step"), int) else None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """RUN_DIR/metrics.jsonl of ``kdstore train``: one dict per logged or validated step, in step order (keys in
    this module's docstring). A half-written last line (the run is still writing it) is left out."""
    path = Path(run_dir) / METRICS_NAME
    if not Path(run_dir).is_dir():
        raise TrainError(f"run folder {run_dir} does not exist", hint="pass the --out folder of a `kdstore train` run")
    if not path.is_file():
        raise TrainError(f"{run_dir} holds no {METRICS_NAME}",
                         hint="pass the --out folder of a `kdstore train` run that has logged a step")
    text = path.read_text()
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(text.splitlines()) and not text.endswith("\n"):
                break
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise TrainError(f"{path} line {number} is not a JSON object with an integer step: {line[:80]!r}",
                             hint="the file was edited or damaged; `kdstore train --resume` drops the lines it cannot read")
        rows.append(row)
    return rows
