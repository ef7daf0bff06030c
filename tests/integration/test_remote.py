"""A store on a real S3-compatible HTTP server (moto's, on loopback) loads byte for byte like the local copy.

No mock of the filesystem layer: s3fs talks HTTP to a moto server thread on 127.0.0.1 (a free port), and
the AWS variables point at dummies so nothing looks for real credentials or leaves the machine.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import S3_BUCKET, write_store
from kdstore.arrow_copy import convert_to_arrow
from kdstore.codec import CodecConfig
from kdstore.errors import ChecksumError, ShardMissingError
from kdstore.loader import MemoryMappedDataset, StreamingDataset, make_dataloader
from kdstore.shuffle import PlanConfig

pytest.importorskip("s3fs", reason="the remote test reads through s3fs")

BUCKET = S3_BUCKET
PLAN = PlanConfig(batch_size=4, seed=7)


@pytest.fixture
def stores(s3, tmp_path):
    """(local store path, its s3:// URL): the same files, uploaded."""
    fs, _ = s3
    local = write_store(tmp_path / "store", CodecConfig(k=8, vocab_size=300), num_sequences=30,
                        shard_bytes=5000, row_group_bytes=1200)  # 3 shards of uneven row groups
    prefix = f"{BUCKET}/{tmp_path.name}"  # one folder per test: a test may damage its copy
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.put_file(str(path), f"{prefix}/{path.relative_to(local).as_posix()}")
    return local, f"s3://{prefix}"


def batch_bytes(loader):
    return [{k: v.numpy().tobytes() for k, v in batch.items()} for batch in loader]


def test_streaming_from_s3_is_byte_identical_to_the_local_store(s3, stores):
    _, options = s3
    local, url = stores
    expected = batch_bytes(make_dataloader(StreamingDataset(local, PLAN, rank=1, num_ranks=2), num_workers=2))
    remote = StreamingDataset(url, PLAN, rank=1, num_ranks=2, storage_options=options)
    assert not remote.store.is_local  # really read through fsspec, not a local path
    assert batch_bytes(make_dataloader(remote, num_workers=2)) == expected
    mapped = batch_bytes(make_dataloader(MemoryMappedDataset(local), PLAN, rank=1, num_ranks=2))
    assert batch_bytes(make_dataloader(StreamingDataset(url, PLAN, rank=1, num_ranks=2, storage_options=options))) == mapped


def test_memory_mapped_from_s3_copies_into_the_local_cache_dir_and_matches_the_local_store(s3, stores, tmp_path):
    _, options = s3
    local, url = stores
    cache = tmp_path / "cache"
    remote = MemoryMappedDataset(url, cache_dir=cache, storage_options=options)
    assert remote.path.parent == cache and remote.path.is_file()
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]  # the downloaded shards are gone
    assert convert_to_arrow(url, cache, storage_options=options) == remote.path  # made once, found again
    expected = batch_bytes(make_dataloader(MemoryMappedDataset(local), PLAN, rank=0, num_ranks=2))
    assert batch_bytes(make_dataloader(remote, PLAN, rank=0, num_ranks=2, num_workers=2)) == expected
    for index in (0, 17, 29):
        a, b = remote[index], MemoryMappedDataset(local)[index]
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_shard_missing_on_s3_during_iteration_is_a_named_error(s3, stores):
    fs, options = s3
    _, url = stores
    dataset = StreamingDataset(url, PlanConfig(batch_size=2, shuffle=False), rank=0, num_ranks=1,
                               storage_options=options)  # reads every footer: all shards are there
    shard = dataset.store.manifest.shards[1].path
    fs.rm(f"{url.removeprefix('s3://')}/{shard}")
    with pytest.raises(ShardMissingError, match=f"shard {shard} listed in the manifest is missing from {url}"):
        batch_bytes(make_dataloader(dataset))


def test_the_arrow_copy_of_an_s3_store_refuses_a_missing_or_changed_shard(s3, stores, tmp_path):
    fs, options = s3
    _, url = stores
    prefix = url.removeprefix("s3://")
    shards = [s.path for s in StreamingDataset(url, PLAN, storage_options=options).store.manifest.shards]
    fs.pipe_file(f"{prefix}/{shards[0]}", fs.cat_file(f"{prefix}/{shards[0]}")[:-10] + bytes(10))  # same size
    with pytest.raises(ChecksumError, match=f"shard {shards[0]}: its footer does not match"):
        MemoryMappedDataset(url, cache_dir=tmp_path / "cache", storage_options=options)
    fs.rm(f"{prefix}/{shards[0]}")
    with pytest.raises(ShardMissingError, match=f"shard {shards[0]} listed in the manifest is missing from {url}"):
        MemoryMappedDataset(url, cache_dir=tmp_path / "cache", storage_options=options)
    assert not list((tmp_path / "cache").glob("store-*"))  # nothing that looks complete


def test_cli_convert_of_an_s3_store_takes_storage_options_and_writes_the_local_copy(s3, stores, tmp_path):
    from click.testing import CliRunner

    from kdstore.cli.main import cli

    _, options = s3
    local, url = stores
    flags = [f"--storage-option={key}={value}" for key, value in options.items()]
    result = CliRunner().invoke(cli, ["convert", url, "--to", "arrow", "--cache-dir", str(tmp_path / "c"), *flags])
    assert result.exit_code == 0, result.output
    copies = list((tmp_path / "c").glob("store-*.arrow"))
    assert len(copies) == 1 and copies[0].read_bytes() == convert_to_arrow(local).read_bytes()
    bad = CliRunner().invoke(cli, ["convert", url, "--to", "arrow", "--cache-dir", str(tmp_path / "c"), "--storage-option", "x"])
    assert bad.exit_code == 2 and "KEY=VALUE" in bad.output


def _cli(*args: str):
    from click.testing import CliRunner

    from kdstore.cli.main import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def test_info_verify_and_head_read_an_s3_store_like_the_local_one(s3, stores):
    _, options = s3
    local, url = stores
    flags = [f"--storage-option={key}={value}" for key, value in options.items()]
    for command in (["info", "--json"], ["verify"], ["head", "-n", "4"]):
        remote, here = _cli(command[0], url, *command[1:], *flags), _cli(command[0], local, *command[1:])
        assert remote.exit_code == here.exit_code == 0, remote.output
        assert remote.output.replace(url, "STORE") == here.output.replace(str(local), "STORE"), command


@pytest.mark.parametrize("case", ["no bucket", "no manifest", "unreachable", "no credentials"])
def test_an_s3_store_that_cannot_be_read_is_one_line_naming_the_url(s3, stores, case, monkeypatch):
    fs, options = s3
    _, url = stores
    flags = {"endpoint_url": options["endpoint_url"], "key": "testing", "secret": "testing"}
    if case == "no bucket":
        url = "s3://no-such-bucket-kd/store"
    elif case == "no manifest":
        fs.pipe_file(f"{url.removeprefix('s3://')}-other/notes.txt", b"not a store")
        url = f"{url}-other"
    elif case == "unreachable":
        flags["endpoint_url"] = "http://127.0.0.1:9"  # discard port: nothing listens
    else:  # moto accepts any key, so the case that can be made here is none at all
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        del flags["key"], flags["secret"]
    pairs = [f"--storage-option={k}={v}" for k, v in flags.items()]
    result = _cli("info", url, *pairs)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and url in lines[0], result.output
    assert "Traceback" not in result.output
    assert ("nothing is there" in lines[0]) == (case == "no bucket")


def test_train_reads_an_s3_store_through_a_local_arrow_copy_in_the_run_folder(s3, stores, tmp_path):
    import json

    from transformers import LlamaConfig

    _, options = s3
    _, url = stores
    student = tmp_path / "student.json"
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    student.write_text(json.dumps(config.to_dict()))
    flags = [f"--storage-option={key}={value}" for key, value in options.items()]
    result = _cli("train", url, "--student", student, "--out", tmp_path / "run", "--steps", "2", "--batch-size", "2",
                  *flags)
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "run" / "_cache").glob("store-*.arrow")) and (tmp_path / "run" / "student").is_dir()


def test_an_hf_url_goes_through_huggingface_hub_and_offline_it_is_one_line():
    """hf:// as far as it can be checked offline: the URL reaches huggingface_hub's fsspec filesystem (which
    refuses in offline mode) and the refusal is one line naming the URL; no test reaches the internet."""
    import os
    import subprocess
    import sys

    # a fresh process: huggingface_hub reads HF_HUB_OFFLINE once, when it is first imported
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "kdstore.cli.main", "info", "hf://datasets/someone/some-store"],
                            capture_output=True, text=True, env=env, timeout=120)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1 and "hf://datasets/someone/some-store" in lines[0], lines
    assert "offline" in lines[0] and "HF_TOKEN" in lines[0]
