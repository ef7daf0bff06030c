"""kdstore stats on a generations store: every figure against the same figure worked out by hand from the rows written.

The store is written with ShardWriter from designed completions (answers, references and votes chosen so that every
branch of accuracy, pass@n and the majority vote is taken, one prompt with fewer completions than n, prompts of one
token) whose per-position values are real softmaxes (conftest.teacher_outputs). The oracle reads the rows as they
were handed to the writer, decodes their codes with kdstore.codec.decode_positions and computes each figure in plain
Python: completion position c predicts input_ids[P + c]. Counts are compared exactly, the perplexity to 1e-6.

Run: .venv/bin/python -m pytest tests/unit/test_generation_stats.py
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from test_stats import count_bins, png_size, stats_peak_memory

from conftest import make_manifest, teacher_outputs
from kdstore.answers import majority, normalise
from kdstore.cli.main import cli
from kdstore.codec import CodecConfig, decode_positions
from kdstore.errors import EmptyStoreError
from kdstore.format import FORMAT_VERSION, TABLE_GENERATIONS, generations_schema, rows_to_table
from kdstore.generate import encode_completion
from kdstore.generation_stats import NUM_LENGTH_BINS, length_histogram
from kdstore.generation_view import generation_summary
from kdstore.plots import FIGURE_PIXELS
from kdstore.stats import measure_store, store_stats
from kdstore.store import open_store
from kdstore.verify import verify_store
from kdstore.writer import ShardWriter

CODEC = CodecConfig(k=6, vocab_size=16)
N, MAX_NEW_TOKENS = 3, 11
# (prompt id, reference answer, the answers of its completions)
PROMPTS = [
    ("p0", "7", ["7", "7", "3"]),  # 2 of 3 correct; majority 7: right
    ("p1", "5", ["2", None, "5"]),  # one correct, one without an answer; tie 2 / 5 goes to the first: wrong
    ("p2", None, ["1", "1", "1"]),  # no reference: votes, but neither accuracy nor pass@n counts it
    ("p3", "9", [None, None, None]),  # no answer at all: no majority, 0 votes, all wrong
    ("p4", "4", ["4", "4"]),  # 2 completions of n = 3 (completions per prompt are not all n)
    ("p5", "8", ["1", "2", "3"]),  # all wrong, three-way tie
]


def designed_rows(copies: int = 1) -> list[dict]:
    """The completions as handed to the writer (decoded arrays), in prompt then sample order; ``copies`` > 1
    repeats the designed prompts under new ids (p0, ..., p5, p0-1, ...) with new random values."""
    rng = np.random.default_rng(0)
    rows, index = [], 0
    designed = [(f"{p}-{c}" if c else p, reference, answers) for c in range(copies) for p, reference, answers in PROMPTS]
    for number, (prompt_id, reference, answers) in enumerate(designed):
        prompt = rng.integers(0, CODEC.vocab_size, 1 + number % 5).astype(np.int32)  # P = 1 .. 5
        winner, share = majority(answers)
        for sample, answer in enumerate(answers):
            length = 1 + (5 * index) % MAX_NEW_TOKENS  # 1 .. 11 tokens, 11 (the limit) twice
            index += 1
            cut = np.concatenate([prompt[-1:], rng.integers(0, CODEC.vocab_size, length)])
            tokens, ids, values, tail, target = teacher_outputs(rng, length + 1, CODEC.vocab_size, CODEC.k, tokens=cut)
            logprobs = target.astype(np.float32)
            rows.append({
                "sequence_id": f"{prompt_id}/{sample:04d}", "prompt_id": prompt_id, "sample_index": sample,
                "prompt": f"question {number}", "reference_answer": reference,
                "input_ids": np.concatenate([prompt, tokens[1:]]), "prompt_num_tokens": len(prompt),
                "text": f"completion {index}", "topk_ids": ids, "topk_logprobs": values, "tail_logmass": tail,
                "target_logprob": logprobs, "token_logprobs": logprobs,
                "total_logprob": float(logprobs.astype(np.float64).sum()),
                "finish_reason": "length" if length == MAX_NEW_TOKENS else "stop", "seed": index, "temperature": 1.0,
                "top_p": 1.0, "top_k": 0, "answer": answer,
                "correct": None if reference is None else answer == reference,
                "majority_answer": winner, "vote_share": share,
                "agrees_with_majority": None if winner is None else (answer is not None and normalise(answer) == winner)})
    return rows


def write_generations(path: Path, rows: list[dict], **writer_args) -> Path:
    manifest = dataclasses.replace(make_manifest(CODEC, n=N, max_new_tokens=MAX_NEW_TOKENS), table=TABLE_GENERATIONS,
                                   format_version=FORMAT_VERSION)
    schema = generations_schema(CODEC)
    with ShardWriter(path, manifest, schema, **writer_args) as writer:
        for row in rows:
            writer.write(rows_to_table(schema, [encode_completion(CODEC, row)]))
    return path


@pytest.fixture(scope="module")
def gens(tmp_path_factory) -> Path:
    return write_generations(tmp_path_factory.mktemp("gens") / "g", designed_rows(), shard_bytes=4000,
                             row_group_bytes=900)


@pytest.fixture(scope="module")
def figures(gens) -> dict:
    return store_stats(gens)


def by_prompt(rows: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        grouped.setdefault(row["prompt_id"], []).append(row)
    return grouped


def positions(rows: list[dict]):
    """(row, c, decoded top-K ids, their log-probs (float64), tail log-mass, target log-prob, the token predicted)
    for every completion position, decoded from the codes the store holds."""
    for row in rows:
        decoded = decode_positions(CODEC, encode_completion(CODEC, row))
        start = row["prompt_num_tokens"]
        for c in range(len(row["token_logprobs"])):
            yield (row, c, decoded["topk_ids"][c], decoded["topk_logprobs"][c].astype(np.float64),
                   float(decoded["tail_logmass"][c]), float(decoded["target_logprob"][c]), int(row["input_ids"][start + c]))


# -- the store itself ----------------------------------------------------------------------------------------------
def test_the_designed_store_verifies_and_a_prompt_spans_two_row_groups(gens):
    store = open_store(gens, tables=(TABLE_GENERATIONS,))
    assert verify_store(store) == []
    where = []  # (row group number across the store, prompt id) per completion
    number = 0
    for shard in store.manifest.shards:
        parquet = pq.ParquetFile(gens / shard.path)
        for group in range(parquet.num_row_groups):
            where += [(number, p) for p in parquet.read_row_group(group, columns=["prompt_id"])["prompt_id"].to_pylist()]
            number += 1
    groups_of = {p: {g for g, q in where if q == p} for _, p in where}
    assert number >= 4 and len(store.manifest.shards) >= 2
    assert any(len(groups) > 1 for groups in groups_of.values())  # the tally carries a prompt over a boundary


# -- completions, answers and votes --------------------------------------------------------------------------------
def test_prompt_and_completion_counts_and_length_histograms_equal_the_rows(figures):
    rows, g = designed_rows(), figures["generations"]
    prompts = by_prompt(rows)
    lengths = [len(r["token_logprobs"]) for r in rows]
    prompt_lengths = [group[0]["prompt_num_tokens"] for group in prompts.values()]
    per_prompt = Counter(len(group) for group in prompts.values())
    assert (g["num_prompts"], g["num_completions"]) == (len(PROMPTS), len(rows)) == (6, 17)
    assert g["completions_per_prompt"]["counts"] == [per_prompt[n] for n in range(N + 1)] == [0, 0, 1, 5]
    assert g["completions_per_prompt"]["mean"] == len(rows) / len(prompts)
    assert g["completion_tokens"]["total"] == sum(lengths) == figures["num_positions"]
    assert g["completion_tokens"]["mean"] == pytest.approx(sum(lengths) / len(rows), rel=1e-12)
    assert g["completion_tokens"]["max"] == max(lengths) == MAX_NEW_TOKENS
    assert g["completion_tokens"]["edges"] == list(range(MAX_NEW_TOKENS + 2))  # one bin per length below 64
    assert g["completion_tokens"]["counts"] == [lengths.count(n) for n in range(MAX_NEW_TOKENS + 1)]
    assert g["prompt_tokens"]["total"] == sum(prompt_lengths) and g["prompt_tokens"]["max"] == max(prompt_lengths)
    assert g["prompt_tokens"]["counts"] == [prompt_lengths.count(n) for n in range(max(prompt_lengths) + 1)]
    assert figures["num_sequences"] == len(rows)
    assert figures["num_tokens"] == sum(len(r["input_ids"]) for r in rows)


def test_length_histogram_of_long_completions_has_whole_token_bins_that_count_each_length():
    rng = np.random.default_rng(1)
    lengths = rng.integers(0, 300, 500)
    edges, counts = length_histogram(np.bincount(lengths))
    width = edges[1] - edges[0]
    assert len(counts) <= NUM_LENGTH_BINS and width == math.ceil((lengths.max() + 1) / NUM_LENGTH_BINS)
    assert edges == list(range(0, len(counts) * width + 1, width)) and edges[-1] > lengths.max()
    assert counts == count_bins(lengths.tolist(), edges)


def test_finish_reasons_are_counted_with_their_shares(figures):
    rows = designed_rows()
    reasons = Counter(r["finish_reason"] for r in rows)
    assert figures["generations"]["finish_reasons"]["counts"] == dict(sorted(reasons.items()))
    assert reasons["length"] == 2 and reasons["stop"] == 15
    assert figures["generations"]["finish_reasons"]["shares"] == {k: v / len(rows) for k, v in sorted(reasons.items())}


def test_accuracy_pass_at_n_and_majority_accuracy_equal_the_designed_answers(figures):
    rows, g = designed_rows(), figures["generations"]
    referenced = [r for r in rows if r["reference_answer"] is not None]
    correct = [r for r in referenced if r["answer"] == r["reference_answer"]]
    without_answer = [r for r in referenced if r["answer"] is None]
    prompts = [group for group in by_prompt(rows).values() if group[0]["reference_answer"] is not None]
    passed = [group for group in prompts if any(r["answer"] == r["reference_answer"] for r in group)]
    majority_right = [group for group in prompts if group[0]["majority_answer"] == group[0]["reference_answer"]]
    answers = g["answers"]
    assert (answers["num_with_reference"], answers["num_correct"], answers["num_without_answer"]) == \
        (len(referenced), len(correct), len(without_answer)) == (14, 5, 4)
    assert answers["accuracy"] == 5 / 14
    assert answers["num_with_answer"] == sum(r["answer"] is not None for r in rows) == 13
    assert answers["fraction_with_answer"] == 13 / 17
    assert g["pass_at_n"] == {"num_prompts_with_reference": len(prompts), "num_passed": len(passed),
                              "value": len(passed) / len(prompts)} == {"num_prompts_with_reference": 5,
                                                                       "num_passed": 3, "value": 0.6}
    assert g["majority"] == {"num_correct": len(majority_right), "accuracy": len(majority_right) / len(prompts)} == \
        {"num_correct": 2, "accuracy": 0.4}


def test_vote_shares_count_prompts_by_the_completions_that_give_the_majority_answer(figures):
    groups = list(by_prompt(designed_rows()).values())
    votes = [sum(bool(r["agrees_with_majority"]) for r in group) for group in groups]
    shares = [group[0]["vote_share"] for group in groups if group[0]["vote_share"] is not None]
    v = figures["generations"]["vote_share"]
    assert v["votes_counts"] == [votes.count(n) for n in range(max(votes) + 1)] == [1, 2, 2, 1]
    assert v["num_prompts_with_answer"] == len(shares) == 5
    assert v["mean"] == pytest.approx(sum(shares) / len(shares), rel=1e-6)  # shares are stored as float32


def test_mean_total_logprob_is_per_completion_and_per_generated_token(figures):
    rows = designed_rows()
    total = sum(r["total_logprob"] for r in rows)
    assert figures["generations"]["mean_total_logprob"] == pytest.approx(total / len(rows), rel=1e-12)
    assert figures["generations"]["mean_token_logprob"] == \
        pytest.approx(total / sum(len(r["token_logprobs"]) for r in rows), rel=1e-12)


def test_info_and_stats_count_completions_the_same_way(gens, figures):
    summary, g = generation_summary(open_store(gens, tables=(TABLE_GENERATIONS,))), figures["generations"]
    assert (summary["num_prompts"], summary["num_completions"]) == (g["num_prompts"], g["num_completions"])
    assert summary["generated_tokens"] == g["completion_tokens"]["total"]
    assert summary["finish_reasons"] == g["finish_reasons"]["counts"]
    for key, value in (("accuracy", g["answers"]["accuracy"]), ("pass_at_n", g["pass_at_n"]["value"]),
                       ("majority_accuracy", g["majority"]["accuracy"]), ("mean_vote_share", g["vote_share"]["mean"]),
                       ("with_answer", g["answers"]["fraction_with_answer"])):
        assert summary[key] == round(value, 4), key


# -- the per-position figures over completion positions -------------------------------------------------------------
def test_perplexity_is_over_the_completion_positions_from_their_target_codes(figures):
    targets = [target for *_, target, _ in positions(designed_rows())]
    assert figures["num_positions"] == len(targets)
    assert figures["perplexity"] == pytest.approx(math.exp(-np.mean(targets)), rel=1e-6)
    assert figures["mean_target_logprob"] == pytest.approx(np.mean(targets), rel=1e-6)


def test_rank_of_the_sampled_token_counts_input_ids_at_p_plus_c(figures):
    counts, outside = [0] * CODEC.k, 0
    for _, _, ids, logprobs, _, _, token in positions(designed_rows()):
        if token not in ids:
            outside += 1
            continue
        ordered = sorted(logprobs, reverse=True)  # ties share the best place
        counts[ordered.index(logprobs[list(ids).index(token)])] += 1
    assert figures["target_rank"]["counts"] == counts and figures["target_rank"]["outside"] == outside
    assert sum(counts) > 2 * CODEC.k and outside > 0


def test_mass_tail_and_entropy_histograms_by_completion_position(figures):
    mass, tail, lower, upper, by_position = [], [], [], [], [[] for _ in range(MAX_NEW_TOKENS)]
    for _, c, _, logprobs, tail_logmass, _, _ in positions(designed_rows()):
        m = math.exp(tail_logmass)
        mass.append(sum(math.exp(v) for v in logprobs))
        tail.append(math.log10(m))
        head = -sum(math.exp(v) * v for v in logprobs)
        lower.append(head - m * math.log(m))
        upper.append(head + m * (math.log(CODEC.vocab_size - CODEC.k) - math.log(m)))
        by_position[c].append(mass[-1])
    assert figures["topk_mass"]["counts"] == count_bins(mass, figures["topk_mass"]["edges"])
    assert figures["topk_mass"]["mean"] == pytest.approx(np.mean(mass), rel=1e-9)
    assert figures["topk_mass"]["mean_by_position"] == pytest.approx([np.mean(m) for m in by_position], rel=1e-9)
    assert figures["tail_mass"]["counts"] == count_bins(tail, figures["tail_mass"]["log10_edges"])
    assert figures["entropy"]["mean_lower"] == pytest.approx(np.mean(lower), rel=1e-9)
    assert figures["entropy"]["mean_upper"] == pytest.approx(np.mean(upper), rel=1e-9)
    assert figures["entropy"]["lower_counts"] == count_bins(lower, figures["entropy"]["edges"])
    assert figures["entropy"]["upper_counts"] == count_bins(upper, figures["entropy"]["edges"])


def test_greedy_completions_of_a_real_teacher_have_their_every_token_at_rank_1(tmp_path, tiny_teacher):
    """`kdstore generate --temperature 0` draws the teacher's first choice at every step, so measured at the right
    offset (position c against input_ids[P + c]) every completion token is at rank 1 of the stored top-K."""
    from kdstore.generate import GenerateConfig, generate

    lines = [json.dumps({"id": f"q{i}", "prompt": " ".join(f"w{(7 * i + j) % 300}" for j in range(2 + i)),
                         "answer": str(i)}) for i in range(4)]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    generate(GenerateConfig(prompts=str(tmp_path / "p.jsonl"), teacher=str(tiny_teacher), out=str(tmp_path / "g"),
                            n=2, k=8, max_new_tokens=9, temperature=0.0, device="cpu", progress=False))
    figures = store_stats(tmp_path / "g")
    rows = pq.read_table(next((tmp_path / "g" / "shards").glob("*.parquet"))).to_pylist()
    generated = sum(len(r["token_logprobs"]) for r in rows)
    assert figures["num_positions"] == generated == figures["generations"]["completion_tokens"]["total"] > 8
    assert figures["target_rank"]["counts"][0] == generated and figures["target_rank"]["outside"] == 0
    assert figures["generations"]["num_prompts"] == 4 and figures["generations"]["num_completions"] == 8
    # the stored codes are within the codebook's bound of the drawn tokens' own log-probs
    exact = sum(sum(r["token_logprobs"]) for r in rows) / generated
    codebook = open_store(tmp_path / "g", tables=(TABLE_GENERATIONS,)).codec.codebook
    assert abs(figures["mean_target_logprob"] - exact) <= codebook.log_step / 2


def test_bytes_are_counted_per_generated_token(gens, figures):
    manifest = json.loads((gens / "manifest.json").read_text())
    on_disk = sum((gens / s["path"]).stat().st_size for s in manifest["shards"])
    generated = figures["generations"]["completion_tokens"]["total"]
    assert list(figures["bytes"]["columns"]) == manifest["columns"]
    assert figures["bytes"]["file_bytes"] == on_disk and figures["bytes"]["per_token"] == on_disk / generated
    assert all(c["per_token"] == c["compressed"] / generated for c in figures["bytes"]["columns"].values())


def test_an_empty_generations_store_is_refused_in_one_line(tmp_path):
    with pytest.raises(EmptyStoreError, match="holds no completions") as caught:
        store_stats(write_generations(tmp_path / "empty", []))
    assert "\n" not in caught.value.one_line()


def test_memory_stays_flat_when_the_store_grows_eightfold(tmp_path):
    """Peak traced memory of a generations store 8x the size stays within 1.5x: the tally keeps sums, histograms
    and the one prompt being read, not the completions. Shards of a few row groups each: a shard's footer (read
    whole when the shard opens) grows with its row groups times the 24 columns, which is not what this measures."""
    sizes = {"row_group_bytes": 3000, "shard_bytes": 12_000}
    small = write_generations(tmp_path / "small", designed_rows(copies=4), **sizes)
    large = write_generations(tmp_path / "large", designed_rows(copies=32), **sizes)
    peaks = stats_peak_memory(small, large)
    row_groups = [pq.ParquetFile(path).num_row_groups for path in (large / "shards").glob("*.parquet")]
    assert sum(row_groups) >= 8 * max(row_groups)
    assert peaks[1] < 1.5 * peaks[0], peaks


# -- pictures and the command ----------------------------------------------------------------------------------------
def test_plots_are_valid_pngs_of_the_stated_size_with_the_generation_plots(gens, tmp_path):
    plots, report = tmp_path / "plots", tmp_path / "report.html"
    _, written = measure_store(gens, plot_dir=plots, html_path=report)
    pngs = sorted(plots.glob("*.png"))
    assert {p.stem for p in pngs} == {"target_rank", "topk_mass", "tail_mass", "mass_by_position", "entropy",
                                      "bytes_per_column", "shard_tokens", "completion_lengths", "finish_reasons",
                                      "vote_shares", "accuracy"}
    assert set(written) == {*pngs, report}
    for png in pngs:
        assert png_size(png.read_bytes()) == FIGURE_PIXELS, png.name
    assert "pass@n" in report.read_text() and "majority accuracy" in report.read_text()


def test_stats_command_prints_the_completion_table_and_the_same_json(gens, figures):
    table = CliRunner().invoke(cli, ["stats", str(gens)])
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    num_shards = len(json.loads((gens / "manifest.json").read_text())["shards"])
    assert lines[0] == f"store                 {gens}: generations, K 6 of 16 ids, {num_shards} shard(s)"
    assert "pass@n                60.0% (3 of 5 prompts with a reference have a correct completion)" in lines
    assert f"teacher perplexity    {figures['perplexity']:.4f}" in table.output
    assert "finish reasons        length 2 (11.8%), stop 15 (88.2%)" in lines
    as_json = CliRunner().invoke(cli, ["stats", str(gens), "--json"])
    assert as_json.exit_code == 0 and json.loads(as_json.output) == json.loads(json.dumps(figures))

