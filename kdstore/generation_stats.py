"""Counts over the completions of a generations store, one row group at a time: what ``kdstore stats`` and
``kdstore info`` report about prompts, lengths, finish reasons, answers and votes (docs/stats.md defines each).

    tally = CompletionTally()
    for table in store.iter_tables(...):         # any Tables holding COMPLETION_COLUMNS, in store order
        tally.add(table)
    figures = tally.figures()                    # JSON-ready: prompts, accuracy, pass@n, majority, vote shares, ...

The per-position figures of a generations store (perplexity, top-K and tail mass, ranks, entropy) are the logits
store's, measured by ``kdstore.stats`` over the completion positions. A prompt's completions are consecutive
rows (``kdstore generate`` writes them so, and partitions split the prompts, never a prompt), so the tally holds
only the prompt whose rows are being read: memory does not grow with the store.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# the stored columns the tally reads (per completion; input_ids only for its length)
COMPLETION_COLUMNS = ("prompt_id", "input_ids", "prompt_num_tokens", "finish_reason", "answer", "correct",
                      "agrees_with_majority", "vote_share", "total_logprob")
NUM_LENGTH_BINS = 64  # token-length histograms: one bin per length up to 63 tokens, wider bins of whole tokens above
# per-prompt sums that add up when a prompt's completions span two row groups
_SUMMED = ("num_completions", "num_with_reference", "num_correct", "num_votes", "num_majority_correct")


def length_histogram(counts_by_length: np.ndarray) -> tuple[list[int], list[int]]:
    """(edges, counts) of a histogram of whole-token lengths from counts by exact length: at most NUM_LENGTH_BINS
    bins of equal integer width, bin i holding lengths edges[i] <= length < edges[i + 1]."""
    width = max(1, math.ceil(len(counts_by_length) / NUM_LENGTH_BINS))
    num_bins = max(1, math.ceil(len(counts_by_length) / width))
    padded = np.zeros(num_bins * width, np.int64)
    padded[:len(counts_by_length)] = counts_by_length
    return list(range(0, num_bins * width + 1, width)), padded.reshape(num_bins, width).sum(axis=1).tolist()


def _share(count: float, total: float) -> float | None:
    return count / total if total else None


def _bincount_into(total: np.ndarray, values: np.ndarray) -> np.ndarray:
    part = np.bincount(values) if values.size else np.zeros(0, np.int64)
    if part.shape[0] > total.shape[0]:
        total = np.concatenate([total, np.zeros(part.shape[0] - total.shape[0], np.int64)])
    total[:part.shape[0]] += part
    return total


def _prompt_runs(table: pa.Table, prompt_tokens: np.ndarray, has_reference: np.ndarray, correct: np.ndarray,
                 agrees: np.ndarray) -> dict[str, np.ndarray]:
    """One entry per run of consecutive rows with the same prompt_id: its sums, first vote share and prompt length."""
    ids = table["prompt_id"].to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.concatenate(([True], ids[1:] != ids[:-1])))
    shares = table["vote_share"].to_numpy(zero_copy_only=False).astype(np.float64)  # null -> NaN
    ones = np.ones(len(ids), np.int64)
    sums = {name: np.add.reduceat(values.astype(np.int64), starts) for name, values in (
        ("num_completions", ones), ("num_with_reference", has_reference), ("num_correct", correct),
        ("num_votes", agrees), ("num_majority_correct", agrees & correct))}
    return {"prompt_id": ids[starts], "vote_share": shares[starts], "prompt_tokens": prompt_tokens[starts], **sums}


class CompletionTally:
    """Running counts over completions (``add`` one Table of COMPLETION_COLUMNS at a time), and per prompt once
    its last completion has been read."""

    def __init__(self) -> None:
        self.num_completions = self.generated_tokens = self.num_with_answer = 0
        self.num_with_reference = self.num_correct = self.num_without_answer_with_reference = 0
        self.total_logprob = 0.0
        self.finish_reasons: Counter[str] = Counter()
        self.completion_lengths = np.zeros(0, np.int64)  # completions by exact length in tokens
        self.num_prompts = self.prompt_tokens = self.num_prompts_with_reference = 0
        self.num_passed = self.num_majority_correct = self.num_prompts_voted = 0
        self.vote_share_sum = 0.0
        self.prompt_lengths = np.zeros(0, np.int64)  # prompts by exact length in tokens
        self.completions_per_prompt = np.zeros(0, np.int64)  # prompts by number of completions
        self.votes = np.zeros(0, np.int64)  # prompts by completions agreeing with the majority (0: no answer at all)
        self._pending: dict[str, np.ndarray] | None = None  # the last prompt read, which may go on

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        prompt_tokens = table["prompt_num_tokens"].to_numpy().astype(np.int64)
        generated = pc.list_value_length(table["input_ids"]).to_numpy().astype(np.int64) - prompt_tokens
        has_reference = table["correct"].is_valid().to_numpy(zero_copy_only=False)
        correct = table["correct"].fill_null(False).to_numpy(zero_copy_only=False)
        agrees = table["agrees_with_majority"].fill_null(False).to_numpy(zero_copy_only=False)
        has_answer = table["answer"].is_valid().to_numpy(zero_copy_only=False)
        self.num_completions += table.num_rows
        self.generated_tokens += int(generated.sum())
        self.completion_lengths = _bincount_into(self.completion_lengths, generated)
        self.finish_reasons.update(table["finish_reason"].to_pylist())
        self.num_with_answer += int(has_answer.sum())
        self.num_with_reference += int(has_reference.sum())
        self.num_correct += int(correct.sum())
        self.num_without_answer_with_reference += int((has_reference & ~has_answer).sum())
        self.total_logprob += float(table["total_logprob"].to_numpy().sum())
        runs = _prompt_runs(table, prompt_tokens, has_reference, correct, agrees)
        if self._pending is not None:
            if self._pending["prompt_id"][0] == runs["prompt_id"][0]:  # the pending prompt goes on in this table
                for name in _SUMMED:
                    runs[name][0] += self._pending[name][0]
            else:
                runs = {name: np.concatenate([self._pending[name], values]) for name, values in runs.items()}
        self._fold({name: values[:-1] for name, values in runs.items()})
        self._pending = {name: values[-1:] for name, values in runs.items()}

    def _fold(self, prompts: dict[str, np.ndarray]) -> None:
        """Count prompts whose every completion has been read."""
        referenced = prompts["num_with_reference"] > 0
        voted = ~np.isnan(prompts["vote_share"])
        self.num_prompts += len(prompts["prompt_id"])
        self.prompt_tokens += int(prompts["prompt_tokens"].sum())
        self.prompt_lengths = _bincount_into(self.prompt_lengths, prompts["prompt_tokens"])
        self.completions_per_prompt = _bincount_into(self.completions_per_prompt, prompts["num_completions"])
        self.num_prompts_with_reference += int(referenced.sum())
        self.num_passed += int((referenced & (prompts["num_correct"] > 0)).sum())
        # the majority answer is right exactly when a completion that agrees with it is right
        self.num_majority_correct += int((referenced & (prompts["num_majority_correct"] > 0)).sum())
        self.num_prompts_voted += int(voted.sum())
        self.vote_share_sum += float(prompts["vote_share"][voted].sum())
        self.votes = _bincount_into(self.votes, prompts["num_votes"])

    def figures(self) -> dict[str, Any]:
        """Every count and share (docs/stats.md, "A generations store"); None where a denominator is 0."""
        if self._pending is not None:
            self._fold(self._pending)
            self._pending = None
        prompts, completions, referenced = self.num_prompts, self.num_completions, self.num_prompts_with_reference
        length_edges, length_counts = length_histogram(self.completion_lengths)
        prompt_edges, prompt_counts = length_histogram(self.prompt_lengths)
        return {
            "num_prompts": prompts, "num_completions": completions,
            "completions_per_prompt": {"counts": self.completions_per_prompt.tolist(), "mean": _share(completions, prompts)},
            "completion_tokens": {"total": self.generated_tokens, "mean": _share(self.generated_tokens, completions),
                                  "max": len(self.completion_lengths) - 1, "edges": length_edges, "counts": length_counts},
            "prompt_tokens": {"total": self.prompt_tokens, "mean": _share(self.prompt_tokens, prompts),
                              "max": len(self.prompt_lengths) - 1, "edges": prompt_edges, "counts": prompt_counts},
            "finish_reasons": {"counts": dict(sorted(self.finish_reasons.items())),
                               "shares": {reason: _share(count, completions)
                                          for reason, count in sorted(self.finish_reasons.items())}},
            "answers": {"num_with_answer": self.num_with_answer,
                        "fraction_with_answer": _share(self.num_with_answer, completions),
                        "num_with_reference": self.num_with_reference, "num_correct": self.num_correct,
                        "num_without_answer": self.num_without_answer_with_reference,
                        "accuracy": _share(self.num_correct, self.num_with_reference)},
            "pass_at_n": {"num_prompts_with_reference": referenced, "num_passed": self.num_passed,
                          "value": _share(self.num_passed, referenced)},
            "majority": {"num_correct": self.num_majority_correct, "accuracy": _share(self.num_majority_correct, referenced)},
            "vote_share": {"votes_counts": self.votes.tolist(), "num_prompts_with_answer": self.num_prompts_voted,
                           "mean": _share(self.vote_share_sum, self.num_prompts_voted)},
            "mean_total_logprob": _share(self.total_logprob, completions),
            "mean_token_logprob": _share(self.total_logprob, self.generated_tokens),
        }


def _pct(count: float, total: float) -> str:
    return f"{100 * count / total:.1f}%" if total else "-"


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _by_prompt(counts: list[int]) -> str:
    """Counts of prompts by a number n as "n (c prompts), n' (c'), ..." (the nonzero ones)."""
    parts = [f"{n} ({count:,}{' prompts' if not i else ''})"
             for i, (n, count) in enumerate((n, c) for n, c in enumerate(counts) if c)]
    return ", ".join(parts)


def format_completion_lines(g: dict[str, Any]) -> list[str]:
    """The completion figures as terminal lines (``kdstore stats`` puts them before the per-position ones)."""
    per_prompt = _by_prompt(g["completions_per_prompt"]["counts"])
    reasons = ", ".join(f"{reason} {count:,} ({_pct(count, g['num_completions'])})"
                        for reason, count in g["finish_reasons"]["counts"].items())
    a, p, m, v = g["answers"], g["pass_at_n"], g["majority"], g["vote_share"]
    votes = _by_prompt(v["votes_counts"])
    return [
        f"{'prompts':<22}{g['num_prompts']:,} (prompt tokens: mean {_number(g['prompt_tokens']['mean'], 1)}, "
        f"max {g['prompt_tokens']['max']:,})",
        f"{'completions':<22}{g['num_completions']:,}; per prompt: {per_prompt}",
        f"{'completion tokens':<22}{g['completion_tokens']['total']:,} (mean {_number(g['completion_tokens']['mean'], 1)}, "
        f"max {g['completion_tokens']['max']:,})",
        f"{'finish reasons':<22}{reasons}",
        f"{'answers':<22}{a['num_with_answer']:,} of {g['num_completions']:,} completions have one "
        f"({_pct(a['num_with_answer'], g['num_completions'])})",
        f"{'accuracy':<22}{_pct(a['num_correct'], a['num_with_reference'])} ({a['num_correct']:,} correct of "
        f"{a['num_with_reference']:,} completions with a reference; without an answer: {a['num_without_answer']:,})",
        f"{'pass@n':<22}{_pct(p['num_passed'], p['num_prompts_with_reference'])} ({p['num_passed']:,} of "
        f"{p['num_prompts_with_reference']:,} prompts with a reference have a correct completion)",
        f"{'majority accuracy':<22}{_pct(m['num_correct'], p['num_prompts_with_reference'])} (the majority answer of "
        f"{m['num_correct']:,} of {p['num_prompts_with_reference']:,} prompts is right)",
        f"{'vote share':<22}mean {_number(v['mean'], 3)} over {v['num_prompts_with_answer']:,} prompts with an answer",
        f"{'votes for majority':<22}{votes}" + (" (0: no completion has an answer)" if v["votes_counts"][0] else ""),
        f"{'total log-prob':<22}mean {_number(g['mean_total_logprob'], 3)} per completion "
        f"({_number(g['mean_token_logprob'], 4)} per token)",
    ]
