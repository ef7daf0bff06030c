"""The codec: teacher top-K arrays <-> the columns a shard stores. Pure array code.

What one position stores, and how (docs/format.md has a worked example):

* ``topk_ids`` are sorted ascending within the position and delta-coded: the
  first id is stored as is, each later one as the gap to the previous id
  (always >= 1, since ids are distinct). Frequent tokens have small ids, so the
  gaps are small numbers whose high bytes are almost always zero; Parquet's
  BYTE_STREAM_SPLIT encoding puts those bytes side by side and zstd removes
  them. Ids are lossless.
* log-probabilities (top-K values, tail mass, target) are quantised to integer
  codes (uint8 or uint16) through one monotone codebook. Code ``c`` decodes to ``table[c]``; the
  table is stored in the manifest and in every shard, so a reader needs no
  kdstore to dequantise. The codebook spends its levels where KL cares: steps
  are uniform in sqrt(p) for likely tokens and uniform in log p (width
  ``log_step``) for unlikely ones. So ``|log p_hat - log p| <= log_step / 2``
  for every log p above ``floor_logprob`` and ``|sqrt(p_hat) - sqrt(p)| <= 1 / (4 *
  sqrt_scale)`` for ``p`` above ``exp(split_logprob)``.
* the optional sampled-sparse distribution (ids drawn from the teacher, with
  counts) uses the same sorted delta coding for ids and plain counts.

Arrays are numpy; torch tensors are accepted and converted (CPU, no copy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdstore.errors import CodecError

# Codebook defaults, chosen on the bundled teacher (benchmarks/codec.py): KL
# from quantising is about N / (24 * sqrt_scale**2) for N likely entries, so
# sqrt_scale 320 keeps even a flat top-64 under 3e-5 nats/position; log_step
# 0.25 bounds every log-prob's error by 0.125 nats. Codes need 10 bits of
# range but carry ~5 bits of entropy, which is what zstd stores.
DEFAULT_SQRT_SCALE = 320.0
DEFAULT_LOG_STEP = 0.25
DEFAULT_FLOOR_LOGPROB = -40.0  # p < 4e-18 is clamped here: no KL or loss can see it


@dataclass(frozen=True)
class Codebook:
    """A monotone quantiser of log-probabilities into integer codes.

    Code 0 is log p = 0; codes grow as p shrinks. ``sqrt_scale`` (a) sets the
    step for likely tokens (uniform in sqrt p, 2a codes across (0, 1]);
    ``log_step`` (delta) caps the step in log p for unlikely ones; log-probs
    below ``floor_logprob`` share the last code. Codes are uint8 when at most
    256 are needed, else uint16.
    """

    sqrt_scale: float = DEFAULT_SQRT_SCALE
    log_step: float = DEFAULT_LOG_STEP
    floor_logprob: float = DEFAULT_FLOOR_LOGPROB
    table: np.ndarray = field(init=False, repr=False, compare=False)
    max_log_error: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.sqrt_scale * self.log_step <= 1.0 or self.log_step <= 0:
            raise CodecError("codebook needs log_step > 0 and sqrt_scale * log_step > 1")
        if not self.floor_logprob < self.split_logprob:
            raise CodecError(f"floor_logprob must lie below {self.split_logprob:.2f} for these parameters")
        if self.num_codes > 65536:
            raise CodecError(f"codebook needs {self.num_codes} codes; at most 65536 fit in uint16")
        codes = np.arange(self.num_codes, dtype=np.float64)
        table = self._code_to_logprob(codes)
        upper = self._code_to_logprob(np.maximum(codes - 0.5, 0.0))
        lower = self._code_to_logprob(codes + 0.5)
        object.__setattr__(self, "table", table.astype(np.float32))
        object.__setattr__(self, "max_log_error", np.maximum(upper - table, table - lower))

    @property
    def split_logprob(self) -> float:
        """log p where the step switches from sqrt-uniform to log-uniform."""
        return -2.0 * math.log(self.sqrt_scale * self.log_step)

    @property
    def split_code(self) -> float:
        return 2.0 * self.sqrt_scale - 2.0 / self.log_step

    @property
    def num_codes(self) -> int:
        return int(math.ceil(self.split_code + (self.split_logprob - self.floor_logprob) / self.log_step)) + 1

    @property
    def dtype(self) -> type:
        return np.uint8 if self.num_codes <= 256 else np.uint16

    def _code_to_logprob(self, g: np.ndarray) -> np.ndarray:
        sqrt_part = 2.0 * np.log(np.clip(1.0 - g / (2.0 * self.sqrt_scale), 1e-300, None))
        log_part = self.split_logprob - (g - self.split_code) * self.log_step
        return np.where(g <= self.split_code, sqrt_part, log_part)

    def encode(self, logprobs: np.ndarray) -> np.ndarray:
        """log p (any float array, <= 0; -inf allowed) -> codes of ``self.dtype``."""
        x = np.asarray(logprobs, dtype=np.float32)
        split = np.float32(self.split_logprob)
        scale = np.float32(self.sqrt_scale)
        g_sqrt = (np.float32(2.0) * scale) * (np.float32(1.0) - np.exp(x * np.float32(0.5)))
        g_log = np.float32(self.split_code) + (split - x) / np.float32(self.log_step)
        g = np.where(x >= split, g_sqrt, g_log)
        np.rint(g, out=g)
        np.clip(g, 0, self.num_codes - 1, out=g)
        return g.astype(self.dtype)

    def decode(self, codes: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """codes -> log p as float32, into ``out`` when given (np.take: ~1.7x a fancy index, which widens the codes
        to intp first)."""
        return np.take(self.table, codes, out=out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dtype": np.dtype(self.dtype).name,
            "num_codes": self.num_codes,
            "sqrt_scale": self.sqrt_scale,
            "log_step": self.log_step,
            "floor_logprob": self.floor_logprob,
            "max_abs_logprob_error": self.log_step / 2,
            "max_abs_sqrt_prob_error": 1.0 / (4.0 * self.sqrt_scale),
            "table": [float(v) for v in self.table],  # float32 values, exact in JSON
        }

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> Codebook:
        book = cls(float(spec["sqrt_scale"]), float(spec["log_step"]), float(spec["floor_logprob"]))
        stored = spec.get("table")
        if stored is not None and (len(stored) != book.num_codes or not np.allclose(stored, book.table, atol=1e-5)):
            raise CodecError("the stored codebook table does not match its parameters")
        return book


SAMPLED_SCHEMES = ("iid", "systematic")


@dataclass(frozen=True)
class CodecConfig:
    """What a store's positions hold. Recorded in the manifest under ``codec``."""

    k: int
    vocab_size: int
    codebook: Codebook = field(default_factory=Codebook)
    tail: bool = True
    target: bool = True
    sampled_draws: int = 0  # 0: no sampled-sparse columns
    sampled_mode: str = "full"  # "full": draws from p; "tail": draws from p outside the top-K
    # "iid": independent draws (multinomial counts); "systematic": one uniform per position and draws at
    # (u + j) / N along the CDF, so each id gets floor or ceil of N p draws: unbiased, lower variance
    sampled_scheme: str = "iid"

    def __post_init__(self) -> None:
        if self.vocab_size < 1:
            raise CodecError(f"vocab_size must be positive, got {self.vocab_size}")
        if not 1 <= self.k <= self.vocab_size:
            raise CodecError(f"K={self.k} must be between 1 and the vocabulary size {self.vocab_size}")
        if self.vocab_size > (1 << 32) - 1:
            raise CodecError("vocabularies above 2**32 - 1 ids are not supported")
        if self.sampled_mode not in ("full", "tail"):
            raise CodecError(f"sampled_mode must be 'full' or 'tail', got {self.sampled_mode!r}")
        if self.sampled_scheme not in SAMPLED_SCHEMES:
            raise CodecError(f"sampled_scheme must be one of {', '.join(SAMPLED_SCHEMES)}, got {self.sampled_scheme!r}")
        if not 0 <= self.sampled_draws <= 65535:
            raise CodecError(f"sampled_draws must be in 0..65535, got {self.sampled_draws}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "vocab_size": self.vocab_size,
            "position_predicts": "next",
            "ids": {"order": "ascending", "coding": "delta", "dtype": "uint32"},
            "logprobs": self.codebook.to_dict(),
            "tail": self.tail,
            "target": self.target,
            "sampled": {"draws": self.sampled_draws, "mode": self.sampled_mode, "scheme": self.sampled_scheme}
            if self.sampled_draws else None,
        }

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> CodecConfig:
        sampled = spec.get("sampled") or {}
        return cls(
            k=int(spec["k"]),
            vocab_size=int(spec["vocab_size"]),
            codebook=Codebook.from_dict(spec["logprobs"]),
            tail=bool(spec["tail"]),
            target=bool(spec["target"]),
            sampled_draws=int(sampled.get("draws", 0)),
            sampled_mode=str(sampled.get("mode", "full")),
            sampled_scheme=str(sampled.get("scheme", "iid")),  # stores written before the key existed: iid
        )


def _as_numpy(array: Any, name: str) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch tensor; the codec itself is numpy
        array = array.detach().cpu().numpy()
    if array is None:
        raise CodecError(f"{name} is required by this codec")
    return np.asarray(array)


def _check_ids(ids: np.ndarray, vocab_size: int, name: str) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise CodecError(f"{name} has ids outside [0, {vocab_size}): min {ids.min()}, max {ids.max()}")


def _check_logprobs(values: np.ndarray, name: str, allow_neg_inf: bool = False) -> None:
    # 1e-4: a log-softmax in fp32 can round the top log-prob a hair above 0
    bad = np.isnan(values) | (values > 1e-4)
    if not allow_neg_inf:
        bad |= np.isinf(values)
    if bad.any():
        where = np.argwhere(bad)[0].tolist()
        raise CodecError(f"{name} must be finite log-probabilities <= 0; found {values[tuple(where)]} at {where}")


def sort_and_quantise(ids: np.ndarray, logprobs: np.ndarray, codebook: Codebook) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row's ids ascending, carrying its quantised log-probs along.

    ids [P, N] int, logprobs [P, N] float -> (sorted ids [P, N] uint32, codes [P, N]).
    One packed-key sort instead of argsort + gather: ~10x faster in numpy.
    """
    codes = codebook.encode(logprobs)
    shift = 8 * np.dtype(codebook.dtype).itemsize
    key_dtype = np.uint32 if (int(ids.max(initial=0)) >> (32 - shift)) == 0 else np.uint64
    keys = (ids.astype(key_dtype) << key_dtype(shift)) | codes.astype(key_dtype)
    keys.sort(axis=1)
    mask = key_dtype((1 << shift) - 1)
    return (keys >> key_dtype(shift)).astype(np.uint32), (keys & mask).astype(codebook.dtype)


def delta_encode(sorted_ids: np.ndarray) -> np.ndarray:
    """[P, N] ascending uint32 -> first id, then gaps (uint32)."""
    deltas = np.empty_like(sorted_ids, dtype=np.uint32)
    if sorted_ids.shape[1]:
        deltas[:, 0] = sorted_ids[:, 0]
        np.subtract(sorted_ids[:, 1:], sorted_ids[:, :-1], out=deltas[:, 1:])
    return deltas


def delta_decode(deltas: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """[P, N] first id + gaps (uint32) -> ascending ids: uint32, or into ``out`` (C-contiguous, uint32 or int64).

    One running sum over all P·N values, then each row minus the sum before it: numpy's 1-D accumulate is
    ~1.5x its row-by-row one at N=64 (P=230: 8.5 vs 12.5 us). The sums are uint32 and may wrap, so the
    differences are taken in uint32 too and are exact; into int64 they are widened as they are written.
    """
    out = np.empty(deltas.shape, dtype=np.uint32) if out is None else out
    if not (out.flags.c_contiguous and out.dtype in (np.uint32, np.int64) and out.shape == deltas.shape):
        raise CodecError(f"delta_decode needs a C-contiguous uint32 or int64 out of shape {deltas.shape}")
    running = out if out.dtype == np.uint32 else np.empty(deltas.shape, dtype=np.uint32)
    np.add.accumulate(np.ascontiguousarray(deltas, dtype=np.uint32).reshape(-1), out=running.reshape(-1))
    if running is not out:
        out[:1] = running[:1]
    if out.shape[0] > 1:  # numpy buffers the overlap of an in-place subtract: row p sees row p-1's running sum
        np.subtract(running[1:], running[:-1, -1:], out=out[1:], dtype=np.uint32)
    return out


def encode_positions(
    config: CodecConfig,
    topk_ids: Any,
    topk_logprobs: Any,
    tail_logmass: Any = None,
    target_logprob: Any = None,
    sampled_ids: Any = None,
    sampled_counts: Any = None,
) -> dict[str, np.ndarray]:
    """Encode the positions of one sequence (or any run of positions).

    Args:
        topk_ids: [P, K] int, the teacher's top-K token ids (any order).
        topk_logprobs: [P, K] float, their log-probs over the full vocabulary at T=1.
        tail_logmass: [P] float, log(1 - sum of top-K probs); -inf when K = V.
        target_logprob: [P] float, teacher log-prob of the actual next token.
        sampled_ids: [P, S] int, padded with -1; ids drawn from the teacher.
        sampled_counts: [P, S] int, draws per id (0 where padded).
    Returns the flat stored columns (see ``format.logits_schema``):
        ``topk_id_deltas`` [P*K] uint32, ``topk_logprob_codes`` [P*K] uint8,
        ``tail_logmass_codes`` [P], ``target_logprob_codes`` [P], and with
        sampling ``sampled_num_ids`` [P] uint16, ``sampled_id_deltas`` /
        ``sampled_counts`` [sum of num_ids].
    """
    ids = _as_numpy(topk_ids, "topk_ids")
    values = _as_numpy(topk_logprobs, "topk_logprobs")
    if ids.ndim != 2 or ids.shape[1] != config.k or values.shape != ids.shape:
        raise CodecError(f"topk_ids and topk_logprobs must both be [P, {config.k}]; got {ids.shape} and {values.shape}")
    _check_ids(ids, config.vocab_size, "topk_ids")
    _check_logprobs(values, "topk_logprobs", allow_neg_inf=True)
    sorted_ids, codes = sort_and_quantise(ids, values, config.codebook)
    deltas = delta_encode(sorted_ids)
    if config.k > 1 and (deltas[:, 1:] == 0).any():
        raise CodecError("topk_ids repeat an id within a position; top-K ids must be distinct")
    columns = {"topk_id_deltas": deltas.reshape(-1), "topk_logprob_codes": codes.reshape(-1)}
    num_positions = ids.shape[0]
    for name, wanted, array in (
        ("tail_logmass", config.tail, tail_logmass),
        ("target_logprob", config.target, target_logprob),
    ):
        if not wanted:
            continue
        values_1d = _as_numpy(array, name).reshape(-1)
        if values_1d.shape[0] != num_positions:
            raise CodecError(f"{name} must have one value per position ({num_positions}), got {values_1d.shape[0]}")
        _check_logprobs(values_1d, name, allow_neg_inf=True)
        columns[f"{name}_codes"] = config.codebook.encode(values_1d)
    if config.sampled_draws:
        columns.update(_encode_sampled(config, sampled_ids, sampled_counts, num_positions))
    return columns


def _encode_sampled(config: CodecConfig, sampled_ids: Any, sampled_counts: Any, num_positions: int) -> dict[str, np.ndarray]:
    ids = _as_numpy(sampled_ids, "sampled_ids").astype(np.int64)
    counts = _as_numpy(sampled_counts, "sampled_counts").astype(np.int64)
    if ids.ndim != 2 or ids.shape != counts.shape or ids.shape[0] != num_positions:
        raise CodecError(f"sampled_ids and sampled_counts must both be [{num_positions}, S]; got {ids.shape} and {counts.shape}")
    present = counts > 0
    _check_ids(ids[present], config.vocab_size, "sampled_ids")
    if (counts.sum(axis=1) != config.sampled_draws).any():
        raise CodecError(f"sampled_counts must sum to {config.sampled_draws} draws at every position")
    # padded slots sort last: give them the largest key
    sort_ids = np.where(present, ids, np.iinfo(np.int64).max)
    order = np.argsort(sort_ids, axis=1, kind="stable")
    ids = np.take_along_axis(sort_ids, order, axis=1)
    counts = np.take_along_axis(counts, order, axis=1)
    num_ids = present.sum(axis=1)
    keep = np.arange(ids.shape[1])[None, :] < num_ids[:, None]
    gaps = np.diff(ids, axis=1, prepend=0)
    if (gaps[:, 1:][keep[:, 1:]] == 0).any():
        raise CodecError("sampled_ids repeat an id within a position; merge duplicates into counts")
    return {
        "sampled_num_ids": num_ids.astype(np.uint16),
        "sampled_id_deltas": gaps[keep].astype(np.uint32),
        "sampled_counts": counts[keep].astype(np.uint16),
    }


def decode_positions(config: CodecConfig, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of ``encode_positions``: flat stored columns -> arrays.

    Returns ``topk_ids`` [P, K] int32 (ascending within a position),
    ``topk_logprobs`` [P, K] float32 in the same order, ``tail_logmass`` [P]
    and ``target_logprob`` [P] float32 when stored, and with sampling
    ``sampled_ids`` / ``sampled_counts`` (flat) with ``sampled_offsets`` [P+1].
    Only the columns present in ``columns`` are decoded (projection).
    """
    out: dict[str, np.ndarray] = {}
    table = config.codebook.table
    if "topk_id_deltas" in columns:
        deltas = np.asarray(columns["topk_id_deltas"]).reshape(-1, config.k)
        out["topk_ids"] = delta_decode(deltas).view(np.int32)
    if "topk_logprob_codes" in columns:
        out["topk_logprobs"] = table[np.asarray(columns["topk_logprob_codes"]).reshape(-1, config.k)]
    for name in ("tail_logmass", "target_logprob"):
        if f"{name}_codes" in columns:
            out[name] = table[np.asarray(columns[f"{name}_codes"])]
    if "sampled_num_ids" in columns:
        num_ids = np.asarray(columns["sampled_num_ids"]).astype(np.int64)
        offsets = np.zeros(num_ids.shape[0] + 1, dtype=np.int64)
        np.cumsum(num_ids, out=offsets[1:])
        out["sampled_offsets"] = offsets
        if "sampled_id_deltas" in columns:
            deltas = np.asarray(columns["sampled_id_deltas"]).astype(np.int64)
            running = np.concatenate(([0], np.cumsum(deltas)))
            # each position's first delta is absolute: remove what earlier positions added
            before = np.repeat(running[offsets[:-1]], num_ids)
            out["sampled_ids"] = (running[1:] - before).astype(np.int32)
        if "sampled_counts" in columns:
            out["sampled_counts"] = np.asarray(columns["sampled_counts"]).astype(np.int32)
    return out


def sum_check_tolerance(config: CodecConfig, topk_codes: np.ndarray, tail_codes: np.ndarray) -> np.ndarray:
    """Per position, how far sum(p_hat) + tail_hat may sit from 1 given quantisation alone.

    topk_codes [P, K], tail_codes [P] -> [P] float64. Each decoded p_hat is
    within a factor exp(+-max_log_error[code]) of the true p.
    """
    table = config.codebook.table.astype(np.float64)
    slack = np.expm1(config.codebook.max_log_error)
    per_code = np.exp(table) * slack
    return per_code[topk_codes].sum(axis=1) + per_code[tail_codes] + 1e-6
