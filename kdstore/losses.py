"""Distillation losses against the stored sparse teacher, without ever building a dense [B, T, V] teacher.

    config = LossConfig(name="forward_kl", temperature=2.0, ce_weight=0.1)
    batch = widen({k: v.to(device) for k, v in batch.items()}, collate.logprob_table)  # teacher at tau = 1
    loss, metrics = distillation_loss(model(input_ids=..., attention_mask=...).logits, batch, config)

Buckets. At each position the store knows the teacher's K most likely tokens and the rest only as one
mass, exp(tail_logmass). Every divergence here compares teacher p and student q over the same K + 1
buckets: the K stored ids, and a "ghost" tail bucket holding the teacher's tail mass and the student's
mass on the other V - K ids, log sum_{j not in top-K} q_j (a logsumexp with the top-K masked out: exact,
where log(1 - sum q_topk) cancels to -inf once the head holds all but 1e-7 of the mass). By the
data-processing inequality each bucket divergence is a lower bound of its full-vocabulary value, equal
to it when K = V; then the tail bucket is dropped (a stored tail at K = V is rounding noise). For the
student's gradient this means: on a top-K id it is the full-vocabulary gradient; over the tail ids the
teacher's tail mass is spread in proportion to the student's own tail probabilities.

Sampled draws (``sampled_kl``, random-sampling KD): the store holds ids drawn from the teacher with their
counts instead of (or, mode "tail", next to) a top-K head; the loss is divergences.sampled_cross_entropy, an
unbiased estimate of the cross-entropy -sum_i p_i log q_i, so its gradient is unbiased for KL's. Its value
(the ``kd`` metric) is KL plus the teacher's entropy, which a store does not record: it does not fall to 0.

Temperature tau: the student is log_softmax(z / tau); the teacher buckets are re-tempered with
kdstore.collate.retemper's formula (log_softmax of bucket log-probs / tau, which also renormalises
quantised values), so the batch must hold the teacher at tau = 1: do not re-temper in the Collator or
widen as well. The KD term is scaled by tau**2 so its gradient does not shrink as 1 / tau**2 (Hinton et
al. 2015); the CE term uses the student at tau = 1.

Memory: positions run in chunks of ``chunk_positions``; each chunk's gradient is computed right away into one
buffer shaped like the logits (what backward would allocate anyway), so the extra memory is that buffer plus a
few [chunk, V] fp32 tensors, whatever B * T. The loss is differentiable once (no double backward).
forward_kl and sampled_kl write each chunk's gradient by hand (0.7-1.0x and 1.04x the cost of F.cross_entropy
forward + backward on the same logits, one CPU thread, V = 4096, K = 64); the other losses go through
autograd (about 3-4x). The per-bucket divergences live in kdstore.divergences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from kdstore.collate import IGNORE_INDEX
from kdstore.divergences import (  # noqa: F401  (re-exported: the per-bucket pieces are public here too)
    LOGPROB_FLOOR,
    forward_kl,
    jsd,
    kl,
    log_mixture,
    reverse_kl,
    sampled_cross_entropy,
    skew_kl,
    skew_reverse_kl,
    student_buckets,
    taid_kl,
    teacher_buckets,
)
from kdstore.errors import KdstoreError
from kdstore.taid import TaidState

LOSS_NAMES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "taid", "sampled_kl")
SAMPLED_MODES = ("full", "tail")
_TEACHER_KEYS = ("topk_ids", "topk_logprobs", "tail_logmass", "labels", "sampled_ids", "sampled_counts")


class LossConfigError(KdstoreError):
    hint = f"valid loss names: {', '.join(LOSS_NAMES)}; see kdstore.losses.LossConfig for each field's range"


class LossInputError(KdstoreError):
    hint = "pass student logits [B, T, V] and a batch from kdstore.collate.widen (int64 ids, float32 log-probs)"


class VocabMismatchError(LossInputError):
    hint = "the student's logits must cover every teacher id: use a student with the store's tokenizer"


@dataclass(frozen=True)
class LossConfig:
    """Which loss and its knobs. Ranges are checked on construction (``LossConfigError``)."""

    name: str = "forward_kl"  # one of LOSS_NAMES
    temperature: float = 1.0  # > 0; student logits / tau, teacher re-tempered over the buckets
    ce_weight: float = 0.0  # total = (1 - ce_weight) * tau**2 * kd + ce_weight * CE(student, labels)
    beta: float = 0.5  # jsd: m = beta p + (1 - beta) q; 0 < beta < 1 (0 and 1 make the loss vanish)
    alpha: float = 0.1  # skew_kl / skew_reverse_kl: share of the first argument in the mixture (DistiLLM: 0.1)
    taid_start: float = 0.0  # TAID's t at step 0 (the paper's runs use 0.4)
    taid_end: float = 1.0  # t never exceeds this
    taid_momentum: float = 0.99  # beta of the paper's Algorithm 1: smoothing of the relative loss change
    taid_step_size: float = 5e-4  # alpha of Algorithm 1: t grows by at most this times (1 - t) per update
    taid_total_steps: int = 0  # > 0: t also never falls behind the linear ramp start -> end over these updates
    sampled_mode: str = "full"  # sampled_kl: the store's codec.sampled.mode ("full" or "tail")
    chunk_positions: int = 1024  # positions per chunk: ~5 fp32 [chunk, V] temporaries (V=128k: ~2.5 GB)

    def __post_init__(self) -> None:
        problems = [
            (self.name not in LOSS_NAMES, f"unknown loss {self.name!r}"),
            (not self.temperature > 0, f"temperature must be positive, got {self.temperature}"),
            (not 0 <= self.ce_weight <= 1, f"ce_weight must be in [0, 1], got {self.ce_weight}"),
            (not 0 < self.beta < 1, f"beta must be in (0, 1), got {self.beta}; use forward_kl or reverse_kl for the ends"),
            (not 0 <= self.alpha < 1, f"alpha must be in [0, 1), got {self.alpha}"),
            (not 0 <= self.taid_start <= self.taid_end <= 1,
             f"need 0 <= taid_start <= taid_end <= 1, got {self.taid_start} and {self.taid_end}"),
            (not 0 <= self.taid_momentum < 1, f"taid_momentum must be in [0, 1), got {self.taid_momentum}"),
            (not self.taid_step_size >= 0 or self.taid_total_steps < 0, "taid_step_size and taid_total_steps must be >= 0"),
            (self.sampled_mode not in SAMPLED_MODES, f"sampled_mode must be 'full' or 'tail', got {self.sampled_mode!r}"),
            (self.chunk_positions < 1, f"chunk_positions must be positive, got {self.chunk_positions}"),
            (self.name == "sampled_kl" and self.temperature != 1.0,
             "sampled_kl needs temperature 1: the store's draws were made from the teacher at temperature 1"),
        ]
        for bad, message in problems:
            if bad:
                raise LossConfigError(message)


# ---- per-position losses on one chunk, and the chunked driver ----

def position_losses(student_logits: torch.Tensor, teacher: dict[str, torch.Tensor], config: LossConfig,
                    taid_t: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk: student logits [N, V] (any float dtype) and the batch's per-position tensors flattened to [N, ...]
    -> (kd [N], ce [N]) in fp32 (float64 stays float64). Unmasked positions only are meaningful."""
    logits = student_logits.to(torch.promote_types(student_logits.dtype, torch.float32))
    labels = teacher["labels"].clamp(min=0).unsqueeze(-1)
    ce = logits.logsumexp(-1) - logits.gather(-1, labels).squeeze(-1)
    num_tail_ids = logits.shape[-1] - teacher["topk_ids"].shape[-1]
    if config.name == "sampled_kl":
        logprobs = torch.log_softmax(logits, -1)
        head = None
        if config.sampled_mode == "tail":
            buckets = _teacher(teacher, logits.dtype, 1.0, num_tail_ids > 0)
            num_kept = teacher["topk_ids"].shape[-1]
            tail = buckets[..., num_kept] if num_tail_ids > 0 else torch.full_like(buckets[..., 0], -math.inf)
            head = (buckets[..., :num_kept], logprobs.gather(-1, teacher["topk_ids"]), tail)
        return sampled_cross_entropy(logprobs, teacher["sampled_ids"], teacher["sampled_counts"], head), ce
    logprobs = torch.log_softmax(logits / config.temperature, -1)
    student = student_buckets(logprobs, teacher["topk_ids"], num_tail_ids > 0)
    target = _teacher(teacher, logits.dtype, config.temperature, num_tail_ids > 0)
    divergences: dict[str, Callable[[], torch.Tensor]] = {
        "forward_kl": lambda: forward_kl(student, target),
        "reverse_kl": lambda: reverse_kl(student, target),
        "jsd": lambda: jsd(student, target, config.beta),
        "skew_kl": lambda: skew_kl(student, target, config.alpha),
        "skew_reverse_kl": lambda: skew_reverse_kl(student, target, config.alpha),
        "taid": lambda: taid_kl(student, target, taid_t),
    }
    return divergences[config.name](), ce


def _teacher(teacher: dict[str, torch.Tensor], dtype: torch.dtype, temperature: float, with_tail: bool) -> torch.Tensor:
    tail = teacher.get("tail_logmass")
    return teacher_buckets(teacher["topk_logprobs"].to(dtype), None if tail is None else tail.to(dtype),
                           temperature, with_tail)


def _weighted_sums(student_logits: torch.Tensor, teacher: dict[str, torch.Tensor], config: LossConfig,
                   taid_t: float, total_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk -> (its share of the loss, sum of weight * kd, sum of weight * ce). Teacher values at weight-0
    positions are replaced by harmless ones first, so padding holding NaN, -inf or stray ids cannot leak into the
    loss or its gradient."""
    weights = teacher["weights"]
    keep = weights > 0
    kd, ce = position_losses(student_logits, _clean(teacher, keep), config, taid_t)
    return tuple(_reduce(kd, ce, weights, keep, config, total_weight))


def _reduce(kd: torch.Tensor, ce: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor, config: LossConfig,
            total_weight: torch.Tensor) -> list[torch.Tensor]:
    """Per-position kd [N] and ce [N] -> [the chunk's share of the loss, sum of weight * kd, sum of weight * ce]:
    loss = ((1 - ce_weight) tau^2 sum w kd + ce_weight sum w ce) / total weight; positions not kept add 0."""
    kd_sum, ce_sum = torch.where(keep, kd * weights, 0.0).sum(), torch.where(keep, ce * weights, 0.0).sum()
    share = ((1 - config.ce_weight) * config.temperature ** 2 * kd_sum + config.ce_weight * ce_sum) / total_weight
    return [share, kd_sum, ce_sum]


def _clean(teacher: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """The chunk's teacher tensors with harmless values at positions that do not count (padding may hold anything)."""
    clean = dict(teacher)
    for name, harmless in (("topk_ids", 0), ("topk_logprobs", 0.0), ("tail_logmass", 0.0), ("sampled_ids", 0),
                           ("sampled_counts", 0)):
        if name in clean:
            shape = keep.shape + (1,) * (clean[name].dim() - 1)
            clean[name] = torch.where(keep.view(shape), clean[name], torch.full_like(clean[name], harmless))
    return clean


def _by_autograd(function: Callable[..., tuple[torch.Tensor, ...]]) -> Callable[..., Any]:
    """A chunk function returning sums -> one returning (sums, d sums[0] / d logits or None), through autograd."""
    def run(logits: torch.Tensor, parts: dict[str, torch.Tensor], *args: Any, wants_gradient: bool) -> Any:
        chunk = logits.detach().requires_grad_(wants_gradient)
        with torch.set_grad_enabled(wants_gradient):
            sums = function(chunk, parts, *args)
            gradient = torch.autograd.grad(sums[0], chunk)[0] if wants_gradient else None
        return [t.detach() for t in sums], gradient
    return run


def _forward_kl_fused(logits: torch.Tensor, parts: dict[str, torch.Tensor], config: LossConfig, taid_t: float,
                      total_weight: torch.Tensor, *, wants_gradient: bool) -> Any:
    """forward_kl (+ CE mixing) on one chunk with its gradient written out by hand, in one [N, V] buffer and
    about four passes over it, where autograd through the generic ops makes ~20 (3.1-3.8x F.cross_entropy's
    cost, one thread). Same values and gradient as ``_by_autograd(_weighted_sums)`` (tests compare them).

    With e_j = exp(z_j / tau - max) and s = sum_j e_j: d KL(p || q) / d z_j = (q_j - r_j) / tau, where r_j = p_j
    on a top-K id and p_tail e_j / e_tail on a tail id, so a tail id's gradient is e_j (1 / s - p_tail / e_tail).
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    weights, tau, mix = parts["weights"].to(dtype), config.temperature, config.ce_weight
    keep = weights > 0
    teacher = _clean(parts, keep)
    ids, num_kept = teacher["topk_ids"], teacher["topk_ids"].shape[-1]
    with_tail = logits.shape[-1] > num_kept
    scaled = logits.to(dtype) / tau if tau != 1 else logits.to(dtype)  # may alias the caller's logits: not in place
    row_max = scaled.amax(-1, keepdim=True)
    e = (scaled - row_max).exp_()  # the one [N, V] buffer
    head_e = e.gather(-1, ids)
    e.scatter_(-1, ids, 0.0)  # from here e holds the tail ids' terms only: their sum has no cancellation
    tail_e = e.sum(-1, keepdim=True) if with_tail else torch.zeros_like(row_max)
    log_s = (tail_e + head_e.sum(-1, keepdim=True)).log()
    lse = row_max + log_s
    log_q = scaled.gather(-1, ids) - lse
    target = _teacher(teacher, dtype, tau, with_tail)
    p = target.exp()
    tiny = torch.zeros_like(keep)
    if with_tail:
        log_q_tail = tail_e.log() - log_s
        tiny = (tail_e < torch.finfo(dtype).tiny * 2**20).squeeze(-1)  # tail terms underflowed: redo in logs
        if tiny.any():
            log_tail = scaled[tiny].scatter(-1, ids[tiny], -math.inf) - lse[tiny]
            log_q_tail[tiny] = log_tail.logsumexp(-1, keepdim=True)
        log_q = torch.cat([log_q, log_q_tail], -1)
    kd = (p * (target - log_q)).sum(-1)
    labels = teacher["labels"].clamp(min=0).unsqueeze(-1)
    lse_ce = lse if tau == 1 else logits.to(dtype).logsumexp(-1, keepdim=True)
    ce = (lse_ce - logits.to(dtype).gather(-1, labels)).squeeze(-1)
    sums = _reduce(kd, ce, weights, keep, config, total_weight)
    if not wants_gradient:
        return sums, None
    row_weight = (torch.where(keep, weights, 0.0) / total_weight).unsqueeze(-1)
    kd_factor = (1 - mix) * tau * row_weight  # d [(1 - mix) tau^2 KL] / d z = (1 - mix) tau (q - r)
    ce_mixed_in = mix and tau == 1  # CE's softmax is q itself: fold it into the same pass
    inverse_s = torch.exp(-log_s)
    tail_coef = kd_factor * (inverse_s - (p[:, num_kept:] if with_tail else 0.0) / tail_e.clamp(min=torch.finfo(dtype).tiny))
    if ce_mixed_in:
        tail_coef = tail_coef + mix * row_weight * inverse_s
    gradient = e.mul_(tail_coef)
    head_q = log_q[:, :num_kept].exp()
    head = kd_factor * (head_q - p[:, :num_kept]) + (mix * row_weight * head_q if ce_mixed_in else 0.0)
    gradient.scatter_(-1, ids, head)
    if tiny.any():  # rows whose tail terms underflowed: each tail id takes its share of p_tail, from logs
        shares = (scaled[tiny] - lse[tiny] - log_q_tail[tiny]).exp().scatter_(-1, ids[tiny], 0.0)
        rows = -kd_factor[tiny] * p[tiny, num_kept:] * shares
        gradient[tiny] = rows.scatter_(-1, ids[tiny], head[tiny])
    if mix and not ce_mixed_in:
        gradient.add_((logits.to(dtype) - lse_ce).exp_().mul_(mix * row_weight))
    if mix:
        gradient.scatter_add_(-1, labels, -mix * row_weight.expand_as(labels).to(dtype))
    gradient[~keep] = 0.0  # a position that does not count gets no gradient, whatever its logits hold
    return sums, gradient


def _sampled_kl_fused(logits: torch.Tensor, parts: dict[str, torch.Tensor], config: LossConfig, taid_t: float,
                      total_weight: torch.Tensor, *, wants_gradient: bool) -> Any:
    """sampled_kl (+ CE mixing) on one chunk with its gradient by hand. Both modes are a cross-entropy against a
    sparse target w over ids, -sum_i w_i log q_i = W lse(z) - sum_i w_i z_i (W = sum_i w_i), whose gradient is
    W q - w: mode "full" w = counts / N; mode "tail" w = p on the top-K ids and p_tail counts / N on the drawn
    tail ids (``sampled_cross_entropy`` has the estimator; tests compare this with autograd through it)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    weights, mix = parts["weights"].to(dtype), config.ce_weight
    keep = weights > 0
    teacher = _clean(parts, keep)
    counts = teacher["sampled_counts"].to(dtype)
    ids, share = teacher["sampled_ids"], counts / counts.sum(-1, keepdim=True).clamp(min=1.0)
    if config.sampled_mode == "tail":
        num_kept = teacher["topk_ids"].shape[-1]
        with_tail = logits.shape[-1] > num_kept
        buckets = _teacher(teacher, dtype, 1.0, with_tail).exp()
        tail = buckets[:, num_kept:num_kept + 1] if with_tail else torch.zeros_like(buckets[:, :1])
        ids, share = torch.cat([teacher["topk_ids"], ids], -1), torch.cat([buckets[:, :num_kept], tail * share], -1)
    z = logits.to(dtype)
    lse = z.logsumexp(-1, keepdim=True)
    labels = teacher["labels"].clamp(min=0).unsqueeze(-1)
    kd = (share.sum(-1, keepdim=True) * lse - (share * z.gather(-1, ids)).sum(-1, keepdim=True)).squeeze(-1)
    ce = (lse - z.gather(-1, labels)).squeeze(-1)
    sums = _reduce(kd, ce, weights, keep, config, total_weight)  # tau = 1: LossConfig refuses another for sampled_kl
    if not wants_gradient:
        return sums, None
    gradient = (z - lse).exp_().mul_((1 - mix) * share.sum(-1, keepdim=True) + mix)  # (1-mix) W q + mix q
    gradient.scatter_add_(-1, ids, share.mul(-(1 - mix)))
    if mix:
        gradient.scatter_add_(-1, labels, torch.full_like(labels, -mix, dtype=dtype))
    gradient.mul_((torch.where(keep, weights, 0.0) / total_weight).unsqueeze(-1))
    gradient[~keep] = 0.0
    return sums, gradient


class _ChunkedLoss(torch.autograd.Function):
    """Runs a per-chunk loss over chunks of positions and, when a gradient is wanted, back-propagates each chunk
    at once into one gradient buffer shaped like the logits. So only one chunk's fp32 intermediates live at a time,
    with no recomputation and no per-chunk full-size gradient (slicing a graph input would cost O(chunks * N * V)).
    First-order only: the saved gradient is not itself differentiable."""

    @staticmethod
    def forward(ctx: Any, flat_logits: torch.Tensor, per_position: dict[str, torch.Tensor], chunk_positions: int,
                function: Callable[..., tuple[torch.Tensor, ...]], args: tuple[Any, ...],
                wants_gradient: bool) -> tuple[torch.Tensor, ...]:
        gradient = torch.empty_like(flat_logits) if wants_gradient else None
        totals: list[torch.Tensor] | None = None
        for start in range(0, flat_logits.shape[0], chunk_positions):
            part = slice(start, start + chunk_positions)
            sums, chunk_gradient = function(flat_logits[part].detach(), {k: v[part] for k, v in per_position.items()},
                                            *args, wants_gradient=wants_gradient)
            if gradient is not None:
                gradient[part] = chunk_gradient
            totals = sums if totals is None else [t + s for t, s in zip(totals, sums)]
        if totals is None:  # no positions at all
            dtype = torch.promote_types(flat_logits.dtype, torch.float32)
            totals = [flat_logits.new_zeros((), dtype=dtype) for _ in range(3)]
        ctx.save_for_backward(gradient if gradient is not None else flat_logits.new_empty(0))
        ctx.mark_non_differentiable(*totals[1:])
        return tuple(totals)

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, *unused: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (gradient,) = ctx.saved_tensors
        if not bool(grad_loss == 1):  # the usual loss.backward(): hand the buffer over without a copy
            gradient = gradient * grad_loss.to(gradient.dtype)
        return gradient, None, None, None, None, None


def _chunked_sums(function: Callable[..., Any], flat_logits: torch.Tensor, per_position: dict[str, torch.Tensor],
                  chunk_positions: int, *args: Any) -> tuple[torch.Tensor, ...]:
    """Totals of ``function(logits[chunk], {k: v[chunk]}, *args, wants_gradient=...)`` over chunks; the function
    returns (sums, gradient of sums[0] or None) and the first total carries that gradient."""
    wants_gradient = torch.is_grad_enabled() and flat_logits.requires_grad
    return _ChunkedLoss.apply(flat_logits, per_position, chunk_positions, function, args, wants_gradient)


def distillation_loss(student_logits: torch.Tensor, batch: dict[str, torch.Tensor], config: LossConfig, *,
                      token_weights: torch.Tensor | None = None,
                      state: TaidState | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Scalar loss and float metrics for one batch.

    student_logits [B, T, V], any float dtype, aligned with ``batch["labels"]`` [B, T] (-100 = ignored).
    batch: a widened batch at tau = 1 (module docstring): topk_ids [B, T, K] int64, topk_logprobs [B, T, K] float32,
    tail_logmass [B, T] (optional), and for sampled_kl sampled_ids / sampled_counts [B, T, S].
    token_weights [B, T] (optional, >= 0): per-position weights, e.g. ``select_tokens_by_gap``.
    state: a ``TaidState`` for name "taid" (read here, advanced by the caller with ``state.update``).

    loss = (1 - ce_weight) * tau**2 * kd + ce_weight * ce, each the weighted mean over unmasked positions
    (sum w l / sum w); 0.0, with finite zero gradients, when no position counts. sampled_kl's kd is the estimated
    cross-entropy (KL plus the teacher's entropy, a constant for the student). Metrics: "kd", "ce" (and "taid_t").
    """
    _check_inputs(student_logits, batch, config, token_weights)
    if config.name == "taid" and state is None:
        raise LossConfigError("the taid loss needs its schedule state",
                              hint="pass state=TaidState(config) and call state.update(metrics['kd']) after each step")
    compute_dtype = torch.promote_types(student_logits.dtype, torch.float32)
    weights = (batch["labels"] != IGNORE_INDEX).to(compute_dtype)
    if token_weights is not None:
        weights = weights * token_weights.to(compute_dtype)
    vocab_size = student_logits.shape[-1]
    per_position = {k: batch[k].flatten(0, 1) for k in _TEACHER_KEYS if k in batch}
    per_position["weights"] = weights.flatten()
    taid_t = state.t if state is not None else 1.0
    total = weights.sum()
    total = torch.where(total > 0, total, torch.ones_like(total))  # nothing counts: sums are 0, and so is the loss
    chunk_loss = _FUSED.get(config.name, _by_autograd(_weighted_sums))
    loss, kd_sum, ce_sum = _chunked_sums(chunk_loss, student_logits.reshape(-1, vocab_size), per_position,
                                         config.chunk_positions, config, taid_t, total)
    kd_value, ce_value = (torch.stack([kd_sum, ce_sum]) / total).tolist()
    metrics = {"kd": kd_value, "ce": ce_value}
    if config.name == "taid":
        metrics["taid_t"] = taid_t
    return loss, metrics


def _check_inputs(student_logits: torch.Tensor, batch: dict[str, torch.Tensor], config: LossConfig,
                  token_weights: torch.Tensor | None) -> None:
    needed = ["labels", "topk_ids", "topk_logprobs"]
    if config.name == "sampled_kl":
        needed += ["sampled_ids", "sampled_counts"]
    missing = [k for k in needed if k not in batch]
    if missing:
        hint = "build the Collator with sampled=True" if "sampled_ids" in missing else "widen the batch first"
        raise LossInputError(f"the batch lacks {', '.join(missing)}", hint=hint)
    if student_logits.dim() != 3 or student_logits.shape[:2] != batch["labels"].shape:
        raise LossInputError(f"student logits {tuple(student_logits.shape)} do not match labels "
                             f"{tuple(batch['labels'].shape)}; expected [B, T, V] with the labels' [B, T]")
    if not batch["topk_logprobs"].is_floating_point():
        raise LossInputError("topk_logprobs holds codes, not log-probs",
                             hint="turn codes into log-probs with kdstore.collate.widen(batch, collate.logprob_table)")
    if token_weights is not None and token_weights.shape != batch["labels"].shape:
        raise LossInputError(f"token_weights {tuple(token_weights.shape)} must match labels {tuple(batch['labels'].shape)}")
    vocab_size = student_logits.shape[-1]
    largest = max((int(batch[k].max()) for k in ("topk_ids", "sampled_ids") if k in batch and batch[k].numel()), default=-1)
    if largest >= vocab_size:
        raise VocabMismatchError(f"the store holds teacher id {largest} but the student has {vocab_size} logits; "
                                 f"the store's vocabulary needs at least {largest + 1}")


def select_tokens_by_gap(student_logprob_of_target: torch.Tensor, reference_logprob_of_target: torch.Tensor,
                         mask: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """0/1 weights [B, T] keeping the ceil(keep_fraction * n) unmasked positions where the student lags a reference
    most (largest reference - student log-prob of the target), AdaSPEC-style token filtering (Hu et al. 2025).

    Both log-probs [B, T] float, mask [B, T] bool (True = counts) -> float32 [B, T]. Ties break arbitrarily.
    """
    if not 0 < keep_fraction <= 1:
        raise LossConfigError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    gap = (reference_logprob_of_target.float() - student_logprob_of_target.float()).detach()
    gap = torch.where(mask, gap, torch.full_like(gap, -math.inf)).flatten()
    num_keep = math.ceil(keep_fraction * int(mask.sum()))
    weights = torch.zeros_like(gap)
    weights[gap.topk(num_keep).indices] = 1.0
    return weights.view(mask.shape)


def dense_forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                     temperature: float = 1.0, chunk_positions: int = 1024) -> torch.Tensor:
    """Online full-vocabulary KD: tau**2 * mean over positions with labels != -100 of KL(p_tau || q_tau).

    student_logits, teacher_logits [B, T, V] (any float dtypes; the teacher gets no gradient), labels [B, T].
    Returns a scalar (0.0 when everything is masked), fp32 inside, chunked like ``distillation_loss``.
    """
    if teacher_logits.shape != student_logits.shape:
        raise VocabMismatchError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                                 f"{tuple(student_logits.shape)} differ")
    compute_dtype = torch.promote_types(student_logits.dtype, torch.float32)
    weights = (labels != IGNORE_INDEX).to(compute_dtype).flatten()
    vocab_size = student_logits.shape[-1]
    per_position = {"teacher_logits": teacher_logits.detach().reshape(-1, vocab_size), "weights": weights}
    total = weights.sum()
    total = torch.where(total > 0, total, torch.ones_like(total))
    return _chunked_sums(_by_autograd(_dense_kl_sums), student_logits.reshape(-1, vocab_size), per_position,
                         chunk_positions, temperature, total)[0]


def _dense_kl_sums(student_logits: torch.Tensor, per_position: dict[str, torch.Tensor], temperature: float,
                   total_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    keep = per_position["weights"] > 0
    # padding may hold anything; zeroed logits keep NaN out of the backward pass of masked positions
    teacher_logits = torch.where(keep.unsqueeze(-1), per_position["teacher_logits"].to(dtype), 0.0)
    student = torch.log_softmax(student_logits.to(dtype) / temperature, -1)
    teacher = torch.log_softmax(teacher_logits / temperature, -1)
    kd_sum = torch.where(keep, kl(teacher, student) * per_position["weights"], 0.0).sum()
    return temperature ** 2 * kd_sum / total_weight, kd_sum, kd_sum.new_zeros(())


# losses with a hand-written chunk gradient; the others go through autograd (tests compare the two)
_FUSED: dict[str, Callable[..., Any]] = {"forward_kl": _forward_kl_fused, "sampled_kl": _sampled_kl_fused}
