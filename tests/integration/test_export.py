"""kdstore export: what HF ``datasets`` loads from an export is the store, value for value, in the documented contract.

Every check reads the export back with ``datasets.load_dataset("parquet", ...)`` and compares it with the store
decoded by hand from its raw Parquet and the manifest's codebook (docs/format.md's recipe, no kdstore decoder),
on a synthetic store and on one built by the bundled tiny teacher. One test runs that teacher as the student and
reads the targets the way axolotl's loss does (kernels/liger.py: student logits at t against target row t): the
KL is quantisation noise only when the rows are aligned as docs/export.md says, and large when shifted by one.

Run: .venv/bin/python -m pytest tests/integration/test_export.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # datasets must not reach the network

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from conftest import write_store  # noqa: E402
from kdstore.cli.main import cli  # noqa: E402
from kdstore.codec import CodecConfig  # noqa: E402
from kdstore.errors import ExportError, KdstoreError  # noqa: E402
from kdstore.export import export_store  # noqa: E402
from kdstore.format import sha256_file  # noqa: E402
from kdstore.store import open_store  # noqa: E402

ASSETS = Path(__file__).parents[2] / "kdstore" / "assets"

# the contract of docs/export.md, as HF datasets features
AXOLOTL_FEATURES = {
    "input_ids": "List(Value('int32'))", "attention_mask": "List(Value('int8'))", "labels": "List(Value('int32'))",
    "position_ids": "List(Value('int32'))", "target_token_ids": "List(List(Value('int32')))",
    "target_logprobs": "List(List(Value('float32')))", "target_mask": "List(List(Value('int8')))",
}
HF_FEATURES = {
    "sequence_id": "Value('string')", "input_ids": "List(Value('int32'))", "topk_ids": "List(List(Value('int32')))",
    "topk_logprobs": "List(List(Value('float32')))", "tail_logmass": "List(Value('float32'))",
    "target_logprob": "List(Value('float32'))",
}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """12 sequences of 17 tokens, K 8, 3 shards of several row groups."""
    return write_store(tmp_path_factory.mktemp("export") / "synthetic", CodecConfig(k=8, vocab_size=300),
                       num_sequences=12, shard_bytes=3000, row_group_bytes=1000)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A store of the bundled tiny teacher (vocabulary 4096) over 8 kB of its sample corpus: K 8, 32 tokens."""
    from kdstore.build import BuildConfig, build

    root = tmp_path_factory.mktemp("export-built")
    corpus = root / "corpus"
    corpus.mkdir()
    text = (ASSETS / "corpus" / "stories.txt").read_text()[:8000]
    (corpus / "stories.txt").write_text(text[:text.rindex("\n\n")])
    build(BuildConfig(corpus=(str(corpus),), out=str(root / "built"), k=8, seq_len=32, progress=False, device="cpu",
                      row_group_bytes=4096))
    return root / "built"


@pytest.fixture(scope="module")
def sampled(tmp_path_factory) -> Path:
    codec = CodecConfig(k=4, vocab_size=300, sampled_draws=16, sampled_scheme="systematic")
    return write_store(tmp_path_factory.mktemp("export-sampled") / "sampled", codec, num_sequences=5)


def load(out: Path, tmp_path: Path) -> datasets.Dataset:
    return datasets.load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train",
                                 cache_dir=str(tmp_path / "hf-cache"))


def features(dataset: datasets.Dataset) -> dict[str, str]:
    return {name: repr(feature) for name, feature in dataset.features.items()}


def by_hand(store: Path) -> list[dict[str, np.ndarray]]:
    """Every sequence of a store decoded from its raw Parquet with manifest.json's codebook (docs/format.md)."""
    manifest = json.loads((store / "manifest.json").read_text())
    k, table = manifest["codec"]["k"], np.array(manifest["codec"]["logprobs"]["table"], dtype=np.float32)
    rows = []
    for shard in manifest["shards"]:
        for raw in pq.read_table(store / shard["path"]).to_pylist():
            rows.append({"sequence_id": raw["sequence_id"], "input_ids": np.array(raw["input_ids"]),
                         "topk_ids": np.cumsum(np.array(raw["topk_id_deltas"], dtype=np.int64).reshape(-1, k), axis=1),
                         "topk_logprobs": table[np.array(raw["topk_logprob_codes"])].reshape(-1, k),
                         "tail_logmass": table[np.array(raw["tail_logmass_codes"])],
                         "target_logprob": table[np.array(raw["target_logprob_codes"])]})
    return rows


def renormalised(logprobs: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    scaled = logprobs.astype(np.float64) / temperature
    top = scaled.max(axis=1, keepdims=True)
    return scaled - top - np.log(np.exp(scaled - top).sum(axis=1, keepdims=True))


def check_axolotl_row(row: dict, expected: dict[str, np.ndarray], temperature: float = 1.0) -> None:
    tokens = expected["input_ids"]
    num_tokens, k = len(tokens), expected["topk_ids"].shape[1]
    assert np.array_equal(row["input_ids"], tokens) and np.array_equal(row["labels"], tokens)
    assert row["attention_mask"] == [1] * num_tokens and row["position_ids"] == list(range(num_tokens))
    ids, logprobs, mask = (np.array(row[name]) for name in ("target_token_ids", "target_logprobs", "target_mask"))
    assert ids.shape == logprobs.shape == mask.shape == (num_tokens, k)
    # row t < T-1: position t's top-K, most likely first, renormalised over the K ids at the temperature
    want = renormalised(expected["topk_logprobs"], temperature)
    for t in range(num_tokens - 1):
        order = np.argsort(-expected["topk_logprobs"][t], kind="stable")
        assert np.array_equal(ids[t], expected["topk_ids"][t][order]), t
        np.testing.assert_allclose(logprobs[t], want[t][order], rtol=0, atol=2e-6)
        assert np.all(np.diff(logprobs[t]) <= 0)
    assert np.all(mask[:-1] == 1)
    # row T-1: the last token predicts nothing; axolotl's own pad values, masked
    assert np.all(ids[-1] == 0) and np.all(logprobs[-1] == -1e9) and np.all(mask[-1] == 0)


@pytest.mark.parametrize("which", ["synthetic", "built"])
def test_axolotl_export_is_the_store_value_for_value_in_the_documented_columns(which, request, tmp_path):
    store = request.getfixturevalue(which)
    result = export_store(store, tmp_path / "out", "axolotl")
    dataset = load(tmp_path / "out", tmp_path)
    assert features(dataset) == AXOLOTL_FEATURES
    expected = by_hand(store)
    assert len(dataset) == len(expected) == result.num_rows
    for row, want in zip(dataset, expected):  # the store's order, row for row
        check_axolotl_row(row, want)
    np.testing.assert_allclose(np.exp(np.array(dataset[0]["target_logprobs"][:-1], dtype=np.float64)).sum(axis=1), 1,
                               atol=1e-5)


def test_axolotl_temperature_softens_the_renormalised_top_k(synthetic, tmp_path):
    export_store(synthetic, tmp_path / "out", "axolotl", temperature=2.0)
    for row, want in zip(load(tmp_path / "out", tmp_path), by_hand(synthetic)):
        check_axolotl_row(row, want, temperature=2.0)
    assert json.loads((tmp_path / "out" / "export.json").read_text())["temperature"] == 2.0


def test_axolotl_targets_line_up_with_the_students_logits_as_axolotls_loss_reads_them(built, tmp_path):
    """The teacher as its own student: axolotl's top-K forward KL (normalize_topk) is ~0 only if aligned."""
    import torch
    from transformers import AutoModelForCausalLM

    export_store(built, tmp_path / "out", "axolotl")
    dataset = load(tmp_path / "out", tmp_path).select(range(12))
    teacher = AutoModelForCausalLM.from_pretrained(open_store(built).manifest.teacher["model"]).eval()

    def mean_kl(shift: int) -> float:
        total, count = 0.0, 0
        for row in dataset.with_format("torch"):
            with torch.no_grad():
                student = torch.log_softmax(teacher(row["input_ids"][None].long()).logits[0].double(), dim=-1)
            rows = slice(shift, None)
            student = student[: student.shape[0] - shift]  # shift 1: row t read against the logits at t - 1
            gathered = torch.gather(student, 1, row["target_token_ids"][rows].long())
            gathered = gathered - torch.logsumexp(gathered, dim=1, keepdim=True)
            target, valid = row["target_logprobs"][rows].double(), row["target_mask"][rows].bool()
            kl = (target.exp() * (target - gathered))[valid]
            total, count = total + kl.sum().item(), count + int(valid[:, 0].sum())
        return total / count

    aligned, shifted = mean_kl(0), mean_kl(1)
    assert aligned < 1e-4, aligned  # quantisation only: the codebook's KL bound is 3e-5 nats for a flat top-64
    assert shifted > 0.1, shifted


@pytest.mark.parametrize("which", ["synthetic", "built", "sampled"])
def test_hf_export_is_every_decoded_column_exactly(which, request, tmp_path):
    store = request.getfixturevalue(which)
    export_store(store, tmp_path / "out", "hf")
    dataset = load(tmp_path / "out", tmp_path)
    found = features(dataset)
    extra = {"built": {"teacher_score": "Value('float32')"},
             "sampled": {"sampled_ids": "List(List(Value('int32')))", "sampled_counts": "List(List(Value('int32')))"}}
    assert found == {**HF_FEATURES, **extra.get(which, {})}
    decoded = list(open_store(store).iter_sequences())
    assert len(dataset) == len(decoded)
    for row, want, raw in zip(dataset, decoded, by_hand(store)):
        assert row["sequence_id"] == want["sequence_id"] == raw["sequence_id"]
        for name in ("input_ids", "topk_ids", "topk_logprobs", "tail_logmass", "target_logprob"):
            assert np.array_equal(np.array(row[name], dtype=want[name].dtype), want[name]), name
            assert np.array_equal(np.array(row[name]), raw[name]), name  # ids exact, log-probs the codebook's values
        if which == "built":
            assert np.float32(row["teacher_score"]) == np.float32(want["teacher_score"])
        if which == "sampled":
            offsets = want["sampled_offsets"]
            for name in ("sampled_ids", "sampled_counts"):
                per_position = [want[name][offsets[p]:offsets[p + 1]].tolist() for p in range(len(offsets) - 1)]
                assert row[name] == per_position, name


def test_export_streams_one_output_row_group_per_store_row_group(synthetic, tmp_path):
    export_store(synthetic, tmp_path / "out", "axolotl")
    manifest = json.loads((synthetic / "manifest.json").read_text())
    files = sorted((tmp_path / "out" / "data").glob("*.parquet"))
    assert len(files) == len(manifest["shards"]) == 3
    for file, shard in zip(files, manifest["shards"]):
        source, exported = pq.ParquetFile(synthetic / shard["path"]), pq.ParquetFile(file)
        assert exported.num_row_groups == source.num_row_groups > 1
        assert [exported.metadata.row_group(g).num_rows for g in range(exported.num_row_groups)] == \
               [source.metadata.row_group(g).num_rows for g in range(source.num_row_groups)]


def test_export_folder_describes_itself_and_loads_by_its_card(synthetic, tmp_path):
    out = tmp_path / "out"
    result = export_store(synthetic, out, "axolotl")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "data", "export.json"]
    record = json.loads((out / "export.json").read_text())
    assert record["format"] == "axolotl" and record["num_rows"] == 12 == result.num_rows
    assert record["columns"]["target_logprobs"] == "list<item: list<item: float>>"
    assert record["source"]["codec"]["k"] == 8 and record["source"]["codec"]["position_predicts"] == "next"
    for file in record["files"]:
        assert sha256_file(out / file["path"]) == file["sha256"] and (out / file["path"]).stat().st_size == file["num_bytes"]
    lone = pq.ParquetFile(out / record["files"][0]["path"]).schema_arrow.metadata[b"kdstore_export"]
    assert json.loads(lone)["format"] == "axolotl"
    by_card = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert len(by_card) == 12 and features(by_card) == AXOLOTL_FEATURES


def test_a_store_with_sampled_draws_goes_to_axolotl_only_by_its_top_k_when_asked(sampled, tmp_path):
    with pytest.raises(ExportError, match="sampled draws"):
        export_store(sampled, tmp_path / "refused", "axolotl")
    assert not (tmp_path / "refused").exists()
    export_store(sampled, tmp_path / "out", "axolotl", top_k_only=True)
    for row, want in zip(load(tmp_path / "out", tmp_path), by_hand(sampled)):
        check_axolotl_row(row, want)


def test_a_damaged_shard_midway_leaves_no_export_behind(synthetic, tmp_path):
    import shutil

    store = Path(shutil.copytree(synthetic, tmp_path / "store"))
    second = store / json.loads((store / "manifest.json").read_text())["shards"][1]["path"]
    data = bytearray(second.read_bytes())
    data[100] ^= 0xFF  # inside its first row group: shard 0 is exported before this is found
    second.write_bytes(bytes(data))
    with pytest.raises(KdstoreError, match="shards/"):
        export_store(store, tmp_path / "new" / "out", "axolotl")
    assert not (tmp_path / "new").exists()  # folders it made are gone
    (tmp_path / "empty").mkdir()
    with pytest.raises(KdstoreError):
        export_store(store, tmp_path / "empty", "hf")
    assert list((tmp_path / "empty").iterdir()) == []  # the user's empty folder stays, empty


def test_an_interrupted_export_leaves_nothing(synthetic, tmp_path, monkeypatch):
    import kdstore.export

    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = kdstore.export.axolotl_rows
    monkeypatch.setattr(kdstore.export, "axolotl_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_store(synthetic, tmp_path / "out", "axolotl")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_export_command_prints_where_and_how_to_load(synthetic, tmp_path):
    result = CliRunner().invoke(cli, ["export", str(synthetic), "--format", "hf", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("exported 12 sequences as hf into 3 Parquet file(s)")
    assert "load_dataset(\"parquet\"" in lines[1]
