"""The vLLM backend's conversion, on prompt log-probs built in vLLM's documented shape from real softmaxes.

vLLM is not needed: ``RequestOutput.prompt_logprobs`` is a list (or a FlatLogprobs, which indexes the same
way) of None for the first prompt token, then {token id: Logprob(logprob, rank, decoded_token)} holding the
top ``prompt_logprobs`` ids and the prompt token itself (with its vocabulary rank) when it is not among them.
The oracle is kdstore.teacher.sparsify on the same logits. The test at the end runs a real vLLM and is skipped,
saying why, where vLLM or a GPU is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kdstore.build import BuildConfig
from kdstore.codec import CodecConfig
from kdstore.errors import BackendError
from kdstore.format import logits_schema
from kdstore.pipeline import batch_table
from kdstore.teacher import sparsify
from kdstore.vllm_backend import check_settings, positions_from_prompt_logprobs


@dataclass
class Logprob:  # vllm.logprobs.Logprob's fields
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def vllm_prompt_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[dict[int, Logprob] | None]:
    """What vLLM returns for prompt ``tokens`` when ``logits[t]`` predicts token t + 1 (raw log-softmax, float32)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    entries: list[dict[int, Logprob] | None] = [None]
    for t, row in enumerate(logprobs):
        order = torch.argsort(row, descending=True, stable=True)
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(1, len(order) + 1)
        entry = {int(i): Logprob(float(row[i]), int(ranks[i])) for i in order[:k]}
        token = tokens[t + 1]
        entry.setdefault(token, Logprob(float(row[token]), int(ranks[token])))
        entries.append(entry)
    return entries


def teacher_case(seed: int = 0, num_tokens: int = 40, vocab_size: int = 64, k: int = 6):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn((num_tokens - 1, vocab_size), generator=generator) * 3
    tokens = torch.randint(0, vocab_size, (num_tokens,), generator=generator).tolist()
    return logits, tokens, k


def test_the_conversion_gives_what_sparsify_gives_on_the_same_logits():
    logits, tokens, k = teacher_case()
    entries = vllm_prompt_logprobs(logits, tokens, k)
    assert {len(e) for e in entries[1:]} == {k, k + 1}  # the prompt token inside the top K, and outside it
    got = positions_from_prompt_logprobs(tokens, entries, k)
    want = sparsify(logits.clone(), torch.tensor(tokens[1:]), k)
    want_order = torch.argsort(want["topk_logprobs"], dim=1, descending=True)
    assert np.array_equal(got["topk_ids"], want["topk_ids"].gather(1, want_order).numpy())  # ranked, largest first
    np.testing.assert_allclose(got["topk_logprobs"], want["topk_logprobs"].gather(1, want_order).numpy(), atol=2e-6)
    np.testing.assert_allclose(got["target_logprob"], want["target_logprob"].numpy(), atol=2e-6)
    # top-K log-probs that agree to 2e-6 (log_softmax vs logit - lse) give head masses sum p that agree to 2e-6
    np.testing.assert_allclose(np.exp(got["tail_logmass"]), np.exp(want["tail_logmass"].numpy()), atol=2e-6)
    assert got["topk_ids"].shape == (len(tokens) - 1, k) and got["topk_logprobs"].dtype == np.float32


def test_a_prompt_token_outside_the_top_k_is_the_target_and_not_a_top_k_entry():
    logits, tokens, k = teacher_case(seed=3)
    entries = vllm_prompt_logprobs(logits, tokens, k)
    outside = [t for t in range(len(tokens) - 1) if len(entries[t + 1]) == k + 1]
    assert outside
    got = positions_from_prompt_logprobs(tokens, entries, k)
    for t in outside:
        assert tokens[t + 1] not in got["topk_ids"][t]
        assert got["target_logprob"][t] == np.float32(entries[t + 1][tokens[t + 1]].logprob)
        assert got["target_logprob"][t] <= got["topk_logprobs"][t].min()


def test_vllm_rows_encode_to_the_stored_columns_of_transformers_rows():
    logits, tokens, k = teacher_case(seed=5, vocab_size=300)
    codec = CodecConfig(k=k, vocab_size=300)
    ids = np.array(tokens, dtype=np.int32)
    sparse = {name: value.numpy() for name, value in sparsify(logits.clone(), torch.tensor(tokens[1:]), k).items()}
    from_vllm = positions_from_prompt_logprobs(tokens, vllm_prompt_logprobs(logits, tokens, k), k)
    sequence = [SimpleNamespace(sequence_id="s", input_ids=ids)]
    tables = [batch_table(codec, logits_schema(codec), sequence, row) for row in (sparse, from_vllm)]
    stored = [{name: np.asarray(value) for name, value in table.to_pylist()[0].items()} for table in tables]
    assert np.array_equal(stored[0]["topk_id_deltas"], stored[1]["topk_id_deltas"])
    for name in ("topk_logprob_codes", "tail_logmass_codes", "target_logprob_codes"):
        # one ulp apart (log_softmax vs sparsify's logit - lse) may land on either side of a code boundary
        assert np.mean(stored[0][name] == stored[1][name]) > 0.97, name


def test_fewer_entries_than_k_name_the_setting_to_raise():
    logits, tokens, k = teacher_case()
    short = vllm_prompt_logprobs(logits, tokens, k - 2)  # vLLM asked for K - 2
    with pytest.raises(BackendError, match=f"top {k}") as raised:
        positions_from_prompt_logprobs(tokens, short, k)
    assert f"max_logprobs >= {k}" in raised.value.one_line()


def test_an_entry_without_its_prompt_token_is_refused():
    logits, tokens, k = teacher_case()
    entries = vllm_prompt_logprobs(logits, tokens, k)
    entries[4] = dict(list(entries[4].items())[:k]) if len(entries[4]) == k + 1 else entries[4]
    entries[4].pop(tokens[4], None)
    with pytest.raises(BackendError, match="without the prompt token"):
        positions_from_prompt_logprobs(tokens, entries, k)


def test_missing_positions_are_refused():
    logits, tokens, k = teacher_case()
    with pytest.raises(BackendError, match="for 39 of 40 tokens"):
        positions_from_prompt_logprobs(tokens, vllm_prompt_logprobs(logits, tokens, k)[1:], k)


def test_settings_vllm_cannot_serve_are_refused_before_it_loads():
    with pytest.raises(BackendError, match="--sampled-draws 16"):
        check_settings(8, 16, {})
    with pytest.raises(BackendError, match="max_logprobs = 20 is below K = 64"):
        check_settings(64, 0, {"max_logprobs": 20})
    with pytest.raises(BackendError, match="logprobs_mode"):
        check_settings(8, 0, {"logprobs_mode": "processed_logprobs"})
    check_settings(64, 0, {"max_logprobs": -1})  # -1: no cap
    with pytest.raises(BackendError, match="max_logprobs"):
        BuildConfig(backend="vllm", k=64, vllm_options={"max_logprobs": 32})


def _vllm_on_a_gpu() -> str:
    """Why the real-vLLM test cannot run here ("" when it can)."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "vLLM is not installed (pip install vllm; it brings its own CUDA torch)"
    return "" if torch.cuda.is_available() else "vLLM needs a GPU and torch sees none"


@pytest.mark.skipif(bool(_vllm_on_a_gpu()), reason=_vllm_on_a_gpu() or "runs")
def test_a_vllm_build_agrees_with_a_transformers_build_of_the_same_teacher(tmp_path, tiny_teacher, word_corpus):
    from kdstore.build import build
    from kdstore.store import open_store

    common = dict(corpus=(str(word_corpus),), teacher=str(tiny_teacher), k=8, seq_len=32, progress=False)
    build(BuildConfig(**common, out=str(tmp_path / "hf"), device="cuda"))
    build(BuildConfig(**common, out=str(tmp_path / "vllm"), backend="vllm"))
    rows = [{r["sequence_id"]: r for r in open_store(tmp_path / name).iter_sequences()} for name in ("hf", "vllm")]
    assert rows[0].keys() == rows[1].keys()
    for sequence_id, hf in rows[0].items():
        vllm_row = rows[1][sequence_id]
        assert np.array_equal(hf["input_ids"], vllm_row["input_ids"])
        np.testing.assert_allclose(hf["target_logprob"], vllm_row["target_logprob"], atol=0.05)
