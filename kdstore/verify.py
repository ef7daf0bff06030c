"""``verify_store``: every check a store must pass, reporting all problems, not the first.

    problems = verify_store(open_store("store"))   # [] when every check passes

Per shard: the file is a regular file inside the store (no symbolic link), its
size, sha256 and (format 2) footer and row-group checksums match the manifest,
its footer carries the store's essentials, its schema is the format's, its row
and token counts match, every page passes its checksum, and every row
satisfies the invariants below. Across the store: sequence ids are unique, the
tokenizer files match the manifest's sha256, and the Arrow copy of the current
manifest, when there is one, matches its sidecar byte for byte.

Row invariants (vectorised over a row group):
* lengths: a sequence of T tokens has T - 1 positions and (T - 1) * K top-K entries;
* ids: top-K ids strictly ascending within a position (distinct) and < vocab_size;
  input ids in [0, vocab_size);
* probabilities: sum of top-K p + tail = 1 within the codec's quantisation bound;
* target: if the next token is in the top-K its log-prob matches that entry,
  otherwise it is no larger than the smallest top-K log-prob and the tail mass
  (each within the quantisation bound);
* sampled: counts sum to the number of draws, ids ascending and < vocab_size.

A generations table (one row per completion, docs/format.md) passes the same checks on its completion
positions, cut out as the logits row ``input_ids[P - 1:]`` (position c predicts ``input_ids[P + c]``), and:
* 1 <= prompt_num_tokens <= len(input_ids); token_logprobs has one value per completion token, each within the
  codec's bound of its target code; total_logprob is their sum;
* sequence_id is PROMPT_ID/SAMPLE; sample_index < n; finish_reason is stop or length, and length only at
  max_new_tokens tokens, which no completion passes;
* correct is null exactly when reference_answer is; agrees_with_majority and vote_share are null exactly when
  majority_answer is, and vote_share lies in (0, 1].
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from kdstore.arrow_copy import ArrowCopy, copy_path, sidecar_path
from kdstore.codec import CodecConfig, sum_check_tolerance
from kdstore.errors import KdstoreError
from kdstore.format import TABLE_GENERATIONS
from kdstore.generation_view import completion_cut
from kdstore.store import Store, StoredRows, list_parts

MAX_EXAMPLES = 3  # rows named per failed check, so a broken store does not flood the terminal


def verify_store(store: Store) -> list[str]:
    problems: list[str] = []
    table_max = float(store.codec.codebook.table.max())
    if table_max > 0:
        problems.append(f"manifest: the log-prob codebook decodes to positive values (max {table_max})")
    seen_ids: set[str] = set()
    for shard in store.manifest.shards:
        try:
            _verify_shard(store, shard, seen_ids, problems)
        except KdstoreError as exc:
            problems.append(str(exc))
    problems += _tokenizer_problems(store)
    if store.manifest.scores:
        from kdstore.score_table import score_file_problems

        problems += score_file_problems(store)
    problems += _arrow_copy_problems(store)
    return problems


def _tokenizer_problems(store: Store) -> list[str]:
    """The tokenizer files the manifest lists, against its files_sha256 (Store.local_tokenizer checks them)."""
    try:
        with store.local_tokenizer():
            return []
    except KdstoreError as exc:
        return [str(exc)]


def _arrow_copy_problems(store: Store) -> list[str]:
    """The Arrow copy of this manifest in STORE/_cache/arrow, when there is one, byte for byte against its sidecar."""
    if store.local_root is None:
        return []
    path = copy_path(store)
    if not path.exists() and not sidecar_path(path).exists():
        return []
    try:
        copy = ArrowCopy(store, path)
        try:
            copy.check_all()
        finally:
            copy.close()
    except (KdstoreError, OSError) as exc:
        return [str(exc) if isinstance(exc, KdstoreError) else f"the Arrow copy {path} cannot be read: {exc}"]
    return []


def _verify_shard(store: Store, shard: Any, seen_ids: set[str], problems: list[str]) -> None:
    store.check_shard_file(shard)
    parquet = store.open_shard(shard)  # footer essentials, schema and row count against the manifest
    rows = tokens = 0
    for group in range(parquet.num_row_groups):
        try:
            table = store.read_row_group(parquet, shard, group)
        except KdstoreError as exc:
            problems.append(str(exc))
            continue
        where = f"shard {shard.path} row group {group}"
        if store.manifest.table == TABLE_GENERATIONS:
            problems += [f"{where}: {p}" for p in check_generation_rows(store.codec, table, store.manifest.build)]
        else:
            problems += [f"{where}: {p}" for p in check_rows(store.codec, table)]
        for sequence_id in table["sequence_id"].to_pylist():
            if sequence_id in seen_ids:
                problems.append(f"{where}: sequence id {sequence_id!r} appears more than once in the store")
            seen_ids.add(sequence_id)
        rows += table.num_rows
        tokens += len(table["input_ids"].combine_chunks().flatten())
    if (rows, tokens) != store.shard_counts(shard):  # a view reads only its chosen rows of the parent's shard
        problems.append(f"shard {shard.path}: holds {rows} sequences / {tokens} tokens; "
                        f"the manifest says {'{} / {}'.format(*store.shard_counts(shard))}")


def _examples(ids: list[str], row_of: np.ndarray, bad: np.ndarray) -> str:
    rows = np.unique(row_of[bad])[:MAX_EXAMPLES]
    return ", e.g. sequence " + ", ".join(repr(ids[r]) for r in rows)


def check_rows(codec: CodecConfig, table: pa.Table) -> list[str]:
    """The row invariants of the module docstring, for one Table of stored columns."""
    ids = table["sequence_id"].to_pylist()
    parts = dict(StoredRows(codec, table).parts)
    tokens, token_offsets = parts.pop("input_ids")
    num_positions = np.maximum(np.diff(token_offsets) - 1, 0)
    wrong_length = _check_lengths(codec.k, parts, num_positions, ids)
    if wrong_length:
        return [wrong_length]  # the other checks would index garbage
    row_of_position = np.repeat(np.arange(len(ids)), num_positions)
    problems = []
    if tokens.size and (tokens.min() < 0 or tokens.max() >= codec.vocab_size):
        problems.append(f"input_ids outside [0, {codec.vocab_size})")
    deltas = parts["topk_id_deltas"][0].reshape(-1, codec.k).astype(np.uint64)
    topk_ids = np.cumsum(deltas, axis=1)
    codes = parts["topk_logprob_codes"][0].reshape(-1, codec.k)
    checks = [
        (topk_ids[:, -1] >= codec.vocab_size, f"with top-K ids >= vocab_size {codec.vocab_size}"),
        ((deltas[:, 1:] == 0).any(axis=1), "whose top-K ids are not strictly ascending"),
    ]
    if "tail_logmass_codes" in parts:
        checks.append(_check_mass(codec, codes, parts["tail_logmass_codes"][0]))
    if "target_logprob_codes" in parts:
        checks += _check_targets(codec, tokens, token_offsets, topk_ids, codes, parts["target_logprob_codes"][0])
    for bad, what in checks:
        if bad.any():
            problems.append(f"{int(bad.sum())} positions {what}" + _examples(ids, row_of_position, bad))
    if "sampled_num_ids" in parts:
        problems += _check_sampled(codec, parts, ids, row_of_position)
    return problems


def _check_lengths(k: int, parts: dict[str, Any], num_positions: np.ndarray, ids: list[str]) -> str | None:
    per_position = {"topk_id_deltas": k, "topk_logprob_codes": k, "tail_logmass_codes": 1,
                    "target_logprob_codes": 1, "sampled_num_ids": 1}
    for name, width in per_position.items():
        if name in parts:
            bad = np.diff(parts[name][1]) != num_positions * width
            if bad.any():
                names = ", ".join(repr(ids[r]) for r in np.flatnonzero(bad)[:MAX_EXAMPLES])
                return f"{int(bad.sum())} sequences whose {name} length does not fit their tokens, e.g. sequence {names}"
    return None


def _check_mass(codec: CodecConfig, codes: np.ndarray, tail_codes: np.ndarray) -> tuple[np.ndarray, str]:
    table = codec.codebook.table.astype(np.float64)
    total = np.exp(table[codes]).sum(axis=1) + np.exp(table[tail_codes])
    bad = np.abs(total - 1.0) > sum_check_tolerance(codec, codes, tail_codes)
    worst = f" (worst {total[bad][np.argmax(np.abs(total[bad] - 1))]:.4f})" if bad.any() else ""
    return bad, f"where sum(p) + tail is not 1{worst}"


def _check_targets(codec: CodecConfig, tokens: np.ndarray, token_offsets: np.ndarray, topk_ids: np.ndarray,
                   codes: np.ndarray, target_codes: np.ndarray) -> list[tuple[np.ndarray, str]]:
    table = codec.codebook.table.astype(np.float64)
    err = codec.codebook.max_log_error
    is_target = np.ones(len(tokens), dtype=bool)
    is_target[token_offsets[:-1]] = False  # the first token of a sequence is nobody's target
    targets = tokens[is_target].astype(np.uint64)
    hit = topk_ids == targets[:, None]
    in_topk = hit.any(axis=1)
    slack = err[target_codes] + 1e-6
    hit_codes = codes[np.arange(len(codes)), hit.argmax(axis=1)]
    mismatch = in_topk & (np.abs(table[target_codes] - table[hit_codes]) > slack + err[hit_codes])
    least_likely = codes.max(axis=1)  # the largest code is the smallest log-prob
    too_likely = ~in_topk & (table[target_codes] > table[least_likely] + slack + err[least_likely])
    return [(mismatch, "whose target log-prob differs from its top-K entry"),
            (too_likely, "whose target is outside the top-K but more likely than every top-K token")]


def _check_sampled(codec: CodecConfig, parts: dict[str, Any], ids: list[str], row_of: np.ndarray) -> list[str]:
    num_ids = parts["sampled_num_ids"][0].astype(np.int64)
    deltas, counts = parts["sampled_id_deltas"][0], parts["sampled_counts"][0].astype(np.int64)
    if num_ids.sum() != len(deltas) or len(deltas) != len(counts):
        return ["sampled_num_ids, sampled_id_deltas and sampled_counts disagree on the number of entries"]
    starts = np.concatenate(([0], np.cumsum(num_ids)))[:-1]
    problems = []
    draws = np.add.reduceat(counts, starts) if len(counts) else np.zeros(0, np.int64)
    draws = np.where(num_ids > 0, draws, 0)
    bad = draws != codec.sampled_draws
    if bad.any():
        problems.append(f"{int(bad.sum())} positions whose sampled counts do not sum to {codec.sampled_draws} draws"
                        + _examples(ids, row_of, bad))
    first = np.zeros(len(deltas), dtype=bool)
    first[starts[num_ids > 0]] = True
    if (deltas[~first] == 0).any():
        problems.append("sampled ids repeat within a position")
    running = np.concatenate(([0], np.cumsum(deltas.astype(np.uint64))))
    sampled_ids = running[1:] - np.repeat(running[starts], num_ids)
    if sampled_ids.size and sampled_ids.max() >= codec.vocab_size:
        problems.append(f"sampled ids >= vocab_size {codec.vocab_size}")
    return problems


def check_generation_rows(codec: CodecConfig, table: pa.Table, build: dict[str, Any]) -> list[str]:
    """The generations invariants of the module docstring, for one Table of stored columns."""
    ids = table["sequence_id"].to_pylist()
    tokens, offsets = list_parts(table["input_ids"])
    prompt_tokens = table["prompt_num_tokens"].to_numpy().astype(np.int64)
    lengths = np.diff(offsets)
    bad = (prompt_tokens < 1) | (prompt_tokens > lengths)
    if bad.any():
        return [f"{int(bad.sum())} completions whose prompt_num_tokens does not fit input_ids"
                + _examples(ids, np.arange(len(ids)), bad)]
    completion = lengths - prompt_tokens
    # the completion positions as a logits row: tokens P-1 .. T-1, so position c predicts token P + c
    keep, cut_offsets = completion_cut(offsets, prompt_tokens)
    cut = pa.array(cut_offsets.astype(np.int32))
    as_logits = table.select([c for c in table.column_names if c in StoredRows.POSITION_COLUMNS or c.startswith("sampled_")
                              or c == "sequence_id"])
    as_logits = as_logits.append_column("input_ids", pa.ListArray.from_arrays(cut, pa.array(tokens[keep])))
    problems = check_rows(codec, as_logits)
    if problems and "length does not fit" in problems[0]:
        return problems
    row_of = np.repeat(np.arange(len(ids)), completion)
    logprobs, logprob_offsets = list_parts(table["token_logprobs"])
    if not np.array_equal(np.diff(logprob_offsets), completion):
        return problems + ["token_logprobs does not hold one value per completion token"]
    target_codes = list_parts(table["target_logprob_codes"])[0]
    far = np.abs(codec.codebook.table[target_codes].astype(np.float64) - logprobs) > \
        codec.codebook.max_log_error[target_codes] + 1e-4
    far &= logprobs > codec.codebook.floor_logprob  # below the floor every value shares the last code
    if far.any():
        problems.append(f"{int(far.sum())} completion tokens whose token_logprobs differ from their target code"
                        + _examples(ids, row_of, far))
    sums = np.add.reduceat(logprobs.astype(np.float64), logprob_offsets[:-1]) if len(logprobs) else np.zeros(len(ids))
    sums = np.where(completion > 0, sums, 0.0)
    off = np.abs(sums - table["total_logprob"].to_numpy()) > 1e-3 * np.maximum(1.0, np.abs(sums))
    problems += _generation_field_problems(table, ids, completion, build)
    if off.any():
        problems.append(f"{int(off.sum())} completions whose total_logprob is not the sum of token_logprobs"
                        + _examples(ids, np.arange(len(ids)), off))
    return problems


def _generation_field_problems(table: pa.Table, ids: list[str], completion: np.ndarray, build: dict[str, Any]) -> list[str]:
    column = {name: table[name].to_pylist() for name in ("prompt_id", "sample_index", "finish_reason", "reference_answer",
                                                        "correct", "majority_answer", "agrees_with_majority", "vote_share")}
    n, limit = int(build.get("n", 1 << 30)), int(build.get("max_new_tokens", 1 << 30))
    checks = {
        "whose sequence_id is not PROMPT_ID/SAMPLE": [i != f"{p}/{s:04d}" for i, p, s in
                                                     zip(ids, column["prompt_id"], column["sample_index"])],
        f"whose sample_index is not below n = {n}": [not 0 <= s < n for s in column["sample_index"]],
        "whose finish_reason is not stop or length": [r not in ("stop", "length") for r in column["finish_reason"]],
        f"with finish_reason length below max_new_tokens = {limit}, or more tokens than that":
            [(r == "length" and c != limit) or c > limit for r, c in zip(column["finish_reason"], completion)],
        "whose correct is null while a reference_answer is given, or set without one":
            [(ref is None) != (ok is None) for ref, ok in zip(column["reference_answer"], column["correct"])],
        "whose agrees_with_majority or vote_share disagrees with majority_answer":
            [(m is None) != (a is None) or (m is None) != (v is None) or (v is not None and not 0 < v <= 1)
             for m, a, v in zip(column["majority_answer"], column["agrees_with_majority"], column["vote_share"])],
    }
    problems = []
    for what, flags in checks.items():
        bad = np.asarray(flags, dtype=bool)
        if bad.any():
            problems.append(f"{int(bad.sum())} completions {what}" + _examples(ids, np.arange(len(ids)), bad))
    return problems
