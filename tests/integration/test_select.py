"""``kdstore select``: MiniPLM difference sampling into a view (read through Store by every reader) or a new store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import save_tiny_teacher, write_word_corpus
from kdstore.build import BuildConfig, build
from kdstore.errors import ViewParentChangedError
from kdstore.loader import MemoryMappedDataset, StreamingDataset, make_dataloader
from kdstore.score import ScoreConfig, score_store
from kdstore.selection import SelectConfig, choose, select
from kdstore.shuffle import PlanConfig
from kdstore.store import open_store
from kdstore.verify import verify_store


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny_teacher) -> Path:
    """A 4-shard store of the tiny teacher, scored by another tiny model with the same tokenizer."""
    root = tmp_path_factory.mktemp("select")
    reference = save_tiny_teacher(root / "reference", hidden=16, layers=1, seed=1)
    corpus = write_word_corpus(root / "corpus", num_files=4, docs_per_file=8)
    out = root / "store"
    build(BuildConfig(corpus=(str(corpus),), teacher=str(tiny_teacher), out=str(out), k=4, seq_len=16, progress=False,
                      device="cpu", shard_bytes=1500, row_group_bytes=700))
    score_store(ScoreConfig(store=str(out), reference=str(reference), device="cpu", progress=False))
    return out


def rows_by_id(store) -> dict[str, dict]:
    return {s["sequence_id"]: s for s in open_store(store).iter_sequences()}


def test_choose_keeps_the_top_fraction_in_corpus_order():
    scores = np.array([0.5, 3.0, -1.0, 2.0, 2.0, 0.0])
    assert choose(scores, 0.5, None, False, 0).tolist() == [1, 3, 4]
    assert choose(scores, 0.5, None, True, 0).tolist() == [0, 2, 5]
    assert choose(scores, 1.0, None, False, 0).tolist() == list(range(6))
    assert choose(scores, 0.01, None, False, 0).tolist() == [1]  # at least one


def test_sampling_follows_the_temperature():
    scores = np.linspace(0.0, 1.0, 200)
    cold = choose(scores, 0.25, 1e-4, False, 0)
    assert cold.tolist() == choose(scores, 0.25, None, False, 0).tolist()  # cold: the top fraction
    hot = [choose(scores, 0.25, 1e4, False, seed) for seed in range(20)]
    assert 0.4 < np.mean([scores[h].mean() for h in hot]) < 0.6  # hot: uniform, mean score 0.5
    warm = choose(scores, 0.25, 0.2, False, 0)
    assert 0.6 < scores[warm].mean() < scores[cold].mean() and not np.array_equal(warm, cold)
    assert np.array_equal(warm, choose(scores, 0.25, 0.2, False, 0))  # seeded


def test_a_view_holds_the_top_half_by_difference_in_corpus_order(scored, tmp_path):
    result = select(SelectConfig(store=str(scored), out=str(tmp_path / "view"), by="difference", keep=0.5))
    table = open_store(scored).score_table()
    difference = table["teacher_score"].to_numpy() - table["reference_score"].to_numpy()
    order = np.argsort(-difference, kind="stable")[:round(0.5 * len(difference))]
    want = [table["sequence_id"][int(i)].as_py() for i in np.sort(order)]
    view = open_store(tmp_path / "view")
    got = [s["sequence_id"] for s in view.iter_sequences()]
    assert got == want and result.num_sequences == len(want) == view.manifest.num_sequences
    parent = rows_by_id(scored)
    for sequence in view.iter_sequences():
        for name, values in sequence.items():
            assert np.array_equal(values, parent[sequence["sequence_id"]][name]), name
    assert view.score_table()["sequence_id"].to_pylist() == want
    assert view.manifest.num_tokens == sum(len(parent[i]["input_ids"]) for i in want)
    assert verify_store(view) == []


def test_loaders_read_a_view_like_a_store(scored, tmp_path):
    select(SelectConfig(store=str(scored), out=str(tmp_path / "view"), keep=0.4, where="num_tokens > 10"))
    view = open_store(tmp_path / "view")
    plan = PlanConfig(batch_size=3, seed=1)
    mapped = list(make_dataloader(MemoryMappedDataset(view), plan, rank=0, num_ranks=1))
    streamed = list(make_dataloader(StreamingDataset(view, plan, rank=0, num_ranks=1)))
    assert len(mapped) == len(streamed) > 0
    for a, b in zip(mapped, streamed):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["sequence_index"], b["sequence_index"])
    seen = sorted({i for batch in mapped for i in batch["sequence_index"].tolist()})
    assert seen == list(range(view.manifest.num_sequences))
    lengths = [len(s["input_ids"]) for s in view.iter_sequences()]
    assert min(lengths) > 10


def test_materialize_writes_the_rows_of_the_view(scored, tmp_path):
    select(SelectConfig(store=str(scored), out=str(tmp_path / "view"), by="ratio", keep=0.3, sample=0.5, seed=4))
    select(SelectConfig(store=str(scored), out=str(tmp_path / "new"), by="ratio", keep=0.3, sample=0.5, seed=4,
                        materialize=True))
    view, new = list(open_store(tmp_path / "view").iter_sequences()), list(open_store(tmp_path / "new").iter_sequences())
    assert [s["sequence_id"] for s in view] == [s["sequence_id"] for s in new] and view
    for a, b in zip(view, new):
        assert all(np.array_equal(a[name], b[name]) for name in a)
    assert verify_store(open_store(tmp_path / "new")) == []
    assert json.loads((tmp_path / "new" / "manifest.json").read_text())["format_version"] == 2


def test_a_view_refuses_a_parent_whose_shard_changed_and_names_it(scored, tmp_path):
    parent = Path(shutil.copytree(scored, tmp_path / "parent"))
    select(SelectConfig(store=str(parent), out=str(tmp_path / "view"), keep=0.5))
    manifest = json.loads((parent / "manifest.json").read_text())
    changed = manifest["shards"][2]
    shutil.copyfile(parent / manifest["shards"][1]["path"], parent / changed["path"])  # another valid shard's bytes
    changed.update({k: manifest["shards"][1][k] for k in ("sha256", "footer_sha256", "row_group_sha256", "num_bytes")})
    (parent / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ViewParentChangedError, match=changed["path"]):
        open_store(tmp_path / "view")


def test_a_selection_from_a_view_is_a_view_of_the_parent(scored, tmp_path):
    select(SelectConfig(store=str(scored), out=str(tmp_path / "half"), keep=0.5))
    select(SelectConfig(store=str(tmp_path / "half"), out=str(tmp_path / "quarter"), keep=0.5, by="teacher-nll"))
    half, quarter = open_store(tmp_path / "half"), open_store(tmp_path / "quarter")
    assert quarter.parent.location == half.parent.location
    table = half.score_table()
    nll = -table["teacher_score"].to_numpy()
    want = [table["sequence_id"][int(i)].as_py() for i in np.sort(np.argsort(-nll, kind="stable")[:round(len(nll) / 2)])]
    assert [s["sequence_id"] for s in quarter.iter_sequences()] == want


def test_where_names_score_file_columns_and_the_derived_scores(scored, tmp_path):
    from kdstore.inspect import matching_ids
    from kdstore.stats import store_stats

    table = open_store(scored).score_table()
    difference = table["teacher_score"].to_numpy() - table["reference_score"].to_numpy()
    threshold = float(np.median(difference))
    select(SelectConfig(store=str(scored), out=str(tmp_path / "view"), keep=1.0, where=f"difference > {threshold}"))
    want = [i for i, d in zip(table["sequence_id"].to_pylist(), difference) if d > threshold]
    assert [s["sequence_id"] for s in open_store(tmp_path / "view").iter_sequences()] == want
    median = float(np.median(table["reference_score"].to_numpy()))
    found, num_read = matching_ids(open_store(scored), f"reference_score < {median}")
    assert found == [i for i, r in zip(table["sequence_id"].to_pylist(), table["reference_score"].to_numpy())
                     if r < median] and 0 < len(found) < num_read == table.num_rows
    figures = store_stats(scored)["scores"]
    assert set(figures) == {"teacher_score", "reference_score"} and figures["reference_score"]["count"] == table.num_rows
