"""Reading a store back, and every kind of damage verify() and the reader must name."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import synthetic_rows
from kdstore.codec import decode_positions
from kdstore.errors import (
    ChecksumError,
    FormatVersionError,
    KdstoreError,
    ManifestError,
    ShardMissingError,
    StoreNotFoundError,
)
from kdstore.format import shard_info
from kdstore.store import open_store
from kdstore.verify import verify_store


def _edit_manifest(path: Path, edit) -> None:
    data = json.loads((path / "manifest.json").read_text())
    edit(data)
    (path / "manifest.json").write_text(json.dumps(data))


def _rewrite_shard(path: Path, index: int, mutate, keep_schema: bool = True) -> None:
    """Rewrite shard ``index`` through ``mutate(table) -> table`` and make the manifest agree (size, checksums)."""
    data = json.loads((path / "manifest.json").read_text())
    shard = path / data["shards"][index]["path"]
    table = pq.read_table(shard)
    schema = table.schema
    table = mutate(table)
    table = table.cast(schema) if keep_schema else table.replace_schema_metadata(schema.metadata)
    pq.write_table(table, shard)
    relative = data["shards"][index]["path"]
    data["shards"][index].update(asdict(shard_info(shard, relative, table.num_rows, data["shards"][index]["num_tokens"])))
    (path / "manifest.json").write_text(json.dumps(data))


def test_sequences_decode_to_what_the_codec_encoded(store_path, codec):
    store = open_store(store_path)
    rows = synthetic_rows(codec, 12, 17)
    for got, row in zip(store.iter_sequences(), rows):
        want = decode_positions(codec, row)
        assert got["sequence_id"] == row["sequence_id"]
        for name in ("topk_ids", "topk_logprobs", "tail_logmass", "target_logprob"):
            assert np.array_equal(got[name], want[name]), name


def test_projection_reads_only_the_asked_columns_and_torch_format_gives_tensors(store_path):
    import torch

    store = open_store(store_path)
    batch = next(store.iter_batches(columns=["topk_ids"], format="torch"))
    assert set(batch) == {"topk_ids", "position_offsets"}
    assert batch["topk_ids"].dtype == torch.int32 and batch["topk_ids"].shape[1] == 8
    with pytest.raises(KdstoreError, match="unknown column 'nope'"):
        next(store.iter_batches(columns=["nope"]))
    with pytest.raises(KdstoreError, match="no 'sampled' column"):
        next(store.iter_batches(columns=["sampled"]))


def test_clean_store_verifies(store_path):
    assert verify_store(open_store(store_path)) == []


def test_missing_folder_and_folder_without_manifest_are_named(tmp_path):
    with pytest.raises(StoreNotFoundError, match="does not exist"):
        open_store(tmp_path / "nope")
    with pytest.raises(StoreNotFoundError, match="no manifest.json"):
        open_store(tmp_path)


def test_interrupted_build_is_not_mistaken_for_a_store(store_path):
    (store_path / "manifest.json").unlink()
    with pytest.raises(StoreNotFoundError, match="unfinished store"):
        open_store(store_path)


def test_newer_format_version_is_refused(store_path):
    _edit_manifest(store_path, lambda d: d.update(format_version=99))
    with pytest.raises(FormatVersionError, match="99"):
        open_store(store_path)


def test_manifest_path_outside_the_store_is_refused(store_path):
    _edit_manifest(store_path, lambda d: d["shards"][0].update(path="../evil.parquet"))
    with pytest.raises(ManifestError, match="outside the store|does not match"):
        open_store(store_path)


def test_verify_reports_every_problem_not_just_the_first(store_path):
    shards = json.loads((store_path / "manifest.json").read_text())["shards"]
    assert len(shards) >= 3
    (store_path / shards[0]["path"]).rename(store_path / "renamed.parquet")
    with open(store_path / shards[1]["path"], "r+b") as handle:
        handle.seek(100)
        handle.write(b"\xff\xff\xff\xff")
    size = (store_path / shards[2]["path"]).stat().st_size
    with open(store_path / shards[2]["path"], "r+b") as handle:
        handle.truncate(size // 2)
    problems = verify_store(open_store(store_path))
    assert len(problems) == 3, problems
    assert "missing" in problems[0] and shards[0]["path"] in problems[0]
    assert "sha256" in problems[1]
    assert "truncated" in problems[2]


def test_reading_a_missing_or_damaged_shard_raises_a_named_error(store_path):
    shards = json.loads((store_path / "manifest.json").read_text())["shards"]
    (store_path / shards[0]["path"]).unlink()
    with pytest.raises(ShardMissingError, match=shards[0]["path"]):
        list(open_store(store_path).iter_batches())


def test_wrong_column_types_are_reported(store_path):
    def widen(table):
        column = table["topk_id_deltas"].cast(pa.list_(pa.int64()))
        return table.set_column(table.schema.get_field_index("topk_id_deltas"), "topk_id_deltas", column)

    _rewrite_shard(store_path, 0, widen, keep_schema=False)
    problems = verify_store(open_store(store_path))
    assert len(problems) == 1 and "schema" in problems[0] and "int64" in problems[0]


def test_ids_out_of_range_and_repeated_ids_are_reported(store_path, codec):
    def corrupt(table):
        deltas = table["topk_id_deltas"].combine_chunks()
        values = deltas.flatten().to_numpy().copy()
        values[0] += codec.vocab_size  # first position: first id beyond the vocabulary
        values[codec.k + 1] = 0  # second position: a repeated id
        fixed = pa.ListArray.from_arrays(deltas.offsets, pa.array(values, pa.uint32()), type=deltas.type)
        return table.set_column(table.schema.get_field_index("topk_id_deltas"), "topk_id_deltas", fixed)

    _rewrite_shard(store_path, 0, corrupt)
    problems = verify_store(open_store(store_path))
    assert any(">= vocab_size 300" in p and "seq-00000" in p for p in problems), problems
    assert any("not strictly ascending" in p for p in problems), problems


def test_probabilities_that_do_not_sum_to_one_are_reported(store_path):
    def drop_tail(table):
        tail = table["tail_logmass_codes"].combine_chunks()
        zeros = pa.array(np.zeros(len(tail.flatten()), np.uint16), pa.uint16())
        fixed = pa.ListArray.from_arrays(tail.offsets, zeros, type=tail.type)  # code 0 = probability 1
        return table.set_column(table.schema.get_field_index("tail_logmass_codes"), "tail_logmass_codes", fixed)

    _rewrite_shard(store_path, 1, drop_tail)
    problems = verify_store(open_store(store_path))
    assert problems and all("sum(p) + tail is not 1" in p for p in problems)


def test_lengths_inconsistent_with_tokens_are_reported(store_path):
    def shorten(table):
        ids = table["input_ids"].combine_chunks()
        shorter = pc.list_slice(ids, 0, 10)
        return table.set_column(table.schema.get_field_index("input_ids"), "input_ids", shorter)

    _rewrite_shard(store_path, 0, shorten)
    problems = verify_store(open_store(store_path))
    assert any("length does not fit their tokens" in p for p in problems), problems


def test_duplicate_sequence_ids_are_reported(store_path):
    def rename(table):
        names = pa.array(["seq-00000"] * table.num_rows)
        return table.set_column(0, "sequence_id", names)

    _rewrite_shard(store_path, 1, rename)
    problems = verify_store(open_store(store_path))
    assert any("more than once" in p for p in problems), problems


def test_size_mismatch_is_a_checksum_error_naming_the_shard(store_path):
    store = open_store(store_path)
    shard = store.manifest.shards[0]
    with open(store_path / shard.path, "ab") as handle:
        handle.write(b"x")
    with pytest.raises(ChecksumError, match=shard.path):
        store.check_shard_file(shard)
