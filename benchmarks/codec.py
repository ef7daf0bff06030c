"""Codec benchmark: bytes/token, encode/decode speed and KL, against two baselines in the same run.

    python benchmarks/codec.py [--teacher PATH] [--positions 16384] [--zipf 1.0]

Log-probs come from a real trained causal LM (the bundled teacher by default)
run over the bundled corpus. Two vocabularies:
  * "teacher": the teacher's own ids (vocabulary of the teacher);
  * "128k": the same log-probs with ids drawn Zipf-like (exponent --zipf) over
    131,072 ids, K distinct per position, as in large-vocabulary teachers where
    frequent tokens have small ids.
Schemes, each written as real Parquet where it applies:
  * kdstore: this codec through ShardWriter (all-in: ids, values, tail, target,
    input ids, Parquet overhead); at the default codebook and at a finer one
    (sqrt_scale 1280) whose KL is comparable to the reference's bf16 values;
  * naive: int32 ids + float32 log-probs, tail, target and input id (raw bytes);
  * distillkit: ids bit-packed at ceil(log2 V) bits + bf16 values (the public
    description of DistillKit's format, without its polynomial fit), bf16 tail
    and target, input id at ceil(log2 V) bits (raw bytes, as it stores them).
KL is mean KL(true || decoded) per position over the K + 1 buckets (top-K + tail),
decoded renormalised. Speeds are single-threaded, positions per second.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kdstore.build import DEFAULT_CORPUS, DEFAULT_TEACHER
from kdstore.codec import Codebook, CodecConfig, decode_positions, encode_positions
from kdstore.format import Manifest, logits_schema, rows_to_table
from kdstore.store import open_store
from kdstore.writer import ShardWriter

KS = (8, 32, 64, 128)
BIG_VOCAB = 131_072


def teacher_logprobs(teacher_path: str, num_positions: int, seq_len: int = 256):
    """Full log-prob rows [P, V] (fp32) and next tokens [P] from the teacher over the corpus."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    model = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).eval()
    text = "\n\n".join(p.read_text() for p in sorted(Path(DEFAULT_CORPUS).rglob("*.txt")))
    ids = torch.tensor(tokenizer(text)["input_ids"][: (num_positions // (seq_len - 1) + 1) * seq_len])
    rows, inputs = [], []
    with torch.inference_mode():
        for start in range(0, len(ids) - seq_len + 1, seq_len):
            chunk = ids[start:start + seq_len][None]
            logits = model(chunk).logits[0, :-1].float()
            rows.append(torch.log_softmax(logits, dim=-1))
            inputs.append(chunk[0])
    logprobs = torch.cat(rows)[:num_positions]
    tokens = torch.stack(inputs)  # [S, seq_len]
    return logprobs, tokens


def topk_parts(logprobs: torch.Tensor, targets: torch.Tensor, k: int):
    values, ids = torch.topk(logprobs, k, dim=-1)
    rest = logprobs.scatter(1, ids, float("-inf"))
    tail = torch.logsumexp(rest.double(), dim=-1).float()
    target = logprobs.gather(1, targets[:, None]).squeeze(1)
    return ids.numpy(), values.numpy(), tail.numpy(), target.numpy()


def zipf_ids(rng: np.random.Generator, num_positions: int, k: int, vocab: int, exponent: float) -> np.ndarray:
    """K distinct ids per position, each draw P(id) ~ 1 / (id + 1)**exponent."""
    cdf = np.cumsum(1.0 / np.arange(1, vocab + 1) ** exponent)
    cdf /= cdf[-1]
    out = np.empty((num_positions, k), dtype=np.int64)
    for row in range(num_positions):
        chosen: dict[int, None] = {}
        while len(chosen) < k:
            for i in np.searchsorted(cdf, rng.random(2 * k)):
                chosen.setdefault(int(i))
        out[row] = list(chosen)[:k]
    return out


def kl_buckets(values, tail, dec_values, dec_tail) -> float:
    """Mean KL(true || decoded) over top-K + tail buckets; both rows in the same id order."""
    true = np.concatenate([np.exp(values.astype(np.float64)), np.exp(tail.astype(np.float64))[:, None]], axis=1)
    dec = np.concatenate([np.exp(dec_values.astype(np.float64)), np.exp(dec_tail.astype(np.float64))[:, None]], axis=1)
    dec /= dec.sum(axis=1, keepdims=True)
    return float((true * (np.log(np.maximum(true, 1e-300)) - np.log(np.maximum(dec, 1e-300)))).sum(axis=1).mean())


def order0_entropy_bytes(values: np.ndarray) -> float:
    """Bytes an ideal order-0 entropy coder needs for ``values`` (a reference point for zstd's result)."""
    _, counts = np.unique(values, return_counts=True)
    p = counts / counts.sum()
    return float(-(counts * np.log2(p)).sum() / 8)


def rate(fn, num_positions: int, repeat: int = 3) -> float:
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return num_positions / best


def measure_kdstore(ids, values, tail, target, tokens, vocab, codebook, workdir: Path) -> dict:
    """All-in bytes/token through ShardWriter, codec speeds, KL."""
    k = ids.shape[1]
    codec = CodecConfig(k=k, vocab_size=vocab, codebook=codebook)
    num_positions = ids.shape[0]
    encode = lambda: encode_positions(codec, ids, values, tail, target)  # noqa: E731
    columns = encode()
    decode = lambda: decode_positions(codec, columns)  # noqa: E731
    decoded = decode()
    order = np.argsort(ids, axis=1)
    kl = kl_buckets(np.take_along_axis(values, order, axis=1), tail, decoded["topk_logprobs"], decoded["tail_logmass"])
    seq_len = tokens.shape[1]
    per_seq = seq_len - 1
    schema = logits_schema(codec)
    manifest = Manifest(table="logits", teacher={"model": "bench", "revision": None, "content_sha256": None,
                                                  "dtype": "float32", "vocab_size": vocab},
                        tokenizer={"name": "bench", "files_sha256": None, "vocab_size": vocab, "special_ids": {}},
                        codec=codec.to_dict(), build={})
    store_path = workdir / f"store-{k}-{vocab}-{codebook.sqrt_scale}"
    shutil.rmtree(store_path, ignore_errors=True)
    with ShardWriter(store_path, manifest, schema) as writer:
        rows = []
        for s in range(num_positions // per_seq):
            part = slice(s * per_seq, (s + 1) * per_seq)
            token_ids = tokens[s].numpy().astype(np.int64) % vocab
            rows.append({"sequence_id": f"s{s}", "input_ids": token_ids,
                         **encode_positions(codec, ids[part], values[part], tail[part], target[part])})
        writer.write(rows_to_table(schema, rows))
    store = open_store(store_path)
    start = time.perf_counter()
    wanted = ["input_ids", "topk_ids", "topk_logprobs", "tail_logmass", "target_logprob"]
    read_positions = sum(len(b["topk_ids"]) for b in store.iter_batches(columns=wanted))
    read_rate = read_positions / (time.perf_counter() - start)
    entropy = sum(order0_entropy_bytes(columns[name]) for name in columns) / num_positions
    return {"bytes_per_token": store.manifest.total_bytes / store.manifest.num_tokens, "kl": kl, "entropy": entropy,
            "encode": rate(encode, num_positions), "decode": rate(decode, num_positions), "read_decode": read_rate}


def bf16(array: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).bfloat16().float().numpy()


def measure_distillkit(ids, values, tail, vocab) -> dict:
    """Ids bit-packed at ceil(log2 V) bits, values in bf16 (raw bytes, plus bf16 tail, target and packed input id)."""
    bits = math.ceil(math.log2(vocab))
    k = ids.shape[1]
    num_positions = ids.shape[0]
    shifts = np.arange(bits, dtype=np.uint64)

    def encode():
        id_bits = ((ids.astype(np.uint64)[:, :, None] >> shifts) & 1).astype(np.uint8).reshape(num_positions, -1)
        return np.packbits(id_bits, axis=1), bf16(values).view(np.uint32) >> 16

    packed, halves = encode()

    def decode():
        id_bits = np.unpackbits(packed, axis=1)[:, : k * bits].reshape(num_positions, k, bits).astype(np.uint64)
        return (id_bits << shifts).sum(axis=2), (halves.astype(np.uint32) << 16).view(np.float32)

    dec_ids, dec_values = decode()
    assert np.array_equal(dec_ids, ids)
    per_position = math.ceil(k * bits / 8) + 2 * k + 2 + 2 + bits / 8
    return {"bytes_per_token": per_position, "kl": kl_buckets(values, tail, dec_values, bf16(tail)),
            "encode": rate(encode, num_positions), "decode": rate(decode, num_positions)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=DEFAULT_TEACHER)
    parser.add_argument("--positions", type=int, default=16384)
    parser.add_argument("--zipf", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    logprobs, tokens = teacher_logprobs(args.teacher, args.positions)
    num_positions = logprobs.shape[0]
    targets = tokens[:, 1:].reshape(-1)[:num_positions]
    print(f"teacher {args.teacher}: vocabulary {logprobs.shape[1]}, {num_positions} positions; "
          f"ids for the 128k rows: Zipf exponent {args.zipf}")
    header = (f"{'vocab':>7} {'K':>4} {'scheme':<18} {'B/token':>8} {'vs DK':>6} {'KL nats':>9} "
              f"{'enc Mpos/s':>10} {'dec Mpos/s':>10} {'read+dec':>9} {'H0 B/pos':>8}")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as workdir:
        for k in KS:
            ids, values, tail, target = topk_parts(logprobs, targets, k)
            big_ids = zipf_ids(rng, num_positions, k, BIG_VOCAB, args.zipf)
            for vocab_name, vocab, use_ids in (("teacher", logprobs.shape[1], ids), ("128k", BIG_VOCAB, big_ids)):
                reference = measure_distillkit(use_ids, values, tail, vocab)
                naive = 8 * k + 12
                results = [("distillkit-style", reference)]
                for label, book in (("kdstore", Codebook()), ("kdstore fine", Codebook(sqrt_scale=1280, log_step=0.0625))):
                    results.append((label, measure_kdstore(use_ids, values, tail, target, tokens, vocab, book, Path(workdir))))
                results.append(("naive int32+fp32", {"bytes_per_token": naive, "kl": 0.0}))
                for label, r in results:
                    ratio = r["bytes_per_token"] / reference["bytes_per_token"]
                    speeds = " ".join(f"{r[key] / 1e6:>10.2f}" if key in r else f"{'':>10}" for key in ("encode", "decode"))
                    read = f"{r['read_decode'] / 1e6:>9.2f}" if "read_decode" in r else ""
                    read += f" {r['entropy']:>8.1f}" if "entropy" in r else ""
                    print(f"{vocab_name:>7} {k:>4} {label:<18} {r['bytes_per_token']:>8.1f} {ratio:>6.2f} "
                          f"{r['kl']:>9.2e} {speeds} {read}")
    print("B/token: all-in bytes per token; vs DK: ratio to the distillkit-style row of the same vocab and K.")
    print("H0 B/pos: what an ideal order-0 entropy coder would need for the stored top-K, tail and target columns\n"
          "(input ids and Parquet overhead excluded): the floor for any per-value coder of these columns.")


if __name__ == "__main__":
    main()
