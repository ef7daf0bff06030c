"""Collate: samples of a store -> padded tensors for a student, compact on the host, widened on the device.

    collate = Collator(store.codec)                 # int32 ids, uint8/uint16 log-prob codes
    batch = collate(samples)                        # dict of torch tensors, [B, T] and [B, T, K]
    batch = widen({k: v.to(device) for k, v in batch.items()}, collate.logprob_table)  # int64, float32

Position t of a sequence holds the teacher's distribution over token t+1, so
every per-position tensor is aligned with ``labels``: ``labels[b, t]`` is
``input_ids[b, t + 1]``, and -100 at the last token and at padding (the
labels are already shifted: do not hand them to a Hugging Face model's own
loss, which shifts again).

Why codes on the host: at K=64 a position is 64 ids + 64 values; as int64 +
float32 that is 768 bytes, as int32 + uint16 codes 384 bytes, which is what
crosses host memory and PCIe. The codebook table (a few hundred floats) turns
codes into log-probs on the device in one gather.

Re-tempering (``temperature`` tau): the store holds log p at tau = 1 over the
full vocabulary. At tau, q_i = p_i^(1/tau) / Z. The top-K entries are exact up
to Z; the tail is unknown, and is treated as one "ghost token" of mass m =
exp(tail_logmass), contributing m^(1/tau) to Z. For tau > 1 that is a lower
bound of the true tail sum (the power 1/tau < 1 is subadditive) and spreading
m evenly over the V - K tail tokens an upper bound; for tau < 1 the two swap.
So: log q_i = log p_i / tau - log Z, tail' = tail_logmass / tau - log Z,
log Z = logsumexp(log p_1 / tau, ..., log p_K / tau, tail_logmass / tau).
``target_logprob`` gets the same map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kdstore.codec import CodecConfig
from kdstore.errors import CollateError

IGNORE_INDEX = -100  # torch cross_entropy's default ignore_index
OUTPUTS = ("codes", "float16", "wide")
# compact key -> widened key
CODE_KEYS = {"topk_logprob_codes": "topk_logprobs", "tail_logmass_codes": "tail_logmass",
             "target_logprob_codes": "target_logprob"}


class Collator:
    """Turns a list of samples (dicts from a kdstore dataset) into one padded batch of tensors.

    Args:
        codec: the store's codec (``store.codec``).
        output: "codes" (default: int32 ids, uint8/uint16 log-prob codes; widen on the device with
            ``widen``), "float16" (int32 ids, float16 log-probs) or "wide" (int64 ids, float32 log-probs).
        top_k: keep only the K' < K most likely entries per position; the dropped mass joins the tail.
        temperature: re-temper (module docstring); needs float output (with codes, pass it to ``widen``).
        sampled: also return the sampled-sparse ids and counts, [B, T, S] (S: most ids at one position).
        pad_id: input id at padding; pad_to_multiple_of: round T up (8 suits tensor cores).
    """

    def __init__(self, codec: CodecConfig, *, output: str = "codes", top_k: int | None = None, temperature: float = 1.0,
                 sampled: bool = False, pad_id: int = 0, pad_to_multiple_of: int = 1) -> None:
        if output not in OUTPUTS:
            raise CollateError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        if top_k is not None and not 1 <= top_k <= codec.k:
            raise CollateError(f"top_k={top_k} but the store holds K={codec.k} entries per position; "
                               f"pick 1 <= top_k <= {codec.k}")
        if temperature <= 0:
            raise CollateError(f"temperature must be positive, got {temperature}")
        if temperature != 1.0 and output == "codes":
            raise CollateError("re-tempering needs log-prob values, not codes",
                               hint="pass temperature to widen() on the device, or use output='float16' or 'wide'")
        if sampled and not codec.sampled_draws:
            raise CollateError("sampled=True but the store has no sampled-sparse columns",
                               hint="build the store with sampled_draws > 0, or drop sampled=True")
        self.codec, self.output, self.temperature, self.sampled = codec, output, temperature, sampled
        self.top_k = top_k if top_k is not None and top_k < codec.k else None
        self.pad_id, self.pad_to_multiple_of = pad_id, pad_to_multiple_of
        self.logprob_table = torch.from_numpy(codec.codebook.table.copy())  # code -> log p, float32
        self._floor_code = codec.codebook.num_codes - 1  # log p ~ floor_logprob: padding carries no mass

    @property
    def columns(self) -> list[str]:
        """Decoded column names (kdstore.store.DECODED_COLUMNS) a dataset must read for this collator."""
        names = ["sequence_id", "input_ids", "topk_ids", "topk_logprobs"]
        names += [n for n, on in (("tail_logmass", self.codec.tail), ("target_logprob", self.codec.target)) if on]
        return names + (["sampled"] if self.sampled else [])

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        num_tokens = np.array([len(s["input_ids"]) for s in samples])
        length = -(-int(num_tokens.max()) // self.pad_to_multiple_of) * self.pad_to_multiple_of
        tokens = _pad_tokens(samples, length, self.pad_id)
        codes = _pad_positions(samples, length, self.codec, self._floor_code)
        tail = None
        if self.top_k is not None:
            codes["topk_ids"], codes["topk_logprob_codes"], tail = truncate_topk(
                codes["topk_ids"], codes["topk_logprob_codes"], codes.get("tail_logmass_codes"), self.top_k, self.codec)
            if tail is not None:
                codes["tail_logmass_codes"] = self.codec.codebook.encode(tail)
        batch = {**tokens, **{k: torch.from_numpy(v) for k, v in codes.items()}}
        if self.output != "codes":
            batch = dequantise(batch, self.logprob_table)
            if tail is not None:  # the exact merged tail, not its re-quantised code
                batch["tail_logmass"] = torch.from_numpy(tail)
            if self.temperature != 1.0:
                batch.update(retemper(batch["topk_logprobs"], batch.get("tail_logmass"), batch.get("target_logprob"),
                                      self.temperature))
        if self.sampled:
            batch.update(_pad_sampled(samples, length))
        if self.output == "wide":
            return {k: v if v.is_floating_point() else v.to(torch.int64) for k, v in batch.items()}
        if self.output == "float16":
            return {k: v.half() if v.is_floating_point() else v for k, v in batch.items()}
        return batch


def _pad_tokens(samples: Sequence[dict[str, Any]], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    num = len(samples)
    input_ids = np.full((num, length), pad_id, dtype=np.int32)
    attention_mask = np.zeros((num, length), dtype=np.int32)
    labels = np.full((num, length), IGNORE_INDEX, dtype=np.int32)
    for b, sample in enumerate(samples):
        ids = sample["input_ids"]
        input_ids[b, :len(ids)] = ids
        attention_mask[b, :len(ids)] = 1
        labels[b, :len(ids) - 1] = ids[1:]
    return {"sequence_index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
            "input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(labels)}


def _pad_positions(samples: Sequence[dict[str, Any]], length: int, codec: CodecConfig,
                   floor_code: int) -> dict[str, np.ndarray]:
    """topk_ids [B, T, K] int32 (0 at padding) and every *_codes column, [B, T(, K)] (floor code at padding)."""
    num = len(samples)
    out = {"topk_ids": np.zeros((num, length, codec.k), dtype=np.int32)}
    for name in ("topk_logprob_codes", *[n for n in ("tail_logmass_codes", "target_logprob_codes") if n in samples[0]]):
        shape = (num, length, codec.k) if name == "topk_logprob_codes" else (num, length)
        out[name] = np.full(shape, floor_code, dtype=codec.codebook.dtype)
    for b, sample in enumerate(samples):
        num_positions = len(sample["input_ids"]) - 1
        for name, padded in out.items():
            padded[b, :num_positions] = sample[name]
    return out


def _pad_sampled(samples: Sequence[dict[str, Any]], length: int) -> dict[str, torch.Tensor]:
    """sampled_ids / sampled_counts [B, T, S] int32; count 0 marks padding."""
    widths = [np.diff(s["sampled_offsets"]) for s in samples]
    width = max(int(w.max(initial=0)) for w in widths) or 1
    ids = np.zeros((len(samples), length, width), dtype=np.int32)
    counts = np.zeros_like(ids)
    for b, (sample, num_ids) in enumerate(zip(samples, widths)):
        position = np.repeat(np.arange(len(num_ids)), num_ids)
        slot = np.arange(int(num_ids.sum())) - np.repeat(sample["sampled_offsets"][:-1], num_ids)
        ids[b, position, slot] = sample["sampled_ids"]
        counts[b, position, slot] = sample["sampled_counts"]
    return {"sampled_ids": torch.from_numpy(ids), "sampled_counts": torch.from_numpy(counts)}


def truncate_topk(ids: np.ndarray, codes: np.ndarray, tail_codes: np.ndarray | None, top_k: int,
                  codec: CodecConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Keep the ``top_k`` most likely of K entries per position, ids still ascending.

    ids, codes [..., K] -> ([..., top_k], [..., top_k], merged tail log-mass [...] float32 or None).
    The tail becomes log(exp(tail) + sum of the dropped p), so top-K + tail still sums to 1.
    Ties keep the smaller id (stable sort); codes grow as p shrinks.
    """
    keep = np.sort(np.argsort(codes, axis=-1, kind="stable")[..., :top_k], axis=-1)
    kept_ids, kept_codes = np.take_along_axis(ids, keep, -1), np.take_along_axis(codes, keep, -1)
    if tail_codes is None:
        return kept_ids, kept_codes, None
    table = codec.codebook.table.astype(np.float64)
    dropped = np.ones(codes.shape, dtype=bool)
    np.put_along_axis(dropped, keep, False, -1)
    dropped_mass = np.where(dropped, np.exp(table[codes]), 0.0).sum(-1)
    tail = np.log(np.exp(table[tail_codes]) + dropped_mass)
    return kept_ids, kept_codes, np.minimum(tail, 0.0).astype(np.float32)


def retemper(topk_logprobs: torch.Tensor, tail_logmass: torch.Tensor | None, target_logprob: torch.Tensor | None,
             temperature: float) -> dict[str, torch.Tensor]:
    """Log-probs at temperature 1 -> at ``temperature`` (formula in the module docstring), in float32.

    topk_logprobs [..., K], tail_logmass [...] (None: no tail, renormalise over the top-K),
    target_logprob [...] or None. Returns the same keys, re-tempered.
    """
    scaled = topk_logprobs.float() / temperature
    parts = [scaled] if tail_logmass is None else [scaled, tail_logmass.float().unsqueeze(-1) / temperature]
    log_z = torch.logsumexp(torch.cat(parts, -1), -1)
    out = {"topk_logprobs": scaled - log_z.unsqueeze(-1)}
    if tail_logmass is not None:
        out["tail_logmass"] = tail_logmass.float() / temperature - log_z
    if target_logprob is not None:
        out["target_logprob"] = target_logprob.float() / temperature - log_z
    return out


def dequantise(batch: dict[str, torch.Tensor], logprob_table: torch.Tensor) -> dict[str, torch.Tensor]:
    """Replace every code tensor by its float32 log-probs (``topk_logprob_codes`` -> ``topk_logprobs``, ...)."""
    out = {k: v for k, v in batch.items() if k not in CODE_KEYS}
    for key, name in CODE_KEYS.items():
        if key in batch:
            codes = batch[key]
            out[name] = logprob_table.to(codes.device)[codes.to(torch.int64)]  # a uint8 index would act as a mask
    return out


def widen(batch: dict[str, torch.Tensor], logprob_table: torch.Tensor, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """A compact batch -> int64 ids and float32 log-probs, where the batch is (run it on the device).

    ``logprob_table``: ``Collator.logprob_table`` (moved to the batch's device here if it is not there).
    Codes become log-probs (``dequantise``), float16 becomes float32, integer tensors int64; then
    re-tempers when ``temperature`` != 1.
    """
    out = {k: v.float() if v.is_floating_point() else v.to(torch.int64)
           for k, v in dequantise(batch, logprob_table).items()}
    if temperature != 1.0:
        out.update(retemper(out["topk_logprobs"], out.get("tail_logmass"), out.get("target_logprob"), temperature))
    return out
