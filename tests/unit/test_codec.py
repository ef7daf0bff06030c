"""The codec: ids lossless, log-probs within the documented bound, clear errors on bad arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import teacher_outputs
from kdstore.codec import Codebook, CodecConfig, decode_positions, encode_positions
from kdstore.errors import CodecError


def _kl_true_vs_decoded(values, tail, dec_values, dec_tail) -> np.ndarray:
    true = np.concatenate([np.exp(values), np.exp(tail)[:, None]], axis=1)
    dec = np.concatenate([np.exp(dec_values), np.exp(dec_tail)[:, None]], axis=1)
    dec /= dec.sum(axis=1, keepdims=True)
    return (true * (np.log(np.maximum(true, 1e-300)) - np.log(dec))).sum(axis=1)


def test_roundtrip_restores_ids_exactly_and_logprobs_within_bound():
    rng = np.random.default_rng(1)
    codec = CodecConfig(k=16, vocab_size=1000)
    _, ids, values, tail, target = teacher_outputs(rng, 65, codec.vocab_size, codec.k)
    decoded = decode_positions(codec, encode_positions(codec, ids, values, tail, target))
    order = np.argsort(ids, axis=1)
    assert np.array_equal(decoded["topk_ids"], np.take_along_axis(ids, order, axis=1))
    expected = np.take_along_axis(values, order, axis=1)
    error = np.abs(decoded["topk_logprobs"] - expected)
    assert error.max() <= codec.codebook.log_step / 2 + 1e-5
    above_split = expected > codec.codebook.split_logprob
    sqrt_error = np.abs(np.exp(decoded["topk_logprobs"] / 2) - np.exp(expected / 2))
    assert sqrt_error[above_split].max() <= 1 / (4 * codec.codebook.sqrt_scale) + 1e-6
    assert np.abs(decoded["tail_logmass"] - tail).max() <= codec.codebook.log_step / 2 + 1e-5
    assert np.abs(decoded["target_logprob"] - target).max() <= codec.codebook.log_step / 2 + 1e-5


def test_default_codebook_keeps_mean_kl_below_1e4_on_peaked_distributions():
    rng = np.random.default_rng(2)
    codec = CodecConfig(k=64, vocab_size=5000)
    _, ids, values, tail, target = teacher_outputs(rng, 201, codec.vocab_size, codec.k)
    decoded = decode_positions(codec, encode_positions(codec, ids, values, tail, target))
    order = np.argsort(ids, axis=1)
    kl = _kl_true_vs_decoded(np.take_along_axis(values, order, axis=1), tail,
                             decoded["topk_logprobs"], decoded["tail_logmass"])
    assert kl.mean() < 1e-4, kl.mean()


def test_codebook_is_monotone_nonpositive_and_starts_at_zero():
    for book in (Codebook(), Codebook(sqrt_scale=60, log_step=0.5), Codebook(sqrt_scale=4000, log_step=0.01)):
        assert book.table[0] == 0.0
        assert np.all(np.diff(book.table) < 0)
        assert book.table.max() <= 0
        assert book.max_log_error[book.table >= book.floor_logprob].max() <= book.log_step / 2 + 1e-9


def test_codes_are_uint8_when_256_suffice_and_uint16_otherwise():
    assert Codebook(sqrt_scale=60, log_step=0.5).dtype == np.uint8
    codec = CodecConfig(k=4, vocab_size=50, codebook=Codebook(sqrt_scale=4000, log_step=0.01))
    rng = np.random.default_rng(3)
    _, ids, values, tail, target = teacher_outputs(rng, 9, codec.vocab_size, codec.k)
    columns = encode_positions(codec, ids, values, tail, target)
    assert columns["topk_logprob_codes"].dtype == np.uint16
    decoded = decode_positions(codec, columns)
    assert np.abs(decoded["tail_logmass"] - tail).max() <= 0.005 + 1e-5


def test_torch_tensors_are_accepted():
    codec = CodecConfig(k=4, vocab_size=50)
    rng = np.random.default_rng(4)
    _, ids, values, tail, target = teacher_outputs(rng, 9, codec.vocab_size, codec.k)
    from_numpy = encode_positions(codec, ids, values, tail, target)
    from_torch = encode_positions(codec, *(torch.from_numpy(np.asarray(a)) for a in (ids, values, tail, target)))
    for name in from_numpy:
        assert np.array_equal(from_numpy[name], from_torch[name])


def test_k_equal_to_vocab_and_minus_inf_tail_are_stored():
    codec = CodecConfig(k=10, vocab_size=10)
    rng = np.random.default_rng(5)
    _, ids, values, tail, target = teacher_outputs(rng, 5, 10, 10)
    assert np.isneginf(tail).all()
    decoded = decode_positions(codec, encode_positions(codec, ids, values, tail, target))
    assert np.array_equal(decoded["topk_ids"], np.tile(np.arange(10), (4, 1)))
    assert (decoded["tail_logmass"] == codec.codebook.table[-1]).all()


def test_large_vocabulary_ids_roundtrip():
    codec = CodecConfig(k=3, vocab_size=300_000)
    ids = np.array([[299_999, 0, 150_000], [7, 8, 9]])
    values = np.log(np.array([[0.5, 0.25, 0.125], [0.3, 0.2, 0.1]]))
    decoded = decode_positions(codec, encode_positions(codec, ids, values, np.log([0.125, 0.4]), np.log([0.5, 0.3])))
    assert decoded["topk_ids"].tolist() == [[0, 150_000, 299_999], [7, 8, 9]]


def test_sampled_sparse_roundtrip():
    codec = CodecConfig(k=2, vocab_size=100, sampled_draws=5)
    ids, values = np.array([[1, 2], [3, 4], [5, 6]]), np.log(np.full((3, 2), 0.3))
    sampled_ids = np.array([[40, 7, -1], [9, -1, -1], [99, 0, 50]])
    counts = np.array([[3, 2, 0], [5, 0, 0], [1, 1, 3]])
    columns = encode_positions(codec, ids, values, np.log([0.4] * 3), np.log([0.3] * 3), sampled_ids, counts)
    decoded = decode_positions(codec, columns)
    assert decoded["sampled_offsets"].tolist() == [0, 2, 3, 6]
    assert decoded["sampled_ids"].tolist() == [7, 40, 9, 0, 50, 99]
    assert decoded["sampled_counts"].tolist() == [2, 3, 5, 1, 3, 1]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(ids=a["ids"] + 1000), "outside"),
        (lambda a: a.update(ids=-a["ids"] - 1), "outside"),
        (lambda a: a.update(values=a["values"] + 5.0), "<= 0"),
        (lambda a: a["values"].__setitem__((0, 0), np.nan), "<= 0"),
        (lambda a: a.update(ids=a["ids"][:, :3]), r"\[P, 4\]"),
        (lambda a: a["ids"].__setitem__((0, 1), a["ids"][0, 0]), "distinct"),
        (lambda a: a.update(tail=a["tail"][:2]), "one value per position"),
    ],
)
def test_bad_arrays_raise_codec_error(change, message):
    codec = CodecConfig(k=4, vocab_size=50)
    _, ids, values, tail, target = teacher_outputs(np.random.default_rng(6), 9, 50, 4)
    arrays = {"ids": ids, "values": values, "tail": tail, "target": target}
    change(arrays)
    with pytest.raises(CodecError, match=message):
        encode_positions(codec, arrays["ids"], arrays["values"], arrays["tail"], arrays["target"])


def test_k_out_of_range_is_refused():
    with pytest.raises(CodecError, match="K=0"):
        CodecConfig(k=0, vocab_size=10)
    with pytest.raises(CodecError, match="K=11"):
        CodecConfig(k=11, vocab_size=10)


def test_codec_config_survives_its_manifest_form():
    codec = CodecConfig(k=8, vocab_size=123, sampled_draws=32, sampled_mode="tail")
    assert CodecConfig.from_dict(codec.to_dict()) == codec
