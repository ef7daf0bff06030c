"""Collate: padded tensors aligned with labels, compact by default, and every option checked against a dense oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_manifest, synthetic_rows
from kdstore.codec import CodecConfig, encode_positions
from kdstore.collate import CODE_KEYS, IGNORE_INDEX, CollateError, Collator, retemper, widen
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


def hand_made_samples(codec, lengths, seed=0):
    """Samples as the datasets give them (stored columns), including a 1-token sequence with no positions."""
    rng = np.random.default_rng(seed)
    samples = []
    for index, length in enumerate(lengths):
        ids = np.array([rng.choice(codec.vocab_size - 1, codec.k, replace=False) for _ in range(length - 1)],
                       dtype=np.int64).reshape(-1, codec.k)
        ids[:1, 0] = codec.vocab_size - 1  # the largest id, where a running sum in too narrow a type would wrap
        logprobs = np.log(rng.dirichlet(np.ones(codec.k + 1), length - 1)[:, :codec.k]).reshape(-1, codec.k)
        stored = encode_positions(codec, ids, logprobs, np.full(length - 1, -2.0), np.full(length - 1, -3.0))
        samples.append({"index": 10 * index, "input_ids": rng.integers(0, 1000, length).astype(np.int32),
                        "topk_id_deltas": stored["topk_id_deltas"].reshape(-1, codec.k),
                        "topk_logprob_codes": stored["topk_logprob_codes"].reshape(-1, codec.k),
                        "tail_logmass_codes": stored["tail_logmass_codes"],
                        "target_logprob_codes": stored["target_logprob_codes"]})
    return samples


def dense_collate(samples, codec, length, pad_id):
    """The plain oracle: one sequence at a time, ids decoded by a 64-bit running sum, codes padded with the floor."""
    num, floor = len(samples), codec.codebook.num_codes - 1
    out = {"sequence_index": np.array([s["index"] for s in samples]), "input_ids": np.full((num, length), pad_id),
           "attention_mask": np.zeros((num, length)), "labels": np.full((num, length), IGNORE_INDEX),
           "topk_ids": np.zeros((num, length, codec.k)), "topk_logprob_codes": np.full((num, length, codec.k), floor),
           "tail_logmass_codes": np.full((num, length), floor), "target_logprob_codes": np.full((num, length), floor)}
    for b, sample in enumerate(samples):
        tokens, num_positions = sample["input_ids"], len(sample["input_ids"]) - 1
        out["input_ids"][b, :len(tokens)], out["attention_mask"][b, :len(tokens)] = tokens, 1
        out["labels"][b, :num_positions] = tokens[1:]
        out["topk_ids"][b, :num_positions] = np.cumsum(sample["topk_id_deltas"].astype(np.int64), axis=1)
        for name in ("topk_logprob_codes", "tail_logmass_codes", "target_logprob_codes"):
            out[name][b, :num_positions] = sample[name]
    return out


@pytest.mark.parametrize("vocab_size", [300, 2**31 - 1])  # ids up to the largest an int32 holds
def test_every_output_equals_a_dense_oracle_for_ragged_batches_with_one_and_two_token_sequences(vocab_size):
    codec = CodecConfig(k=8, vocab_size=vocab_size)
    samples = hand_made_samples(codec, (9, 1, 17, 2, 4))
    expected = dense_collate(samples, codec, 24, pad_id=7)  # 17 rounded up to a multiple of 8
    table = codec.codebook.table
    compact = Collator(codec, pad_id=7, pad_to_multiple_of=8)(samples)
    assert list(compact) == list(expected)
    for key, value in expected.items():
        dtype = {"sequence_index": torch.int64, "topk_logprob_codes": torch.uint16, "tail_logmass_codes": torch.uint16,
                 "target_logprob_codes": torch.uint16}.get(key, torch.int32)
        assert compact[key].dtype == dtype and np.array_equal(compact[key].numpy(), value), key
    wide = Collator(codec, output="wide", pad_id=7, pad_to_multiple_of=8)(samples)
    assert list(wide) == [CODE_KEYS.get(key, key) for key in expected]
    for key, value in expected.items():
        if key in CODE_KEYS:
            assert wide[CODE_KEYS[key]].dtype == torch.float32 and np.array_equal(wide[CODE_KEYS[key]].numpy(), table[value])
        else:
            assert wide[key].dtype == torch.int64 and np.array_equal(wide[key].numpy(), value), key
    half = Collator(codec, output="float16", pad_id=7, pad_to_multiple_of=8)(samples)
    for key, value in wide.items():  # numpy's float32 -> float16 rounds as torch's .half() does
        expected_half = value.half() if value.is_floating_point() else value if key == "sequence_index" else value.int()
        assert torch.equal(half[key], expected_half) and half[key].dtype == expected_half.dtype, key
