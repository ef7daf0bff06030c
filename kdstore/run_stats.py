"""``kdstore stats RUN_FOLDER``: the figures and curves of a ``kdstore train`` run, from its metrics.jsonl.

    figures, written = measure_run("run", plot_dir="plots", html_path="report.html")
    for line in format_run_stats(figures): print(line)

The store's figures are kdstore.stats; both draw through kdstore.plots. docs/stats.md defines every figure.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kdstore.errors import StatsError
from kdstore.format import MANIFEST_NAME
from kdstore.stats import check_output_paths, format_number, write_pictures
from kdstore.store import is_url


def is_run_folder(location: str | os.PathLike[str]) -> bool:
    """True for a local folder holding metrics.jsonl and no manifest.json (a ``kdstore train`` run); False for what
    may be a store (a URL, a missing path, a folder with manifest.json or an unfinished store's shards/ or
    _partitions/). Any other folder is neither: refused in one line naming both."""
    if is_url(location) or not Path(location).is_dir():
        return False
    folder = Path(location)
    if (folder / MANIFEST_NAME).exists() or (folder / "shards").is_dir() or (folder / "_partitions").is_dir():
        return False
    from kdstore.progress import METRICS_NAME  # imports torch: only once the folder is no store

    if (folder / METRICS_NAME).is_file():
        return True
    raise StatsError(f"{location} is neither a store (no {MANIFEST_NAME}) nor a training run folder (no {METRICS_NAME})",
                     hint="pass a store folder or URL, or the --out folder of a `kdstore train` run")


def run_stats(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The figures of a ``kdstore train`` run from its metrics.jsonl as a JSON-ready dict (docs/stats.md).

    Training rows are those with a ``loss``; validation rows those with a ``val_loss`` (docs/train.md).
    """
    from kdstore.progress import METRICS_NAME, read_metrics

    rows = read_metrics(run_dir)
    if not rows:
        raise StatsError(f"{Path(run_dir) / METRICS_NAME} holds no logged step; there is nothing to measure",
                         hint="let the run log a step first (the log_every setting), then run kdstore stats again")
    train, val = [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]
    losses = [float(r["loss"]) for r in train]
    speeds = [float(r["tokens_per_s"]) for r in train if "tokens_per_s" in r]
    lrs = [r for r in train if "lr" in r]
    least = min(range(len(losses)), key=losses.__getitem__) if losses else None
    return {"run": str(run_dir), "num_steps": max(r["step"] for r in rows), "num_logged": len(train),
            "num_validations": len(val),
            "loss": {"first": losses[0] if losses else None, "last": losses[-1] if losses else None,
                     "min": losses[least] if least is not None else None,
                     "min_step": train[least]["step"] if least is not None else None},
            "last_val_loss": float(val[-1]["val_loss"]) if val else None, "last_val_step": val[-1]["step"] if val else None,
            "mean_tokens_per_s": sum(speeds) / len(speeds) if speeds else None,
            "final_lr": float(lrs[-1]["lr"]) if lrs else None,
            "curves": {"step": [r["step"] for r in train],
                       **{key: [r.get(key) for r in train] for key in ("loss", "kd", "ce", "lr", "tokens_per_s")},
                       "val_step": [r["step"] for r in val], "val_loss": [float(r["val_loss"]) for r in val]}}


def measure_run(run_dir: str | os.PathLike[str], plot_dir: str | os.PathLike[str] | None = None,
                html_path: str | os.PathLike[str] | None = None) -> tuple[dict[str, Any], list[Path]]:
    """``kdstore stats RUN_FOLDER``: the run's figures, and its curves as PNGs and an HTML report when asked."""
    check_output_paths(plot_dir, html_path)
    figures = run_stats(run_dir)
    return figures, write_pictures(figures, format_run_stats(figures), str(run_dir), plot_dir, html_path)


def format_run_stats(figures: dict[str, Any]) -> list[str]:
    """A run's figures as aligned terminal lines (what ``kdstore stats RUN_FOLDER`` prints)."""
    f, loss = figures, figures["loss"]
    val = (f"{f['last_val_loss']:.4f} (step {f['last_val_step']})" if f["last_val_loss"] is not None
           else "- (the run has not validated)")
    return [f"{'run':<22}{f['run']}: {f['num_steps']:,} steps, {f['num_logged']} logged, {f['num_validations']} validated",
            f"{'training loss':<22}first {format_number(loss['first'], 4)}, last {format_number(loss['last'], 4)}, "
            f"min {format_number(loss['min'], 4)}" + (f" (step {loss['min_step']})" if loss["min_step"] is not None else ""),
            f"{'validation loss':<22}{val}",
            f"{'tokens/s':<22}mean {format_number(f['mean_tokens_per_s'], 0)} over the logged intervals",
            f"{'final lr':<22}" + ("-" if f["final_lr"] is None else f"{f['final_lr']:.4g}")]


__all__ = ["format_run_stats", "is_run_folder", "measure_run", "run_stats"]
