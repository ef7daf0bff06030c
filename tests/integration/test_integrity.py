"""No wrong value reaches a trainer: random damage to a store ends in identical batches or a named error.

Each trial copies a sound store (shards, manifest, the Arrow copy and its sidecar), flips one bit or
truncates one file, then reads every batch through both loaders and runs ``verify_store``. A trial passes
when each reader either serves batches bit-identical to the sound store's or raises a KdstoreError, and
``verify_store`` finds a problem unless both loaders served identical batches. Anything else (other
values, a raw KeyError or ArrowInvalid, verify saying OK over changed data) fails the test.
"""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import write_store
from kdstore.arrow_copy import convert_to_arrow, sidecar_path
from kdstore.codec import CodecConfig
from kdstore.collate import Collator
from kdstore.errors import ArrowCopyError, ChecksumError, KdstoreError
from kdstore.loader import EpochBatchSampler, MemoryMappedDataset, StreamingDataset
from kdstore.shuffle import PlanConfig
from kdstore.store import open_store
from kdstore.verify import verify_store

NUM_TRIALS = 400
PLAN = PlanConfig(batch_size=3, seed=1)
CODEC = CodecConfig(k=4, vocab_size=200, sampled_draws=8)


def _mapped_batches(store: Path) -> list[dict[str, torch.Tensor]]:
    dataset = MemoryMappedDataset(store)
    collate = Collator(dataset.store.codec, sampled=True)
    return [collate([dataset[i] for i in rows]) for rows in EpochBatchSampler(dataset.group_sizes, PLAN, 0, 1)]


def _streamed_batches(store: Path) -> list[dict[str, torch.Tensor]]:
    dataset = StreamingDataset(store, PLAN, rank=0, num_ranks=1)
    collate = Collator(dataset.store.codec, sampled=True)
    return [collate(samples) for samples in dataset]


def _same(left: list[dict[str, torch.Tensor]], right: list[dict[str, torch.Tensor]]) -> bool:
    return len(left) == len(right) and all(
        a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
        for a, b in zip(left, right))


def _outcome(read, store: Path, reference) -> str:
    """'identical', 'error' (a KdstoreError), or 'changed'; any other exception propagates and fails the test."""
    try:
        return "identical" if _same(read(store), reference) else "changed"
    except KdstoreError:
        return "error"


@pytest.fixture(scope="module")
def sound(tmp_path_factory) -> tuple[Path, list, list]:
    """Two shards of several row groups, with their Arrow copy made."""
    path = write_store(tmp_path_factory.mktemp("fuzz") / "store", CODEC, num_sequences=14, seq_len=9,
                       shard_bytes=4000, row_group_bytes=1500)
    convert_to_arrow(path)
    assert len(open_store(path).manifest.shards) >= 2
    return path, _mapped_batches(path), _streamed_batches(path)


def _targets(store: Path) -> list[tuple[str, Path]]:
    copy = next((store / "_cache" / "arrow").glob("store-*.arrow"))
    shards = sorted((store / "shards").glob("*.parquet"))
    return ([("shard", s) for s in shards] + [("footer", s) for s in shards]
            + [("arrow copy", copy), ("arrow copy", copy), ("sidecar", sidecar_path(copy)),
               ("manifest", store / "manifest.json")])


def _damage(path: Path, kind: str, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    if rng.random() < 0.2:
        del data[rng.randrange(len(data)):]  # truncated
    else:
        footer = int.from_bytes(data[-8:-4], "little") + 8 if kind == "footer" else len(data)
        at = len(data) - 1 - rng.randrange(min(footer, len(data)))
        data[at] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def test_random_bit_flips_and_truncations_never_change_what_a_loader_serves(sound, tmp_path):
    store, mapped, streamed = sound
    rng = random.Random(20261130)
    outcomes: Counter[tuple[str, str, str, str]] = Counter()
    for trial in range(NUM_TRIALS):
        work = tmp_path / f"t{trial}"
        shutil.copytree(store, work)
        kind, target = rng.choice(_targets(work))
        _damage(target, kind, rng)
        got_mapped = _outcome(_mapped_batches, work, mapped)
        got_streamed = _outcome(_streamed_batches, work, streamed)
        try:
            verified = "problems" if verify_store(open_store(work)) else "ok"
        except KdstoreError:
            verified = "error"
        assert "changed" not in (got_mapped, got_streamed), (trial, kind, target.name)
        if verified == "ok":
            assert got_mapped == got_streamed == "identical", (trial, kind, target.name)
        outcomes[(kind, got_mapped, got_streamed, verified)] += 1
        shutil.rmtree(work)
    print("\n".join(f"{n:4d} {k}" for k, n in sorted(outcomes.items())))
    errors = sum(n for (_, a, b, _), n in outcomes.items() if "error" in (a, b))
    assert sum(outcomes.values()) == NUM_TRIALS and errors > NUM_TRIALS // 3  # the damage was really seen


def test_a_planted_arrow_copy_of_another_store_is_not_served(sound, tmp_path):
    store, mapped, _ = sound
    other = write_store(tmp_path / "other", CODEC, num_sequences=14, seq_len=9, seed=5, shard_bytes=4000,
                        row_group_bytes=1500)
    work = tmp_path / "work"
    shutil.copytree(store, work)
    planted = convert_to_arrow(other)
    mine = next((work / "_cache" / "arrow").glob("store-*.arrow"))
    shutil.copy(planted, mine)  # the other store's rows under this store's name, and its sidecar
    shutil.copy(sidecar_path(planted), sidecar_path(mine))
    assert _same(_mapped_batches(work), mapped)  # the sidecar's fingerprint names the other store: remade
    assert verify_store(open_store(work)) == []


def test_a_copy_damaged_after_it_was_opened_is_caught_on_first_touch(sound, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(sound[0], work)
    dataset = MemoryMappedDataset(work)
    copy = next((work / "_cache" / "arrow").glob("store-*.arrow"))
    sums = json.loads(sidecar_path(copy).read_text())
    first = sums["batches"][-1]["buffers"][-1]  # the last buffer of the last batch: values, not headers
    with open(copy, "r+b") as handle:  # in place, as a failing disk would: the mapping sees it
        handle.seek(first[0])
        byte = handle.read(1)[0]
        handle.seek(first[0])
        handle.write(bytes([byte ^ 0x10]))
    with pytest.raises(ArrowCopyError, match="record batch .* does not match its checksum"):
        for index in range(len(dataset)):
            dataset[index]
    problems = verify_store(open_store(work))
    assert len(problems) == 1 and "does not match its checksum" in problems[0]


def test_streaming_refuses_a_shard_whose_footer_renames_a_column(sound, tmp_path):
    """The bug that started this: one flipped bit in a column name made pyarrow drop tail_logmass silently."""
    work = tmp_path / "work"
    shutil.copytree(sound[0], work)
    shard = sorted((work / "shards").glob("*.parquet"))[0]
    data = shard.read_bytes()
    at = data.rindex(b"tail_logmass_codes")
    shard.write_bytes(data[:at] + b"tail_logmasS_codes" + data[at + len(b"tail_logmass_codes"):])
    with pytest.raises(ChecksumError, match="footer does not match"):
        _streamed_batches(work)
    assert any(shard.name in p and "sha256" in p for p in verify_store(open_store(work)))


def test_verify_and_loaders_refuse_a_shard_that_is_a_symbolic_link(sound, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(sound[0], work, ignore=shutil.ignore_patterns("_cache"))
    shard = sorted((work / "shards").glob("*.parquet"))[0]
    outside = tmp_path / "elsewhere.parquet"
    shard.rename(outside)
    shard.symlink_to(outside)  # the same bytes, but from outside the store
    problems = verify_store(open_store(work))
    assert len(problems) == 1 and "symbolic link" in problems[0] and shard.name in problems[0]
    with pytest.raises(KdstoreError, match="symbolic link"):
        _streamed_batches(work)
    with pytest.raises(KdstoreError, match="symbolic link"):
        _mapped_batches(work)


def test_verify_compares_the_tokenizer_files_with_the_manifest(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from conftest import make_manifest, synthetic_rows
    from kdstore.build import tokenizer_info
    from kdstore.format import logits_schema, rows_to_table
    from kdstore.writer import ShardWriter

    vocab = {f"w{i}": i for i in range(CODEC.vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    saved = tmp_path / "saved"
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(saved)
    manifest = make_manifest(CODEC)
    manifest.tokenizer = tokenizer_info(PreTrainedTokenizerFast.from_pretrained(saved), saved)
    store, schema = tmp_path / "store", logits_schema(CODEC)
    with ShardWriter(store, manifest, schema, tokenizer_dir=saved) as writer:
        writer.write(rows_to_table(schema, synthetic_rows(CODEC, 2, 9)))
    assert verify_store(open_store(store)) == []
    tokenizer_file = store / "tokenizer" / "tokenizer.json"
    tokenizer_file.write_text(tokenizer_file.read_text().replace('"w1"', '"w1x"'))
    problems = verify_store(open_store(store))
    assert len(problems) == 1 and "tokenizer" in problems[0] and "files_sha256" in problems[0]
    tokenizer_file.unlink()
    assert "tokenizer.json" in verify_store(open_store(store))[0]
