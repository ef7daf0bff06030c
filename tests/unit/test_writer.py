"""ShardWriter: atomic shards, manifest last, nothing committed on error, resume, locks, partitions."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import make_manifest, synthetic_rows, write_store
from kdstore.codec import CodecConfig
from kdstore.errors import StoreLockedError, StoreMismatchError
from kdstore.format import logits_schema, rows_to_table
from kdstore.store import open_store
from kdstore.writer import ShardWriter

SMALL = {"shard_bytes": 4000, "row_group_bytes": 1500}


def _write(path: Path, codec: CodecConfig, rows, fail_after: int | None = None, **args):
    schema = logits_schema(codec)
    with ShardWriter(path, make_manifest(codec), schema, **{**SMALL, **args}) as writer:
        for i, row in enumerate(rows[writer.num_committed_rows:] if fail_after is None else rows):
            if fail_after is not None and i == fail_after:
                raise RuntimeError("boom")
            writer.write(rows_to_table(schema, [row]))
    return writer


def _content(path: Path) -> dict:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.pop("created_at")
    return manifest


def test_rows_come_back_from_several_shards_and_row_groups(tmp_path, codec):
    rows = synthetic_rows(codec, 10, 17)
    _write(tmp_path / "s", codec, rows)
    store = open_store(tmp_path / "s")
    assert len(store.manifest.shards) > 1
    assert pq.ParquetFile(tmp_path / "s" / store.manifest.shards[0].path).num_row_groups > 1
    got = list(store.iter_sequences())
    assert [g["sequence_id"] for g in got] == [r["sequence_id"] for r in rows]
    assert all((g["input_ids"] == r["input_ids"]).all() for g, r in zip(got, rows))
    assert store.manifest.num_tokens == 10 * 17
    assert store.verify() == []


def test_exception_inside_with_block_commits_no_manifest_and_leaves_no_temp_file(tmp_path, codec):
    rows = synthetic_rows(codec, 10, 17)
    with pytest.raises(RuntimeError, match="boom"):
        _write(tmp_path / "s", codec, rows, fail_after=7)
    assert not (tmp_path / "s" / "manifest.json").exists()
    assert not list((tmp_path / "s").rglob("*.tmp"))
    assert not list((tmp_path / "s" / "_partitions").iterdir())


def test_exception_while_extending_keeps_the_previous_manifest_unchanged(tmp_path, codec):
    rows = synthetic_rows(codec, 4, 17)
    _write(tmp_path / "s", codec, rows)
    before = (tmp_path / "s" / "manifest.json").read_text()
    with pytest.raises(RuntimeError):
        _write(tmp_path / "s", codec, rows + synthetic_rows(codec, 6, 17, seed=9, prefix="more"), fail_after=8)
    assert (tmp_path / "s" / "manifest.json").read_text() == before
    assert open_store(tmp_path / "s").verify() == []


def test_rerun_after_failure_resumes_and_equals_uninterrupted_run(tmp_path, codec):
    rows = synthetic_rows(codec, 12, 17)
    _write(tmp_path / "whole", codec, rows)
    with pytest.raises(RuntimeError):
        _write(tmp_path / "resumed", codec, rows, fail_after=9)
    committed = ShardWriter(tmp_path / "resumed", make_manifest(codec), logits_schema(codec), **SMALL)
    with committed:
        assert 0 < committed.num_committed_rows < 12
        assert committed.committed_sequence_ids() == [r["sequence_id"] for r in rows[: committed.num_committed_rows]]
        for row in rows[committed.num_committed_rows:]:
            committed.write(rows_to_table(logits_schema(codec), [row]))
    assert _content(tmp_path / "whole") == _content(tmp_path / "resumed")
    for shard in open_store(tmp_path / "whole").manifest.shards:
        assert (tmp_path / "whole" / shard.path).read_bytes() == (tmp_path / "resumed" / shard.path).read_bytes()


def test_second_writer_of_the_same_partition_is_refused_by_the_lock(tmp_path, codec):
    schema = logits_schema(codec)
    with ShardWriter(tmp_path / "s", make_manifest(codec), schema):
        with pytest.raises(StoreLockedError, match="another process"):
            with ShardWriter(tmp_path / "s", make_manifest(codec), schema):
                pass
        with ShardWriter(tmp_path / "s2", make_manifest(codec), schema):
            pass  # other stores are unaffected


@pytest.mark.parametrize("other", [CodecConfig(k=4, vocab_size=300), CodecConfig(k=8, vocab_size=301)])
def test_writing_into_a_store_of_another_codec_is_refused(tmp_path, codec, other):
    write_store(tmp_path / "s", codec)
    with pytest.raises(StoreMismatchError, match="different .*codec"):
        with ShardWriter(tmp_path / "s", make_manifest(other), logits_schema(other)):
            pass


def test_writing_with_another_build_config_is_refused_even_before_the_manifest(tmp_path, codec):
    with pytest.raises(RuntimeError):
        _write(tmp_path / "s", codec, synthetic_rows(codec, 10, 17), fail_after=9)
    manifest = make_manifest(codec, seq_len=999)
    with pytest.raises(StoreMismatchError, match="different build"):
        with ShardWriter(tmp_path / "s", manifest, logits_schema(codec), **SMALL):
            pass


def test_manifest_appears_only_when_every_partition_has_finished(tmp_path, codec):
    schema = logits_schema(codec)
    rows = synthetic_rows(codec, 9, 17)
    for partition in (2, 0, 1):
        assert not (tmp_path / "s" / "manifest.json").exists()
        with ShardWriter(tmp_path / "s", make_manifest(codec), schema, partition=partition, num_partitions=3, **SMALL) as w:
            for row in rows[partition::3]:
                w.write(rows_to_table(schema, [row]))
    store = open_store(tmp_path / "s")
    assert sorted(s["sequence_id"] for s in store.iter_sequences(["sequence_id"])) == [r["sequence_id"] for r in rows]
    assert store.manifest.num_partitions == 3
    assert store.verify() == []


def test_partitions_must_agree_on_their_number(tmp_path, codec):
    schema = logits_schema(codec)
    with ShardWriter(tmp_path / "s", make_manifest(codec), schema, partition=0, num_partitions=2):
        pass
    with pytest.raises(StoreMismatchError, match="num_partitions"):
        with ShardWriter(tmp_path / "s", make_manifest(codec), schema, partition=0, num_partitions=3):
            pass
