"""Pictures of a store's or a training run's figures (kdstore.stats): PNG plots and one self-contained HTML report.

    figures, written = kdstore.stats.measure_store("store", plot_dir="plots", html_path="report.html")
    figures, written = kdstore.run_stats.measure_run("run", plot_dir="plots", html_path="report.html")

Every plot is FIGURE_INCHES at DPI, so exactly FIGURE_PIXELS (640 x 400) whatever it shows; matplotlib draws it
on its Agg canvas (no display, no pyplot state). The HTML report holds the terminal table, every plot inline as
a base64 data URI and the figures as JSON: one file that opens offline and references nothing outside itself.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kdstore.writer import write_atomic

FIGURE_INCHES = (6.4, 4.0)
DPI = 100
FIGURE_PIXELS = (640, 400)  # FIGURE_INCHES * DPI: width, height of every PNG
TOP_COLOUR, OUTSIDE_COLOUR = "#4c72b0", "#dd8452"


def _integer_ticks(axis: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _rank(ax: Any, f: dict[str, Any]) -> str:
    counts, positions = f["target_rank"]["counts"], f["num_positions"]
    share = np.array(counts + [f["target_rank"]["outside"]], dtype=float) / max(positions, 1)
    labels = [str(r) for r in range(1, len(counts) + 1)] + ["out"]
    ax.bar(range(len(share)), share, color=[TOP_COLOUR] * len(counts) + [OUTSIDE_COLOUR])
    step = max(1, len(labels) // 16)  # at most ~16 tick labels; "out" always shown
    ticks = [*range(0, len(counts), step), len(counts)]
    ax.set_xticks(ticks, [labels[t] for t in ticks])
    ax.set(xlabel="rank of the actual next token among the stored K (out: not stored)", ylabel="share of positions",
           title="Rank of the next token in the teacher's top-K")
    return "Share of positions whose actual next token has each rank among the stored K (1 = most likely), and outside."


def _topk_mass(ax: Any, f: dict[str, Any]) -> str:
    edges, counts = np.array(f["topk_mass"]["edges"]), f["topk_mass"]["counts"]
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=TOP_COLOUR, edgecolor="white")
    ax.axvline(f["topk_mass"]["mean"], color="black", linestyle="--", label=f"mean {f['topk_mass']['mean']:.3f}")
    ax.set(xlim=(0, 1), xlabel="probability mass held by the stored K", ylabel="positions",
           title="How much of the teacher's distribution the top-K holds")
    ax.legend(loc="upper left")
    return "Histogram over positions of the summed probability of the K stored ids (bins of 0.05)."


def _tail_mass(ax: Any, f: dict[str, Any]) -> str:
    edges, counts = np.array(f["tail_mass"]["log10_edges"]), f["tail_mass"]["counts"]
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=OUTSIDE_COLOUR, edgecolor="white")
    ax.set(xlabel="log10 of the tail mass (first bin: everything below 1e-7.5)", ylabel="positions",
           title="Probability mass outside the top-K")
    return f"Histogram of the tail mass per position in half decades ({f['tail_mass']['source']})."


def _mass_by_position(ax: Any, f: dict[str, Any]) -> str:
    means = f["topk_mass"]["mean_by_position"]
    where = "completion" if "generations" in f else "sequence"  # a generations store's positions: completions only
    ax.plot(range(len(means)), means, color=TOP_COLOUR, marker="." if len(means) <= 64 else None)
    ax.set(ylim=(0, 1.02), xlabel=f"position in the {where}", ylabel="mean top-K mass",
           title=f"Top-K mass by position in the {where}")
    return f"Mean probability mass held by the stored K at each position index, over all {where}s."


def _entropy(ax: Any, f: dict[str, Any]) -> str:
    e = f["entropy"]
    edges = np.array(e["edges"])
    for key, label, colour in (("lower", "lower bound", TOP_COLOUR), ("upper", "upper bound", OUTSIDE_COLOUR)):
        ax.stairs(e[f"{key}_counts"], edges, label=f"{label} (mean {e[f'mean_{key}']:.3f})", color=colour, linewidth=2)
    ax.set(xlabel="entropy per position, nats", ylabel="positions", title="Teacher entropy: bounds from top-K + tail")
    ax.legend(loc="upper right")
    return ("Histograms of each position's entropy bounds: the tail mass on one token (lower) or spread evenly over "
            "the ids outside the top-K (upper).")


def _bytes(ax: Any, f: dict[str, Any]) -> str:
    columns = f["bytes"]["columns"]
    names = list(columns)[::-1]
    ax.barh(names, [columns[n]["per_token"] or 0 for n in names], color=TOP_COLOUR)
    in_columns = sum(columns[n]["per_token"] or 0 for n in names)
    token = "generated token" if "generations" in f else "token"  # the denominator store_stats used
    ax.set(xlabel=f"compressed bytes per {token}",
           title=f"Bytes per {token}: {in_columns:.1f} in columns, {f['bytes']['per_token']:.1f} with footers")
    ax.tick_params(axis="y", labelsize=8 if len(names) <= 12 else 7)
    return f"Compressed bytes per {token} of each column, from the shards' Parquet footers."


def _shards(ax: Any, f: dict[str, Any]) -> str:
    shards = f["shards"]
    ax.bar(range(len(shards)), [s["num_tokens"] for s in shards], color=TOP_COLOUR)
    _integer_ticks(ax.xaxis)
    ax.set(xlabel="shard (manifest order)", ylabel="tokens", title=f"Tokens per shard ({len(shards)} shards)")
    return "Tokens held by each shard, in manifest order (the terminal table lists paths, rows and bytes)."


def _sampled(ax: Any, f: dict[str, Any]) -> str:
    s = f["sampled"]
    ax.bar(range(len(s["unique_ids_counts"])), s["unique_ids_counts"], color=TOP_COLOUR)
    _integer_ticks(ax.xaxis)
    ax.set(xlabel=f"distinct ids among the {s['draws']} draws of a position", ylabel="positions",
           title=f"Sampled draws: distinct ids per position (mean {s['mean_unique_ids']:.2f})")
    return "Histogram of the number of distinct ids among each position's sampled draws."


def _scores(ax: Any, f: dict[str, Any]) -> str:
    for (name, score), colour in zip(f["scores"].items(), (TOP_COLOUR, OUTSIDE_COLOUR)):
        ax.stairs(score["counts"], np.array(score["edges"]), label=name, color=colour, linewidth=2)
    ax.set(xlabel="mean log-likelihood per token (clipped to [-16, 0])", ylabel="sequences", title="Per-sequence scores")
    ax.legend(loc="upper left")
    return "Histograms of the per-sequence score columns."


def _completion_lengths(ax: Any, f: dict[str, Any]) -> str:
    lengths = f["generations"]["completion_tokens"]
    edges = np.array(lengths["edges"])
    ax.bar(edges[:-1], lengths["counts"], width=np.diff(edges), align="edge", color=TOP_COLOUR, edgecolor="white")
    ax.axvline(lengths["mean"], color="black", linestyle="--", label=f"mean {lengths['mean']:.1f}")
    _integer_ticks(ax.xaxis)
    _integer_ticks(ax.yaxis)
    ax.set(xlabel="completion length, tokens", ylabel="completions",
           title=f"Completion lengths (max {lengths['max']:,} tokens)")
    ax.legend(loc="upper right")
    width = int(edges[1] - edges[0])
    return f"Histogram of the completions' lengths in generated tokens (bins of {width} token{'s' * (width != 1)})."


def _finish_reasons(ax: Any, f: dict[str, Any]) -> str:
    reasons = f["generations"]["finish_reasons"]
    names = ["stop", "length", *(n for n in reasons["counts"] if n not in ("stop", "length"))]  # both, even at 0
    bars = ax.bar(names, [reasons["shares"].get(n, 0.0) for n in names], width=0.5,
                  color=[TOP_COLOUR if n == "stop" else OUTSIDE_COLOUR for n in names])
    ax.bar_label(bars, labels=[f"{reasons['counts'].get(n, 0):,}" for n in names])
    ax.set(ylim=(0, 1.1), xlabel="finish reason", ylabel="share of completions",
           title="Why completions ended (stop: end of sequence or a stop string)")
    return "Share of completions by finish reason (stop: end-of-sequence token or a stop string; length: " \
           "max_new_tokens reached), with the counts above the bars."


def _vote_shares(ax: Any, f: dict[str, Any]) -> str:
    g = f["generations"]
    sizes = [n for n, count in enumerate(g["completions_per_prompt"]["counts"]) if count]
    votes = g["vote_share"]["votes_counts"]
    votes = votes + [0] * (sizes[-1] + 1 - len(votes))  # up to n votes, even when no prompt got them all
    labels = [f"{v}/{sizes[0]}" if len(sizes) == 1 else str(v) for v in range(len(votes))]
    ax.bar(range(len(votes)), votes, color=[OUTSIDE_COLOUR] + [TOP_COLOUR] * (len(votes) - 1))
    ax.set_xticks(range(len(votes)), labels)
    _integer_ticks(ax.yaxis)
    ax.set(xlabel="completions that give the majority answer (0: no completion has an answer)", ylabel="prompts",
           title=f"Self-consistency: votes for the majority answer (mean share {g['vote_share']['mean']:.2f})")
    return "Prompts by the number of their completions whose answer is the majority answer (the vote share times n)."


def _accuracy(ax: Any, f: dict[str, Any]) -> str:
    g = f["generations"]
    answers, passed, majority = g["answers"], g["pass_at_n"], g["majority"]
    prompts = passed["num_prompts_with_reference"]
    bars = [("per completion", answers["num_correct"], answers["num_with_reference"]),
            ("pass@n (any correct)", passed["num_passed"], prompts), ("majority vote", majority["num_correct"], prompts)]
    shares = [b[1] / b[2] if b[2] else 0.0 for b in bars]
    drawn = ax.bar([b[0] for b in bars], shares, width=0.6, color=[TOP_COLOUR, TOP_COLOUR, OUTSIDE_COLOUR])
    ax.bar_label(drawn, labels=[f"{share:.1%} ({b[1]:,}/{b[2]:,})" for share, b in zip(shares, bars)])
    from matplotlib.ticker import PercentFormatter

    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    # a low accuracy stays visible: the axis ends a little above the highest bar, not at 100 %
    ax.set(ylim=(0, min(1.1, max(0.05, 1.2 * max(shares)))), ylabel="correct",
           title="Answer accuracy (among those with a reference answer)")
    return "Share of completions with a correct answer, of prompts with at least one correct completion (pass@n), " \
           "and of prompts whose majority answer is correct, among those with a reference answer."


def _generations(f: dict[str, Any]) -> bool:
    return "generations" in f


# name -> (draws the plot on an Axes and returns its caption, whether the figures have what it shows)
PLOTS: dict[str, tuple[Callable[[Any, dict[str, Any]], str], Callable[[dict[str, Any]], bool]]] = {
    "target_rank": (_rank, lambda f: True),
    "topk_mass": (_topk_mass, lambda f: True),
    "tail_mass": (_tail_mass, lambda f: True),
    "mass_by_position": (_mass_by_position, lambda f: True),
    "entropy": (_entropy, lambda f: True),
    "bytes_per_column": (_bytes, lambda f: True),
    "shard_tokens": (_shards, lambda f: f["num_shards"] > 1),  # one shard: the table says it all
    "sampled_unique_ids": (_sampled, lambda f: f["sampled"] is not None),
    "scores": (_scores, lambda f: bool(f["scores"])),
    "completion_lengths": (_completion_lengths, _generations),
    "finish_reasons": (_finish_reasons, _generations),
    "vote_shares": (_vote_shares, lambda f: _generations(f) and f["generations"]["vote_share"]["mean"] is not None),
    "accuracy": (_accuracy, lambda f: _generations(f) and f["generations"]["pass_at_n"]["num_prompts_with_reference"] > 0),
}


def _run_losses(ax: Any, f: dict[str, Any]) -> str:
    c = f["curves"]
    for key, label, style in (("loss", "training loss", "-"), ("kd", "KD part", "--"), ("ce", "CE part", ":")):
        points = [(s, v) for s, v in zip(c["step"], c[key]) if v is not None]
        if points:
            ax.plot(*zip(*points), style, label=label, marker="." if len(points) <= 64 else None)
    if c["val_step"]:
        ax.plot(c["val_step"], c["val_loss"], "o-", color=OUTSIDE_COLOUR, label="validation loss")
    _integer_ticks(ax.xaxis)
    ax.set(xlabel="step", ylabel="loss, nats per token", title="Training loss (KD and CE parts) and validation loss")
    ax.legend(loc="best")  # the curves fall, rise or cross: let matplotlib find a clear corner
    return "Mean training loss and its KD and CE parts over each logged interval, and the validation loss, by step."


def _run_curve(key: str, label: str, title: str, caption: str) -> Callable[[Any, dict[str, Any]], str]:
    def draw(ax: Any, f: dict[str, Any]) -> str:
        points = [(s, v) for s, v in zip(f["curves"]["step"], f["curves"][key]) if v is not None]
        ax.plot(*zip(*points), color=TOP_COLOUR, marker="." if len(points) <= 64 else None)
        _integer_ticks(ax.xaxis)
        ax.set(xlabel="step", ylabel=label, title=title)
        return caption
    return draw


def _has(key: str) -> Callable[[dict[str, Any]], bool]:
    return lambda f: any(v is not None for v in f["curves"][key])


RUN_PLOTS: dict[str, tuple[Callable[[Any, dict[str, Any]], str], Callable[[dict[str, Any]], bool]]] = {
    "loss": (_run_losses, lambda f: bool(f["curves"]["step"] or f["curves"]["val_step"])),
    "lr": (_run_curve("lr", "learning rate", "Learning rate", "The learning rate at each logged step."), _has("lr")),
    "tokens_per_s": (_run_curve("tokens_per_s", "tokens/s", "Throughput",
                                "Real tokens per second on every rank over each logged interval."), _has("tokens_per_s")),
}


def render_figures(figures: dict[str, Any]) -> dict[str, tuple[bytes, str]]:
    """{plot name: (PNG bytes, caption)} of every plot the figures have data for (a store with no positions: none)."""
    return _render(PLOTS, figures) if figures["num_positions"] else {}


def render_run_figures(figures: dict[str, Any]) -> dict[str, tuple[bytes, str]]:
    """{plot name: (PNG bytes, caption)} of a training run's curves (kdstore.run_stats.run_stats) it has data for."""
    return _render(RUN_PLOTS, figures)


def _render(plots: dict[str, tuple[Callable[[Any, dict[str, Any]], str], Callable[[dict[str, Any]], bool]]],
            figures: dict[str, Any]) -> dict[str, tuple[bytes, str]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    images = {}
    for name, (draw, applies) in plots.items():
        if not applies(figures):
            continue
        figure = Figure(figsize=FIGURE_INCHES, dpi=DPI)
        FigureCanvasAgg(figure)
        caption = draw(figure.add_subplot(), figures)
        figure.tight_layout()  # moves the axes inside the fixed canvas; the size stays FIGURE_PIXELS
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})  # no version string: same bytes
        images[name] = (buffer.getvalue(), caption)
    return images


def write_pngs(images: dict[str, tuple[bytes, str]], folder: Path) -> list[Path]:
    """``folder/<name>.png`` for each image; the folder is made if missing (its parent must exist)."""
    folder.mkdir(exist_ok=True)
    written = []
    for name, (png, _) in images.items():
        path = folder / f"{name}.png"
        write_atomic(path, png)
        written.append(path)
    return written


_STYLE = ("body{font-family:sans-serif;max-width:62rem;margin:2rem auto;padding:0 1rem;color:#222}"
          "pre{background:#f6f6f6;padding:1rem;overflow-x:auto;font-size:0.85rem}"
          "figure{margin:1.5rem 0}figcaption{font-size:0.9rem;color:#555}img{max-width:100%;height:auto}")


def report_html(location: str, lines: list[str], figures: dict[str, Any], images: dict[str, tuple[bytes, str]]) -> str:
    """One HTML page: the terminal table, every plot as a data URI, the figures as JSON. No external reference."""
    title = html.escape(f"kdstore stats: {location}")
    width, height = FIGURE_PIXELS
    plots = "".join(
        f'<figure id="{name}"><img alt="{html.escape(name)}" width="{width}" height="{height}" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode()}"><figcaption>{html.escape(caption)}'
        "</figcaption></figure>\n" for name, (png, caption) in images.items())
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{_STYLE}</style></head>\n<body><h1>{title}</h1>\n<h2>Figures</h2>\n"
            f"<pre>{html.escape(chr(10).join(lines))}</pre>\n<h2>Plots</h2>\n{plots}"
            f"<details><summary>All figures as JSON (kdstore stats --json)</summary>"
            f"<pre>{html.escape(json.dumps(figures, indent=1))}</pre></details>\n</body></html>\n")


def write_html(path: Path, location: str, lines: list[str], figures: dict[str, Any],
               images: dict[str, tuple[bytes, str]]) -> Path:
    write_atomic(path, report_html(location, lines, figures, images))
    return path
