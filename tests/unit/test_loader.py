"""Datasets: both yield the store reader's samples in one plan; the Arrow copy is made once; bad input is one named error."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from conftest import make_manifest, synthetic_rows, write_store
from kdstore.arrow_copy import convert_to_arrow
from kdstore.codec import CodecConfig, delta_decode
from kdstore.collate import Collator
from kdstore.errors import (
    ChecksumError,
    EmptyStoreError,
    ResumeError,
    ShardMissingError,
    TokenizerMismatchError,
)
from kdstore.format import logits_schema, rows_to_table
from kdstore.loader import (
    FAULT_AROUND_BYTES,
    MemoryMappedDataset,
    StreamingDataset,
    make_dataloader,
    set_epoch,
)
from kdstore.shuffle import PartitionError, PlanConfig, interleave_workers
from kdstore.store import open_store
from kdstore.writer import ShardWriter


@pytest.fixture
def store(tmp_path, codec):
    # 30 sequences over 3 shards of uneven row groups
    return write_store(tmp_path / "store", codec, num_sequences=30, shard_bytes=5000, row_group_bytes=1200)


def batches(loader):
    return [{k: v.clone() for k, v in batch.items()} for batch in loader]


def assert_same_batches(left, right):
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_memory_mapped_samples_are_the_store_readers_sequences(store):
    dataset = MemoryMappedDataset(store, release_bytes=1)  # release the mapped pages after every sample
    reference = list(open_store(store).iter_sequences())
    assert len(dataset) == len(reference) == 30
    for index in (0, 7, 29, 13):
        sample, row = dataset[index], reference[index]
        assert sample["sequence_id"] == row["sequence_id"]
        assert np.array_equal(sample["input_ids"], row["input_ids"])
        assert np.array_equal(delta_decode(sample["topk_id_deltas"]).view(np.int32), row["topk_ids"])
        table = open_store(store).codec.codebook.table
        assert np.array_equal(table[sample["topk_logprob_codes"]], row["topk_logprobs"])
    with pytest.raises(IndexError):
        dataset[30]


def test_the_bytes_counted_towards_a_release_stay_within_each_row_groups_mapped_pages(store):
    dataset = MemoryMappedDataset(store, release_bytes=1 << 40)  # never released: every count stays
    for _ in range(3):  # reading a row again maps nothing new
        for index in range(len(dataset)):
            dataset[index]
    pages = dict(enumerate(length for _, length in dataset._group_pages))
    assert set(dataset._touched) == set(pages)
    assert all(counted <= pages[group] + 2 * FAULT_AROUND_BYTES for group, counted in dataset._touched.items())
    assert dataset._bytes_since_release == sum(dataset._touched.values())


def test_a_release_drops_the_least_recently_read_row_groups_and_keeps_the_one_just_read(store):
    caps = [length + 2 * FAULT_AROUND_BYTES for _, length in MemoryMappedDataset(store)._group_pages]
    dataset = MemoryMappedDataset(store, release_bytes=4 * max(caps))
    released = []
    dataset._map = type("Mapping", (), {"madvise": lambda self, advice, start, length: released.append(start)})()
    reference = list(open_store(store).iter_sequences())
    for index in list(range(len(dataset))) * 2:
        sample = dataset[index]
        group = int(np.searchsorted(dataset._group_starts, index, side="right")) - 1
        assert list(dataset._touched)[-1] == group  # the most recently read group is never released with the old ones
        assert dataset._bytes_since_release == sum(dataset._touched.values()) < dataset.release_bytes
        assert np.array_equal(sample["input_ids"], reference[index]["input_ids"])
    assert released and released[0] == dataset._group_pages[0][0]  # the first group read went first


def test_the_arrow_copy_is_made_once_atomically_and_remade_when_the_shards_change(store, codec):
    first = convert_to_arrow(store)
    assert first.parent == store / "_cache" / "arrow" and not list(first.parent.glob("*.tmp-*"))
    stamp = first.stat().st_mtime_ns
    assert MemoryMappedDataset(store).path == first and first.stat().st_mtime_ns == stamp
    for shard in (store / "shards").glob("*.parquet"):  # the same store rebuilt with other content
        shard.unlink()
    (store / "manifest.json").unlink()
    for record in (store / "_partitions").glob("*.json"):
        record.unlink()
    write_store(store, codec, num_sequences=30, seed=5, shard_bytes=5000, row_group_bytes=1200)
    second = convert_to_arrow(store)
    assert second != first and not first.exists()
    assert MemoryMappedDataset(store)[0]["sequence_id"] == "seq-00000"


def test_streaming_and_memory_mapped_datasets_yield_identical_batches(store):
    plan = PlanConfig(batch_size=4, seed=3)
    mapped = batches(make_dataloader(MemoryMappedDataset(store), plan, rank=1, num_ranks=2))
    streamed = batches(make_dataloader(StreamingDataset(store, plan, rank=1, num_ranks=2)))
    assert_same_batches(mapped, streamed)
    with_workers = batches(make_dataloader(StreamingDataset(store, plan, rank=1, num_ranks=2), num_workers=2))
    assert_same_batches([mapped[i] for i in interleave_workers(len(mapped), 2)], with_workers)


def test_a_file_url_streams_through_fsspec_like_the_local_path(store):
    plan = PlanConfig(batch_size=5, seed=1)
    local = batches(make_dataloader(StreamingDataset(store, plan, rank=0, num_ranks=1)))
    remote = batches(make_dataloader(StreamingDataset(f"file://{store}", plan, rank=0, num_ranks=1)))
    assert_same_batches(local, remote)


def test_two_ranks_by_two_workers_see_every_sequence_once_per_epoch_with_drop_last(store):
    plan = PlanConfig(batch_size=3, seed=0, drop_last=True)
    seen, lengths = [], []
    for rank in (0, 1):
        loader = make_dataloader(StreamingDataset(store, plan, rank=rank, num_ranks=2), num_workers=2)
        rank_batches = batches(loader)
        lengths.append(len(rank_batches))
        seen += [i for b in rank_batches for i in b["sequence_index"].tolist()]
    assert lengths == [5, 5] and sorted(seen) == list(range(30))


def test_set_epoch_reshuffles_both_datasets_the_same_way(store):
    plan = PlanConfig(batch_size=6, seed=0)
    mapped = make_dataloader(MemoryMappedDataset(store), plan, rank=0, num_ranks=1)
    streamed = make_dataloader(StreamingDataset(store, plan, rank=0, num_ranks=1), num_workers=1)
    epoch0 = batches(mapped)
    set_epoch(mapped, 1)
    set_epoch(streamed, 1)
    epoch1 = batches(mapped)
    assert_same_batches(epoch1, batches(streamed))
    assert not torch.equal(epoch0[0]["sequence_index"], epoch1[0]["sequence_index"])


def test_a_corrupted_row_group_met_while_streaming_names_shard_and_row_group(store):
    dataset = StreamingDataset(store, PlanConfig(batch_size=2, shuffle=False), rank=0, num_ranks=1)
    shard = sorted((store / "shards").glob("*.parquet"))[1]
    data = bytearray(shard.read_bytes())
    data[200:260] = bytes(60)  # inside the first row group's pages; the footer stays sound
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=rf"shard shards/{shard.name} row group 0 does not match"):
        batches(make_dataloader(dataset))
    skipping = StreamingDataset(store, PlanConfig(batch_size=2, shuffle=False), rank=0, num_ranks=1,
                                skip_bad_row_groups=True)
    with pytest.warns(UserWarning, match=rf"skipping shard shards/{shard.name} row group 0"):
        result = batches(make_dataloader(skipping))
    assert len(result) == len(skipping) and all(len(b["sequence_index"]) == 2 for b in result)
    in_worker = StreamingDataset(store, PlanConfig(batch_size=2, shuffle=False), rank=0, num_ranks=1)
    with pytest.raises(ChecksumError, match=rf"shard shards/{shard.name} row group 0 does not match"):
        batches(make_dataloader(in_worker, num_workers=2))  # raised in a worker, re-raised by the DataLoader
    with pytest.raises(ChecksumError, match=f"shard shards/{shard.name} row group 0 does not match"):
        MemoryMappedDataset(store)  # the Arrow copy is made from sound shards only


def test_a_shard_missing_during_iteration_is_a_named_error(store):
    dataset = StreamingDataset(store, PlanConfig(batch_size=2), rank=0, num_ranks=1)
    shard = sorted((store / "shards").glob("*.parquet"))[2]
    shard.unlink()
    with pytest.raises(ShardMissingError, match=f"shard shards/{shard.name} listed in the manifest is missing"):
        batches(make_dataloader(dataset))
    with pytest.raises(ShardMissingError):
        MemoryMappedDataset(store)


def test_an_empty_store_is_refused(tmp_path, codec):
    empty = write_store(tmp_path / "empty", codec, num_sequences=0)
    with pytest.raises(EmptyStoreError, match="has no sequences"):
        MemoryMappedDataset(empty)
    with pytest.raises(EmptyStoreError):
        StreamingDataset(empty, PlanConfig(batch_size=1))


def test_more_ranks_than_row_groups_is_refused(tmp_path, codec):
    one_group = write_store(tmp_path / "small", codec, num_sequences=4)
    with pytest.raises(PartitionError, match="2 ranks but the store has only 1 row groups"):
        StreamingDataset(one_group, PlanConfig(batch_size=1), rank=0, num_ranks=2)
    with pytest.raises(PartitionError, match="2 ranks but the store has only 1 row groups"):
        make_dataloader(MemoryMappedDataset(one_group), PlanConfig(batch_size=1), rank=1, num_ranks=2)


@pytest.mark.parametrize("kind", ["mapped", "streaming"])
def test_four_ranks_by_two_workers_over_six_uneven_shards_get_equal_batches_losing_nothing(tmp_path, codec, kind):
    store = write_store(tmp_path / "uneven", codec, num_sequences=41, shard_bytes=7000, row_group_bytes=1200)
    assert [s.num_rows for s in open_store(store).manifest.shards] == [8, 8, 8, 8, 8, 1]
    plan = PlanConfig(batch_size=4, seed=2)
    per_rank = []
    for rank in range(4):
        if kind == "mapped":
            loader = make_dataloader(MemoryMappedDataset(store), plan, rank=rank, num_ranks=4, num_workers=2)
        else:
            loader = make_dataloader(StreamingDataset(store, plan, rank=rank, num_ranks=4), num_workers=2)
        per_rank.append([i for b in batches(loader) for i in b["sequence_index"].tolist()])
    assert [len(seen) for seen in per_rank] == [3 * 4] * 4  # ceil(41 / (4 ranks * 4)) = 3 full batches on each
    counts = np.bincount(sum(per_rank, []), minlength=41)
    assert counts.min() == 1 and counts.sum() - 41 == 4 * 12 - 41  # none lost; only the documented padding repeats


def _store_with_tokenizer(path, codec, tokenizer):
    from kdstore.build import tokenizer_info

    saved = path.parent / "saved-tokenizer"
    tokenizer.save_pretrained(saved)
    manifest = make_manifest(codec)
    manifest.tokenizer = {**manifest.tokenizer, **tokenizer_info(tokenizer, saved), "name": "teacher-tok"}
    schema = logits_schema(codec)
    with ShardWriter(path, manifest, schema, tokenizer_dir=saved) as writer:
        writer.write(rows_to_table(schema, synthetic_rows(codec, 4, 9)))
    return path


def test_a_student_tokenizer_other_than_the_stores_is_refused_with_both_names(tmp_path, tiny_teacher):
    import json

    from transformers import AutoTokenizer

    codec = CodecConfig(k=8, vocab_size=320)
    teacher_tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    store = _store_with_tokenizer(tmp_path / "store", codec, teacher_tokenizer)
    MemoryMappedDataset(store, student_tokenizer=tiny_teacher)  # the same files: accepted
    other = tmp_path / "other-tokenizer"
    teacher_tokenizer.save_pretrained(other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["w0"], vocab["w1"] = vocab["w1"], vocab["w0"]  # two ids swapped (an extra token above would fit: kdstore.vocab)
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(TokenizerMismatchError, match=r"tokenizer 'teacher-tok' .* student tokenizer '.*other-tokenizer'"):
        StreamingDataset(store, PlanConfig(batch_size=1), student_tokenizer=other)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MemoryMappedDataset(store, student_tokenizer=other, allow_tokenizer_mismatch=True)
    assert any("allow_tokenizer_mismatch=True" in str(w.message) for w in caught)


def test_a_state_from_another_plan_is_refused(store):
    loader = make_dataloader(MemoryMappedDataset(store), PlanConfig(batch_size=4), rank=0, num_ranks=1)
    next(iter(loader))
    state = loader.state_dict()
    other = make_dataloader(MemoryMappedDataset(store), PlanConfig(batch_size=5), rank=0, num_ranks=1)
    other.load_state_dict(state)
    with pytest.raises(ResumeError, match="plan"):
        next(iter(other))


def test_the_kdstore_convert_command_writes_the_arrow_copy(store):
    from click.testing import CliRunner

    from kdstore.cli.main import cli

    result = CliRunner().invoke(cli, ["convert", str(store), "--to", "arrow"])
    assert result.exit_code == 0, result.output
    assert "store-" in result.output and list((store / "_cache" / "arrow").glob("store-*.arrow"))


def test_a_collator_decides_which_columns_the_datasets_read(store, codec):
    collate = Collator(codec)
    sample = MemoryMappedDataset(store, columns=["input_ids", "topk_ids", "topk_logprobs"])[0]
    assert {"input_ids", "topk_id_deltas", "topk_logprob_codes"} <= set(sample) and "tail_logmass_codes" not in sample
    assert set(collate.columns) >= {"input_ids", "topk_ids", "topk_logprobs", "tail_logmass", "target_logprob"}
