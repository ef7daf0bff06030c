"""A shard is plain Parquet: polars, pyarrow and HF datasets read the same ids and log-probs as kdstore.

Decoding without kdstore takes two documented steps (docs/format.md): ids are a
cumulative sum within each run of K values; log-probs are
``manifest["codec"]["logprobs"]["table"][code]``.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq

from kdstore.format import LOGITS_FORMAT_VERSION
from kdstore.store import open_store


def _kdstore_reference(store_path):
    first = next(open_store(store_path).iter_sequences())
    return first["topk_ids"], first["topk_logprobs"], first["tail_logmass"]


def _manifest(store_path):
    manifest = json.loads((store_path / "manifest.json").read_text())
    return manifest, np.asarray(manifest["codec"]["logprobs"]["table"], dtype=np.float32), manifest["codec"]["k"]


def test_polars_alone_reads_the_same_ids_and_logprobs(store_path):
    import polars as pl

    manifest, table, k = _manifest(store_path)
    frame = pl.read_parquet(store_path / manifest["shards"][0]["path"])
    row = frame.row(0, named=True)
    ids = np.cumsum(np.asarray(row["topk_id_deltas"], dtype=np.int64).reshape(-1, k), axis=1)
    logprobs = table[np.asarray(row["topk_logprob_codes"]).reshape(-1, k)]
    tail = table[np.asarray(row["tail_logmass_codes"])]
    want_ids, want_logprobs, want_tail = _kdstore_reference(store_path)
    assert np.array_equal(ids, want_ids) and np.array_equal(logprobs, want_logprobs) and np.array_equal(tail, want_tail)


def test_polars_expressions_decode_without_numpy(store_path):
    import polars as pl

    manifest, table, k = _manifest(store_path)
    frame = pl.read_parquet(store_path / manifest["shards"][0]["path"]).head(1)
    lookup = pl.Series("table", table)
    decoded = (
        frame.select(pl.col("topk_id_deltas").list.eval(pl.element().cast(pl.Int64)).alias("d"),
                     pl.col("topk_logprob_codes").alias("c"))
        .explode(["d", "c"])
        .with_row_index("i")
        .with_columns((pl.col("i") // k).alias("position"))
        .with_columns(pl.col("d").cum_sum().over("position").alias("id"),
                      pl.col("c").map_batches(lambda codes: lookup.gather(codes)).alias("logprob"))
    )
    want_ids, want_logprobs, _ = _kdstore_reference(store_path)
    assert np.array_equal(decoded["id"].to_numpy().reshape(-1, k), want_ids)
    assert np.array_equal(decoded["logprob"].to_numpy().reshape(-1, k), want_logprobs)


def test_pyarrow_alone_reads_the_same_ids_and_logprobs(store_path):
    import pyarrow.compute as pc

    manifest, table, k = _manifest(store_path)
    shard = pq.read_table(store_path / manifest["shards"][0]["path"])
    deltas = pc.list_flatten(shard["topk_id_deltas"].slice(0, 1)).to_numpy()
    codes = pc.list_flatten(shard["topk_logprob_codes"].slice(0, 1)).to_numpy()
    ids = np.cumsum(deltas.astype(np.int64).reshape(-1, k), axis=1)
    logprobs = pc.take(table, codes).to_numpy().reshape(-1, k)
    want_ids, want_logprobs, _ = _kdstore_reference(store_path)
    assert np.array_equal(ids, want_ids) and np.array_equal(logprobs, want_logprobs)


def test_a_lone_shard_says_what_it_is_in_its_footer(store_path):
    manifest, _, _ = _manifest(store_path)
    metadata = pq.read_metadata(store_path / manifest["shards"][0]["path"]).metadata
    essentials = json.loads(metadata[b"kdstore"])
    assert essentials["format_version"] == manifest["format_version"] == LOGITS_FORMAT_VERSION
    assert essentials["codec"] == manifest["codec"]
    assert essentials["teacher"] == manifest["teacher"] and essentials["tokenizer"] == manifest["tokenizer"]


def test_hf_datasets_loads_the_shards(store_path):
    from datasets import load_dataset

    manifest, table, k = _manifest(store_path)
    files = [str(store_path / s["path"]) for s in manifest["shards"]]
    dataset = load_dataset("parquet", data_files=files, split="train", cache_dir=str(store_path.parent / "hf-cache"))
    row = dataset[0]
    ids = np.cumsum(np.asarray(row["topk_id_deltas"], dtype=np.int64).reshape(-1, k), axis=1)
    logprobs = table[np.asarray(row["topk_logprob_codes"]).reshape(-1, k)]
    want_ids, want_logprobs, _ = _kdstore_reference(store_path)
    assert len(dataset) == 12
    assert np.array_equal(ids, want_ids) and np.array_equal(logprobs, want_logprobs)


def _card_blocks(store_path) -> list[str]:
    import re

    return re.findall(r"```python\n(.*?)```", (store_path / "README.md").read_text(), flags=re.S)


def test_every_python_block_of_the_dataset_card_runs_in_the_store_folder_and_reads_every_row(store_path, monkeypatch):
    """The card's one-liners (kdstore, HF datasets, polars, pyarrow, duckdb, plain numpy) work as written."""
    import pyarrow as pa

    monkeypatch.chdir(store_path)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(store_path.parent / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    blocks = _card_blocks(store_path)
    assert len(blocks) == 6
    manifest = json.loads((store_path / "manifest.json").read_text())
    for block in blocks:
        scope: dict = {}
        exec(compile(block, "README.md", "exec"), scope)  # noqa: S102  the card is ours, generated by kdstore
        rows = scope.get("rows")
        if rows is not None:
            count = rows.num_rows if hasattr(rows, "num_rows") else (rows.height if hasattr(rows, "height") else len(rows))
            assert count == manifest["stats"]["num_sequences"], block
            if isinstance(rows, pa.Table):
                assert "topk_logprob_codes" in rows.column_names
    decoded = scope  # the last block decodes the first row of the first shard
    want_ids, want_logprobs, want_tail = _kdstore_reference(store_path)
    assert np.array_equal(decoded["topk_ids"], want_ids) and np.array_equal(decoded["topk_logprobs"], want_logprobs)
    assert np.array_equal(decoded["tail_logmass"], want_tail)


def test_the_card_states_the_true_code_width_and_a_hub_yaml_header(store_path):
    text = (store_path / "README.md").read_text()
    manifest = json.loads((store_path / "manifest.json").read_text())
    bits = {"uint8": 8, "uint16": 16}[manifest["codec"]["logprobs"]["dtype"]]
    assert text.startswith("---\n") and '"path": "shards/*.parquet"' in text and f"{bits}-bit codes" in text
    assert f"{manifest['stats']['num_sequences']:,} sequences" in text
