"""Bucket divergences: teacher p and student q compared over the same M = K (+ 1 tail) buckets.

The per-position math of kdstore.losses, on log-probs [..., M] (the docstring of kdstore.losses says
what the buckets are and why each divergence over them is a lower bound of its full-vocabulary value).
Pure functions, any float dtype, no reduction over positions.
"""

from __future__ import annotations

import math

import torch

# Teacher log-probs are clamped here: exp(-100) ~ 4e-44 is below anything a loss can see, and keeps
# -inf (a tail stored as exactly 0 mass) out of reverse-direction logs.
LOGPROB_FLOOR = -100.0


def student_buckets(student_logprobs: torch.Tensor, topk_ids: torch.Tensor, with_tail: bool) -> torch.Tensor:
    """Student log q [..., V], teacher ids [..., K] int64 -> bucket log-probs [..., K + 1] (tail last) or [..., K]."""
    head = student_logprobs.gather(-1, topk_ids)
    if not with_tail:
        return head
    tail = student_logprobs.scatter(-1, topk_ids, -math.inf).logsumexp(-1, keepdim=True)
    return torch.cat([head, tail], -1)


def teacher_buckets(topk_logprobs: torch.Tensor, tail_logmass: torch.Tensor | None, temperature: float,
                    with_tail: bool) -> torch.Tensor:
    """Stored log p [..., K] and tail [...] at tau = 1 -> re-tempered, renormalised bucket log-probs [..., K (+ 1)].

    With no tail column the tail is inferred as log(1 - sum p_topk), the stored values being log-probs over the full
    vocabulary. Log-probs are clamped at LOGPROB_FLOOR before the (kdstore.collate.retemper) re-tempering.
    """
    if with_tail:
        if tail_logmass is None:
            head_mass = topk_logprobs.logsumexp(-1).clamp(max=0.0)
            tail_logmass = torch.log(-torch.expm1(head_mass))
        topk_logprobs = torch.cat([topk_logprobs, tail_logmass.unsqueeze(-1)], -1)
    return torch.log_softmax(topk_logprobs.clamp(min=LOGPROB_FLOOR) / temperature, -1)


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum p (log p - log q) over the last dim: [..., M] twice -> [...]."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w a + (1 - w) b) for log-probs [..., M]; 0 <= w < 1."""
    if weight_a == 0:
        return log_b
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def forward_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(p || q): mode-covering; the standard KD loss. Bucket log-probs [..., M] -> [...]."""
    return kl(teacher, student)


def reverse_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(q || p): mode-seeking. In bucket form the student's tail mass meets the teacher's tail mass as one bucket
    (no spreading over tail ids is imputed), a lower bound of the full-vocabulary value."""
    return kl(student, teacher)


def jsd(student: torch.Tensor, teacher: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalised JSD (GKD, Agarwal et al. 2024): beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q."""
    mixture = log_mixture(teacher, student, beta)
    return beta * kl(teacher, mixture) + (1 - beta) * kl(student, mixture)


def skew_kl(student: torch.Tensor, teacher: torch.Tensor, alpha: float) -> torch.Tensor:
    """Skew KL (DistiLLM, Ko et al. 2024): KL(p || alpha p + (1 - alpha) q); alpha = 0 is forward KL."""
    return kl(teacher, log_mixture(teacher, student, alpha))


def skew_reverse_kl(student: torch.Tensor, teacher: torch.Tensor, alpha: float) -> torch.Tensor:
    """Skew reverse KL (DistiLLM): KL(q || alpha q + (1 - alpha) p); alpha = 0 is reverse KL."""
    return kl(student, log_mixture(student, teacher, alpha))


def taid_kl(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """TAID: KL(p_t || q), p_t = softmax((1 - t) stopgrad(log q) + t log p) over the buckets.

    Log-probs stand in for logits (softmax ignores a per-position constant); the tail bucket is interpolated as one
    token, exact only when K = V. t = 1 is forward KL; t = 0 gives 0.
    """
    target = torch.log_softmax((1 - t) * student.detach() + t * teacher, -1)
    return kl(target, student)


def sampled_cross_entropy(student_logprobs: torch.Tensor, sampled_ids: torch.Tensor, sampled_counts: torch.Tensor,
                          head: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Unbiased estimate of the cross-entropy -sum_i p_i log q_i from draws (Anshumann et al. 2025).

    student_logprobs [..., V] at tau = 1; sampled_ids / sampled_counts [..., S] (count 0 = padding) -> [...].
    Mode "full" (head None): N draws from p, estimate -sum (c_i / N) log q_i; E[c_i / N] = p_i.
    Mode "tail": head = (teacher log p [..., K], student log q [..., K] on the top-K ids, teacher tail log-mass
    [...]); the draws came from p restricted to ids outside the top-K, so E[p_tail c_j / N] = p_j and the estimate
    is the exact head -sum_k p_k log q_k plus -p_tail sum_j (c_j / N) log q_j (so do not truncate such a batch
    with Collator(top_k=...): the entries it drops were never drawn). Either way the student gradient is unbiased
    for KL's.
    """
    counts = sampled_counts.to(student_logprobs.dtype)
    num_draws = counts.sum(-1).clamp(min=1.0)
    estimate = -(counts * student_logprobs.gather(-1, sampled_ids)).sum(-1) / num_draws
    if head is None:
        return estimate
    teacher_head, student_head, teacher_tail = head
    return -(teacher_head.exp() * student_head).sum(-1) + teacher_tail.exp() * estimate
