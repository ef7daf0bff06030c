"""The vLLM teacher backend: the same per-position columns as the transformers backend, from vLLM's prompt log-probs.

    kdstore build data/ --teacher ./my-teacher --out store --backend vllm      # pip install vllm (brings its own torch)

Each sequence goes to vLLM as token ids (``TokensPrompt(prompt_token_ids=...)``, never re-tokenised text) with
``SamplingParams(prompt_logprobs=K, max_tokens=1)``; the engine runs with ``logprobs_mode="raw_logprobs"`` (the
log-softmax of the model's own logits, before temperature, penalties or any processor) and ``max_logprobs`` of
at least K. vLLM's ``prompt_logprobs[i]`` is the distribution that predicted prompt token i (entry 0 is None):
its K most likely ids, plus token i itself when it is not among them. So kdstore's position t, which predicts
token t + 1, is vLLM's entry t + 1, and ``positions_from_prompt_logprobs`` turns it into

    topk_ids [T-1, K] int64, topk_logprobs [T-1, K] float32     the K entries of rank 1..K
    target_logprob [T-1] float32                                token t + 1's own entry, inside the top K or not
    tail_logmass [T-1] float32                                  log(1 - sum exp(top-K)), in float64

The top-K log-probs are normalised over the full vocabulary (a raw log-softmax), so the tail mass is exact
to float32 rounding. What vLLM cannot give: sampled draws over the full vocabulary (it returns at most
``max_logprobs`` entries, never the whole distribution), so ``--sampled-draws`` with this backend is refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kdstore.errors import BackendError, first_line

if TYPE_CHECKING:
    from kdstore.pipeline import SparseBatch

VLLM_INSTALL = "pip install vllm (into an environment whose torch is the one vLLM pins)"
RAW_LOGPROBS = "raw_logprobs"


def check_settings(k: int, sampled_draws: int, vllm_options: Mapping[str, Any]) -> None:
    """What can be refused before vLLM is imported or a model loads: draws it cannot give, settings too small."""
    if sampled_draws:
        raise BackendError(f"--sampled-draws {sampled_draws} with --backend vllm: vLLM returns at most max_logprobs "
                           "entries per position, never the full distribution that sampled draws come from",
                           hint="use --backend transformers for sampled draws, or drop --sampled-draws")
    max_logprobs = vllm_options.get("max_logprobs")
    if max_logprobs is not None and max_logprobs != -1 and max_logprobs < k:
        raise BackendError(f"vllm_options.max_logprobs = {max_logprobs} is below K = {k}: vLLM would refuse "
                           f"prompt_logprobs={k}",
                           hint=f"raise max_logprobs under [vllm_options] in build.toml to {k} or more (or -1), or lower -k")
    mode = vllm_options.get("logprobs_mode", RAW_LOGPROBS)
    if mode != RAW_LOGPROBS:
        raise BackendError(f"vllm_options.logprobs_mode = {mode!r}: a store holds the model's own log-probs",
                           hint=f"drop logprobs_mode from [vllm_options] (kdstore sets {RAW_LOGPROBS!r})")


def positions_from_prompt_logprobs(prompt_token_ids: Sequence[int], prompt_logprobs: Sequence[Mapping[int, Any] | None],
                                   k: int) -> dict[str, np.ndarray]:
    """vLLM's prompt log-probs of one sequence of T tokens -> kdstore's per-position arrays (module docstring).

    ``prompt_logprobs``: T entries as vLLM gives them (``RequestOutput.prompt_logprobs``, a list or a
    FlatLogprobs): None for the first token, then a mapping token id -> Logprob (``.logprob``, ``.rank``) with
    the top-K ids and the prompt token. Raises BackendError when an entry holds fewer than K ids or lacks its
    prompt token (vLLM was asked for fewer log-probs than K).
    """
    num_positions = len(prompt_token_ids) - 1
    if len(prompt_logprobs) != len(prompt_token_ids):
        raise BackendError(f"vLLM gave prompt log-probs for {len(prompt_logprobs)} of {len(prompt_token_ids)} tokens",
                           hint="prefix caching must not skip positions: keep enable_prefix_caching unset")
    ids = np.zeros((num_positions, k), dtype=np.int64)
    values = np.zeros((num_positions, k), dtype=np.float32)
    target = np.zeros(num_positions, dtype=np.float32)
    for t in range(num_positions):
        entry, token = prompt_logprobs[t + 1], int(prompt_token_ids[t + 1])
        if entry is None or token not in entry or len(entry) < k:
            raise BackendError(f"vLLM's prompt log-probs at position {t + 1} hold {0 if entry is None else len(entry)} "
                               f"ids{'' if entry is not None and token in entry else ' without the prompt token'}; "
                               f"expected the top {k} and the prompt token",
                               hint=f"run vLLM with max_logprobs >= {k} and prompt_logprobs = {k}")
        # rank 1..K first; a prompt token outside the top K (rank > K) sorts last and is dropped
        ranked = sorted(entry.items(), key=lambda item: (-item[1].logprob, _rank(item[1]), item[0]))[:k]
        ids[t] = [token_id for token_id, _ in ranked]
        values[t] = [logprob.logprob for _, logprob in ranked]
        target[t] = entry[token].logprob
    return {"topk_ids": ids, "topk_logprobs": values, "tail_logmass": tail_logmass(values), "target_logprob": target}


def _rank(logprob: Any) -> float:
    rank = getattr(logprob, "rank", None)
    return math.inf if rank is None else rank


def tail_logmass(topk_logprobs: np.ndarray) -> np.ndarray:
    """log(1 - sum exp(top-K)) per position, in float64 as kdstore.teacher.sparsify computes it; -inf when the
    top K hold all the mass."""
    values = topk_logprobs.astype(np.float64)
    peak = values.max(axis=1, keepdims=True)
    head = (peak + np.log(np.exp(values - peak).sum(axis=1, keepdims=True)))[:, 0]
    with np.errstate(divide="ignore"):
        return np.log(-np.expm1(np.minimum(head, 0.0))).astype(np.float32)


@dataclass
class VllmTeacher:
    """A vLLM engine holding the teacher; ``info()`` is the manifest's ``teacher`` record, as Teacher.info()."""

    llm: Any
    source: str
    dtype_name: str
    vocab_size: int
    max_positions: int | None
    architecture: str | None
    trust_remote_code: bool

    def info(self) -> dict[str, Any]:
        from kdstore.teacher import content_sha256

        return {"model": self.source, "revision": None,
                "content_sha256": content_sha256(Path(self.source)) if Path(self.source).is_dir() else None,
                "dtype": self.dtype_name, "vocab_size": self.vocab_size, "architecture": self.architecture,
                "trust_remote_code": self.trust_remote_code, "backend": "vllm"}


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError:
        raise BackendError("--backend vllm needs vLLM, which is not installed", hint=VLLM_INSTALL) from None
    return vllm


def load_vllm_teacher(source: str, k: int, dtype: str = "float32", trust_remote_code: bool = False,
                      vllm_options: Mapping[str, Any] | None = None) -> VllmTeacher:
    """``vllm.LLM`` over the teacher folder or hub id, set up for raw prompt log-probs of K ids."""
    from kdstore.teacher import DTYPES

    options = dict(vllm_options or {})
    check_settings(k, 0, options)
    vllm = import_vllm()
    name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype)
    if name not in DTYPES:
        raise BackendError(f"unknown dtype {dtype!r}; choose float32, bfloat16 or float16")
    options.setdefault("max_logprobs", max(k, 20))  # vLLM's default is 20
    try:
        llm = vllm.LLM(model=source, tokenizer=source, dtype=name, trust_remote_code=trust_remote_code,
                       logprobs_mode=RAW_LOGPROBS, skip_tokenizer_init=True, seed=0, **options)
    except Exception as exc:  # vLLM raises ValueError, RuntimeError, OSError, ... for a model it cannot serve
        raise BackendError(f"vLLM cannot load teacher {source!r}: {first_line(exc)}",
                           hint="vLLM serves the architectures it lists as supported, on a GPU; use --backend "
                                "transformers for others") from None
    engine = llm.llm_engine
    config = getattr(engine, "model_config", None) or engine.vllm_config.model_config
    architectures = getattr(config.hf_config, "architectures", None) or [None]
    return VllmTeacher(llm, str(source), name, int(config.get_vocab_size()), int(config.max_model_len),
                       architectures[0], trust_remote_code)


def run_vllm_teacher(teacher: VllmTeacher, sequences: list[Any], k: int) -> Iterator[SparseBatch]:
    """Teacher outputs for ``sequences`` as one ``SparseBatch`` (kdstore.build.run_teacher's layout, host arrays)."""
    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from kdstore.pipeline import SparseBatch
    from kdstore.teacher import HostCopy

    params = SamplingParams(prompt_logprobs=k, max_tokens=1, temperature=1.0, detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in s.input_ids]) for s in sequences]
    outputs = teacher.llm.generate(prompts, params, use_tqdm=False)
    parts = [positions_from_prompt_logprobs(s.input_ids, output.prompt_logprobs, k) for s, output in zip(sequences, outputs)]
    arrays = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    # vLLM hides the normaliser; a NaN or inf anywhere in a position's log-probs marks it as the encoder's check expects
    finite = np.isfinite(arrays["topk_logprobs"]).all(axis=1) & np.isfinite(arrays["target_logprob"])
    arrays["lse"] = np.where(finite, 0.0, np.nan).astype(np.float32)
    yield SparseBatch(np.arange(len(sequences)), HostCopy({name: torch.from_numpy(a) for name, a in arrays.items()}))


__all__ = ["VllmTeacher", "check_settings", "load_vllm_teacher", "positions_from_prompt_logprobs", "run_vllm_teacher",
           "tail_logmass"]
