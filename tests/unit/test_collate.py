"""Collate: padded tensors aligned with labels, compact by default, and every option checked against a dense oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_manifest, synthetic_rows
from kdstore.codec import CodecConfig
from kdstore.collate import IGNORE_INDEX, CollateError, Collator, retemper, widen
from kdstore.format import logits_schema, rows_to_table
from kdstore.loader import MemoryMappedDataset
from kdstore.store import open_store
from kdstore.writer import ShardWriter


def write_ragged_store(path, codec, lengths=(17, 9, 5, 12)):
    schema = logits_schema(codec)
    with ShardWriter(path, make_manifest(codec), schema, row_group_bytes=2000) as writer:
        for i, length in enumerate(lengths):
            writer.write(rows_to_table(schema, synthetic_rows(codec, 1, length, seed=i, prefix=f"len{length}")))
    return path


@pytest.fixture
def ragged(tmp_path, codec):
    path = write_ragged_store(tmp_path / "ragged", codec)
    dataset = MemoryMappedDataset(path)
    reference = list(open_store(path).iter_sequences())  # the store reader is the oracle
    return dataset, [dataset[i] for i in range(len(dataset))], reference


def test_compact_batch_has_the_documented_shapes_and_dtypes(ragged, codec):
    _, samples, _ = ragged
    batch = Collator(codec)(samples)
    assert batch["input_ids"].shape == (4, 17) and batch["input_ids"].dtype == torch.int32
    assert batch["topk_ids"].shape == (4, 17, 8) and batch["topk_ids"].dtype == torch.int32
    assert batch["topk_logprob_codes"].dtype == torch.uint16  # the default codebook has 758 codes
    assert batch["tail_logmass_codes"].shape == batch["target_logprob_codes"].shape == (4, 17)
    assert batch["sequence_index"].tolist() == [0, 1, 2, 3]


def test_labels_are_the_next_token_with_ignore_index_at_the_last_token_and_padding(ragged, codec):
    _, samples, reference = ragged
    batch = Collator(codec)(samples)
    for b, row in enumerate(reference):
        tokens = row["input_ids"]
        assert batch["labels"][b, :len(tokens) - 1].tolist() == tokens[1:].tolist()
        assert (batch["labels"][b, len(tokens) - 1:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][b].sum() == len(tokens)


def test_widened_batch_matches_the_store_reader_and_the_wide_output(ragged, codec):
    _, samples, reference = ragged
    collate = Collator(codec)
    wide = widen(collate(samples), collate.logprob_table)
    assert wide["topk_ids"].dtype == torch.int64 and wide["topk_logprobs"].dtype == torch.float32
    for b, row in enumerate(reference):
        num_positions = len(row["input_ids"]) - 1
        assert np.array_equal(wide["topk_ids"][b, :num_positions].numpy(), row["topk_ids"])
        assert np.array_equal(wide["topk_logprobs"][b, :num_positions].numpy(), row["topk_logprobs"])
        assert np.array_equal(wide["target_logprob"][b, :num_positions].numpy(), row["target_logprob"])
    on_host = Collator(codec, output="wide")(samples)
    assert on_host.keys() == wide.keys()
    assert all(torch.equal(on_host[k], wide[k]) for k in wide)
    half = Collator(codec, output="float16")(samples)
    assert half["topk_logprobs"].dtype == torch.float16 and half["topk_ids"].dtype == torch.int32


def test_padding_carries_no_probability_mass(ragged, codec):
    _, samples, _ = ragged
    wide = Collator(codec, output="wide")(samples)
    assert wide["topk_logprobs"][3, 11:].exp().sum() < 1e-12  # sequence 3 has 12 tokens: 11 positions


def test_truncation_keeps_the_most_likely_entries_and_moves_the_rest_into_the_tail(ragged, codec):
    _, samples, reference = ragged
    batch = Collator(codec, output="wide", top_k=3)(samples)
    for b, row in enumerate(reference):
        num_positions = len(row["input_ids"]) - 1
        order = np.argsort(-row["topk_logprobs"], axis=1, kind="stable")[:, :3]  # the dense oracle
        expected = np.sort(np.take_along_axis(row["topk_ids"], order, 1), axis=1)
        assert np.array_equal(batch["topk_ids"][b, :num_positions].numpy(), expected)
        kept = batch["topk_logprobs"][b, :num_positions].double().exp().sum(-1)
        total = kept + batch["tail_logmass"][b, :num_positions].double().exp()
        stored = np.exp(row["topk_logprobs"].astype(np.float64)).sum(1) + np.exp(row["tail_logmass"].astype(np.float64))
        assert np.allclose(total.numpy(), stored, atol=1e-5)
    compact = Collator(codec, top_k=3)(samples)
    assert compact["topk_ids"].shape[-1] == 3 and torch.equal(compact["topk_ids"], batch["topk_ids"].int())


def test_retemper_matches_a_dense_softmax_when_the_top_k_is_the_whole_vocabulary():
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(0)) * 3
    logprobs = logits.log_softmax(-1)
    for temperature in (0.5, 1.0, 2.0):
        out = retemper(logprobs, None, logprobs[:, 0], temperature)
        assert torch.allclose(out["topk_logprobs"], (logits / temperature).log_softmax(-1), atol=1e-5)
        assert torch.allclose(out["target_logprob"], out["topk_logprobs"][:, 0])


def test_retempered_top_k_and_ghost_tail_sum_to_one(ragged, codec):
    _, samples, _ = ragged
    batch = Collator(codec, output="wide", temperature=2.0)(samples)
    total = batch["topk_logprobs"].exp().sum(-1) + batch["tail_logmass"].exp()
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5)
    collate = Collator(codec)
    on_device = widen(collate(samples), collate.logprob_table, temperature=2.0)
    assert torch.allclose(on_device["topk_logprobs"], batch["topk_logprobs"])


def test_sampled_sparse_counts_come_back_padded_per_position(tmp_path):
    codec = CodecConfig(k=8, vocab_size=300, sampled_draws=16)
    dataset = MemoryMappedDataset(write_ragged_store(tmp_path / "sampled", codec))
    samples = [dataset[i] for i in range(len(dataset))]
    batch = Collator(codec, sampled=True)(samples)
    assert batch["sampled_counts"].shape[:2] == batch["topk_ids"].shape[:2]
    positions = batch["attention_mask"].sum(1) - 1
    for b, count in enumerate(positions.tolist()):
        assert (batch["sampled_counts"][b, :count].sum(-1) == 16).all()
        assert (batch["sampled_counts"][b, count:] == 0).all()
    present = batch["sampled_counts"] > 0
    assert torch.isin(batch["sampled_ids"][present], batch["topk_ids"].unique()).all()  # the fixture samples from the top-K


def test_bad_collate_options_are_named_errors(codec):
    with pytest.raises(CollateError, match="top_k=9 but the store holds K=8"):
        Collator(codec, top_k=9)
    with pytest.raises(CollateError, match="re-tempering needs log-prob values"):
        Collator(codec, temperature=2.0)
    with pytest.raises(CollateError, match="no sampled-sparse columns"):
        Collator(codec, sampled=True)
    with pytest.raises(CollateError, match="output must be one of"):
        Collator(codec, output="bf16")
