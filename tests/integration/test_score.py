"""``kdstore score``: the reference pass over a store's own ids, its score files, and resuming after kill -9."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_word_corpus
from kdstore.build import BuildConfig, build
from kdstore.format import FORMAT_VERSION, LOGITS_FORMAT_VERSION
from kdstore.score import ScoreConfig, score_store
from kdstore.store import open_store
from kdstore.verify import verify_store


def built_store(folder: Path, teacher: Path, shard_bytes: int = 1 << 20) -> Path:
    corpus = write_word_corpus(folder / "corpus", num_files=4, docs_per_file=8)
    out = folder / "store"
    build(BuildConfig(corpus=(str(corpus),), teacher=str(teacher), out=str(out), k=4, seq_len=16, progress=False,
                      device="cpu", shard_bytes=shard_bytes, row_group_bytes=min(shard_bytes, 1 << 20)))
    return out


@pytest.fixture(scope="module")
def scored_pair(tmp_path_factory, tiny_teacher) -> tuple[Path, Path]:
    """A multi-shard store built by the tiny teacher, and a copy scored by that same teacher."""
    root = tmp_path_factory.mktemp("score")
    store = built_store(root, tiny_teacher, shard_bytes=1500)
    scored = Path(shutil.copytree(store, root / "scored"))
    score_store(ScoreConfig(store=str(scored), reference=str(tiny_teacher), per_token=True, device="cpu", progress=False))
    return store, scored


def test_the_teacher_as_its_own_reference_scores_what_the_store_holds(scored_pair, tiny_teacher):
    store, scored = scored_pair
    opened = open_store(scored)
    table = opened.score_table(["teacher_score", "reference_score", "num_positions", "reference_logprobs"])
    assert table.num_rows == opened.manifest.num_sequences and len(opened.manifest.shards) > 2
    # the teacher's stored mean (build, unquantised) and the reference pass's agree: same model, same ids
    np.testing.assert_allclose(table["reference_score"].to_numpy(), table["teacher_score"].to_numpy(), atol=1e-4)
    targets = [b["target_logprob"] for b in opened.iter_batches(["target_logprob"])]
    per_token = np.concatenate(table["reference_logprobs"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(per_token, np.concatenate(targets), atol=0.05)  # stored targets are quantised
    assert table["sequence_id"].to_pylist() == [s for b in opened.iter_batches(["sequence_id"]) for s in b["sequence_id"]]


def test_scoring_adds_files_and_leaves_the_shards_as_they_were(scored_pair):
    store, scored = scored_pair
    before, after = json.loads((store / "manifest.json").read_text()), json.loads((scored / "manifest.json").read_text())
    assert (before["format_version"], after["format_version"]) == (LOGITS_FORMAT_VERSION, FORMAT_VERSION)
    assert before["shards"] == after["shards"]
    for shard in before["shards"]:
        assert (store / shard["path"]).read_bytes() == (scored / shard["path"]).read_bytes()
    assert [f["shard"] for f in after["scores"]["files"]] == [s["path"] for s in before["shards"]]
    assert verify_store(open_store(scored)) == []


def test_a_damaged_score_file_is_named_by_verify(scored_pair, tmp_path):
    copy = Path(shutil.copytree(scored_pair[1], tmp_path / "copy"))
    path = copy / json.loads((copy / "manifest.json").read_text())["scores"]["files"][1]["path"]
    data = bytearray(path.read_bytes())
    data[10] ^= 1
    path.write_bytes(bytes(data))
    problems = verify_store(open_store(copy))
    assert len(problems) == 1 and path.name in problems[0] and "sha256" in problems[0]


def _score_command(store: Path, reference: Path) -> list[str]:
    return [sys.executable, "-m", "kdstore.cli.main", "score", str(store), "--reference", str(reference), "--device",
            "cpu", "--per-token"]


def test_kill_9_mid_pass_then_rerun_gives_the_uninterrupted_files(scored_pair, tmp_path, tiny_teacher):
    store, want = scored_pair
    names = [f["path"] for f in json.loads((want / "manifest.json").read_text())["scores"]["files"]]
    for attempt in range(4):  # a busy machine may finish the pass between two polls: start again on a fresh copy
        crashed = Path(shutil.copytree(store, tmp_path / f"crashed-{attempt}"))
        process = subprocess.Popen(_score_command(crashed, tiny_teacher), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        while process.poll() is None and not list((crashed / "scores").glob("*.parquet")):
            time.sleep(0.002)
        process.send_signal(signal.SIGKILL)
        process.wait()
        done = len(list((crashed / "scores").glob("*.parquet")))
        if "scores" not in json.loads((crashed / "manifest.json").read_text()) and done < len(names):
            break
    else:
        pytest.fail("every kill came after the pass had finished")
    assert open_store(crashed).manifest.scores is None  # nothing looks scored before every file is there
    (crashed / "scores" / f"{Path(names[-1]).name}.999-deadbeef.tmp").write_bytes(b"half")  # a killed write
    assert subprocess.run(_score_command(crashed, tiny_teacher), capture_output=True).returncode == 0
    assert sorted(p.name for p in (crashed / "scores").iterdir()) == sorted(Path(n).name for n in names)
    for name in names:
        assert (crashed / name).read_bytes() == (want / name).read_bytes(), name
    assert (crashed / "manifest.json").read_text() == (want / "manifest.json").read_text()


@pytest.mark.parametrize("per_token", [False, True])
def test_score_file_schema_in_code_matches_schemas_folder(per_token):
    from kdstore.format import arrow_schema_to_spec, load_schema_file, score_columns_schema

    spec = {f["name"]: f for f in load_schema_file("scores.arrow.json")["fields"]}
    fields = arrow_schema_to_spec(score_columns_schema(per_token))
    assert [f["name"] for f in fields] == [n for n, f in spec.items() if f["present"] == "always" or per_token]
    for field in fields:
        assert (field["type"], field["nullable"]) == (spec[field["name"]]["type"], spec[field["name"]]["nullable"])


def test_build_with_a_reference_writes_the_score_files_kdstore_score_writes(scored_pair, tmp_path, tiny_teacher):
    store, _ = scored_pair
    plain = Path(shutil.copytree(store, tmp_path / "plain"))
    score_store(ScoreConfig(store=str(plain), reference=str(tiny_teacher), device="cpu", progress=False))
    corpus = store.parent / "corpus"
    both = tmp_path / "both"
    result = build(BuildConfig(corpus=(str(corpus),), teacher=str(tiny_teacher), out=str(both), k=4, seq_len=16,
                               progress=False, device="cpu", shard_bytes=1500, row_group_bytes=1500,
                               reference=str(tiny_teacher)))
    assert result.finished and any("score files" in line for line in result.summary_lines())
    want, got = (json.loads((p / "manifest.json").read_text()) for p in (plain, both))
    assert got["shards"] == want["shards"] and got["format_version"] == want["format_version"] == FORMAT_VERSION
    drop = ("sha256", "num_bytes")  # the reference ran in other batches (a unit's, not a shard's): equal to ~1e-6
    assert [{k: v for k, v in f.items() if k not in drop} for f in got["scores"]["files"]] == \
        [{k: v for k, v in f.items() if k not in drop} for f in want["scores"]["files"]]
    a, b = open_store(both).score_table(), open_store(plain).score_table()
    assert a["sequence_id"].equals(b["sequence_id"]) and a["teacher_score"].equals(b["teacher_score"])
    np.testing.assert_allclose(a["reference_score"].to_numpy(), b["reference_score"].to_numpy(), atol=1e-5)


def test_per_token_reference_log_probs_feed_select_tokens_by_gap(scored_pair):
    import torch

    from kdstore.collate import Collator
    from kdstore.losses import select_tokens_by_gap
    from kdstore.score_table import padded_reference_logprobs

    store = open_store(scored_pair[1])
    per_token = store.score_table(["reference_logprobs"])["reference_logprobs"].to_numpy(zero_copy_only=False)
    samples = _samples(store, [5, 0, 7, 2])
    batch = Collator(store.codec)(samples)
    reference = padded_reference_logprobs(per_token, batch["sequence_index"].numpy(), batch["labels"].shape[1])
    mask = batch["labels"] != -100
    assert np.array_equal(reference != 0, mask.numpy())  # a log-prob exactly where a label is
    for row, index in enumerate([5, 0, 7, 2]):
        assert np.array_equal(reference[row, :len(per_token[index])], per_token[index])
    weights = select_tokens_by_gap(torch.zeros(mask.shape), torch.from_numpy(reference), mask, 0.5)
    kept = torch.from_numpy(reference)[weights.bool()]
    assert weights.sum() == int(np.ceil(0.5 * int(mask.sum()))) and kept.min() >= torch.from_numpy(reference)[
        mask & ~weights.bool()].max()  # the student at log-prob 0 lags most where the reference is highest


def _samples(store, indices: list[int]) -> list[dict]:
    from kdstore.store import StoredRows

    rows = []
    for table in store.iter_tables():
        stored = StoredRows(store.codec, table, len(rows))
        rows += [stored.sample(i) for i in range(stored.num_rows)]
    return [rows[i] for i in indices]


def test_copy_takes_the_score_files_along(scored_pair, tmp_path):
    from kdstore.transfer import copy_store

    copy_store(scored_pair[1], tmp_path / "copy")
    copied = open_store(tmp_path / "copy")
    assert verify_store(copied) == [] and copied.score_table().equals(open_store(scored_pair[1]).score_table())


def test_two_partitions_score_like_one_pass(scored_pair, tmp_path, tiny_teacher):
    store, want = scored_pair
    parts = Path(shutil.copytree(store, tmp_path / "parts"))
    for partition in (1, 0):
        result = score_store(ScoreConfig(store=str(parts), reference=str(tiny_teacher), per_token=True, device="cpu",
                                         progress=False, num_partitions=2, partition=partition))
        assert result.finished == (partition == 0) and result.num_files > 0
    assert (parts / "manifest.json").read_text() == (want / "manifest.json").read_text()


def _rebuild(store: Path, teacher: Path, shard_bytes: int = 1500, **extra) -> object:
    """``kdstore build`` again over ``store`` with the settings ``scored_pair`` built it with."""
    corpus = store.parent / "corpus"
    return build(BuildConfig(corpus=(str(corpus),), teacher=str(teacher), out=str(store), k=4, seq_len=16,
                             progress=False, device="cpu", shard_bytes=shard_bytes, row_group_bytes=1500, **extra))


def test_rerunning_build_or_finalize_on_a_scored_store_keeps_its_score_files(scored_pair, tiny_teacher):
    from kdstore.build import finalize_store

    scored = scored_pair[1]
    copy = Path(shutil.copytree(scored, scored.parent / "rerun"))  # beside corpus/: the recorded build agrees
    try:
        want = json.loads((scored / "manifest.json").read_text())
        (copy / want["shards"][-1]["path"]).unlink()  # a resume rewrites the last shard, byte for byte
        result = _rebuild(copy, tiny_teacher)
        assert result.finished and result.num_sequences > 0 and result.notes == []
        got = json.loads((copy / "manifest.json").read_text())
        assert (got["scores"], got["format_version"]) == (want["scores"], FORMAT_VERSION)
        assert "store" in finalize_store(str(copy))
        assert json.loads((copy / "manifest.json").read_text())["scores"] == want["scores"]
        assert verify_store(open_store(copy)) == []
    finally:
        shutil.rmtree(copy)


def test_a_rebuild_that_changes_the_shards_drops_the_score_files_with_a_note(scored_pair, tiny_teacher):
    scored = scored_pair[1]
    copy = Path(shutil.copytree(scored, scored.parent / "changed"))
    try:
        for shard in json.loads((copy / "manifest.json").read_text())["shards"][1:]:
            (copy / shard["path"]).unlink()
        result = _rebuild(copy, tiny_teacher, shard_bytes=3000)  # other cuts after the first shard
        assert result.finished and len(result.notes) == 1 and "score files" in result.notes[0]
        assert result.notes[0] in result.summary_lines()
        manifest = json.loads((copy / "manifest.json").read_text())
        assert "scores" not in manifest and manifest["format_version"] == LOGITS_FORMAT_VERSION
        assert verify_store(open_store(copy)) == []
    finally:
        shutil.rmtree(copy)


def _counting_reference(monkeypatch) -> list[int]:
    """Count the sequences the reference runs over (kdstore.score.reference_logprobs, the one forward, as the
    build's reference pass and the score files' writer call it)."""
    import kdstore.reference_pass
    import kdstore.score

    counts: list[int] = []
    real = kdstore.score.reference_logprobs

    def counting(model, sequences, batch_tokens):
        counts.append(len(sequences))
        return real(model, sequences, batch_tokens)

    for module in (kdstore.score, kdstore.reference_pass):
        monkeypatch.setattr(module, "reference_logprobs", counting)
    return counts


def _partition_config(corpus: Path, teacher: Path, out: Path, partition: int) -> BuildConfig:
    return BuildConfig(corpus=(str(corpus),), teacher=str(teacher), out=str(out), k=4, seq_len=16, progress=False,
                       device="cpu", shard_bytes=1500, row_group_bytes=1500, reference=str(teacher),
                       num_partitions=2, partition=partition)


def test_each_build_partition_scores_its_own_shards_and_no_sequence_twice(scored_pair, tmp_path, tiny_teacher,
                                                                         monkeypatch):
    store, _ = scored_pair
    out = tmp_path / "two"
    counts = _counting_reference(monkeypatch)
    first = build(_partition_config(store.parent / "corpus", tiny_teacher, out, 0))
    assert not first.finished and sorted(p.name for p in (out / "scores").iterdir()) == \
        sorted(p.name for p in (out / "shards").glob("part-00000-*.parquet"))  # partition 0's own, right away
    assert build(_partition_config(store.parent / "corpus", tiny_teacher, out, 1)).finished
    manifest = open_store(out).manifest
    assert sum(counts) == manifest.num_sequences  # each sequence's reference forward ran once
    assert [f["shard"] for f in manifest.scores["files"]] == [s.path for s in manifest.shards]
    assert verify_store(open_store(out)) == []
    plain = Path(shutil.copytree(out, tmp_path / "plain", ignore=shutil.ignore_patterns("scores")))
    manifest_json = json.loads((plain / "manifest.json").read_text())
    del manifest_json["scores"]
    manifest_json["format_version"] = LOGITS_FORMAT_VERSION
    (plain / "manifest.json").write_text(json.dumps(manifest_json))
    score_store(ScoreConfig(store=str(plain), reference=str(tiny_teacher), device="cpu", progress=False))
    a, b = open_store(out).score_table(), open_store(plain).score_table()
    assert a["sequence_id"].equals(b["sequence_id"]) and a["teacher_score"].equals(b["teacher_score"])
    np.testing.assert_allclose(a["reference_score"].to_numpy(), b["reference_score"].to_numpy(), atol=1e-5)


@pytest.mark.parametrize("kill_at", ["shards", "scores"])  # mid-teacher pass, or while it writes its score files
def test_kill_9_of_a_build_partition_with_a_reference_then_rerun_gives_the_uninterrupted_files(
        scored_pair, tmp_path, tiny_teacher, kill_at):
    corpus = scored_pair[0].parent / "corpus"
    want = tmp_path / "want"
    for partition in (0, 1):
        build(_partition_config(corpus, tiny_teacher, want, partition))
    config = tmp_path / "build.toml"
    config.write_text("shard_bytes = 1500\nrow_group_bytes = 1500\nk = 4\nseq_len = 16\nnum_partitions = 2\n")

    def command(out: Path, partition: int) -> list[str]:
        return [sys.executable, "-m", "kdstore.cli.main", "build", str(corpus), "--teacher", str(tiny_teacher),
                "--out", str(out), "--config", str(config), "--reference", str(tiny_teacher), "--device", "cpu",
                "--partition", str(partition)]

    for attempt in range(4):  # a busy machine may finish the partition between two polls: try a fresh folder
        crashed = tmp_path / f"crashed-{attempt}"
        process = subprocess.Popen(command(crashed, 0), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while process.poll() is None and not list((crashed / kill_at).glob("part-00000-*.parquet")):
            time.sleep(0.002)
        process.send_signal(signal.SIGKILL)
        process.wait()
        if process.returncode == -signal.SIGKILL and not (crashed / "_partitions" / "part-00000.json").exists() \
                or kill_at == "scores" and len(list((crashed / "scores").glob("*.parquet"))) < \
                len(list((crashed / "shards").glob("part-00000-*.parquet"))):
            break
    else:
        pytest.fail("every kill came after the partition had finished")
    for partition in (0, 1):
        assert subprocess.run(command(crashed, partition), capture_output=True).returncode == 0
    names = [f["path"] for f in json.loads((want / "manifest.json").read_text())["scores"]["files"]]
    assert sorted(p.name for p in (crashed / "scores").iterdir()) == sorted(Path(n).name for n in names)
    for name in names:
        assert (crashed / name).read_bytes() == (want / name).read_bytes(), name
    got = json.loads((crashed / "manifest.json").read_text())
    assert got["scores"] == json.loads((want / "manifest.json").read_text())["scores"]


@pytest.fixture(scope="module")
def other_scored(scored_pair, tiny_teacher) -> Path:
    """A store of other documents (other file names: other sequence ids) built and scored like ``scored_pair``."""
    root = scored_pair[0].parent / "other"
    corpus = write_word_corpus(root / "corpus", num_files=2, docs_per_file=8, seed=7)
    for path in corpus.iterdir():
        path.rename(path.with_name("other-" + path.name))
    out = root / "store"
    build(BuildConfig(corpus=(str(corpus),), teacher=str(tiny_teacher), out=str(out), k=4, seq_len=16,
                      progress=False, device="cpu", shard_bytes=1500, row_group_bytes=1500))
    score_store(ScoreConfig(store=str(out), reference=str(tiny_teacher), per_token=True, device="cpu", progress=False))
    return out


def test_merge_of_stores_scored_by_one_reference_keeps_their_scores(scored_pair, other_scored, tmp_path):
    from kdstore.transfer import merge_stores

    scored = scored_pair[1]
    result = merge_stores([scored, other_scored, scored], tmp_path / "merged")  # the repeat adds nothing
    merged = open_store(tmp_path / "merged")
    assert result.notes == [] and verify_store(merged) == [] and merged.manifest.format_version == FORMAT_VERSION
    assert [f["shard"] for f in merged.manifest.scores["files"]] == [s.path for s in merged.manifest.shards]
    columns = ["teacher_score", "reference_score", "num_positions", "reference_logprobs"]
    want = [open_store(p).score_table(columns) for p in (scored, other_scored)]
    assert merged.score_table(columns).equals(pa.concat_tables(want))
    assert merged.manifest.scores["reference"] == open_store(scored).manifest.scores["reference"]


def test_merge_of_a_scored_and_an_unscored_store_drops_the_scores_saying_why(scored_pair, other_scored, tmp_path):
    from kdstore.transfer import merge_stores

    store, scored = scored_pair
    result = merge_stores([other_scored, store], tmp_path / "merged")
    assert len(result.notes) == 1 and str(store) in result.notes[0] and "kdstore score" in result.notes[0]
    merged = open_store(tmp_path / "merged")
    assert merged.manifest.scores is None and merged.manifest.format_version == LOGITS_FORMAT_VERSION
    assert verify_store(merged) == [] and merged.manifest.num_sequences == sum(
        open_store(p).manifest.num_sequences for p in (store, other_scored))
    from click.testing import CliRunner

    from kdstore.cli.main import cli

    run = CliRunner().invoke(cli, ["merge", str(other_scored), str(store), "--out", str(tmp_path / "by-cli")])
    assert run.exit_code == 0 and run.output.splitlines()[-1] == result.notes[0].replace(
        str(tmp_path / "merged"), str(tmp_path / "by-cli"))


def test_merge_of_stores_scored_differently_drops_the_scores_saying_why(scored_pair, other_scored, tmp_path,
                                                                         tiny_teacher):
    from kdstore.transfer import merge_stores

    means_only = Path(shutil.copytree(scored_pair[0], tmp_path / "means-only"))  # scored without --per-token
    score_store(ScoreConfig(store=str(means_only), reference=str(tiny_teacher), device="cpu", progress=False))
    result = merge_stores([other_scored, means_only], tmp_path / "merged")
    assert len(result.notes) == 1 and "different references" in result.notes[0]
    merged = open_store(tmp_path / "merged")
    assert merged.manifest.scores is None and not (tmp_path / "merged" / "scores").exists()


def test_hf_export_of_a_scored_store_carries_its_reference_score(scored_pair, tmp_path):
    from kdstore.export import export_store

    scored = open_store(scored_pair[1])
    export_store(scored, tmp_path / "out", "hf")
    exported = pa.concat_tables(pq.read_table(p) for p in sorted((tmp_path / "out" / "data").glob("*.parquet")))
    want = scored.score_table(["teacher_score", "reference_score"])
    assert exported["sequence_id"].equals(want["sequence_id"])
    for name in ("teacher_score", "reference_score"):
        assert exported[name].combine_chunks().equals(want[name].combine_chunks()), name
    assert "reference_score" not in export_columns(scored_pair[0], tmp_path / "plain")  # unscored: none


def export_columns(store: Path, out: Path) -> list[str]:
    from kdstore.export import export_store

    export_store(store, out, "hf")
    return pq.read_schema(next((out / "data").glob("*.parquet"))).names
