"""Collate: samples of a store -> padded tensors for a student, compact on the host, widened on the device.

    collate = Collator(store.codec)                 # int32 ids, uint8/uint16 log-prob codes
    batch = collate(samples)                        # dict of torch tensors, [B, T] and [B, T, K]
    batch = widen({k: v.to(device) for k, v in batch.items()}, collate.logprob_table)  # int64, float32

A sample (``dataset[i]``, kdstore.store.StoredRows.sample) holds ``index``,
``input_ids`` [T] and, per position, the stored ``topk_id_deltas`` [T-1, K]
and ``*_codes`` ([T-1, K] / [T-1]); the collator decodes them straight into
the padded batch, all on the host in numpy (torch's CPU ops run on its
intra-op thread pool, which on a busy 2-core machine made one [16, 256, 64]
int64 conversion take a median 14 ms instead of 0.03 ms).

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

from kdstore.codec import CodecConfig, delta_decode
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
        num_tokens = [len(s["input_ids"]) for s in samples]
        length = -(-max(num_tokens) // self.pad_to_multiple_of) * self.pad_to_multiple_of
        id_dtype = np.int64 if self.output == "wide" else np.int32
        # float output: decode the codes while padding, so only real positions go through the table (a batch of
        # 16 of the bundled store's sequences is ~54 % padding); truncation works on codes, so it decodes after
        decode_now = self.output != "codes" and self.top_k is None
        arrays = _pad_tokens(samples, num_tokens, length, self.pad_id, id_dtype)
        arrays.update(_pad_positions(samples, num_tokens, length, self.codec, self._floor_code, id_dtype, decode_now))
        if self.top_k is not None:
            arrays["topk_ids"], arrays["topk_logprob_codes"], tail = truncate_topk(
                arrays["topk_ids"], arrays["topk_logprob_codes"], arrays.get("tail_logmass_codes"), self.top_k, self.codec)
            if tail is not None:
                arrays["tail_logmass_codes"] = self.codec.codebook.encode(tail)
            if self.output != "codes":
                arrays = {CODE_KEYS.get(k, k): self.codec.codebook.decode(v) if k in CODE_KEYS else v
                          for k, v in arrays.items()}
                if tail is not None:  # the exact merged tail, not its re-quantised code
                    arrays["tail_logmass"] = tail
        if self.temperature != 1.0:
            tempered = retemper(*(torch.from_numpy(arrays[k]) if k in arrays else None
                                  for k in ("topk_logprobs", "tail_logmass", "target_logprob")), self.temperature)
            arrays.update({k: v.numpy() for k, v in tempered.items()})
        if self.output == "float16":
            arrays = {k: v.astype(np.float16) if v.dtype.kind == "f" else v for k, v in arrays.items()}
        if self.sampled:
            arrays.update(_pad_sampled(samples, length, id_dtype))
        return {k: torch.from_numpy(v) for k, v in arrays.items()}


def _pad_tokens(samples: Sequence[dict[str, Any]], num_tokens: list[int], length: int, pad_id: int,
                id_dtype: type) -> dict[str, np.ndarray]:
    """sequence_index [B] int64; input_ids, attention_mask, labels [B, T] of ``id_dtype``.

    One concatenation and one masked assignment per key rather than B slice copies: a boolean mask fills in
    row-major order, which is the order of the concatenated sequences.
    """
    columns = np.arange(length)
    attention_mask = columns < np.array(num_tokens)[:, None]
    input_ids = np.full((len(samples), length), pad_id, dtype=id_dtype)
    input_ids[attention_mask] = np.concatenate([s["input_ids"] for s in samples])
    labels = np.full_like(input_ids, IGNORE_INDEX)
    has_label = columns < np.array(num_tokens)[:, None] - 1
    labels[has_label] = input_ids[:, 1:][has_label[:, :-1]]  # has_label is False in the last column
    return {"sequence_index": np.array([s["index"] for s in samples], dtype=np.int64), "input_ids": input_ids,
            "attention_mask": attention_mask.astype(id_dtype), "labels": labels}


def _pad_positions(samples: Sequence[dict[str, Any]], num_tokens: list[int], length: int, codec: CodecConfig,
                   floor_code: int, id_dtype: type, decode: bool) -> dict[str, np.ndarray]:
    """topk_ids [B, T, K] of ``id_dtype`` (0 at padding) and every *_codes column [B, T(, K)] (floor code at padding),
    or with ``decode`` its float32 log-probs under the CODE_KEYS name (the floor code's log-prob at padding).

    The [B, T, K] keys are decoded sequence by sequence straight into the padded arrays; the [B, T] ones in
    one masked assignment (a boolean mask fills in row-major order, the order of the concatenated sequences;
    B copies of ~100 values cost more in calls than in bytes).
    """
    book = codec.codebook
    num = len(samples)
    has_position = np.arange(length) < np.array(num_tokens)[:, None] - 1
    fill, dtype = (book.table[floor_code], np.float32) if decode else (floor_code, book.dtype)
    names = ["topk_logprob_codes", *[n for n in ("tail_logmass_codes", "target_logprob_codes") if n in samples[0]]]
    keys = [CODE_KEYS[name] if decode else name for name in names]
    out = {"topk_ids": np.zeros((num, length, codec.k), dtype=id_dtype),
           keys[0]: np.full((num, length, codec.k), fill, dtype=dtype),
           **{key: np.full((num, length), fill, dtype=dtype) for key in keys[1:]}}
    # the codec decodes ids as uint32: int32 output views them so (as decode_positions does), int64 widens them
    ids = out["topk_ids"].view(np.uint32) if id_dtype == np.int32 else out["topk_ids"]
    values = out[keys[0]]
    for b, sample in enumerate(samples):
        num_positions = num_tokens[b] - 1
        delta_decode(sample["topk_id_deltas"], out=ids[b, :num_positions])
        if decode:
            book.decode(sample["topk_logprob_codes"], out=values[b, :num_positions])
        else:
            values[b, :num_positions] = sample["topk_logprob_codes"]
    for name, key in zip(names[1:], keys[1:]):
        codes = np.concatenate([s[name] for s in samples])
        out[key][has_position] = book.decode(codes) if decode else codes
    return out


def _pad_sampled(samples: Sequence[dict[str, Any]], length: int, id_dtype: type) -> dict[str, np.ndarray]:
    """sampled_ids / sampled_counts [B, T, S] of ``id_dtype``; count 0 marks padding."""
    widths = [np.diff(s["sampled_offsets"]) for s in samples]
    width = max(int(w.max(initial=0)) for w in widths) or 1
    ids = np.zeros((len(samples), length, width), dtype=id_dtype)
    counts = np.zeros_like(ids)
    for b, (sample, num_ids) in enumerate(zip(samples, widths)):
        position = np.repeat(np.arange(len(num_ids)), num_ids)
        slot = np.arange(int(num_ids.sum())) - np.repeat(sample["sampled_offsets"][:-1], num_ids)
        ids[b, position, slot] = sample["sampled_ids"]
        counts[b, position, slot] = sample["sampled_counts"]
    return {"sampled_ids": ids, "sampled_counts": counts}


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
