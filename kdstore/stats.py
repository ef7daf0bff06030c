"""Figures about a store, measured one row group at a time: what the teacher's distributions look like and what the
stored K of them keeps.

    kdstore stats my-store --plot plots --html report.html
    figures = kdstore.stats.store_stats("s3://bucket/store", storage_options={...})   # a JSON-ready dict

Everything is read through ``Store`` (checked bytes, local or any fsspec URL) and decoded by ``StoredRows``; each
row group is folded into fixed-size sums and histograms and dropped, so memory does not grow with the store.
docs/stats.md defines every figure; in short, per position t (the teacher's distribution over token t+1):

* perplexity: exp(-mean target log-prob) over all positions (``target_logprob``, decoded through the codebook);
* entropy bounds: the top-K part -sum p log p is exact up to quantisation; the tail mass m adds between m(-log m)
  (all of it on one token) and m(log(V-K) - log m) (spread evenly over the V-K other ids); the estimate is the
  midpoint of the two bounds;
* top-K mass (sum of the K stored p), tail mass (``tail_logmass``, or 1 - top-K mass when no tail is stored);
* the rank of the actual next token among the K by probability (1 = most likely; tied codes share the best rank),
  or outside the top-K;
* sampled stores: distinct ids per position, draws per position and the share of draws that hit a top-K id;
* bytes per column from the shards' Parquet footers (column chunks' compressed sizes), rows and tokens per shard,
  and the per-sequence score columns when present.

A generations store (``kdstore generate``) gets the same per-position figures over its completion positions only
(completion position c predicts ``input_ids[P + c]``, ``completion_next_tokens_and_positions``), bytes per generated
token, and under ``generations`` its prompts, lengths, finish reasons, accuracy, pass@n and votes
(``kdstore.generation_stats.CompletionTally``, which ``kdstore info`` shares).

Given a ``kdstore train`` run folder (it holds ``metrics.jsonl``, no manifest.json) it reports the run instead
(``run_stats``, ``measure_run``): first, last and least training loss, last validation loss, mean tokens/s and
final learning rate, and the curves against step.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdstore.errors import EmptyStoreError, StatsError, VerifyError
from kdstore.format import SCORE_COLUMNS, TABLE_GENERATIONS, TABLE_LOGITS, ShardInfo
from kdstore.generation_stats import COMPLETION_COLUMNS, CompletionTally, format_completion_lines
from kdstore.generation_view import completion_cut
from kdstore.store import DECODED_COLUMNS, Store, StoredRows, is_url, open_store

# fixed histogram edges, so row groups add up without a second pass; values outside fall into the end bins
TOPK_MASS_EDGES = np.linspace(0.0, 1.0, 21)  # 20 bins of 0.05; a quantised sum a hair above 1 counts in the last
TAIL_LOG10_EDGES = np.arange(-8.0, 0.25, 0.5)  # tail mass 1e-8 .. 1 in half decades; below 1e-8 counts in the first
NUM_ENTROPY_BINS = 40  # over [0, ln V] nats, V the vocabulary size
SCORE_EDGES = np.arange(-16.0, 0.25, 0.5)  # mean log-likelihood per token; -16 is perplexity 9e6, far past any teacher


def entropy_bounds(topk_logprobs: np.ndarray, tail_mass: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds of each position's entropy in nats.

    topk_logprobs [P, K] float (over the full vocabulary), tail_mass [P] float in [0, 1] -> (lower [P], upper [P])
    float64. The top-K part is exact up to quantisation; the tail's V-K ids hold mass m, whose entropy share lies
    between m(-log m) (one token) and m(log(V-K) - log m) (uniform).
    """
    p = np.exp(topk_logprobs.astype(np.float64))
    head = -(p * topk_logprobs.astype(np.float64)).sum(axis=1)
    m = np.clip(tail_mass.astype(np.float64), 0.0, 1.0)
    tail_self = np.where(m > 0, -m * np.log(np.where(m > 0, m, 1.0)), 0.0)
    num_tail_ids = max(vocab_size - topk_logprobs.shape[1], 1)  # V = K: no tail ids, the bounds meet
    return head + tail_self, head + tail_self + m * math.log(num_tail_ids)


def target_ranks(topk_ids: np.ndarray, topk_logprobs: np.ndarray, next_tokens: np.ndarray) -> np.ndarray:
    """Rank of each position's actual next token among its K by probability: 1 + the number of stored entries
    strictly more likely (tied codes share the best rank), or 0 when the token is not in the top-K.

    topk_ids [P, K] int, topk_logprobs [P, K] float, next_tokens [P] int -> [P] int64.
    """
    hit = topk_ids == next_tokens[:, None]
    target_value = np.where(hit, topk_logprobs, -np.inf).max(axis=1)
    ranks = 1 + (topk_logprobs > target_value[:, None]).sum(axis=1)
    return np.where(hit.any(axis=1), ranks, 0).astype(np.int64)


def next_tokens_and_positions(input_ids: np.ndarray, token_offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The token each position predicts and the position's index in its sequence, for ragged sequences.

    input_ids [N_tok], token_offsets [B+1] -> (next_tokens [N_pos], position_in_sequence [N_pos]) int64;
    a T-token sequence has T-1 positions and position t predicts token t+1.
    """
    starts, lengths = token_offsets[:-1], np.diff(token_offsets)
    not_first = np.ones(input_ids.shape[0], dtype=bool)
    not_first[starts[lengths > 0]] = False
    num_positions = np.maximum(lengths - 1, 0)
    first_position = np.concatenate(([0], np.cumsum(num_positions)[:-1])) if len(lengths) else np.zeros(0, np.int64)
    index = np.arange(int(num_positions.sum())) - np.repeat(first_position, num_positions)
    return input_ids[not_first].astype(np.int64), index.astype(np.int64)


def completion_next_tokens_and_positions(input_ids: np.ndarray, token_offsets: np.ndarray,
                                         prompt_num_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``next_tokens_and_positions`` for the rows of a generations table, whose positions cover the completion
    only: completion position c predicts ``input_ids[P + c]`` (P = prompt_num_tokens), and its index is c.

    input_ids [N_tok], token_offsets [B+1], prompt_num_tokens [B] -> (next_tokens [N_pos], c [N_pos]) int64.
    """
    lengths = np.diff(token_offsets)
    if ((prompt_num_tokens < 1) | (prompt_num_tokens > lengths)).any():
        raise VerifyError("a completion's prompt_num_tokens does not fit its input_ids; run `kdstore verify`")
    keep, offsets = completion_cut(token_offsets, prompt_num_tokens)
    return next_tokens_and_positions(input_ids[keep], offsets)


def _histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)[0].astype(np.int64)


def _add_at(total: np.ndarray, part: np.ndarray) -> np.ndarray:
    """total + part for arrays of different lengths (the longer one's length)."""
    if part.shape[0] > total.shape[0]:
        total = np.concatenate([total, np.zeros(part.shape[0] - total.shape[0], dtype=total.dtype)])
    total[:part.shape[0]] += part
    return total


class _Tally:
    """Running sums and histograms of one store; ``add`` folds in one decoded row group (StoredRows.ragged)."""

    def __init__(self, store: Store) -> None:
        codec, decoded = store.codec, _decoded(store)
        self.codec, self.has_tail, self.has_target = codec, "tail_logmass" in decoded, "target_logprob" in decoded
        # no entropy exceeds ln V; a one-id vocabulary still needs edges that grow
        self.entropy_edges = np.linspace(0.0, math.log(max(codec.vocab_size, 2)), NUM_ENTROPY_BINS + 1)
        self.num_sequences = self.num_tokens = self.num_positions = 0
        self.sums = dict.fromkeys(("target_logprob", "entropy_lower", "entropy_upper", "topk_mass", "tail_mass"), 0.0)
        self.counts = {"topk_mass": np.zeros(len(TOPK_MASS_EDGES) - 1, np.int64),
                       "tail_mass": np.zeros(len(TAIL_LOG10_EDGES) - 1, np.int64),
                       "entropy_lower": np.zeros(NUM_ENTROPY_BINS, np.int64),
                       "entropy_upper": np.zeros(NUM_ENTROPY_BINS, np.int64),
                       "rank": np.zeros(codec.k + 1, np.int64)}  # index 0: outside the top-K
        self.mass_by_position, self.positions_at = np.zeros(0, np.float64), np.zeros(0, np.int64)
        self.sampled = {"unique": np.zeros(codec.sampled_draws + 1, np.int64), "draws": 0, "draws_in_topk": 0}
        self.scores = {name: {"count": 0, "num_null": 0, "sum": 0.0, "min": math.inf, "max": -math.inf,
                              "counts": np.zeros(len(SCORE_EDGES) - 1, np.int64)}
                       for name in store.score_columns() if name != "num_positions"}

    def add(self, batch: dict[str, Any], predicted: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Fold in one row group; ``predicted``: (next token, index) of each position when a position t does not
        predict token t + 1 (a generations table: ``completion_next_tokens_and_positions``)."""
        ids, logprobs = batch["topk_ids"], batch["topk_logprobs"]
        next_tokens, position = predicted or next_tokens_and_positions(batch["input_ids"], batch["token_offsets"])
        if next_tokens.shape[0] != ids.shape[0]:
            raise VerifyError(f"a row group holds {ids.shape[0]} positions for {next_tokens.shape[0]} next tokens")
        self.num_sequences += len(batch["token_offsets"]) - 1
        self.num_tokens += int(batch["input_ids"].shape[0])
        self.num_positions += int(ids.shape[0])
        topk_mass = np.exp(logprobs.astype(np.float64)).sum(axis=1)
        tail_mass = np.exp(batch["tail_logmass"].astype(np.float64)) if self.has_tail else np.clip(1.0 - topk_mass, 0, 1)
        lower, upper = entropy_bounds(logprobs, tail_mass, self.codec.vocab_size)
        if self.has_target:
            self.sums["target_logprob"] += float(batch["target_logprob"].astype(np.float64).sum())
        for name, values in (("entropy_lower", lower), ("entropy_upper", upper), ("topk_mass", topk_mass),
                             ("tail_mass", tail_mass)):
            self.sums[name] += float(values.sum())
        self.counts["topk_mass"] += _histogram(topk_mass, TOPK_MASS_EDGES)
        self.counts["tail_mass"] += _histogram(np.log10(np.maximum(tail_mass, 1e-300)), TAIL_LOG10_EDGES)
        self.counts["entropy_lower"] += _histogram(lower, self.entropy_edges)
        self.counts["entropy_upper"] += _histogram(upper, self.entropy_edges)
        self.counts["rank"] += np.bincount(target_ranks(ids, logprobs, next_tokens), minlength=self.codec.k + 1)
        self.mass_by_position = _add_at(self.mass_by_position, np.bincount(position, weights=topk_mass))
        self.positions_at = _add_at(self.positions_at, np.bincount(position))
        if "sampled_offsets" in batch:
            self._add_sampled(batch, ids)
        for name, tally in self.scores.items():
            if name in batch:  # else from the score files, once (store_stats)
                _add_scores(tally, batch[name])

    def _add_sampled(self, batch: dict[str, Any], topk_ids: np.ndarray) -> None:
        num_ids = np.diff(batch["sampled_offsets"])
        counts = batch["sampled_counts"].astype(np.int64)
        owner = np.repeat(np.arange(num_ids.shape[0]), num_ids)
        in_topk = (topk_ids[owner] == batch["sampled_ids"][:, None]).any(axis=1)
        self.sampled["unique"] = _add_at(self.sampled["unique"], np.bincount(num_ids))
        self.sampled["draws"] += int(counts.sum())
        self.sampled["draws_in_topk"] += int(counts[in_topk].sum())

    def figures(self) -> dict[str, Any]:
        positions = self.num_positions
        mean = (lambda name: self.sums[name] / positions) if positions else (lambda name: None)
        rank = self.counts["rank"]
        lower, upper = mean("entropy_lower"), mean("entropy_upper")
        target = mean("target_logprob") if self.has_target else None
        return {
            "num_sequences": self.num_sequences, "num_tokens": self.num_tokens, "num_positions": positions,
            "perplexity": math.exp(-target) if target is not None else None,
            "mean_target_logprob": target,
            "entropy": {"mean_lower": lower, "mean_upper": upper,
                        "mean_estimate": (lower + upper) / 2 if positions else None,
                        "edges": self.entropy_edges.tolist(), "lower_counts": self.counts["entropy_lower"].tolist(),
                        "upper_counts": self.counts["entropy_upper"].tolist()},
            "topk_mass": {"mean": mean("topk_mass"), "edges": TOPK_MASS_EDGES.tolist(),
                          "counts": self.counts["topk_mass"].tolist(),
                          "mean_by_position": (self.mass_by_position / np.maximum(self.positions_at, 1)).tolist()},
            "tail_mass": {"mean": mean("tail_mass"), "source": "tail_logmass" if self.has_tail else "1 - topk_mass",
                          "log10_edges": TAIL_LOG10_EDGES.tolist(), "counts": self.counts["tail_mass"].tolist()},
            "target_rank": {"counts": rank[1:].tolist(), "outside": int(rank[0]),
                            "fraction_top1": rank[1] / positions if positions else None,
                            "fraction_outside": rank[0] / positions if positions else None},
            "sampled": self._sampled_figures(),
            "scores": {name: _score_figures(tally) for name, tally in self.scores.items()},
        }

    def _sampled_figures(self) -> dict[str, Any] | None:
        codec, sampled = self.codec, self.sampled
        if not codec.sampled_draws:
            return None
        unique, positions = sampled["unique"], self.num_positions
        return {"draws": codec.sampled_draws, "mode": codec.sampled_mode, "scheme": codec.sampled_scheme,
                "unique_ids_counts": unique.tolist(),
                "mean_unique_ids": float((unique * np.arange(len(unique))).sum() / positions) if positions else None,
                "draws_per_position": sampled["draws"] / positions if positions else None,
                "fraction_draws_in_topk": sampled["draws_in_topk"] / sampled["draws"] if sampled["draws"] else None}


def _add_scores(tally: dict[str, Any], scores: np.ndarray) -> None:
    present = scores[~np.isnan(scores)].astype(np.float64)
    tally["num_null"] += int(scores.shape[0] - present.shape[0])
    tally["count"] += int(present.shape[0])
    if present.size:
        tally["sum"] += float(present.sum())
        tally["min"], tally["max"] = min(tally["min"], float(present.min())), max(tally["max"], float(present.max()))
        tally["counts"] += _histogram(present, SCORE_EDGES)


def _score_figures(tally: dict[str, Any]) -> dict[str, Any]:
    count = tally["count"]
    return {"count": count, "num_null": tally["num_null"], "mean": tally["sum"] / count if count else None,
            "min": tally["min"] if count else None, "max": tally["max"] if count else None,
            "edges": SCORE_EDGES.tolist(), "counts": tally["counts"].tolist()}


def column_bytes(metadata: pq.FileMetaData) -> dict[str, tuple[int, int]]:
    """{column: (compressed, uncompressed) bytes} summed over a shard's column chunks (from its Parquet footer)."""
    sizes: dict[str, tuple[int, int]] = {}
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        for index in range(row_group.num_columns):
            chunk = row_group.column(index)
            name = chunk.path_in_schema.split(".")[0]  # a list column's leaf is "<name>.list.element"
            compressed, uncompressed = sizes.get(name, (0, 0))
            sizes[name] = (compressed + chunk.total_compressed_size, uncompressed + chunk.total_uncompressed_size)
    return sizes


def _decoded(store: Store) -> list[str]:
    """The decoded columns stats reads: tokens, ids and log-probs (always stored), and tail, target, draws and
    scores when the store has them."""
    from kdstore.score_table import has_score_files

    scores = () if has_score_files(store) else SCORE_COLUMNS  # score files: read once, whole (store_stats)
    wanted = ["input_ids", "topk_ids", "topk_logprobs", "tail_logmass", "target_logprob", "sampled", *scores]
    present = set(store.manifest.columns)
    return [name for name in wanted if all(column in present for column in DECODED_COLUMNS[name])]


def store_stats(location: str | os.PathLike[str] | Store, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every figure of the store at ``location`` (a folder or fsspec URL) as a JSON-ready dict (docs/stats.md).

    One row group is decoded at a time; what is kept between them is a few histograms (fixed edges) and sums.
    """
    store = open_store(location, storage_options, tables=(TABLE_LOGITS, TABLE_GENERATIONS))
    if store.manifest.num_sequences == 0:
        what = "completions" if store.manifest.table == TABLE_GENERATIONS else "sequences"
        raise EmptyStoreError(f"{store.location} holds no {what}; there is nothing to measure")
    tally, columns = _Tally(store), store.stored_columns(_decoded(store))
    completions = CompletionTally() if store.manifest.table == TABLE_GENERATIONS else None
    if completions is not None:
        columns += [name for name in COMPLETION_COLUMNS if name not in columns]
    sizes: dict[str, tuple[int, int]] = {}
    shards = []
    for index, shard in enumerate(store.manifest.shards):
        parquet = store.open_shard(index)
        rows_before, tokens_before = tally.num_sequences, tally.num_tokens
        for group in range(parquet.num_row_groups):
            _add_row_group(tally, completions, store, store.read_row_group(parquet, index, group, columns))
        for name, (compressed, uncompressed) in column_bytes(parquet.metadata).items():
            before = sizes.get(name, (0, 0))
            sizes[name] = (before[0] + compressed, before[1] + uncompressed)
        shards.append(_shard_figures(shard, parquet, tally.num_sequences - rows_before, tally.num_tokens - tokens_before))
    from kdstore.score_table import has_score_files

    if has_score_files(store):  # per-sequence floats: one small table
        table = store.score_table(list(tally.scores))
        for name, score_tally in tally.scores.items():
            _add_scores(score_tally, table.column(name).to_numpy().astype(np.float32))
    figures = tally.figures()
    # a generations store's bytes are counted per generated token (its positions), as `kdstore info` counts them
    per = figures["num_tokens"] if completions is None else figures["num_positions"]
    return {"table": store.manifest.table, "k": store.codec.k, "vocab_size": store.codec.vocab_size,
            "num_shards": len(shards), **figures,
            **({} if completions is None else {"generations": completions.figures()}),
            "bytes": _bytes_figures(sizes, store.manifest.columns, per, store.manifest.total_bytes),
            "shards": shards}


def _add_row_group(tally: _Tally, completions: CompletionTally | None, store: Store, table: pa.Table) -> None:
    """One row group into the tallies: a generations table's positions cover its completions only."""
    batch = StoredRows(store.codec, table).ragged()
    if completions is None:
        tally.add(batch)
        return
    completions.add(table)
    prompt_tokens = table["prompt_num_tokens"].to_numpy().astype(np.int64)
    tally.add(batch, completion_next_tokens_and_positions(batch["input_ids"], batch["token_offsets"], prompt_tokens))


def _shard_figures(shard: ShardInfo, parquet: pq.ParquetFile, num_rows: int, num_tokens: int) -> dict[str, Any]:
    return {"path": shard.path, "num_rows": num_rows, "num_tokens": num_tokens, "num_bytes": shard.num_bytes,
            "num_row_groups": parquet.num_row_groups}


def _bytes_figures(sizes: dict[str, tuple[int, int]], order: list[str], num_tokens: int, file_bytes: int) -> dict[str, Any]:
    per_token = (lambda count: count / num_tokens) if num_tokens else (lambda count: None)
    columns = {name: {"compressed": sizes[name][0], "uncompressed": sizes[name][1], "per_token": per_token(sizes[name][0])}
               for name in order if name in sizes}
    in_columns = sum(column["compressed"] for column in columns.values())
    return {"columns": columns, "column_bytes": in_columns, "file_bytes": file_bytes,
            "other_bytes": file_bytes - in_columns,  # footers (schema, codebook, checksums) and the magic bytes
            "per_token": per_token(file_bytes)}


def check_output_paths(plot_dir: str | os.PathLike[str] | None, html_path: str | os.PathLike[str] | None) -> None:
    """Refuse, before anything is read or written, a plot folder or HTML file that cannot be made where asked."""
    for path, what in ((plot_dir, "plot folder"), (html_path, "HTML report")):
        if path is None:
            continue
        if is_url(path):
            raise StatsError(f"{what} {path} must be a local path, not a URL")
        target = Path(path)
        if what == "plot folder" and target.exists() and not target.is_dir():
            raise StatsError(f"{what} {path} is a file, not a folder")
        if what == "HTML report" and target.is_dir():
            raise StatsError(f"{what} {path} is a folder; name a file such as {target / 'stats.html'}")
        parent = target.parent
        above = next((folder for folder in (parent, *parent.parents) if folder.exists()), None)
        if above is not None and not above.is_dir():
            raise StatsError(f"{what} {path} lies inside {above}, which is a file")
        if not parent.is_dir():
            raise StatsError(f"{what} {path}: the folder {parent} does not exist")
        writable = target if target.is_dir() else parent
        if not os.access(writable, os.W_OK):
            raise StatsError(f"{what} {path}: the folder {writable} is not writable")


def measure_store(location: str | os.PathLike[str], storage_options: dict[str, Any] | None = None,
                  plot_dir: str | os.PathLike[str] | None = None,
                  html_path: str | os.PathLike[str] | None = None) -> tuple[dict[str, Any], list[Path]]:
    """``kdstore stats``: the figures, and the PNG plots and HTML report when asked (paths checked before the store
    is read; nothing is written when reading fails). Returns (figures, the files written)."""
    check_output_paths(plot_dir, html_path)
    figures = store_stats(location, storage_options)
    return figures, write_pictures(figures, format_stats(figures, str(location)), str(location), plot_dir, html_path)


def write_pictures(figures: dict[str, Any], lines: list[str], location: str, plot_dir: str | os.PathLike[str] | None,
                    html_path: str | os.PathLike[str] | None) -> list[Path]:
    """The PNGs and HTML report asked for, of a store's figures or a run's (``figures["run"]`` tells which)."""
    if plot_dir is None and html_path is None:
        return []
    from kdstore.plots import render_figures, render_run_figures, write_html, write_pngs

    images = render_run_figures(figures) if "run" in figures else render_figures(figures)
    written = write_pngs(images, Path(plot_dir)) if plot_dir is not None else []
    if html_path is not None:
        written.append(write_html(Path(html_path), location, lines, figures, images))
    return written


# -- the terminal table ------------------------------------------------------------------
def _pct(count: float, total: float) -> str:
    return f"{100 * count / total:.1f}%" if total else "-"


def format_number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_stats(figures: dict[str, Any], location: str) -> list[str]:
    """The figures as aligned terminal lines (what ``kdstore stats`` prints and the HTML report repeats)."""
    f, positions = figures, figures["num_positions"]
    entropy, mass, tail, rank = f["entropy"], f["topk_mass"], f["tail_mass"], f["target_rank"]
    below_half = sum(mass["counts"][:10])  # bins of 0.05: the first 10 end at 0.5
    tail_above = sum(tail["counts"][12:])  # half-decade bins from 1e-8: the 13th starts at 1e-2
    lines = [
        f"{'store':<22}{location}: {f['table']}, K {f['k']} of {f['vocab_size']:,} ids, {f['num_shards']} shard(s)",
        *(format_completion_lines(f["generations"]) if "generations" in f else
          [f"{'sequences':<22}{f['num_sequences']:,} ({f['num_tokens']:,} tokens, {positions:,} positions)"]),
        f"{'teacher perplexity':<22}" + (f"{f['perplexity']:.4f} (mean target log-prob {f['mean_target_logprob']:.4f})"
                                         if f["perplexity"] is not None else "- (the store has no target log-probs)"),
        f"{'entropy, nats':<22}{format_number(entropy['mean_lower'])} .. {format_number(entropy['mean_upper'])} per position "
        f"(estimate {format_number(entropy['mean_estimate'])}: top-K exact, tail bounded)",
        f"{'top-K mass':<22}mean {format_number(mass['mean'])}; positions below 0.5: {_pct(below_half, positions)}",
        f"{'tail mass':<22}mean {format_number(tail['mean'], 4)}; above 1e-2: {_pct(tail_above, positions)} "
        f"(from {tail['source']})",
        f"{'next token rank':<22}" + "  ".join(f"{r + 1}: {_pct(c, positions)}" for r, c in enumerate(rank["counts"][:5]))
        + (f"  {6}-{f['k']}: {_pct(sum(rank['counts'][5:]), positions)}" if f["k"] > 5 else "")
        + f"  outside the top-K: {_pct(rank['outside'], positions)}",
    ]
    if f["sampled"] is not None:
        s = f["sampled"]
        lines.append(f"{'sampled draws':<22}{s['draws']} per position ({s['mode']}, {s['scheme']}): "
                     f"{format_number(s['mean_unique_ids'], 2)} distinct ids per position, "
                     f"{_pct(s['fraction_draws_in_topk'] or 0, 1)} of draws in the top-K")
    for name, score in f["scores"].items():
        lines.append(f"{name:<22}{score['count']:,} scored, {score['num_null']:,} null: mean {format_number(score['mean'], 4)}, "
                     f"min {format_number(score['min'], 4)}, max {format_number(score['max'], 4)}")
    size = f["bytes"]
    per = "bytes/generated token" if "generations" in f else "bytes per token"  # positions or tokens (store_stats)
    lines += [f"{per:<22}{format_number(size['per_token'], 2)} ({size['file_bytes']:,} bytes in shards, "
              f"{size['other_bytes']:,} of them footers)", "",
              f"  {'column':<24}{'bytes':>14}{'per token':>12}{'share':>8}"]
    lines += [f"  {name:<24}{c['compressed']:>14,}{format_number(c['per_token'], 2):>12}"
              f"{_pct(c['compressed'], size['file_bytes']):>8}"
              for name, c in size["columns"].items()]
    lines += ["", f"  {'shard':<40}{'rows':>10}{'tokens':>12}{'bytes':>14}"]
    lines += [f"  {s['path']:<40}{s['num_rows']:>10,}{s['num_tokens']:>12,}{s['num_bytes']:>14,}" for s in f["shards"]]
    return lines
