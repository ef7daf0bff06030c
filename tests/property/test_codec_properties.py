"""Property tests: for any distribution, decoding keeps ids and the documented error bound."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kdstore.codec import CodecConfig, decode_positions, encode_positions, sum_check_tolerance


@settings(max_examples=60, deadline=None)
@given(
    vocab_size=st.integers(2, 3000),
    k_fraction=st.floats(0.0, 1.0),
    num_positions=st.integers(1, 12),
    temperature=st.floats(0.05, 20.0),
    seed=st.integers(0, 2**31),
)
def test_any_softmax_roundtrips_within_bounds(vocab_size, k_fraction, num_positions, temperature, seed):
    rng = np.random.default_rng(seed)
    k = max(1, int(round(k_fraction * vocab_size)))
    codec = CodecConfig(k=k, vocab_size=vocab_size)
    logits = rng.standard_normal((num_positions, vocab_size)) * temperature
    logprobs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    ids = rng.permutation(vocab_size)[None, :].repeat(num_positions, 0)
    ids = np.argsort(-logprobs, axis=1)[:, :k]
    values = np.take_along_axis(logprobs, ids, axis=1)
    rest = logprobs.copy()
    np.put_along_axis(rest, ids, -np.inf, axis=1)
    tail = np.logaddexp.reduce(rest, axis=1)
    columns = encode_positions(codec, ids, values, tail, values[:, 0])
    decoded = decode_positions(codec, columns)
    assert np.array_equal(decoded["topk_ids"], np.sort(ids, axis=1))
    expected = np.take_along_axis(values, np.argsort(ids, axis=1), axis=1)
    representable = expected >= codec.codebook.floor_logprob
    error = np.abs(decoded["topk_logprobs"] - expected)
    assert (error[representable] <= codec.codebook.log_step / 2 + 1e-4).all()
    total = np.exp(decoded["topk_logprobs"].astype(np.float64)).sum(1) + np.exp(decoded["tail_logmass"].astype(np.float64))
    tolerance = sum_check_tolerance(codec, columns["topk_logprob_codes"].reshape(-1, k), columns["tail_logmass_codes"])
    assert (np.abs(total - 1) <= tolerance).all()
