"""--engine ray: on a real two-node Ray cluster on this machine, a build equals a local one, and so do
kdstore generate and kdstore score (the same engine, kdstore/engine.py, runs every teacher pass).

The module's cluster is started once by ``ray start --head`` plus a second ``ray start --address`` (a worker
node), one CPU each, in their own temp dir and process groups, and stopped by terminating those two
processes (never ``ray stop``, which would stop every Ray cluster of the machine). The killed worker is a
real Ray worker process, found by the PID its task reported, killed with SIGKILL mid-partition.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import S3_BUCKET, write_word_corpus
from kdstore.build import BuildConfig, build
from kdstore.cli.main import cli
from kdstore.engine import run_partitions
from kdstore.errors import TeacherError
from kdstore.generate import GenerateConfig, generate
from kdstore.score import ScoreConfig, score_store
from kdstore.store import open_store
from kdstore.verify import verify_store

ray = pytest.importorskip("ray", reason="--engine ray needs Ray: pip install 'kdstore[ray]'")

NUM_NODES = 2
# A loopback cluster of the test's own: no token (Ray >= 2.5x enables token auth when ~/.ray/auth_token exists,
# and which processes see which token then depends on the machine), no usage report
RAY_ENVIRON = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
# the workers talk to the loopback S3 server of tests/conftest.py as the driver does: dummy credentials, no
# instance-metadata lookups, no ~/.aws files
AWS_ENVIRON = {"AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
               "AWS_CONFIG_FILE": "/nonexistent/aws-config", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(*args: str, temp_dir: str) -> subprocess.Popen:
    command = [str(Path(sys.executable).with_name("ray")), "start", "--block", "--num-cpus", "1",
               "--disable-usage-stats", *args]
    log = open(Path(temp_dir) / f"node-{len(os.listdir(temp_dir))}.log", "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **RAY_ENVIRON, **AWS_ENVIRON})


def _stop(process: subprocess.Popen) -> None:
    process.terminate()  # `ray start --block` stops the processes it started on SIGTERM
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # whatever of its group is left
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def cluster():
    """The address HOST:PORT of a running 2-node, 2-CPU Ray cluster."""
    saved = {key: os.environ.get(key) for key in RAY_ENVIRON}
    os.environ.update(RAY_ENVIRON)  # the driver (this process) too
    temp_dir = tempfile.mkdtemp(prefix="kdray-")  # short: Ray's socket paths live under it
    port = _free_port()
    address = f"127.0.0.1:{port}"
    nodes = [_start("--head", "--port", str(port), "--node-ip-address", "127.0.0.1", "--include-dashboard=false",
                    "--temp-dir", temp_dir, "--object-store-memory", str(100 << 20), temp_dir=temp_dir)]
    try:
        _wait_for_nodes(address, 1)
        nodes.append(_start("--address", address, "--node-ip-address", "127.0.0.1",
                            "--object-store-memory", str(100 << 20), temp_dir=temp_dir))
        _wait_for_nodes(address, NUM_NODES)
        yield address
    finally:
        for node in reversed(nodes):  # the worker node first: it drains through the head
            _stop(node)
        shutil.rmtree(temp_dir, ignore_errors=True)
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def _wait_for_nodes(address: str, count: int, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=False)
            alive = sum(1 for node in ray.nodes() if node["Alive"])
        except ConnectionError:
            alive = 0
        finally:
            ray.shutdown()
        if alive >= count:
            return
        assert time.monotonic() < deadline, f"the Ray cluster at {address} has {alive} of {count} nodes"
        time.sleep(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_teacher):
    """A BuildConfig of many small work units (a partition takes a few seconds), and that build made in this
    process partition by partition (folder/local) and as one partition (folder/single).

    With one torch thread, as in a Ray task of one CPU (Ray sets OMP_NUM_THREADS to the task's CPUs): a matmul
    split over another number of threads sums in another order, and one logit in a million may then differ
    in its last bit, which is enough to change a shard's sha256."""
    folder = tmp_path_factory.mktemp("ray-build")
    corpus = write_word_corpus(folder / "corpus", num_files=10, docs_per_file=100)
    config = BuildConfig(corpus=(str(corpus),), teacher=str(tiny_teacher), k=8, seq_len=32, unit_documents=2,
                         shard_bytes=20_000, row_group_bytes=8_000, progress=False, device="cpu", num_partitions=2)
    with one_torch_thread():
        for partition in range(2):
            build(replace(config, out=str(folder / "local"), partition=partition))
        build(replace(config, out=str(folder / "single"), num_partitions=1))
    return config, folder


@contextlib.contextmanager
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _shards(store: Path) -> list[tuple[str, str, int]]:
    manifest = json.loads((store / "manifest.json").read_text())
    return [(shard["path"], shard["sha256"], shard["num_rows"]) for shard in manifest["shards"]]


def _rows_sha256(store: Path) -> str:
    """sha256 of every decoded row, in sequence id order: what a store holds, whatever its shard layout."""
    rows = sorted((row["sequence_id"], row) for row in open_store(store).iter_sequences())
    digest = hashlib.sha256()
    for sequence_id, row in rows:
        digest.update(sequence_id.encode())
        for name in sorted(row):
            value = row[name]
            digest.update(name.encode() + (value.tobytes() if hasattr(value, "tobytes") else repr(value).encode()))
    return digest.hexdigest()


def test_a_ray_build_writes_the_store_a_local_build_writes(cluster, setup, tmp_path, monkeypatch):
    config, folder = setup
    seen: list[dict] = []
    monkeypatch.chdir(tmp_path)  # --out relative to the driver's working directory, as on a shared file system
    result = run_partitions(replace(config, out="ray", engine="ray", ray_address=cluster),
                            on_progress=lambda progress: seen.append(dict(progress)))
    assert result.finished and result.num_sequences == open_store(folder / "local").manifest.num_sequences
    assert _shards(tmp_path / "ray") == _shards(folder / "local")  # same shards, same sha256s
    assert _rows_sha256(tmp_path / "ray") == _rows_sha256(folder / "single")  # same rows as one process
    assert verify_store(open_store(tmp_path / "ray")) == []
    final = seen[-1]
    assert sorted(final) == [0, 1] and all(state.done and state.num_units_done == state.num_units for state in
                                           final.values())
    assert len({state.node for state in final.values()}) == NUM_NODES  # one task per one-CPU node
    assert "ran 2 partitions as Ray tasks on 2 node(s)" in result.summary_lines()


def run_killing_partition_0(config, out: Path):
    """Run ``config`` on Ray into ``out``, killing the Ray worker of partition 0 (SIGKILL) once, when that partition
    has committed a shard and has work left; the result, once partition 0 was seen to be rerun."""
    killed: list[int] = []

    def kill_once_a_shard_is_committed(progress: dict) -> None:
        state = progress.get(0)
        committed = list((out / "shards").glob("part-00000-*.parquet")) if (out / "shards").is_dir() else []
        if not killed and state is not None and committed and state.num_units_done < state.num_units:
            os.kill(state.pids[-1], signal.SIGKILL)  # the Ray worker process running partition 0
            killed.append(state.pids[-1])

    result = run_partitions(replace(config, out=str(out), engine="ray"), on_progress=kill_once_a_shard_is_committed)
    assert killed, "partition 0 finished before a shard was committed and polled: nothing was killed"
    assert any("partition 0 was rerun 1 time(s)" in line for line in result.summary_lines()), result.summary_lines()
    return result


def test_a_worker_killed_mid_partition_is_rerun_and_the_store_is_still_identical(cluster, setup, tmp_path):
    config, folder = setup
    out = tmp_path / "ray"
    run_killing_partition_0(replace(config, ray_address=cluster), out)
    assert _shards(out) == _shards(folder / "local")
    assert verify_store(open_store(out)) == []


def test_kdstore_build_engine_ray_into_an_object_store_equals_the_local_build(cluster, setup, s3, tmp_path):
    fs, options = s3
    config, folder = setup
    toml = tmp_path / "build.toml"
    toml.write_text(f'teacher = "{config.teacher}"\nk = 8\nseq_len = 32\nunit_documents = 2\nshard_bytes = 20000\n'
                    'row_group_bytes = 8000\nnum_partitions = 2\n')
    url = f"s3://{S3_BUCKET}/ray-store"
    result = CliRunner().invoke(cli, ["build", *config.corpus, "--config", str(toml), "--out", url, "--engine", "ray",
                                      "--ray-address", cluster, *(f"--storage-option={k}={v}" for k, v in options.items())])
    assert result.exit_code == 0, result.output
    assert "ran 2 partitions as Ray tasks on 2 node(s)" in result.output and "partition 1" in result.output  # its bar
    manifest = json.loads(fs.cat_file(f"{S3_BUCKET}/ray-store/manifest.json"))
    assert [(s["path"], s["sha256"], s["num_rows"]) for s in manifest["shards"]] == _shards(folder / "local")
    assert verify_store(open_store(url, options)) == []


def test_an_error_in_a_task_is_the_one_line_error_a_local_build_gives(cluster, setup, tmp_path):
    config, _ = setup
    missing = tmp_path / "no-such-teacher"
    with pytest.raises(TeacherError, match="does not exist") as raised:  # raised in the workers, shown as itself
        run_partitions(replace(config, teacher=str(missing), out=str(tmp_path / "ray"), engine="ray", ray_address=cluster))
    assert type(raised.value) is TeacherError  # not Ray's wrapper, whose text is the worker's traceback
    assert str(missing) in raised.value.one_line()


def test_a_ray_build_resumes_a_store_started_with_another_number_of_partitions(cluster, setup, tmp_path):
    config, folder = setup
    out = tmp_path / "store"
    with one_torch_thread():
        build(replace(config, out=str(out), num_partitions=3, partition=1))  # one of three, here
    result = run_partitions(replace(config, out=str(out), engine="ray", ray_address=cluster, num_partitions=1))
    assert result.finished and "ran 3 partitions as Ray tasks on 2 node(s)" in result.summary_lines()
    assert _rows_sha256(out) == _rows_sha256(folder / "single")


# -- kdstore generate and kdstore score: the same engine ------------------------------------------
GENERATIONS = ("generations",)


@pytest.fixture(scope="module")
def generate_setup(tmp_path_factory, tiny_teacher):
    """A GenerateConfig of many small units and shards (a partition takes a few seconds), and its two partitions
    generated in this process with one torch thread (folder/local), as in ``setup``."""
    from test_generate import prompt_file

    folder = tmp_path_factory.mktemp("ray-generate")
    prompts = prompt_file(folder / "prompts.jsonl", num_prompts=160)
    config = GenerateConfig(prompts=str(prompts), teacher=str(tiny_teacher), n=2, k=8, max_new_tokens=24,
                            batch_size=4, unit_prompts=2, shard_bytes=6_000, row_group_bytes=3_000, progress=False,
                            device="cpu", num_partitions=2)
    with one_torch_thread():
        for partition in range(2):
            generate(replace(config, out=str(folder / "local"), partition=partition))
    return config, folder


def test_a_ray_generate_writes_the_store_a_local_generate_writes(cluster, generate_setup, tmp_path):
    config, folder = generate_setup
    seen: list[dict] = []
    result = run_partitions(replace(config, out=str(tmp_path / "ray"), engine="ray", ray_address=cluster),
                            on_progress=lambda progress: seen.append(dict(progress)))
    assert result.finished
    assert result.num_completions == open_store(folder / "local", tables=GENERATIONS).manifest.num_sequences
    assert _shards(tmp_path / "ray") == _shards(folder / "local")  # same shards, same sha256s
    assert verify_store(open_store(tmp_path / "ray", tables=GENERATIONS)) == []
    final = seen[-1]
    assert sorted(final) == [0, 1] and all(state.done and state.num_units_done == state.num_units > 0 for state in
                                           final.values())  # per partition: prompts done of its prompts
    assert sum(state.num_units for state in final.values()) == 160
    assert "ran 2 partitions as Ray tasks on 2 node(s)" in result.summary_lines()


def test_a_generate_worker_killed_mid_partition_is_rerun_and_the_store_is_still_identical(cluster, generate_setup,
                                                                                          tmp_path):
    config, folder = generate_setup
    out = tmp_path / "ray"
    run_killing_partition_0(replace(config, ray_address=cluster), out)
    assert _shards(out) == _shards(folder / "local")
    assert verify_store(open_store(out, tables=GENERATIONS)) == []


def test_kdstore_score_engine_ray_writes_the_score_files_a_local_score_writes(cluster, setup, tmp_path):
    config, folder = setup
    local, on_ray = (Path(shutil.copytree(folder / "local", tmp_path / name)) for name in ("local", "ray"))
    with one_torch_thread():
        for partition in range(2):
            score_store(ScoreConfig(store=str(local), reference=config.teacher, device="cpu", progress=False,
                                    num_partitions=2, partition=partition))
    result = CliRunner().invoke(cli, ["score", str(on_ray), "--reference", config.teacher, "--engine", "ray",
                                      "--ray-address", cluster])  # --num-partitions 1: one per worker slot
    assert result.exit_code == 0, result.output
    assert "ran 2 partitions as Ray tasks on 2 node(s)" in result.output and "partition 1" in result.output  # its bar
    scores = [json.loads((store / "manifest.json").read_text())["scores"] for store in (local, on_ray)]
    assert scores[0]["files"] and scores[1] == scores[0]  # every score file with the same sha256
    assert verify_store(open_store(on_ray)) == []
