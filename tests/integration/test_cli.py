"""The kdstore command end to end: output, exit codes, one-line errors, documented commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import write_store
from kdstore.cli.main import cli
from kdstore.codec import CodecConfig


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _single_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("Error: ")
    return lines[-1]


def test_info_json_has_the_machine_readable_fields(store_path):
    result = run("info", store_path, "--json")
    assert result.exit_code == 0
    summary = json.loads(result.output)
    assert summary["num_sequences"] == 12 and summary["num_tokens"] == 12 * 17
    assert summary["k"] == 8 and summary["vocab_size"] == 300
    assert summary["total_bytes"] == sum(p.stat().st_size for p in (store_path / "shards").glob("*.parquet"))


def test_info_text_names_teacher_and_bytes_per_token(store_path):
    result = run("info", store_path)
    assert result.exit_code == 0
    assert "synthetic" in result.output and "bytes_per_token" in result.output


def test_info_names_the_sampled_draws(tmp_path):
    codec = CodecConfig(k=4, vocab_size=100, sampled_draws=16, sampled_scheme="systematic")
    result = run("info", write_store(tmp_path / "sampled", codec, num_sequences=2))
    assert result.exit_code == 0 and "sampled: draws 16, mode full, scheme systematic" in result.output
    as_json = json.loads(run("info", write_store(tmp_path / "plain", CodecConfig(k=4, vocab_size=100)), "--json").output)
    assert as_json["sampled"] is None


def test_verify_exits_zero_on_a_sound_store_and_one_listing_problems(store_path):
    sound = run("verify", store_path)
    assert sound.exit_code == 0 and sound.output.startswith("OK: ") and "12 sequences" in sound.output
    shards = sorted((store_path / "shards").glob("*.parquet"))
    shards[0].unlink()
    with open(shards[1], "r+b") as handle:
        handle.seek(50)
        handle.write(b"\x00\x01\x02")
    result = run("verify", store_path)
    assert result.exit_code == 1
    assert result.output.count("problem:") == 2
    assert _single_line_error(result) == f"Error: 2 problem(s) in {store_path}"


def test_verify_counts_one_shard_in_the_singular(tmp_path, codec):
    result = run("verify", write_store(tmp_path / "one", codec, num_sequences=1))
    assert result.exit_code == 0 and result.output.startswith("OK: 1 shard, 1 sequence, "), result.output


def test_head_shows_ids_without_a_tokenizer(store_path):
    result = run("head", store_path, "-n", "3", "--top", "2")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("sequence seq-00000")
    assert len(lines) == 4 and "->" in lines[1] and "tail" in lines[1]


def test_head_decodes_tokens_with_the_store_tokenizer(tmp_path, codec):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from conftest import write_store

    vocab = {f"w{i}": i for i in range(300)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(tmp_path / "tok")
    store = write_store(tmp_path / "s", codec, tokenizer_dir=tmp_path / "tok")
    result = run("head", store, "-n", "2")
    assert result.exit_code == 0, result.output
    assert "'w" in result.output


def scored_store(path: Path, codec: CodecConfig) -> tuple[Path, list[dict]]:
    """Six 17-token sequences (seq-*) and six 40-token ones (long-*), teacher_score -0.0, -1.0, ..., -11.0."""
    from conftest import make_manifest, synthetic_rows
    from kdstore.format import logits_schema, rows_to_table
    from kdstore.writer import ShardWriter

    schema = logits_schema(codec, ("teacher_score",))
    rows = synthetic_rows(codec, 6, 17) + synthetic_rows(codec, 6, 40, seed=1, prefix="long")
    rows = [{**row, "teacher_score": -float(i)} for i, row in enumerate(rows)]
    with ShardWriter(path, make_manifest(codec), schema, row_group_bytes=1000) as writer:
        for row in rows:
            writer.write(rows_to_table(schema, [row]))
    return path, rows


def test_head_id_shows_that_sequence(store_path):
    result = run("head", store_path, "--id", "seq-00007", "-n", "2")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "sequence seq-00007: 17 tokens" and len(result.output.splitlines()) == 3


@pytest.mark.parametrize(("where", "matches"), [
    ("teacher_score < -2.5 AND num_tokens > 20", lambda r: r["teacher_score"] < -2.5 and len(r["input_ids"]) > 20),
    ("teacher_score > -2.5", lambda r: r["teacher_score"] > -2.5),
    ("num_tokens = 40 AND NOT (teacher_score BETWEEN -10 AND -7)",
     lambda r: len(r["input_ids"]) == 40 and not -10 <= r["teacher_score"] <= -7),
    ("sequence_id IN ('long-00004', 'seq-00001') OR sequence_id LIKE 'long-0000_' AND teacher_score * 2 < -21",
     lambda r: r["sequence_id"] in ("long-00004", "seq-00001") or r["sequence_id"] == "long-00005"),
])
def test_head_where_shows_the_first_match_and_counts_them_all_as_computed_by_hand(tmp_path, codec, where, matches):
    store, rows = scored_store(tmp_path / "scored", codec)
    expected = [r for r in rows if matches(r)]
    result = run("head", store, "--where", where, "-n", "1")
    assert result.exit_code == 0, result.output
    header = result.output.splitlines()[0]
    first = expected[0]
    assert header.startswith(f"sequence {first['sequence_id']}: {len(first['input_ids'])} tokens, "
                             f"teacher_score {first['teacher_score']:.3f}; the first of {len(expected)} satisfying {where}")
    others = [r["sequence_id"] for r in expected[1:6]]
    assert (f"(the others: {', '.join(others)}" in header) if others else "the others" not in header


def test_head_where_never_hands_polars_a_subquery_or_a_function(tmp_path, codec, monkeypatch):
    """polars' SQL runs a subquery that reads a file while it parses: the words are checked before it sees them."""
    import polars

    store, _ = scored_store(tmp_path / "scored", codec)
    secret = tmp_path / "secret.csv"
    secret.write_text("column_1\nlong-00000\n")
    calls = []
    monkeypatch.setattr(polars, "sql_expr", lambda text: calls.append(text))
    for where in (f"sequence_id IN (SELECT column_1 FROM read_csv('{secret}'))", "avg(teacher_score) < 0",
                  "pl.col('teacher_score') < -3", "teacher_score < -3; DROP TABLE x", "__import__('os')"):
        line = _single_line_error(run("head", store, "--where", where))
        assert "--where takes an SQL condition" in line, line
    assert calls == []


@pytest.mark.parametrize("command", ["info", "verify", "head"])
def test_a_missing_store_is_one_clear_line(tmp_path, command):
    line = _single_line_error(run(command, tmp_path / "nowhere"))
    assert "does not exist" in line


def test_a_newer_format_is_one_clear_line(store_path):
    data = json.loads((store_path / "manifest.json").read_text())
    data["format_version"] = 7
    (store_path / "manifest.json").write_text(json.dumps(data))
    line = _single_line_error(run("info", store_path))
    assert "version 7" in line and "upgrade" in line


def test_a_manifest_pointing_outside_the_store_is_one_clear_line(store_path):
    data = json.loads((store_path / "manifest.json").read_text())
    data["shards"][0]["path"] = "../x.parquet"
    (store_path / "manifest.json").write_text(json.dumps(data))
    line = _single_line_error(run("verify", store_path))
    assert "outside the store" in line and "../x.parquet" in line


def test_every_command_is_documented_with_an_example():
    for name, command in cli.commands.items():
        assert command.help and "Example:" in command.help, name
        assert run(name, "--help").exit_code == 0


def test_docs_cli_md_is_the_generated_help():
    from kdstore.cli.docs import render_cli_docs

    assert (Path(__file__).parents[2] / "docs" / "cli.md").read_text() == render_cli_docs()
