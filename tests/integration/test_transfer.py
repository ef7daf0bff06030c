"""kdstore copy and kdstore merge: stores moved between folders and a real S3-compatible server, and merged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import S3_BUCKET, write_store
from kdstore.cli.main import cli
from kdstore.codec import CodecConfig
from kdstore.errors import ChecksumError, StoreMismatchError
from kdstore.store import open_store
from kdstore.transfer import copy_store, merge_stores
from kdstore.verify import verify_store

CODEC = CodecConfig(k=8, vocab_size=300)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.relative_to(root).as_posix().startswith(("_", "."))}


@pytest.fixture
def store(tmp_path) -> Path:
    return write_store(tmp_path / "store", CODEC, num_sequences=20, shard_bytes=4000, row_group_bytes=1500)


def test_a_copied_store_has_the_same_files_and_verifies(store, tmp_path):
    result = copy_store(store, tmp_path / "copy")
    assert result.num_files_copied == len(open_store(store).manifest.shards) + 1  # + README.md
    assert _files(tmp_path / "copy") == {k: v for k, v in _files(store).items() if not k.startswith("_")}
    assert verify_store(open_store(tmp_path / "copy")) == []


def test_an_interrupted_copy_resumes_and_copies_only_what_is_missing(store, tmp_path):
    copy_store(store, tmp_path / "copy")
    target = tmp_path / "copy"
    (target / "manifest.json").unlink()  # as if stopped before the manifest ...
    shard = sorted((target / "shards").glob("*.parquet"))[1]
    shard.write_bytes(shard.read_bytes()[:100])  # ... in the middle of a shard (a local copy never shows this)
    result = copy_store(store, target)
    num_shards = len(open_store(store).manifest.shards)
    assert (result.num_files_copied, result.num_files_present) == (1, num_shards - 1 + 1)  # + the card
    assert verify_store(open_store(target)) == []


def test_a_damaged_source_shard_is_refused_and_no_manifest_is_written(store, tmp_path):
    shard = sorted((store / "shards").glob("*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=f"{shard.name} in .* does not match its sha256"):
        copy_store(store, tmp_path / "copy")
    assert not (tmp_path / "copy" / "manifest.json").exists()
    assert not list((tmp_path / "copy").rglob("*.tmp"))


def test_a_target_holding_other_files_is_refused_untouched(store, tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(StoreMismatchError, match="not part of"):
        copy_store(store, target)
    assert _files(target) == {"notes.txt": b"mine"}
    other = write_store(tmp_path / "other", CODEC, num_sequences=3, seed=9)
    with pytest.raises(StoreMismatchError, match="already holds another store"):
        copy_store(store, other)


def test_merge_keeps_every_sequence_once_and_verifies(tmp_path):
    a = write_store(tmp_path / "a", CODEC, num_sequences=10, seed=1)
    b = write_store(tmp_path / "b", CODEC, num_sequences=14, seed=1)  # seq-00000 .. 00009 repeat a's
    result = merge_stores([a, b], tmp_path / "merged")
    assert (result.num_sequences, result.num_duplicates) == (14, 10)
    merged = open_store(tmp_path / "merged")
    assert verify_store(merged) == []
    ids = [s["sequence_id"] for s in merged.iter_sequences(["sequence_id"])]
    assert ids == [f"seq-{i:05d}" for i in range(14)]
    parts = merged.manifest.build["merged_from"]
    assert [p["num_sequences"] for p in parts] == [10, 14]


def test_merge_refuses_stores_of_another_codec_naming_the_field_and_both_values(tmp_path):
    a = write_store(tmp_path / "a", CODEC, num_sequences=2)
    b = write_store(tmp_path / "b", CodecConfig(k=4, vocab_size=300), num_sequences=2)
    with pytest.raises(StoreMismatchError, match=r"differs from .*: codec\.k is 4 in .*b, 8 in .*a"):
        merge_stores([a, b], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_the_cli_copies_to_s3_and_back_byte_for_byte(store, tmp_path, s3):
    _, options = s3
    endpoint = options["endpoint_url"]
    target = f"s3://{S3_BUCKET}/{tmp_path.name}"
    up = CliRunner().invoke(cli, ["copy", str(store), target, f"--target-option=endpoint_url={endpoint}"])
    assert up.exit_code == 0, up.output
    again = CliRunner().invoke(cli, ["copy", str(store), target, f"--target-option=endpoint_url={endpoint}"])
    assert again.exit_code == 0 and "copied 0 file(s)" in again.output, again.output
    assert verify_store(open_store(target, {"endpoint_url": endpoint})) == []
    down = CliRunner().invoke(cli, ["copy", target, str(tmp_path / "back"), f"--source-option=endpoint_url={endpoint}"])
    assert down.exit_code == 0, down.output
    assert _files(tmp_path / "back") == {k: v for k, v in _files(store).items() if not k.startswith("_")}
    manifest = json.loads((tmp_path / "back" / "manifest.json").read_text())
    assert manifest["shards"] == json.loads((store / "manifest.json").read_text())["shards"]


def test_merge_check_and_export_take_s3_stores(tmp_path, s3):
    """The sharing commands read stores in a bucket like local ones (moto on loopback)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from conftest import make_manifest, synthetic_rows
    from kdstore.build import tokenizer_info
    from kdstore.format import logits_schema, rows_to_table
    from kdstore.writer import ShardWriter

    _, options = s3
    endpoint = [f"--storage-option=endpoint_url={options['endpoint_url']}"]
    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(CODEC.vocab_size)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(tmp_path / "tok")
    manifest = make_manifest(CODEC)
    manifest.tokenizer = tokenizer_info(PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok"), tmp_path / "tok")
    schema = logits_schema(CODEC)
    for name, seed in (("a", 1), ("b", 2)):
        with ShardWriter(tmp_path / name, manifest, schema, tokenizer_dir=tmp_path / "tok") as writer:
            writer.write(rows_to_table(schema, synthetic_rows(CODEC, 4, 9, seed=seed, prefix=name)))
    url = f"s3://{S3_BUCKET}/{tmp_path.name}-b"
    copy_store(tmp_path / "b", url, target_options={"endpoint_url": options["endpoint_url"]})

    merged = CliRunner().invoke(cli, ["merge", str(tmp_path / "a"), url, "--out", str(tmp_path / "merged"), *endpoint])
    assert merged.exit_code == 0 and "merged 8 sequences" in merged.output, merged.output
    assert verify_store(open_store(tmp_path / "merged")) == []
    checked = CliRunner().invoke(cli, ["check", url, "--student", str(tmp_path / "tok"), *endpoint])
    assert checked.exit_code == 0 and "identical" in checked.output, checked.output
    exported = CliRunner().invoke(cli, ["export", url, "--format", "hf", "--out", str(tmp_path / "hf"), *endpoint])
    assert exported.exit_code == 0, exported.output
    local = CliRunner().invoke(cli, ["export", str(tmp_path / "b"), "--format", "hf", "--out", str(tmp_path / "hf-local")])
    assert local.exit_code == 0, local.output
    import pyarrow.parquet as pq

    parts = sorted(p.relative_to(tmp_path / "hf-local") for p in (tmp_path / "hf-local").rglob("*.parquet"))
    assert parts and parts == sorted(p.relative_to(tmp_path / "hf") for p in (tmp_path / "hf").rglob("*.parquet"))
    for part in parts:  # the same rows (the files' metadata name their source: a folder or the URL)
        assert pq.read_table(tmp_path / "hf" / part).equals(pq.read_table(tmp_path / "hf-local" / part))
