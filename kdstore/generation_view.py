"""``kdstore info`` and ``kdstore head`` for a generations store (docs/generate.md).

    summary = generation_summary(open_store("gens", tables=("generations",)))   # prompts, accuracy, votes, ...
    for line in generation_head(store, prompt_id=None, num_positions=8, top=3):
        print(line)

Rows are read through ``Store.open_shard`` / ``read_row_group`` (checked row groups) and per-position values
decoded by ``kdstore.codec.decode_positions``, as for a logits store.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from kdstore.codec import decode_positions
from kdstore.errors import KdstoreError
from kdstore.generation_stats import COMPLETION_COLUMNS, CompletionTally
from kdstore.store import Store


def _tables(store: Store, columns: list[str] | None) -> Iterator[pa.Table]:
    for shard in store.manifest.shards:
        parquet = store.open_shard(shard)
        for group in range(parquet.num_row_groups):
            yield store.read_row_group(parquet, shard, group, columns)


def completion_cut(token_offsets: np.ndarray, prompt_num_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each completion as a logits-table row (docs/format.md): its tokens from P - 1 on, so that the row's position
    c predicts token P + c, as a logits row's position t predicts token t + 1.

    token_offsets [B+1], prompt_num_tokens [B] (each 1 <= P <= T) -> (index [N_cut] into the flat input_ids,
    offsets [B+1] of the cut rows) int64; a row of T tokens keeps T - P + 1, one more than its C positions.
    """
    starts, lengths = token_offsets[:-1].astype(np.int64), np.diff(token_offsets).astype(np.int64)
    kept = lengths - prompt_num_tokens.astype(np.int64) + 1
    first = np.repeat(starts + lengths - kept, kept)
    position = np.arange(int(kept.sum())) - np.repeat(np.concatenate(([0], np.cumsum(kept)[:-1])), kept)
    return first + position, np.concatenate(([0], np.cumsum(kept))).astype(np.int64)


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def generation_summary(store: Store) -> dict[str, Any]:
    """What ``kdstore info`` adds for a generations store: counts, tokens, finish reasons, answers and votes
    (counted by ``CompletionTally``, as ``kdstore stats`` counts them)."""
    tally = CompletionTally()
    for table in _tables(store, list(COMPLETION_COLUMNS)):
        tally.add(table)
    g = tally.figures()
    build = store.manifest.build
    generated = g["completion_tokens"]["total"]
    return {
        "num_prompts": g["num_prompts"],
        "num_completions": g["num_completions"],
        "completions_per_prompt": build.get("n"),
        "sampling": {k: build.get(k) for k in ("temperature", "top_p", "top_k", "max_new_tokens")},
        "prompt_tokens": g["prompt_tokens"]["total"],
        "generated_tokens": generated,
        "mean_completion_tokens": _rounded(g["completion_tokens"]["mean"], 2),
        "finish_reasons": g["finish_reasons"]["counts"],
        "with_answer": _rounded(g["answers"]["fraction_with_answer"]),
        "accuracy": _rounded(g["answers"]["accuracy"]),
        "pass_at_n": _rounded(g["pass_at_n"]["value"]),
        "majority_accuracy": _rounded(g["majority"]["accuracy"]),
        "mean_vote_share": _rounded(g["vote_share"]["mean"]),
        "bytes_per_generated_token": round(store.manifest.total_bytes / generated, 2) if generated else None,
    }


def generation_head(store: Store, prompt_id: str | None, num_positions: int, top: int,
                    tokenizer: Any | None) -> Iterator[str]:
    """Lines showing one prompt (``prompt_id``, or the prompt of sequence ``prompt_id``; None: the first) and its
    completions: text, answer, vote, finish reason, and the first ``num_positions`` tokens of each with the
    teacher's ``top`` alternatives at temperature 1."""
    wanted = prompt_id.split("/")[0] if prompt_id else None
    rows: list[dict[str, Any]] = []
    for table in _tables(store, None):
        ids = table["prompt_id"].to_pylist()
        wanted = wanted if wanted is not None else (ids[0] if ids else None)
        picked = [i for i, value in enumerate(ids) if value == wanted]
        rows += [_decoded(store, table.slice(i, 1)) for i in picked]
        if rows and len(picked) < len(ids):
            break  # a prompt's completions are consecutive rows
    if not rows:
        raise KdstoreError(f"no prompt {wanted!r} in {store.location}" if prompt_id else f"{store.location} holds no completions",
                           hint="omit --id to show the first prompt; --id takes a prompt id or a sequence id")
    show = (lambda i: repr(tokenizer.decode([int(i)]))) if tokenizer else (lambda i: f"#{int(i)}")
    first = rows[0]
    yield f"prompt {first['prompt_id']} ({first['prompt_num_tokens']} tokens, {len(rows)} completion{'s' * (len(rows) != 1)}), " \
          f"reference answer: {first['reference_answer']!r}"
    yield from (f"  | {line}" for line in first["prompt"].splitlines() or [""])
    for row in rows:
        verdict = {True: "correct", False: "wrong", None: "no reference"}[row["correct"]]
        vote = "" if row["majority_answer"] is None else \
            (f", majority {row['majority_answer']!r} ({row['vote_share']:.0%}, "
             f"{'agrees' if row['agrees_with_majority'] else 'differs'})")
        yield (f"completion {row['sequence_id']}: {len(row['token_logprobs'])} tokens, finish {row['finish_reason']}, "
               f"log-prob {row['total_logprob']:.2f}, seed {row['seed']}, answer {row['answer']!r} ({verdict}){vote}")
        yield from (f"  > {line}" for line in row["text"].splitlines() or [""])
        tokens = row["input_ids"][row["prompt_num_tokens"]:]
        for c in range(min(num_positions, len(tokens))):
            order = np.argsort(-row["topk_logprobs"][c])[:top]
            alternatives = "  ".join(f"{show(row['topk_ids'][c, j])} {np.exp(row['topk_logprobs'][c, j]):.3f}"
                                     for j in order)
            yield (f"{c:>7} {show(tokens[c])} p={np.exp(row['token_logprobs'][c]):.3f} | {alternatives} | "
                   f"tail {np.exp(row['tail_logmass'][c]):.3f}")


def _decoded(store: Store, table: pa.Table) -> dict[str, Any]:
    """One row as Python values, its per-position columns decoded ([C, K] top-K, [C] tail)."""
    row = {name: table[name][0].as_py() for name in table.column_names
           if not pa.types.is_list(table.schema.field(name).type)}
    stored = {name: table[name][0].values.to_numpy() for name in table.column_names
              if pa.types.is_list(table.schema.field(name).type)}
    row["input_ids"], row["token_logprobs"] = stored.pop("input_ids"), stored.pop("token_logprobs")
    row.update(decode_positions(store.codec, stored))
    return row
