"""Losses: every sparse loss checked against a plain dense oracle, plus gradients, masking, chunking and errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import write_store
from kdstore.codec import CodecConfig
from kdstore.collate import Collator, widen
from kdstore.errors import KdstoreError
from kdstore.loader import MemoryMappedDataset
from kdstore.losses import (
    LOSS_NAMES,
    LossConfig,
    LossConfigError,
    LossInputError,
    TaidState,
    VocabMismatchError,
    dense_forward_kl,
    distillation_loss,
    select_tokens_by_gap,
)
from kdstore.teacher import sample_sparse, sparsify

BUCKET_LOSSES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "taid")
BETA, ALPHA, TAID_T = 0.3, 0.2, 0.35


# ---- the oracle: definitions written out over whole distributions, in float64 ----

def reference_divergence(name: str, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-position divergence between teacher p and student q given as log-probs [..., M], float64."""
    p, q = log_p.exp(), log_q.exp()

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "jsd":
        m = BETA * p + (1 - BETA) * q
        return BETA * kl(p, m) + (1 - BETA) * kl(q, m)
    if name == "skew_kl":
        return kl(p, ALPHA * p + (1 - ALPHA) * q)
    if name == "skew_reverse_kl":
        return kl(q, ALPHA * q + (1 - ALPHA) * p)
    if name == "taid":
        return kl(torch.softmax((1 - TAID_T) * log_q + TAID_T * log_p, -1), q)
    raise ValueError(name)


def masked_mean(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    mask = labels != -100
    return values[mask].mean() if mask.any() else values.new_zeros(())


def config_for(name: str, **overrides) -> LossConfig:
    return LossConfig(name=name, beta=BETA, alpha=ALPHA, taid_start=TAID_T, **overrides)


def state_for(config: LossConfig) -> TaidState | None:
    return TaidState(config) if config.name == "taid" else None


def make_case(seed: int, k: int, batch_size: int = 2, num_tokens: int = 5, vocab_size: int = 11, masked_tail: int = 2):
    """Random student and teacher logits [B, T, V] (float32), labels with -100 at some positions, and the stored
    sparse teacher at K (kdstore.teacher.sparsify, as the builder runs it)."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch_size, num_tokens, vocab_size, generator=generator) * 2
    teacher = torch.randn(batch_size, num_tokens, vocab_size, generator=generator) * 3
    labels = torch.randint(0, vocab_size, (batch_size, num_tokens), generator=generator)
    labels[-1, num_tokens - masked_tail:] = -100
    sparse = sparsify(teacher.reshape(-1, vocab_size), labels.clamp(min=0).reshape(-1), k)
    shape = (batch_size, num_tokens)
    batch = {"labels": labels, "topk_ids": sparse["topk_ids"].reshape(*shape, k),
             "topk_logprobs": sparse["topk_logprobs"].reshape(*shape, k), "tail_logmass": sparse["tail_logmass"].reshape(shape)}
    return student, teacher, batch


def add_draws(batch: dict, teacher: torch.Tensor, num_draws: int, mode: str, seed: int = 0) -> dict:
    """sampled_ids / sampled_counts [B, T, S] as the Collator pads them (id 0, count 0 in unused slots)."""
    vocab_size = teacher.shape[-1]
    generator = torch.Generator().manual_seed(seed)
    uniforms = torch.rand(teacher.shape[0] * teacher.shape[1], num_draws, generator=generator, dtype=torch.float64)
    ids, counts = sample_sparse(teacher.reshape(-1, vocab_size), batch["topk_ids"].reshape(-1, batch["topk_ids"].shape[-1]),
                                uniforms, mode)
    width = int((counts > 0).sum(-1).max())  # S: most distinct ids at one position, as the Collator pads; S < N here
    shape = teacher.shape[:2] + (width,)
    return {**batch, "sampled_ids": ids[:, :width].clamp(min=0).reshape(shape),
            "sampled_counts": counts[:, :width].reshape(shape)}


# ---- oracle tests ----

@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name", BUCKET_LOSSES)
def test_full_vocabulary_store_matches_the_dense_definition(name, temperature):
    student, teacher, batch = make_case(seed=1, k=11)
    config = config_for(name, temperature=temperature)
    loss, metrics = distillation_loss(student, batch, config, state=state_for(config))
    log_p = torch.log_softmax(teacher.double() / temperature, -1)
    log_q = torch.log_softmax(student.double() / temperature, -1)
    expected = masked_mean(reference_divergence(name, log_p, log_q), batch["labels"])
    assert loss.item() == pytest.approx(temperature ** 2 * expected.item(), abs=1e-5)
    assert metrics["kd"] == pytest.approx(expected.item(), abs=1e-5)


def dense_buckets(logits: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """log of (probs at the top-K ids, total prob of every other id), float64 [..., K + 1]."""
    probs = torch.softmax(logits.double(), -1)
    head = probs.gather(-1, topk_ids)
    return torch.cat([head, probs.sum(-1, keepdim=True) - head.sum(-1, keepdim=True)], -1).log()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name", BUCKET_LOSSES)
def test_top_k_store_matches_the_dense_definition_over_k_plus_one_buckets(name, temperature):
    student, teacher, batch = make_case(seed=2, k=4)
    config = config_for(name, temperature=temperature)
    loss, metrics = distillation_loss(student, batch, config, state=state_for(config))
    # teacher: buckets at tau = 1, re-tempered as one ghost token (kdstore.collate.retemper); student: softmax at tau
    log_p = torch.log_softmax(dense_buckets(teacher, batch["topk_ids"]) / temperature, -1)
    log_q = dense_buckets(student / temperature, batch["topk_ids"])
    expected = masked_mean(reference_divergence(name, log_p, log_q), batch["labels"])
    assert metrics["kd"] == pytest.approx(expected.item(), abs=1e-5)
    assert loss.item() == pytest.approx(temperature ** 2 * expected.item(), abs=1e-5)


def test_bucket_forward_kl_is_a_lower_bound_of_the_full_vocabulary_kl():
    student, teacher, batch = make_case(seed=3, k=3, masked_tail=0)
    _, metrics = distillation_loss(student, batch, LossConfig())
    full = dense_forward_kl(student, teacher, batch["labels"]).item()
    assert metrics["kd"] < full - 1e-3  # strictly below for a random teacher with a spread-out tail


def test_forward_kl_gradient_on_top_k_ids_is_the_full_vocabulary_gradient():
    student, teacher, batch = make_case(seed=4, k=4, batch_size=1, num_tokens=1, masked_tail=0)
    student.requires_grad_(True)
    distillation_loss(student, batch, LossConfig())[0].backward()
    full_gradient = torch.softmax(student, -1) - torch.softmax(teacher, -1)  # d KL / d logits
    ids = batch["topk_ids"]
    assert torch.allclose(student.grad.gather(-1, ids), full_gradient.gather(-1, ids), atol=1e-6)
    assert not torch.allclose(student.grad, full_gradient, atol=1e-3)  # the tail ids differ: the test can tell


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl"])
def test_student_tail_bucket_stays_exact_when_the_head_holds_all_but_1e_12_of_the_mass(name):
    student, teacher, batch = make_case(seed=19, k=4, masked_tail=0)
    student = torch.zeros_like(student).scatter(-1, batch["topk_ids"], 30.0)  # tail mass 7 e^-30 ~ 6e-13
    _, metrics = distillation_loss(student, batch, LossConfig(name=name))
    log_p = dense_buckets(teacher, batch["topk_ids"])
    log_q = dense_buckets(student, batch["topk_ids"])
    expected = masked_mean(reference_divergence(name, log_p, log_q), batch["labels"])
    assert metrics["kd"] == pytest.approx(expected.item(), rel=1e-5)


def assert_fused_matches_autograd(monkeypatch, student: torch.Tensor, batch: dict, config: LossConfig,
                                  weights: torch.Tensor) -> torch.Tensor:
    """The loss, metrics and gradient of the hand-written chunk equal autograd's through the generic ops
    (float64); returns the hand-written gradient."""
    import kdstore.losses as losses

    def run() -> tuple[torch.Tensor, torch.Tensor, dict]:
        logits = student.clone().requires_grad_(True)
        loss, metrics = distillation_loss(logits, batch, config, token_weights=weights)
        loss.backward()
        return loss.detach(), logits.grad, metrics

    assert config.name in losses._FUSED
    fused = run()
    monkeypatch.setattr(losses, "_FUSED", {})
    generic = run()
    assert torch.allclose(fused[0], generic[0], rtol=1e-10, atol=1e-12)
    assert torch.allclose(fused[1], generic[1], rtol=1e-8, atol=1e-12)
    assert fused[2] == pytest.approx(generic[2], rel=1e-10)
    return fused[1]


@pytest.mark.parametrize("k", [4, 11])
@pytest.mark.parametrize("temperature, ce_weight", [(1.0, 0.0), (1.0, 0.3), (2.0, 0.0), (0.5, 0.7)])
def test_hand_written_forward_kl_gradient_equals_autograd_through_the_generic_ops(monkeypatch, k, temperature, ce_weight):
    student, _, batch = make_case(seed=23, k=k, batch_size=3, num_tokens=6)
    student = student.double()
    student[0, 0] = 0.0
    student[0, 0].scatter_(-1, batch["topk_ids"][0, 0], 400.0)  # tail ids ~e^-400: underflows outside log space
    weights = torch.rand(student.shape[:2], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    config = LossConfig(temperature=temperature, ce_weight=ce_weight, chunk_positions=7)
    gradient = assert_fused_matches_autograd(monkeypatch, student, batch, config, weights)
    assert torch.isfinite(gradient).all() and gradient[-1, -1].abs().max() == 0  # masked position: no gradient


@pytest.mark.parametrize("k", [4, 11])
@pytest.mark.parametrize("mode", ["full", "tail"])
@pytest.mark.parametrize("ce_weight", [0.0, 0.4])
def test_hand_written_sampled_kl_gradient_equals_autograd_through_the_estimator(monkeypatch, k, mode, ce_weight):
    student, teacher, batch = make_case(seed=29, k=k, batch_size=3, num_tokens=6)
    batch = add_draws(batch, teacher, num_draws=12, mode=mode)
    weights = torch.rand(student.shape[:2], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    config = LossConfig(name="sampled_kl", sampled_mode=mode, ce_weight=ce_weight, chunk_positions=7)
    assert_fused_matches_autograd(monkeypatch, student.double(), batch, config, weights)


def test_missing_tail_column_is_inferred_from_the_top_k():
    student, _, batch = make_case(seed=5, k=4)
    with_tail, _ = distillation_loss(student, batch, LossConfig(name="reverse_kl"))
    without = {k: v for k, v in batch.items() if k != "tail_logmass"}
    inferred, _ = distillation_loss(student, without, LossConfig(name="reverse_kl"))
    assert inferred.item() == pytest.approx(with_tail.item(), abs=1e-5)


def test_taid_gradient_stops_at_the_interpolated_target_and_its_ends_are_zero_and_forward_kl():
    student, teacher, batch = make_case(seed=6, k=11, batch_size=1, num_tokens=1, masked_tail=0)
    student.requires_grad_(True)
    config = config_for("taid")
    distillation_loss(student, batch, config, state=TaidState(config))[0].backward()
    target = torch.softmax((1 - TAID_T) * student.detach() + TAID_T * teacher, -1)
    assert torch.allclose(student.grad, torch.softmax(student.detach(), -1) - target, atol=1e-6)
    at_zero = TaidState(LossConfig(name="taid", taid_start=0.0, taid_end=0.0))
    at_one = TaidState(LossConfig(name="taid", taid_start=1.0, taid_end=1.0))
    assert distillation_loss(student, batch, config, state=at_zero)[0].item() == pytest.approx(0.0, abs=1e-6)
    forward = distillation_loss(student, batch, LossConfig())[0].item()
    assert distillation_loss(student, batch, config, state=at_one)[0].item() == pytest.approx(forward, abs=1e-6)


def test_temperature_and_ce_mixing_follow_the_documented_formula():
    student, teacher, batch = make_case(seed=7, k=11)
    config = LossConfig(temperature=2.0, ce_weight=0.25)
    loss, metrics = distillation_loss(student, batch, config)
    ce = F.cross_entropy(student.reshape(-1, 11), batch["labels"].reshape(-1), ignore_index=-100)
    kd = dense_forward_kl(student, teacher, batch["labels"], temperature=2.0) / 4.0
    assert metrics["ce"] == pytest.approx(ce.item(), abs=1e-5)
    assert metrics["kd"] == pytest.approx(kd.item(), abs=1e-5)
    assert loss.item() == pytest.approx(0.75 * 4.0 * kd.item() + 0.25 * ce.item(), abs=1e-5)


def test_token_weights_give_a_weighted_mean_over_unmasked_positions():
    student, teacher, batch = make_case(seed=8, k=11)
    weights = torch.rand(batch["labels"].shape, generator=torch.Generator().manual_seed(0))
    weights[0, :2] = 0.0
    loss, _ = distillation_loss(student, batch, LossConfig(), token_weights=weights)
    per_position = reference_divergence("forward_kl", torch.log_softmax(teacher.double(), -1),
                                        torch.log_softmax(student.double(), -1))
    mask = batch["labels"] != -100
    expected = (per_position * weights)[mask].sum() / weights[mask].sum()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


def test_dense_forward_kl_matches_the_definition_at_temperature():
    student, teacher, batch = make_case(seed=9, k=11)
    got = dense_forward_kl(student, teacher, batch["labels"], temperature=3.0, chunk_positions=4)
    per_position = reference_divergence("forward_kl", torch.log_softmax(teacher.double() / 3, -1),
                                        torch.log_softmax(student.double() / 3, -1))
    assert got.item() == pytest.approx(9.0 * masked_mean(per_position, batch["labels"]).item(), abs=1e-5)


# ---- gradients, masking, chunking, dtypes ----

GRADIENT_CASES = [(name, "full") for name in LOSS_NAMES if name != "taid"] + [("sampled_kl", "tail")]


@pytest.mark.parametrize("name, sampled_mode", GRADIENT_CASES)
def test_gradcheck_in_float64_through_chunks(name, sampled_mode):
    student, teacher, batch = make_case(seed=10, k=3, batch_size=1, num_tokens=4, vocab_size=6, masked_tail=1)
    batch = add_draws(batch, teacher, num_draws=5, mode=sampled_mode)
    config = config_for(name, ce_weight=0.3, chunk_positions=2, sampled_mode=sampled_mode)
    logits = student.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: distillation_loss(x, batch, config)[0], (logits,), eps=1e-6, atol=1e-6,
                                      fast_mode=True)  # a random projection of the Jacobian: 4 evaluations, not 2 * 24


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_all_masked_gives_exactly_zero_with_finite_gradients_even_over_nan_padding(name):
    student, teacher, batch = make_case(seed=11, k=4)
    batch = add_draws(batch, teacher, num_draws=3, mode="full")
    batch["labels"][:] = -100
    batch["topk_logprobs"][:] = math.nan
    batch["tail_logmass"][:] = -math.inf
    config = config_for(name, ce_weight=0.5, chunk_positions=3)
    student.requires_grad_(True)
    loss, metrics = distillation_loss(student, batch, config, state=state_for(config))
    loss.backward()
    assert loss.item() == 0.0 and metrics["kd"] == 0.0 and metrics["ce"] == 0.0
    assert torch.isfinite(student.grad).all() and (student.grad == 0).all()


@pytest.mark.parametrize("name", ["forward_kl", "jsd", "sampled_kl"])
def test_nan_teacher_values_at_padding_do_not_change_the_loss_or_its_gradient(name):
    student, teacher, batch = make_case(seed=12, k=4, masked_tail=2)
    batch = add_draws(batch, teacher, num_draws=3, mode="full")
    dirty = {k: v.clone() for k, v in batch.items()}
    dirty["topk_logprobs"][-1, -2:] = math.nan
    dirty["tail_logmass"][-1, -2:] = math.inf
    results = []
    for candidate in (batch, dirty):
        logits = student.clone().requires_grad_(True)
        loss, _ = distillation_loss(logits, candidate, LossConfig(name=name, chunk_positions=4))
        loss.backward()
        results.append((loss.detach(), logits.grad))
    assert torch.isfinite(results[1][1]).all()
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_chunking_over_positions_gives_the_same_loss_and_gradient(name):
    student, teacher, batch = make_case(seed=13, k=4, batch_size=3, num_tokens=7)
    batch = add_draws(batch, teacher, num_draws=4, mode="full")
    results = []
    for chunk in (1, 4, 10_000):
        config = config_for(name, ce_weight=0.2, chunk_positions=chunk)
        logits = student.clone().requires_grad_(True)
        loss, _ = distillation_loss(logits, batch, config, state=state_for(config))
        loss.backward()
        results.append((loss.item(), logits.grad))
    for loss, grad in results[:2]:
        assert loss == pytest.approx(results[-1][0], abs=1e-6)
        assert torch.allclose(grad, results[-1][1], atol=1e-7)
    with torch.no_grad():  # evaluation: same value, no graph, no gradient buffer
        loss, _ = distillation_loss(student.requires_grad_(True), batch, config, state=state_for(config))
    assert loss.grad_fn is None and loss.item() == pytest.approx(results[-1][0], abs=1e-6)


def test_half_precision_logits_are_upcast_inside():
    student, _, batch = make_case(seed=14, k=4)
    low = student.to(torch.bfloat16)
    loss, _ = distillation_loss(low, batch, LossConfig(name="jsd"))
    upcast, _ = distillation_loss(low.float(), batch, LossConfig(name="jsd"))
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(upcast.item(), abs=1e-6)


@pytest.fixture(scope="module")
def store_batch(tmp_path_factory) -> dict:
    """A widened batch of three ragged sequences from a real store: quantised codes, sampled draws, padding."""
    codec = CodecConfig(k=8, vocab_size=300, sampled_draws=16)
    path = tmp_path_factory.mktemp("losses") / "store"
    for i, length in enumerate((17, 9, 12)):
        write_store(path, codec, num_sequences=1, seq_len=length, seed=i)
    dataset = MemoryMappedDataset(path)
    collate = Collator(codec, sampled=True)
    return widen(collate([dataset[i] for i in range(len(dataset))]), collate.logprob_table)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_batches_from_a_real_store_give_finite_losses_blind_to_the_student_at_padding(store_batch, name):
    """Quantised codes, ragged sequences padded by the Collator and widened: the loss is finite, and the student's
    logits at ignored positions (last token, padding) change neither the loss nor get any gradient."""
    batch = store_batch
    student = torch.randn(*batch["labels"].shape, 300, generator=torch.Generator().manual_seed(20))
    ignored = batch["labels"] == -100
    config = config_for(name, temperature=1.0 if name == "sampled_kl" else 2.0, ce_weight=0.1, chunk_positions=8)
    results = []
    for logits in (student, torch.where(ignored.unsqueeze(-1), student * 50.0, student)):
        logits = logits.clone().requires_grad_(True)
        loss, _ = distillation_loss(logits, batch, config, state=state_for(config))
        loss.backward()
        results.append((loss.item(), logits.grad))
    assert math.isfinite(results[0][0]) and results[0][0] > 0
    assert results[1][0] == pytest.approx(results[0][0], abs=1e-6)
    assert (results[0][1][ignored] == 0).all() and ignored.any()


# ---- sampled_kl: an unbiased estimator, tested statistically with a fixed seed ----

@pytest.mark.parametrize("mode", ["full", "tail"])
def test_sampled_kl_is_unbiased_for_the_cross_entropy_and_its_gradient(mode):
    """R independent positions share one student and one teacher; distillation_loss's mean over positions is then
    the average of R independent estimates. It must sit within 4 standard errors of the exact cross-entropy, and its
    gradient within 4.5 standard errors of q - p on every id (fixed seed: deterministic, a biased estimate fails)."""
    num_positions, num_draws, vocab_size, k = 4000, 16, 8, 3  # 16 draws over 8 ids: S < N, as with real stores
    generator = torch.Generator().manual_seed(15)
    teacher = (torch.randn(vocab_size, generator=generator) * 1.5).expand(1, num_positions, vocab_size)
    student_row = torch.randn(vocab_size, generator=generator).requires_grad_(True)
    labels = torch.zeros(1, num_positions, dtype=torch.int64)
    sparse = sparsify(teacher[0], labels[0], k)
    batch = {"labels": labels, "topk_ids": sparse["topk_ids"][None], "topk_logprobs": sparse["topk_logprobs"][None],
             "tail_logmass": sparse["tail_logmass"][None]}
    batch = add_draws(batch, teacher, num_draws, mode, seed=16)
    loss, _ = distillation_loss(student_row.expand(1, num_positions, vocab_size), batch,
                                LossConfig(name="sampled_kl", sampled_mode=mode))
    loss.backward()

    p, log_q = torch.softmax(teacher[0, 0].double(), -1), torch.log_softmax(student_row.detach().double(), -1)
    in_tail = torch.ones(vocab_size, dtype=torch.bool)
    in_tail[sparse["topk_ids"][0]] = False
    # per-draw distribution of the estimate's random part, and the factor that scales it
    draw_p, scale = (p, 1.0) if mode == "full" else (torch.where(in_tail, p, 0.0) / p[in_tail].sum(), p[in_tail].sum())
    exact = -(p * log_q).sum()
    draw_var = (draw_p * log_q ** 2).sum() - (draw_p * log_q).sum() ** 2
    standard_error = scale * torch.sqrt(draw_var / (num_draws * num_positions))
    assert abs(loss.item() - exact.item()) < 4 * standard_error.item()
    assert abs(loss.item() - exact.item()) > 1e-6  # it is an estimate, not the exact value in disguise

    gradient_error = scale * torch.sqrt(draw_p * (1 - draw_p) / (num_draws * num_positions))
    expected_gradient = log_q.exp() - p
    assert (abs(student_row.grad.double() - expected_gradient) <= 4.5 * gradient_error + 1e-6).all()


# ---- TAID's schedule ----

def test_taid_t_rises_while_the_loss_falls_and_stays_within_start_and_end():
    config = LossConfig(name="taid", taid_start=0.4, taid_end=0.9, taid_step_size=0.05)
    state = TaidState(config)
    history = [state.update(2.0 * 0.9 ** step) for step in range(200)]
    assert history[0] == 0.4 and all(b >= a for a, b in zip(history, history[1:]))
    assert history[1] > 0.4 and history[-1] == 0.9


def test_taid_update_follows_algorithm_1_by_hand():
    state = TaidState(LossConfig(name="taid", taid_start=0.4, taid_momentum=0.5, taid_step_size=0.1))

    def sigmoid(x):
        return 1 / (1 + math.exp(-x))

    assert state.update(2.0) == 0.4  # the first step only records the loss
    momentum = 0.5 * 0.0 + 0.5 * (2.0 - 1.0) / 2.0
    t = 0.4 + 0.1 * sigmoid(momentum) * (1 - 0.4)
    assert state.update(1.0) == pytest.approx(t, abs=1e-12)
    momentum = 0.5 * momentum + 0.5 * (1.0 - 1.5) / 1.0  # the loss rose: the momentum, and so the step, shrinks
    t = t + 0.1 * sigmoid(momentum) * (1 - t)
    assert state.update(1.5) == pytest.approx(t, abs=1e-12)
    assert state.momentum == pytest.approx(momentum, abs=1e-12)


def test_taid_linear_ramp_is_a_floor_when_the_adaptive_step_is_off():
    state = TaidState(LossConfig(name="taid", taid_start=0.2, taid_end=1.0, taid_step_size=0.0, taid_total_steps=10))
    for _ in range(5):
        state.update(1.0)
    assert state.t == pytest.approx(0.2 + 0.8 * 5 / 10)


def test_taid_state_dict_resumes_exactly():
    config = LossConfig(name="taid", taid_step_size=0.01, taid_total_steps=50)
    losses = [3.0 / (1 + step) + 0.1 * (step % 3) for step in range(10)]
    straight = TaidState(config)
    for value in losses:
        straight.update(value)
    first = TaidState(config)
    for value in losses[:5]:
        first.update(value)
    resumed = TaidState(config)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for value in losses[5:]:
        resumed.update(value)
    assert resumed.state_dict() == straight.state_dict()
    assert straight.t > config.taid_start


# ---- token selection ----

def test_select_tokens_by_gap_keeps_the_largest_gaps_among_unmasked_positions():
    student = torch.tensor([[-1.0, -5.0, -2.0, -9.0], [-3.0, -0.5, -8.0, -1.0]])
    reference = torch.zeros_like(student)  # gap = -student: 1, 5, 2, 9 / 3, .5, 8, 1
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    weights = select_tokens_by_gap(student, reference, mask, keep_fraction=0.4)  # ceil(0.4 * 7) = 3
    assert weights.tolist() == [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]]
    assert select_tokens_by_gap(student, reference, mask, 1.0).sum() == 7
    with pytest.raises(LossConfigError):
        select_tokens_by_gap(student, reference, mask, 0.0)


# ---- bad input ----

def test_unknown_loss_name_lists_the_valid_names():
    with pytest.raises(LossConfigError) as caught:
        LossConfig(name="kl")
    assert "'kl'" in str(caught.value)
    assert all(name in caught.value.one_line() for name in LOSS_NAMES)
    assert issubclass(LossConfigError, KdstoreError) and issubclass(VocabMismatchError, KdstoreError)


@pytest.mark.parametrize("fields", [{"beta": 1.0}, {"alpha": 1.0}, {"temperature": 0.0}, {"ce_weight": 1.5},
                                    {"taid_start": 0.8, "taid_end": 0.5}, {"chunk_positions": 0},
                                    {"sampled_mode": "head"}, {"name": "sampled_kl", "temperature": 2.0}])
def test_out_of_range_config_fields_are_refused(fields):
    with pytest.raises(LossConfigError):
        LossConfig(**fields)


def test_teacher_ids_beyond_the_student_vocabulary_name_both_sizes():
    student, _, batch = make_case(seed=17, k=4, vocab_size=11)
    with pytest.raises(VocabMismatchError) as caught:
        distillation_loss(student[..., :9], batch, LossConfig())
    largest = int(batch["topk_ids"].max())
    assert "9 logits" in str(caught.value) and f"teacher id {largest}" in str(caught.value)


def test_bad_batches_raise_named_errors_with_hints():
    student, _, batch = make_case(seed=18, k=4)
    with pytest.raises(LossInputError, match="sampled_ids") as caught:
        distillation_loss(student, batch, LossConfig(name="sampled_kl"))
    assert "sampled=True" in caught.value.hint
    with pytest.raises(LossInputError, match="codes"):
        distillation_loss(student, {**batch, "topk_logprobs": batch["topk_logprobs"].to(torch.int64)}, LossConfig())
    with pytest.raises(LossInputError, match="do not match"):
        distillation_loss(student[:, :3], batch, LossConfig())
    with pytest.raises(LossConfigError, match="schedule state"):
        distillation_loss(student, batch, LossConfig(name="taid"))
