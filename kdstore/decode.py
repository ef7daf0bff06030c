"""Batched sampling with a KV cache that keeps, per generated token, what the store needs.

    outputs = decode_batch(teacher, prompts_ids, uniforms, settings, k=32, stop_check=None)

One prefill of the left-padded prompts, then one forward of one token per step through the model's cache
(``past_key_values``), until every row has stopped or ``max_new_tokens`` are drawn. At each step, on the
device, from the raw fp32 logits of the full vocabulary:

* the token is drawn by inverse CDF with the row's own uniform for that step from the sampling distribution
  (logits / temperature, then top-k, then top-p; argmax at temperature 0). The uniforms come from the sample's
  seed alone, so a sample does not depend on its batch mates' draws;
* the teacher's distribution at temperature 1 is sparsified by ``kdstore.teacher.sparsify``: top-K ids and
  log-probs, tail mass and the drawn token's log-prob, and optional sampled draws (``sample_sparse``) — the
  same values the logits table stores, whatever the sampling settings.

Only [B, K] values a step leave the device, once per batch. A row stops at the end-of-sequence token or
when a stop string appears in its completion text (both kept in the completion: finish reason "stop"), else
at ``max_new_tokens`` ("length"). Rerunning the same batch on the same device and dtype gives the same bits.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from kdstore.teacher import Teacher, sample_sparse, sparsify


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0: off
    max_new_tokens: int = 128


def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """fp32 logits [B, V], uniforms [B] in [0, 1) -> drawn token ids [B] (module docstring)."""
    if settings.temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits / settings.temperature if settings.temperature != 1.0 else logits  # not written to below
    if 0 < settings.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, settings.top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if settings.top_p < 1.0:
        ordered, order = scaled.sort(dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
        drop = (before >= settings.top_p).scatter(1, order, before >= settings.top_p)
        scaled = scaled.masked_fill(drop, float("-inf"))
    cdf = torch.softmax(scaled.double(), dim=-1).cumsum_(dim=-1)
    # right=True: the first id whose cumulative mass exceeds u * total, never an id of zero probability
    drawn = torch.searchsorted(cdf, uniforms.double()[:, None] * cdf[:, -1:], right=True)
    return drawn.squeeze(1).clamp_(max=cdf.shape[1] - 1)


@dataclass
class BatchOutput:
    """Host arrays for B rows and S steps; row r's completion is its first ``lengths[r]`` steps."""

    tokens: np.ndarray  # [B, S] int64
    topk_ids: np.ndarray  # [B, S, K]
    topk_logprobs: np.ndarray  # [B, S, K] float32
    tail_logmass: np.ndarray  # [B, S] float32
    target_logprob: np.ndarray  # [B, S] float32 (the drawn token at temperature 1)
    lengths: np.ndarray  # [B]
    stopped: np.ndarray  # [B] bool: end-of-sequence or a stop string (else the length limit)
    non_finite: np.ndarray  # [B] bool: the teacher produced NaN or inf logits for this row
    sampled_ids: np.ndarray | None = None  # [B, S, D] padded with -1
    sampled_counts: np.ndarray | None = None


def _left_padded(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def decode_batch(teacher: Teacher, prompts: list[list[int]], uniforms: torch.Tensor, settings: SamplingSettings,
                 k: int, eos_ids: set[int], pad_id: int, stop_check: Callable[[int, list[int]], bool] | None = None,
                 draw_uniforms: torch.Tensor | None = None, sampled_mode: str = "full") -> BatchOutput:
    """Sample one completion per prompt. uniforms [B, max_new_tokens] float64 (host); draw_uniforms
    [B, max_new_tokens, D] for sampled draws, or None. ``stop_check(row, completion ids)`` says whether a stop
    string has appeared (called on the host after each step, only for running rows)."""
    device, model = teacher.device, teacher.model
    ids, mask = _left_padded(prompts, pad_id, device)
    positions = (mask.cumsum(dim=1) - 1).clamp_(min=0)
    uniforms = uniforms.to(device)
    draw_uniforms = draw_uniforms.to(device) if draw_uniforms is not None else None
    eos = torch.tensor(sorted(eos_ids) or [-1], device=device)
    cache_name, keep_last = _cache_argument(model), _keep_last_logits(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **keep_last)
    cache, logits = getattr(out, cache_name), out.logits[:, -1].float()
    batch = len(prompts)
    running = torch.ones(batch, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    non_finite = torch.zeros(batch, dtype=torch.bool, device=device)
    steps: list[dict[str, torch.Tensor]] = []
    host_tokens: list[list[int]] = [[] for _ in prompts]
    for step in range(settings.max_new_tokens):
        token = sample_tokens(logits, uniforms[:, step], settings)
        # overwrite: the log-sum-exp may work in the logits' memory unless the draws still need them
        record = sparsify(logits, token, k, overwrite=draw_uniforms is None)
        if draw_uniforms is not None:
            record["sampled_ids"], record["sampled_counts"] = sample_sparse(
                logits, record["topk_ids"], draw_uniforms[:, step], sampled_mode)
        non_finite |= running & ~torch.isfinite(record.pop("lse"))
        record["token"] = token
        steps.append(record)
        lengths += running
        running &= ~torch.isin(token, eos)
        if stop_check is not None:
            running = _apply_stop_strings(token, running, host_tokens, stop_check)
        if not bool(running.any()):  # one sync a step, as transformers' generate has
            break
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=torch.where(running, token, pad_id)[:, None], attention_mask=mask, position_ids=positions,
                    use_cache=True, **{cache_name: cache})
        cache, logits = getattr(out, cache_name), out.logits[:, -1].float()
    return _to_host(steps, lengths, running, non_finite)


def _cache_argument(model: torch.nn.Module) -> str:
    """The name of the KV-cache argument and output: ``cache`` from transformers 5.24 on, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _keep_last_logits(model: torch.nn.Module) -> dict[str, int]:
    """The prefill needs the last position's logits only: ``logits_to_keep`` (``num_logits_to_keep`` in older
    transformers); a model with neither computes all of them."""
    parameters = inspect.signature(model.forward).parameters
    return next(({name: 1} for name in ("logits_to_keep", "num_logits_to_keep") if name in parameters), {})


def _apply_stop_strings(token: torch.Tensor, running: torch.Tensor, host_tokens: list[list[int]],
                        stop_check: Callable[[int, list[int]], bool]) -> torch.Tensor:
    tokens, alive = token.tolist(), running.tolist()
    changed = False
    for row, (value, is_running) in enumerate(zip(tokens, alive)):
        if not is_running:
            continue
        host_tokens[row].append(value)
        if stop_check(row, host_tokens[row]):
            alive[row], changed = False, True
    return torch.tensor(alive, device=running.device) if changed else running


def _to_host(steps: list[dict[str, torch.Tensor]], lengths: torch.Tensor, running: torch.Tensor,
             non_finite: torch.Tensor) -> BatchOutput:
    stacked = {name: torch.stack([s[name] for s in steps], dim=1).cpu().numpy() for name in steps[0]}
    # a row still running after the last step stopped at the length limit; every other row stopped on its own
    return BatchOutput(tokens=stacked["token"], topk_ids=stacked["topk_ids"], topk_logprobs=stacked["topk_logprobs"],
                       tail_logmass=stacked["tail_logmass"], target_logprob=stacked["target_logprob"],
                       lengths=lengths.cpu().numpy(), stopped=~running.cpu().numpy(),
                       non_finite=non_finite.cpu().numpy(), sampled_ids=stacked.get("sampled_ids"),
                       sampled_counts=stacked.get("sampled_counts"))
