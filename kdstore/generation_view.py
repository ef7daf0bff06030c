"""``kdstore info`` and ``kdstore head`` for a generations store (docs/generate.md).

    summary = generation_summary(open_store("gens", tables=("generations",)))   # prompts, accuracy, votes, ...
    for line in generation_head(store, prompt_id=None, num_positions=8, top=3):
        print(line)

Rows are read through ``Store.open_shard`` / ``read_row_group`` (checked row groups) and per-position values
decoded by ``kdstore.codec.decode_positions``, as for a logits store.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kdstore.codec import decode_positions
from kdstore.errors import KdstoreError
from kdstore.store import Store

_SUMMARY_COLUMNS = ["prompt_id", "input_ids", "prompt_num_tokens", "finish_reason", "answer", "correct",
                    "agrees_with_majority", "vote_share", "majority_answer", "reference_answer"]


def _tables(store: Store, columns: list[str] | None) -> Iterator[pa.Table]:
    for shard in store.manifest.shards:
        parquet = store.open_shard(shard)
        for group in range(parquet.num_row_groups):
            yield store.read_row_group(parquet, shard, group, columns)


def generation_summary(store: Store) -> dict[str, Any]:
    """What ``kdstore info`` adds for a generations store: counts, tokens, finish reasons, answers and votes."""
    prompts: dict[str, dict[str, Any]] = {}
    reasons: Counter[str] = Counter()
    completions = prompt_tokens = generated = with_answer = with_reference = correct = 0
    for table in _tables(store, _SUMMARY_COLUMNS):
        lengths = pc.list_value_length(table["input_ids"]).to_numpy()
        prompt_lengths = table["prompt_num_tokens"].to_numpy()
        completions += table.num_rows
        generated += int((lengths - prompt_lengths).sum())
        reasons.update(table["finish_reason"].to_pylist())
        with_answer += table.num_rows - table["answer"].null_count
        columns = {name: table[name].to_pylist() for name in ("prompt_id", "correct", "agrees_with_majority",
                                                             "vote_share", "majority_answer", "reference_answer")}
        for row in range(table.num_rows):
            ok = columns["correct"][row]
            seen = prompts.setdefault(columns["prompt_id"][row], {"any": False, "majority": None,
                                                                  "share": columns["vote_share"][row]})
            if seen.get("tokens") is None:
                seen["tokens"] = int(prompt_lengths[row])
                prompt_tokens += seen["tokens"]
            if ok is not None:
                with_reference += 1
                correct += int(ok)
                seen["any"] |= ok
                if columns["agrees_with_majority"][row]:
                    seen["majority"] = ok  # the majority answer is right exactly when an agreeing row is
                elif seen["majority"] is None and columns["majority_answer"][row] is None:
                    seen["majority"] = False
    referenced = [p for p in prompts.values() if p["majority"] is not None]
    shares = [p["share"] for p in prompts.values() if p["share"] is not None]
    build = store.manifest.build
    return {
        "num_prompts": len(prompts),
        "num_completions": completions,
        "completions_per_prompt": build.get("n"),
        "sampling": {k: build.get(k) for k in ("temperature", "top_p", "top_k", "max_new_tokens")},
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated,
        "mean_completion_tokens": round(generated / completions, 2) if completions else None,
        "finish_reasons": dict(sorted(reasons.items())),
        "with_answer": round(with_answer / completions, 4) if completions else None,
        "accuracy": round(correct / with_reference, 4) if with_reference else None,
        "pass_at_n": round(sum(p["any"] for p in referenced) / len(referenced), 4) if referenced else None,
        "majority_accuracy": round(sum(bool(p["majority"]) for p in referenced) / len(referenced), 4) if referenced else None,
        "mean_vote_share": round(float(np.mean(shares)), 4) if shares else None,
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
