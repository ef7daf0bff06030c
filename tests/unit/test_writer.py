"""ShardWriter: atomic shards, manifest last, nothing committed on error, resume, locks, partitions."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import make_manifest, synthetic_rows, write_store
from kdstore.card import is_kdstore_card
from kdstore.codec import CodecConfig
from kdstore.errors import KdstoreError, ManifestError, OutputFolderError, StoreLockedError, StoreMismatchError
from kdstore.format import logits_schema, rows_to_table
from kdstore.store import open_store
from kdstore.verify import verify_store
from kdstore.writer import ShardWriter, _copy_tree_atomic, _file_contents, row_bytes, temporary_name, write_atomic

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
    assert verify_store(store) == []


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
    assert verify_store(open_store(tmp_path / "s")) == []


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
    assert verify_store(store) == []


def test_partitions_must_agree_on_their_number(tmp_path, codec):
    schema = logits_schema(codec)
    with ShardWriter(tmp_path / "s", make_manifest(codec), schema, partition=0, num_partitions=2):
        pass
    with pytest.raises(StoreMismatchError, match="num_partitions"):
        with ShardWriter(tmp_path / "s", make_manifest(codec), schema, partition=0, num_partitions=3):
            pass


# -- row groups are cut by bytes, whatever tables the rows arrive in ---------------------------------------
def _write_tables(path: Path, codec: CodecConfig, tables, **args) -> list[list[int]]:
    """Write ``tables`` (lists of rows) and return the rows per row group of every shard."""
    schema = logits_schema(codec)
    with ShardWriter(path, make_manifest(codec), schema, **args) as writer:
        for rows in tables:
            writer.write(rows_to_table(schema, rows))
    files = [pq.ParquetFile(path / s.path) for s in open_store(path).manifest.shards]
    return [[f.metadata.row_group(i).num_rows for i in range(f.num_row_groups)] for f in files]


def test_rows_written_as_one_table_are_cut_into_row_groups_of_row_group_bytes(tmp_path, codec):
    rows = synthetic_rows(codec, 40, 17)
    sizes = row_bytes(rows_to_table(logits_schema(codec), rows))
    groups = _write_tables(tmp_path / "s", codec, [rows], shard_bytes=1 << 30, row_group_bytes=3000)
    assert len(groups) == 1 and len(groups[0]) > 5  # it used to be one row group per table written
    first = 0
    for num_rows in groups[0][:-1]:  # each closes at the first row that brings it to 3000 bytes
        group = sizes[first:first + num_rows]
        assert group.sum() >= 3000 > group[:-1].sum()
        first += num_rows


def test_the_same_rows_give_the_same_shards_however_they_are_grouped_into_tables(tmp_path, codec):
    rows = synthetic_rows(codec, 40, 17)
    rng = np.random.default_rng(0)
    cuts = sorted(rng.choice(np.arange(1, 40), 6, replace=False))
    groupings = {"one": [rows], "each": [[r] for r in rows], "random": np.split(np.array(rows, dtype=object), cuts)}
    args = {"shard_bytes": 9000, "row_group_bytes": 2000}
    layouts = {name: _write_tables(tmp_path / name, codec, [list(t) for t in tables], **args)
               for name, tables in groupings.items()}
    assert layouts["one"] == layouts["each"] == layouts["random"] and len(layouts["one"]) > 1
    assert _content(tmp_path / "one") == _content(tmp_path / "each") == _content(tmp_path / "random")


def test_resume_after_a_failure_mid_table_equals_the_uninterrupted_store(tmp_path, codec):
    rows = synthetic_rows(codec, 30, 17)
    schema = logits_schema(codec)
    args = {"shard_bytes": 6000, "row_group_bytes": 1500}
    _write_tables(tmp_path / "whole", codec, [rows[:13], rows[13:]], **args)
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "resumed", make_manifest(codec), schema, **args) as writer:
            writer.write(rows_to_table(schema, rows[:25]))
            raise RuntimeError("killed")
    with ShardWriter(tmp_path / "resumed", make_manifest(codec), schema, **args) as writer:
        assert 0 < writer.num_committed_rows < 25
        for start in range(writer.num_committed_rows, 30, 7):  # other tables than the first run's
            writer.write(rows_to_table(schema, rows[start:start + 7]))
    assert _content(tmp_path / "whole") == _content(tmp_path / "resumed")


def test_row_bytes_count_values_and_offsets_of_each_row_alone(codec):
    table = rows_to_table(logits_schema(codec), synthetic_rows(codec, 6, 17))
    sizes = row_bytes(table)
    assert sizes.tolist() == [row_bytes(table.slice(i, 1))[0] for i in range(6)]
    assert abs(sizes.sum() - table.nbytes) < 0.02 * table.nbytes  # within 2 % of Arrow's own count


def test_row_group_bytes_above_shard_bytes_is_refused_naming_both(tmp_path, codec):
    with pytest.raises(KdstoreError, match="row_group_bytes .* got 5000 and 4000"):
        ShardWriter(tmp_path / "s", make_manifest(codec), logits_schema(codec), shard_bytes=4000, row_group_bytes=5000)


# -- temporary names, the tokenizer copy, the user's folder and README -------------------------------------
def test_temporary_names_are_unique_and_name_the_process(tmp_path):
    names = {temporary_name(tmp_path / "manifest.json") for _ in range(100)}
    assert len(names) == 100
    assert all(n.name.startswith(f"manifest.json.{os.getpid()}-") and n.suffix == ".tmp" for n in names)
    (tmp_path / "manifest.json.tmp").mkdir()  # the name every writer used to share, here held by someone else
    write_atomic(tmp_path / "manifest.json", "{}")
    assert (tmp_path / "manifest.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "manifest.json.tmp"]


def test_tokenizer_copy_accepts_an_identical_copy_another_writer_renamed_first(tmp_path, monkeypatch):
    source = tmp_path / "scratch"
    source.mkdir()
    (source / "tokenizer.json").write_text('{"v": 1}')
    target = tmp_path / "store" / "tokenizer"
    target.parent.mkdir()
    real_rename = os.rename

    def other_writer_wins(src, dst):  # another process renames its copy into place just before this one
        shutil.copytree(source, dst)
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", other_writer_wins)
    _copy_tree_atomic(source, target)
    monkeypatch.undo()
    assert sorted(p.name for p in target.parent.iterdir()) == ["tokenizer"]  # its own copy is cleaned up
    _copy_tree_atomic(source, target)  # already there and identical: fine
    (source / "tokenizer.json").write_text('{"v": 2}')
    with pytest.raises(StoreMismatchError, match="other files than this build's tokenizer"):
        _copy_tree_atomic(source, target)


def _listing(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() if p.is_file() else b"" for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize("files", [{"README.md": "my notes\n", "data.csv": "a,b\n"}, {"README.md": "# mine\n"},
                                   {"shards/x.parquet": "mine"}])
def test_a_folder_holding_other_files_is_refused_and_left_untouched(tmp_path, codec, files):
    folder = tmp_path / "mine"
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    before = _listing(folder)
    with pytest.raises(OutputFolderError, match="is not empty .* not a kdstore store"):
        with ShardWriter(folder, make_manifest(codec), logits_schema(codec)):
            pass
    assert _listing(folder) == before  # no _locks/, shards/ or _partitions/ either


@pytest.mark.parametrize("text, problem", [("ship cargo\n", "not JSON"), ('{"name": "my-app"}', "not a kdstore manifest"),
                                           ("[1, 2]", "not a kdstore manifest")])
def test_a_manifest_json_that_is_not_a_kdstore_manifest_is_one_clear_error(tmp_path, codec, text, problem):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "manifest.json").write_text(text)
    with pytest.raises(OutputFolderError, match=problem):
        with ShardWriter(tmp_path / "s", make_manifest(codec), logits_schema(codec)):
            pass
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["manifest.json"]


def test_a_damaged_partition_record_is_one_clear_error(tmp_path, codec):
    with ShardWriter(tmp_path / "s", make_manifest(codec), logits_schema(codec), partition=1, num_partitions=2):
        pass
    (tmp_path / "s" / "_partitions" / "part-00001.json").write_text('{"partition": 1, ')
    with pytest.raises(ManifestError, match="part-00001.json is not JSON") as raised:
        with ShardWriter(tmp_path / "s", make_manifest(codec), logits_schema(codec), partition=0, num_partitions=2):
            pass
    assert "rerun partition 1" in raised.value.hint


def test_a_store_being_built_or_finished_is_written_into(tmp_path, codec):
    write_store(tmp_path / "s", codec)  # finished: extending it is allowed
    shutil.rmtree(tmp_path / "s" / "_locks")
    shutil.rmtree(tmp_path / "s" / "_partitions")
    write_store(tmp_path / "s", codec)
    (tmp_path / "p" / "_locks").mkdir(parents=True)  # begun by a writer of another partition
    (tmp_path / "p" / "tokenizer").mkdir()
    write_store(tmp_path / "p", codec, partition=1, num_partitions=2)
    shutil.copytree(tmp_path / "p" / "shards", tmp_path / "copied" / "shards")  # a partition built elsewhere, copied
    with ShardWriter(tmp_path / "copied", make_manifest(codec), logits_schema(codec), partition=0, num_partitions=2):
        pass
    assert (tmp_path / "copied" / "_partitions" / "part-00000.json").exists()


def test_a_users_readme_in_the_store_folder_is_never_overwritten(tmp_path, codec):
    write_store(tmp_path / "s", codec)
    assert is_kdstore_card((tmp_path / "s" / "README.md").read_text())
    (tmp_path / "s" / "README.md").write_text("# My experiment\n")
    write_store(tmp_path / "s", codec, seed=1)
    assert (tmp_path / "s" / "README.md").read_text() == "# My experiment\n"


def test_a_mismatch_names_the_field_that_differs_and_both_values(tmp_path, codec):
    write_store(tmp_path / "s", codec)
    other = CodecConfig(k=4, vocab_size=300)
    with pytest.raises(StoreMismatchError, match=r"different codec than this build: codec.k is 8 in the store, 4 in this build"):
        with ShardWriter(tmp_path / "s", make_manifest(other), logits_schema(other)):
            pass
    with pytest.raises(StoreMismatchError, match=r"build.seq_len is \(absent\) in the store, 999 in this build"):
        with ShardWriter(tmp_path / "s", make_manifest(codec, seq_len=999), logits_schema(codec)):
            pass


def _racing_writer(folder: Path, source: Path, barrier, rounds: int, errors) -> None:
    for r in range(rounds):
        barrier.wait()  # every process at once: what partitions started together into one folder do
        try:
            _copy_tree_atomic(source, folder / f"tokenizer-{r}")
            write_atomic(folder / f"manifest-{r}.json", json.dumps({"round": r}))
        except Exception as exc:  # reported to the test, which lists them
            errors.put(f"{type(exc).__name__}: {exc}")


def test_processes_copying_the_tokenizer_and_writing_one_file_at_the_same_moment_never_fail(tmp_path):
    import multiprocessing

    source = tmp_path / "scratch"
    source.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (source / name).write_text(json.dumps({name: list(range(20_000))}))
    context = multiprocessing.get_context("spawn")  # fork would copy this process's threads' state
    barrier, errors = context.Barrier(4), context.Queue()
    processes = [context.Process(target=_racing_writer, args=(tmp_path, source, barrier, 30, errors)) for _ in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert found == [] and all(p.exitcode == 0 for p in processes)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []
    assert all(_file_contents(tmp_path / f"tokenizer-{r}") == _file_contents(source) for r in range(30))
