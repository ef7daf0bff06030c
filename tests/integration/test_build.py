"""`kdstore build` end to end with real (tiny) transformers teachers and real files."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from conftest import save_tiny_teacher, write_word_corpus
from kdstore.build import DEFAULT_TEACHER
from kdstore.cli.main import cli
from kdstore.store import open_store
from kdstore.verify import verify_store
from kdstore.writer import DEFAULT_ROW_GROUP_BYTES, row_bytes


def run(*args) -> object:
    return CliRunner().invoke(cli, ["build", *map(str, args)])


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    return [line for line in result.output.splitlines() if line.strip()][-1]


def store_rows(path: Path) -> dict[str, tuple]:
    """sequence id -> its decoded content, for comparing stores written differently."""
    store = open_store(path)
    return {s["sequence_id"]: tuple(np.asarray(s[k]).tobytes() for k in sorted(s) if k != "sequence_id")
            for s in store.iter_sequences()}


def test_build_writes_a_store_that_verifies_and_records_its_provenance(tmp_path, tiny_teacher, word_corpus):
    result = run(word_corpus, "--teacher", tiny_teacher, "--out", tmp_path / "s", "-k", "8", "--seq-len", "24")
    assert result.exit_code == 0, result.output
    assert "bytes/token" in result.output
    store = open_store(tmp_path / "s")
    assert verify_store(store) == []
    manifest = store.manifest
    assert manifest.teacher["vocab_size"] == 320 and manifest.teacher["content_sha256"]
    assert manifest.tokenizer["special_ids"] == {"bos": 1, "eos": 2, "pad": 0, "unk": 3}
    assert manifest.build["seq_len"] == 24 and manifest.codec["k"] == 8
    assert (tmp_path / "s" / "tokenizer" / "tokenizer.json").exists()
    first = next(store.iter_sequences())
    assert first["input_ids"][0] == 1 and len(first["input_ids"]) <= 24
    assert all(np.isfinite(first["teacher_score"]) for first in [first])


def test_stored_logprobs_match_a_dense_log_softmax_of_the_teacher(tmp_path, tiny_teacher, word_corpus):
    from transformers import AutoModelForCausalLM

    assert run(word_corpus, "--teacher", tiny_teacher, "--out", tmp_path / "s", "-k", "8", "--seq-len", "24").exit_code == 0
    store = open_store(tmp_path / "s")
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    bound = store.codec.codebook.log_step / 2 + 1e-4
    for sequence in list(store.iter_sequences())[:5]:
        with torch.no_grad():
            dense = torch.log_softmax(model(torch.tensor(sequence["input_ids"][None], dtype=torch.long)).logits[0, :-1], -1)
        want = torch.gather(dense, 1, torch.from_numpy(sequence["topk_ids"].astype(np.int64)))
        assert (want - torch.from_numpy(sequence["topk_logprobs"])).abs().max() <= bound
        assert set(sequence["topk_ids"][0]) == set(dense[0].topk(8).indices.tolist())
        target = dense[torch.arange(len(dense)), torch.from_numpy(sequence["input_ids"][1:].astype(np.int64))]
        assert (target - torch.from_numpy(sequence["target_logprob"])).abs().max() <= bound


def test_systematic_draws_give_every_id_the_floor_or_ceiling_of_its_expected_count(tmp_path, tiny_teacher, word_corpus):
    from transformers import AutoModelForCausalLM

    result = run(word_corpus, "--teacher", tiny_teacher, "-k", "1", "--seq-len", "24", "--sampled-draws", "32",
                 "--out", tmp_path / "s")  # systematic is the default scheme
    assert result.exit_code == 0, result.output
    store = open_store(tmp_path / "s")
    assert store.manifest.codec["sampled"] == {"draws": 32, "mode": "full", "scheme": "systematic"}
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    num_checked = 0
    for sequence in list(store.iter_sequences())[:5]:
        with torch.no_grad():
            logits = model(torch.tensor(sequence["input_ids"][None], dtype=torch.long)).logits[0, :-1]
        expected = 32 * torch.softmax(logits.double(), -1)  # draws each id should get on average
        offsets = sequence["sampled_offsets"]
        for t in range(len(offsets) - 1):
            counts = torch.zeros_like(expected[t])
            ids = torch.from_numpy(sequence["sampled_ids"][offsets[t]:offsets[t + 1]].astype(np.int64))
            counts[ids] = torch.from_numpy(sequence["sampled_counts"][offsets[t]:offsets[t + 1]]).double()
            # iid draws would leave an id with 32 p = 3.5 anywhere from 0 to 32 draws; systematic ones give 3 or 4
            assert ((expected[t] - 1e-6).floor() <= counts).all() and (counts <= (expected[t] + 1e-6).ceil()).all()
            num_checked += 1
    assert num_checked > 50


def test_partitioned_build_holds_the_same_sequences_as_a_single_one(tmp_path, tiny_teacher):
    corpus = write_word_corpus(tmp_path / "corpus", num_files=4, docs_per_file=6)
    common = ["--teacher", tiny_teacher, "-k", "4", "--seq-len", "16"]
    assert run(corpus, "--out", tmp_path / "one", *common).exit_code == 0
    for partition in (1, 2, 0):
        assert not (tmp_path / "three" / "manifest.json").exists()
        result = run(corpus, "--out", tmp_path / "three", *common, "--num-partitions", "3", "--partition", partition)
        assert result.exit_code == 0, result.output
    assert store_rows(tmp_path / "one") == store_rows(tmp_path / "three")
    assert verify_store(open_store(tmp_path / "three")) == []
    assert "store" in CliRunner().invoke(cli, ["build", "--finalize", "--out", str(tmp_path / "three")]).output


def test_torchrun_ranks_build_the_partitions_of_one_store(tmp_path, tiny_teacher):
    corpus = write_word_corpus(tmp_path / "corpus", num_files=4, docs_per_file=6)
    common = ["--teacher", str(tiny_teacher), "-k", "4", "--seq-len", "16", "--device", "cpu"]
    assert run(corpus, "--out", tmp_path / "one", *common).exit_code == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run([*torchrun, "-m", "kdstore.cli.main", "build", str(corpus), "--out", str(tmp_path / "ranks"),
                           *common], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[:6000]
    assert sorted(p.name for p in (tmp_path / "ranks" / "_partitions").iterdir()) == ["part-00000.json", "part-00001.json"]
    assert store_rows(tmp_path / "one") == store_rows(tmp_path / "ranks")
    assert verify_store(open_store(tmp_path / "ranks")) == []


def test_explicit_partition_flags_win_over_the_launcher_environment(monkeypatch):
    from kdstore.build import resolved_config

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert (resolved_config({}, None).num_partitions, resolved_config({}, None).partition) == (4, 3)
    explicit = resolved_config({"num_partitions": 2, "partition": 0}, None)
    assert (explicit.num_partitions, explicit.partition) == (2, 0)


def test_build_config_file_is_read_and_flags_override_it(tmp_path, tiny_teacher, word_corpus):
    config = tmp_path / "build.toml"
    config.write_text(f'teacher = "{tiny_teacher}"\nk = 5\nseq_len = 20\nsampled_draws = 16\nsampled_mode = "tail"\n'
                      'sampled_scheme = "iid"\n')
    result = run(word_corpus, "--config", config, "-k", "6", "--out", tmp_path / "s")
    assert result.exit_code == 0, result.output
    store = open_store(tmp_path / "s")
    assert store.codec.k == 6 and store.manifest.build["seq_len"] == 20
    assert (store.codec.sampled_draws, store.codec.sampled_scheme) == (16, "iid") and verify_store(store) == []
    sequence = next(store.iter_sequences())
    offsets = sequence["sampled_offsets"]
    for t in range(len(offsets) - 1):  # tail draws never hit a top-K id
        assert not set(sequence["sampled_ids"][offsets[t]:offsets[t + 1]]) & set(sequence["topk_ids"][t])
        assert sequence["sampled_counts"][offsets[t]:offsets[t + 1]].sum() == 16


def test_unknown_config_key_is_one_line(tmp_path, word_corpus):
    config = tmp_path / "build.toml"
    config.write_text("kay = 5\n")
    assert "unknown keys: kay" in one_line_error(run(word_corpus, "--config", config))


def test_empty_corpus_is_one_line(tmp_path, tiny_teacher):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("  \n\n \n")
    line = one_line_error(run(tmp_path / "empty", "--teacher", tiny_teacher, "--out", tmp_path / "s"))
    assert "no documents" in line
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_whitespace_documents_are_skipped_and_counted(tmp_path, tiny_teacher):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("w1 w2 w3\n\n   \n\n\t\n\nw4 w5\n")
    result = run(tmp_path / "c", "--teacher", tiny_teacher, "--out", tmp_path / "s", "-k", "4")
    assert result.exit_code == 0, result.output
    assert open_store(tmp_path / "s").manifest.num_sequences == 2


def test_non_utf8_names_file_and_offset_unless_replace(tmp_path, tiny_teacher):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "bad.txt").write_bytes(b"w1 w2\n\nw3 \xff w4\n")
    line = one_line_error(run(tmp_path / "c", "--teacher", tiny_teacher, "--out", tmp_path / "s", "-k", "4"))
    assert "bad.txt" in line and "offset" in line
    result = run(tmp_path / "c", "--teacher", tiny_teacher, "--out", tmp_path / "s2", "-k", "4", "--errors", "replace")
    assert result.exit_code == 0, result.output


def test_sequence_longer_than_the_teacher_allows_is_one_line(tmp_path, tiny_teacher, word_corpus):
    line = one_line_error(run(word_corpus, "--teacher", tiny_teacher, "--out", tmp_path / "s", "--seq-len", "4096"))
    assert "above the teacher's maximum of 512" in line


def test_k_larger_than_the_vocabulary_is_one_line(tmp_path, tiny_teacher, word_corpus):
    line = one_line_error(run(word_corpus, "--teacher", tiny_teacher, "--out", tmp_path / "s", "-k", "1000"))
    assert "K=1000" in line and "320" in line


def test_teacher_with_nan_logits_stops_naming_the_sequence(tmp_path, word_corpus):
    from transformers import AutoModelForCausalLM

    folder = save_tiny_teacher(tmp_path / "nan")
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(folder)
    line = one_line_error(run(word_corpus, "--teacher", folder, "--out", tmp_path / "s", "-k", "4"))
    assert "NaN or inf logits for sequence" in line
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_tokenizer_larger_than_the_logit_dimension_is_refused(tmp_path, word_corpus):
    folder = save_tiny_teacher(tmp_path / "t", vocab_size=100, words=300)
    line = one_line_error(run(word_corpus, "--teacher", folder, "--out", tmp_path / "s", "-k", "4"))
    assert "304 tokens" in line and "100 logits" in line


def test_tokenizer_smaller_than_the_logit_dimension_is_recorded(tmp_path, word_corpus):
    folder = save_tiny_teacher(tmp_path / "t", vocab_size=400, words=300)
    assert run(word_corpus, "--teacher", folder, "--out", tmp_path / "s", "-k", "4").exit_code == 0
    manifest = open_store(tmp_path / "s").manifest
    assert (manifest.teacher["vocab_size"], manifest.tokenizer["vocab_size"]) == (400, 304)


def test_building_into_a_store_of_another_teacher_is_refused(tmp_path, tiny_teacher, word_corpus):
    assert run(word_corpus, "--teacher", tiny_teacher, "--out", tmp_path / "s", "-k", "4").exit_code == 0
    other = save_tiny_teacher(tmp_path / "other", seed=1)
    line = one_line_error(run(word_corpus, "--teacher", other, "--out", tmp_path / "s", "-k", "4"))
    assert "different teacher" in line


def test_output_folder_that_cannot_be_created_is_one_line(tmp_path, tiny_teacher, word_corpus):
    (tmp_path / "file").write_text("not a folder")
    line = one_line_error(run(word_corpus, "--teacher", tiny_teacher, "--out", tmp_path / "file" / "s", "-k", "4"))
    assert "cannot write the store" in line


def test_full_disk_is_one_line_and_a_rerun_finishes(tmp_path, tiny_teacher, word_corpus):
    """A real failed write: the file-size limit makes write() fail with EFBIG, as a full disk fails with ENOSPC."""
    import resource

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    command = [sys.executable, "-m", "kdstore.cli.main", "build", str(word_corpus), "--teacher", str(tiny_teacher),
               "--out", str(tmp_path / "s"), "-k", "4"]
    failed = subprocess.run(command, capture_output=True, text=True, preexec_fn=limit_file_size)
    assert failed.returncode == 1, failed.stderr
    assert failed.stderr.strip().splitlines()[-1].startswith("Error: cannot write the store")
    assert "Traceback" not in failed.stderr
    assert not (tmp_path / "s" / "manifest.json").exists()
    assert subprocess.run(command, capture_output=True).returncode == 0
    assert verify_store(open_store(tmp_path / "s")) == []


def test_second_build_of_the_same_partition_is_refused_by_the_lock(tmp_path, tiny_teacher, word_corpus):
    import fcntl

    (tmp_path / "s" / "_locks").mkdir(parents=True)
    with open(tmp_path / "s" / "_locks" / "part-00000.lock", "a+") as held:  # what a running writer holds
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        line = one_line_error(run(word_corpus, "--teacher", tiny_teacher, "--out", tmp_path / "s", "-k", "4"))
    assert "being written by another process" in line


def _holds_a_flock(pid: int) -> bool:
    """Whether process ``pid`` holds a flock (the writer's partition lock): /proc/locks, without touching the lock."""
    return any(line.split()[1] == "FLOCK" and line.split()[4] == str(pid)
               for line in Path("/proc/locks").read_text().splitlines() if len(line.split()) > 4)


def _start_and_wait_for_the_build_phase(command: list[str]) -> subprocess.Popen | None:
    """Start a build; return it once it holds its partition lock (teacher loaded, writing), None if it ended first."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not _holds_a_flock(process.pid):
        if process.poll() is not None:
            return None
        time.sleep(0.005)
    return process


def test_kill_9_at_20_random_points_then_rerun_gives_the_uninterrupted_store(tmp_path, tiny_teacher):
    corpus = write_word_corpus(tmp_path / "corpus", num_files=6, docs_per_file=12)
    config = tmp_path / "build.toml"
    config.write_text(f'teacher = "{tiny_teacher}"\nk = 8\nseq_len = 16\nunit_documents = 2\n'
                      f'shard_bytes = 6000\nprogress = false\ndevice = "cpu"\n')
    command = [sys.executable, "-m", "kdstore.cli.main", "build", str(corpus), "--config", str(config), "--out"]
    whole_run = _start_and_wait_for_the_build_phase([*command, str(tmp_path / "whole")])
    started = time.perf_counter()
    assert whole_run is not None and whole_run.wait() == 0
    build_seconds = time.perf_counter() - started  # lock held to exit: the window the kills fall in
    whole = json.loads((tmp_path / "whole" / "manifest.json").read_text())
    whole.pop("created_at")

    def assert_same_as_whole(path: Path) -> None:
        finished = json.loads((path / "manifest.json").read_text())
        finished.pop("created_at")
        assert finished == whole  # same shards, same sha256: byte-identical content
        assert verify_store(open_store(path)) == []

    rng = random.Random(7)
    target = tmp_path / "killed"
    kills_while_writing = 0
    for _ in range(60):  # attempts; a resumed run with little left may finish before its kill
        process = _start_and_wait_for_the_build_phase([*command, str(target)])
        if process is not None:
            time.sleep(rng.uniform(0.0, build_seconds))
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                kills_while_writing += 1
            process.wait()
        if (target / "manifest.json").exists():  # this chain of kills ended in a finished store: check, start another
            assert_same_as_whole(target)
            shutil.rmtree(target)
        if kills_while_writing >= 20:
            break
    assert kills_while_writing >= 20
    assert subprocess.run([*command, str(target)], capture_output=True).returncode == 0
    assert_same_as_whole(target)


# -- the user's folders ----------------------------------------------------------------------------------------
def _listing(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() if p.is_file() else b"" for p in sorted(path.rglob("*"))}


def test_build_into_a_folder_of_other_files_is_refused_touching_nothing(tmp_path, tiny_teacher, word_corpus):
    mine = tmp_path / "mine"
    (mine / "data").mkdir(parents=True)
    (mine / "README.md").write_text("# My thesis\n")
    (mine / "data" / "results.csv").write_text("a,b\n1,2\n")
    before = _listing(mine)
    line = one_line_error(run(word_corpus, "--teacher", tiny_teacher, "--out", mine, "-k", "4"))
    assert f"{mine} is not empty (README.md, data) and is not a kdstore store" in line and "new or empty --out" in line
    assert _listing(mine) == before  # the README is the user's, and no _locks/ or shards/ appeared


def test_build_into_a_folder_whose_manifest_json_is_not_json_is_one_line(tmp_path, tiny_teacher, word_corpus):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.json").write_text("my ship's cargo manifest\n")
    line = one_line_error(run(word_corpus, "--teacher", tiny_teacher, "--out", tmp_path / "out", "-k", "4"))
    assert "manifest.json is not JSON" in line
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["manifest.json"]


def test_a_write_error_names_what_failed_and_only_a_full_disk_asks_for_space(tmp_path, tiny_teacher, word_corpus):
    (tmp_path / "s" / "_locks").mkdir(parents=True)  # a store being built, whose shards/ is a file
    (tmp_path / "s" / "shards").write_text("in the way")
    line = one_line_error(run(word_corpus, "--teacher", tiny_teacher, "--out", tmp_path / "s", "-k", "4"))
    assert line.startswith(f"Error: cannot write the store at {tmp_path / 's'}: File exists ({tmp_path / 's' / 'shards'})")
    assert "free space" not in line


def _cli_process(args: list[str], log: str) -> None:
    """A partition process: ``kdstore ARGS`` as the installed command runs it, its stderr into ``log``."""
    import contextlib

    from kdstore.cli.main import cli

    with open(log, "w") as stderr, contextlib.redirect_stderr(stderr):
        cli.main(args=args, prog_name="kdstore")  # exits with the command's status


def test_four_partition_processes_started_at_once_into_an_empty_folder_never_fail(tmp_path, tiny_teacher):
    """They used to race on one temporary name for the tokenizer copy (and the error asked to free disk space).

    Each round forks 4 processes at the same moment from a server that imported kdstore, torch and transformers
    once: real processes running the real command, started closer together than 4 `python -m kdstore.cli.main`
    (whose imports take ~4 s of CPU each and spread the starts by ~0.3 s), so the race is hit, not skirted.
    """
    import multiprocessing

    corpus = write_word_corpus(tmp_path / "corpus", num_files=4, docs_per_file=2)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["kdstore.cli.main", "kdstore.build", "transformers", "tokenizers",
                                    "transformers.models.llama.modeling_llama"])
    failures = []
    for attempt in range(10):
        out = tmp_path / f"store{attempt}"
        out.mkdir()
        args = ["build", str(corpus), "--teacher", str(tiny_teacher), "-k", "4", "--seq-len", "16", "--device", "cpu",
                "--num-partitions", "4", "--out", str(out)]
        logs = [tmp_path / f"log{attempt}-{i}.txt" for i in range(4)]
        processes = [context.Process(target=_cli_process, args=([*args, "--partition", str(i)], str(log)))
                     for i, log in enumerate(logs)]
        for process in processes:
            process.start()
        for process, log in zip(processes, logs):
            process.join(timeout=120)
            if process.exitcode != 0:
                failures.append(f"{process.exitcode}: {log.read_text()[-500:]}")
        verified = CliRunner().invoke(cli, ["verify", str(out)])
        assert verified.exit_code == 0 and verified.output.startswith("OK"), verified.output
        assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []
    assert failures == []


# -- row groups --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hundred_sequence_store(tmp_path_factory):
    """~100 sequences of the bundled corpus through the bundled teacher, every setting at its default."""
    from kdstore.build import DEFAULT_CORPUS

    folder = tmp_path_factory.mktemp("hundred")
    (folder / "corpus").mkdir()
    for name in ("fables.txt", "history.txt", "science.txt", "stories.txt"):
        shutil.copy(Path(DEFAULT_CORPUS) / name, folder / "corpus" / name)
    result = run(folder / "corpus", "--out", folder / "store", "--device", "cpu")
    assert result.exit_code == 0, result.output
    return folder / "store"


def test_default_row_groups_let_four_ranks_stream_a_store_of_about_100_sequences(hundred_sequence_store):
    from kdstore.loader import StreamingDataset
    from kdstore.shuffle import PlanConfig

    store = open_store(hundred_sequence_store)
    assert 90 <= store.manifest.num_sequences <= 110
    num_row_groups = sum(pq.ParquetFile(hundred_sequence_store / s.path).num_row_groups for s in store.manifest.shards)
    assert num_row_groups >= 6  # one row group per work unit (here: per file) gave 4, which 4 ranks would share
    seen = set()
    for rank in range(4):
        dataset = StreamingDataset(hundred_sequence_store, PlanConfig(batch_size=2), rank=rank, num_ranks=4)
        batches = list(dataset)
        assert len(batches) == len(dataset) > 0 and all(len(b) == 2 for b in batches)
        seen |= {sample["sequence_id"] for batch in batches for sample in batch}
    assert len(seen) == store.manifest.num_sequences


def test_the_torchrun_example_trains_on_four_ranks_of_a_small_built_store(hundred_sequence_store, tmp_path):
    example = Path(__file__).parents[2] / "examples" / "train_ddp.py"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", str(example),
                str(hundred_sequence_store), "--steps", "2", "--batch-size", "2", "--workers", "0"]
    done = subprocess.run(torchrun, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "done: 2 steps on 4 ranks" in done.stdout


def test_row_group_bytes_from_build_toml_sets_the_row_groups(tmp_path, tiny_teacher, word_corpus):
    config = tmp_path / "build.toml"
    config.write_text("row_group_bytes = 4000\n")
    result = run(word_corpus, "--teacher", tiny_teacher, "--out", tmp_path / "s", "-k", "8", "--config", config)
    assert result.exit_code == 0, result.output
    store = open_store(tmp_path / "s")
    files = [pq.ParquetFile(tmp_path / "s" / s.path) for s in store.manifest.shards]
    assert sum(f.num_row_groups for f in files) > 3  # one row group per work unit before: here the corpus is one unit
    columns = store.manifest.columns
    for f in files:  # every row group but a shard's last holds at least row_group_bytes of Arrow rows
        for i in range(f.num_row_groups - 1):
            assert row_bytes(f.read_row_group(i, columns=columns)).sum() >= 4000


def test_the_partition_error_hint_names_a_build_setting_that_exists():
    from kdstore.build import BuildConfig
    from kdstore.errors import PartitionError

    assert "row_group_bytes" in PartitionError.hint and "row_group_bytes" in {f.name for f in dataclasses.fields(BuildConfig)}
    assert f"default {DEFAULT_ROW_GROUP_BYTES}" in PartitionError.hint
    assert BuildConfig().row_group_bytes == DEFAULT_ROW_GROUP_BYTES


# -- the teacher -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, recorded", [((), False), (("--trust-remote-code",), True)])
def test_the_manifest_records_whether_remote_code_was_on(tmp_path, tiny_teacher, word_corpus, flag, recorded):
    result = run(word_corpus, "--teacher", tiny_teacher, "--out", tmp_path / "s", "-k", "4", *flag)
    assert result.exit_code == 0, result.output
    assert open_store(tmp_path / "s").manifest.teacher["trust_remote_code"] is recorded


def test_a_teacher_folder_without_tokenizer_files_is_one_line(tmp_path, tiny_teacher, word_corpus):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (teacher / name).unlink(missing_ok=True)
    line = one_line_error(run(word_corpus, "--teacher", teacher, "--out", tmp_path / "s", "-k", "4"))
    assert f"teacher folder {teacher} has no tokenizer files" in line and "save_pretrained" in line
    assert not (tmp_path / "s").exists()


def test_truncated_teacher_weights_are_one_line_naming_the_file(tmp_path, tiny_teacher, word_corpus):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    weights = teacher / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    line = one_line_error(run(word_corpus, "--teacher", teacher, "--out", tmp_path / "s", "-k", "4", "--device", "cpu"))
    assert "model.safetensors is truncated or damaged" in line and "again" in line


@pytest.mark.parametrize("name", ["./my-teacher", "../models/my-teacher", "/no/such/teacher", "models/org/name"])
def test_a_teacher_path_that_does_not_exist_says_so(tmp_path, word_corpus, name):
    line = one_line_error(run(word_corpus, "--teacher", name, "--out", tmp_path / "s"))
    assert f"teacher folder {name} does not exist" in line and "Repo id" not in line


def test_an_unknown_device_is_one_line(tmp_path, tiny_teacher, word_corpus):
    line = one_line_error(run(word_corpus, "--teacher", tiny_teacher, "--out", tmp_path / "s", "--device", "gpu"))
    assert "--device 'gpu' is not a device torch knows" in line


def test_a_store_of_another_teacher_is_refused_naming_the_field_and_both_values(tmp_path, tiny_teacher, word_corpus):
    assert run(word_corpus, "--teacher", tiny_teacher, "--out", tmp_path / "s", "-k", "4").exit_code == 0
    line = one_line_error(run(word_corpus, "--out", tmp_path / "s", "-k", "4"))  # the bundled teacher
    assert f"different teacher, tokenizer, codec than this build: teacher.model is '{tiny_teacher}' in the store, " \
           f"'{DEFAULT_TEACHER}' in this build; tokenizer.name is" in line


# -- the docs' commands work as written ---------------------------------------------------------------------
@pytest.mark.parametrize("page", ["README.md", "docs/build.md"])
def test_build_commands_of_the_docs_that_share_an_out_folder_agree(page):
    """Commands writing one --out must agree on the teacher and every setting but --partition (else: a mismatch)."""
    root = Path(__file__).parents[2]
    text = (root / page).read_text().replace("\\\n", " ")
    by_out: dict[str, set[tuple[str, ...]]] = {}
    for line in text.splitlines():
        if "kdstore build " not in line and "kdstore.cli.main build" not in line:
            continue
        words = line.split("#")[0].replace(";", " ").split()
        words = words[words.index("build") + 1:]
        settings = [w for i, w in enumerate(words) if w not in ("--partition", "&", "done", "wait")
                    and not (i and words[i - 1] == "--partition") and w != "--out" and not (i and words[i - 1] == "--out")]
        if "--out" in words and "--finalize" not in words:
            by_out.setdefault(words[words.index("--out") + 1], set()).add(tuple(settings))
    assert by_out, page
    for out, variants in by_out.items():
        assert len(variants) == 1, f"{page}: commands writing {out} differ: {variants}"


def test_a_bf16_teacher_builds_a_store_close_to_its_fp32_build(tmp_path, tiny_teacher, word_corpus):
    """--dtype bfloat16 runs the forward in bf16 and the sparsify in fp32 (the GPU path, here on the CPU)."""
    for dtype in ("float32", "bfloat16"):
        result = run(word_corpus, "--teacher", tiny_teacher, "--out", tmp_path / dtype, "-k", "8", "--seq-len", "24",
                     "--dtype", dtype)
        assert result.exit_code == 0, result.output
    fp32, bf16 = open_store(tmp_path / "float32"), open_store(tmp_path / "bfloat16")
    assert verify_store(bf16) == [] and bf16.manifest.teacher["dtype"] == "bfloat16"
    want = {s["sequence_id"]: s for s in fp32.iter_sequences()}
    differences = [np.abs(s["target_logprob"] - want[s["sequence_id"]]["target_logprob"]) for s in bf16.iter_sequences()]
    assert len(differences) == len(want)
    assert 0 < np.concatenate(differences).mean() < 0.02  # bf16 rounding moves them a little (5e-4 nats measured)


def test_a_head_cut_into_many_position_chunks_writes_the_same_store(tmp_path, tiny_teacher, word_corpus, monkeypatch):
    """Each batch's chunks are joined on the device before their one copy to the host: 7 positions a chunk (the
    large-vocabulary case) must give the shards a single chunk gives, sampled draws included."""
    import kdstore.teacher

    common = [word_corpus, "--teacher", tiny_teacher, "-k", "8", "--seq-len", "24", "--sampled-draws", "4"]
    assert run(*common, "--out", tmp_path / "one-chunk").exit_code == 0
    monkeypatch.setattr(kdstore.teacher, "HEAD_CHUNK_ELEMENTS", 7 * 320)
    assert run(*common, "--out", tmp_path / "chunks").exit_code == 0
    manifests = [json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("one-chunk", "chunks")]
    assert [s["sha256"] for s in manifests[0]["shards"]] == [s["sha256"] for s in manifests[1]["shards"]]
