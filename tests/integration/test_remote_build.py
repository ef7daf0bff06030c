"""kdstore build --out s3://...: staged locally, uploaded whole, manifest last; resumable; partitions share a store.

Against a real S3-compatible server (moto's, on loopback, tests/conftest.py), through s3fs; the killed
build is a real process killed with SIGKILL while it uploads.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from conftest import S3_BUCKET, write_word_corpus
from kdstore.cli.main import cli
from kdstore.errors import StoreNotFoundError
from kdstore.store import open_store
from kdstore.verify import verify_store

pytest.importorskip("s3fs", reason="builds into s3:// through s3fs")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_teacher):
    """(corpus, build.toml, the manifest of the same build into a local folder, without created_at)."""
    folder = tmp_path_factory.mktemp("remote-build")
    corpus = write_word_corpus(folder / "corpus", num_files=6, docs_per_file=12)
    config = folder / "build.toml"
    config.write_text(f'teacher = "{tiny_teacher}"\nk = 8\nseq_len = 16\nunit_documents = 2\nshard_bytes = 6000\n'
                      'row_group_bytes = 3000\nprogress = false\ndevice = "cpu"\n')
    local = CliRunner().invoke(cli, ["build", str(corpus), "--config", str(config), "--out", str(folder / "local")])
    assert local.exit_code == 0, local.output
    return corpus, config, _manifest_text((folder / "local" / "manifest.json").read_text())


def _manifest_text(text: str) -> dict:
    manifest = json.loads(text)
    manifest.pop("created_at")
    return manifest


def _flags(options: dict) -> list[str]:
    return [f"--storage-option={key}={value}" for key, value in options.items()]


def test_a_build_into_s3_equals_the_same_build_into_a_folder(s3, setup, tmp_path):
    fs, options = s3
    corpus, config, local = setup
    url = f"s3://{S3_BUCKET}/{tmp_path.name}"
    result = CliRunner().invoke(cli, ["build", str(corpus), "--config", str(config), "--out", url, *_flags(options)])
    assert result.exit_code == 0, result.output
    assert _manifest_text(fs.cat_file(f"{url[5:]}/manifest.json").decode()) == local  # same shards, same sha256
    store = open_store(url, options)
    assert len(store.manifest.shards) >= 3 and verify_store(store) == []
    assert fs.exists(f"{url[5:]}/README.md") and fs.exists(f"{url[5:]}/tokenizer/tokenizer.json")


def test_two_partitions_built_apart_write_one_s3_store(s3, setup, tmp_path):
    fs, options = s3
    corpus, config, _ = setup
    url = f"s3://{S3_BUCKET}/{tmp_path.name}"
    command = ["build", str(corpus), "--config", str(config), "--out", url, "--num-partitions", "2", *_flags(options)]
    first = CliRunner().invoke(cli, [*command, "--partition", "1"])
    assert first.exit_code == 0 and not fs.exists(f"{url[5:]}/manifest.json"), first.output
    second = CliRunner().invoke(cli, [*command, "--partition", "0"])
    assert second.exit_code == 0, second.output
    store = open_store(url, options)
    assert {s.path.split("-")[1] for s in store.manifest.shards} == {"00000", "00001"}
    assert verify_store(store) == []


def test_a_build_killed_while_uploading_resumes_to_the_uninterrupted_store(s3, setup, tmp_path):
    fs, options = s3
    corpus, config, local = setup
    for attempt in range(5):  # on a busy machine a build may finish between two polls: start again, elsewhere
        url = f"s3://{S3_BUCKET}/{tmp_path.name}-{attempt}"
        command = [sys.executable, "-m", "kdstore.cli.main", "build", str(corpus), "--config", str(config), "--out",
                   url, *_flags(options)]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        first_record = f"{url[5:]}/_partitions/part-00000/shard-000000.json"
        deadline = time.monotonic() + 120
        while not fs.exists(first_record) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
            fs.invalidate_cache()
        if process.poll() is None:
            break
    assert process.poll() is None, "the build finished before it could be killed, 5 times"
    process.send_signal(signal.SIGKILL)  # one shard is up, the next is being written or uploaded
    process.wait()
    fs.invalidate_cache()
    assert not fs.exists(f"{url[5:]}/manifest.json")
    with pytest.raises(StoreNotFoundError, match="unfinished store"):
        open_store(url, options)
    rerun = subprocess.run(command, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    fs.invalidate_cache()
    assert _manifest_text(fs.cat_file(f"{url[5:]}/manifest.json").decode()) == local


def test_a_prefix_holding_other_files_is_refused_before_anything_is_uploaded(s3, setup, tmp_path):
    fs, options = s3
    corpus, config, _ = setup
    prefix = f"{S3_BUCKET}/{tmp_path.name}"
    fs.pipe_file(f"{prefix}/notes.txt", b"mine")
    result = CliRunner().invoke(cli, ["build", str(corpus), "--config", str(config), "--out", f"s3://{prefix}",
                                      *_flags(options)])
    assert result.exit_code == 1 and result.output.strip().splitlines()[-1].startswith("Error: "), result.output
    assert "not empty" in result.output and "Traceback" not in result.output
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.find(prefix)) == ["notes.txt"]
