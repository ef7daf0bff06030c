"""Shared fixtures: teacher outputs computed from real softmaxes, and small stores written with ShardWriter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kdstore.codec import CodecConfig, encode_positions
from kdstore.format import Manifest, logits_schema, rows_to_table
from kdstore.writer import ShardWriter


def teacher_outputs(rng: np.random.Generator, num_tokens: int, vocab_size: int, k: int, tokens: np.ndarray | None = None):
    """Top-K, tail and target of real softmaxes over peaked random logits, for a T-token sequence.

    Returns (input_ids [T], topk_ids [T-1, K], topk_logprobs [T-1, K], tail [T-1], target [T-1]).
    """
    logits = rng.standard_normal((num_tokens - 1, vocab_size)) * 3.0
    logprobs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    if tokens is None:
        tokens = rng.integers(0, vocab_size, num_tokens)
    order = np.argsort(-logprobs, axis=1)[:, :k]
    topk = np.take_along_axis(logprobs, order, axis=1)
    rest = logprobs.copy()
    np.put_along_axis(rest, order, -np.inf, axis=1)
    tail = np.logaddexp.reduce(rest, axis=1)
    target = logprobs[np.arange(num_tokens - 1), tokens[1:]]
    return tokens.astype(np.int32), order, topk, tail, target


def make_manifest(codec: CodecConfig, **build) -> Manifest:
    return Manifest(
        table="logits",
        teacher={"model": "synthetic", "revision": None, "content_sha256": None, "dtype": "float32",
                 "vocab_size": codec.vocab_size, "architecture": None},
        tokenizer={"name": "synthetic", "files_sha256": None, "vocab_size": codec.vocab_size,
                   "special_ids": {"bos": None, "eos": None, "pad": None}},
        codec=codec.to_dict(),
        build=dict(build),
    )


def synthetic_rows(codec: CodecConfig, num_sequences: int, seq_len: int, seed: int = 0, prefix: str = "seq"):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num_sequences):
        tokens, ids, values, tail, target = teacher_outputs(rng, seq_len, codec.vocab_size, codec.k)
        sampled = {}
        if codec.sampled_draws:
            probs = np.exp(values)
            draws = [rng.choice(codec.k, size=codec.sampled_draws, p=p / p.sum()) for p in probs]
            sampled_ids = np.full((seq_len - 1, codec.sampled_draws), -1)
            sampled_counts = np.zeros_like(sampled_ids)
            for t, d in enumerate(draws):
                uniq, counts = np.unique(ids[t, d], return_counts=True)
                sampled_ids[t, :len(uniq)], sampled_counts[t, :len(uniq)] = uniq, counts
            sampled = {"sampled_ids": sampled_ids, "sampled_counts": sampled_counts}
        columns = encode_positions(codec, ids, values, tail, target, **sampled)
        rows.append({"sequence_id": f"{prefix}-{i:05d}", "input_ids": tokens, **columns})
    return rows


def write_store(path: Path, codec: CodecConfig, num_sequences: int = 6, seq_len: int = 17, seed: int = 0, **writer_args):
    schema = logits_schema(codec)
    with ShardWriter(path, make_manifest(codec), schema, **writer_args) as writer:
        for row in synthetic_rows(codec, num_sequences, seq_len, seed):
            writer.write(rows_to_table(schema, [row]))
    return path


@pytest.fixture
def codec() -> CodecConfig:
    return CodecConfig(k=8, vocab_size=300)


@pytest.fixture
def store_path(tmp_path: Path, codec: CodecConfig) -> Path:
    return write_store(tmp_path / "store", codec, num_sequences=12, shard_bytes=3000, row_group_bytes=1000)


def save_tiny_teacher(folder: Path, vocab_size: int = 320, hidden: int = 32, layers: int = 2, max_positions: int = 512,
                      seed: int = 0, words: int | None = None) -> Path:
    """A randomly initialised tiny Llama and a word-level tokenizer, saved with save_pretrained (no downloads).

    The tokenizer knows ``words`` words w0..w{words-1} (default: vocab_size - 4) plus <pad>, <s>, </s>, <unk>.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = vocab_size - 4 if words is None else words
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max_positions,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_word_corpus(folder: Path, num_files: int = 3, docs_per_file: int = 5, seed: int = 0, words: int = 300) -> Path:
    """Plain-text files of random 'w<n>' words, documents separated by blank lines."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(num_files):
        docs = [" ".join(f"w{w}" for w in rng.integers(0, words, rng.integers(5, 60))) for _ in range(docs_per_file)]
        (folder / f"part{f}.txt").write_text("\n\n".join(docs) + "\n")
    return folder


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny")


@pytest.fixture
def word_corpus(tmp_path) -> Path:
    return write_word_corpus(tmp_path / "corpus")


S3_BUCKET = "kd-bucket"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(an s3fs filesystem, its storage_options) on a fresh moto server on loopback; bucket S3_BUCKET exists.

    No mock of the filesystem layer: s3fs (and any subprocess, which inherits the environment) talks HTTP to
    a moto server thread on 127.0.0.1; the AWS variables point at dummies so nothing leaves the machine."""
    pytest.importorskip("s3fs", reason="reads and writes s3:// through s3fs")
    moto_server = pytest.importorskip("moto.moto_server.threaded_moto_server", reason="needs moto[server]")
    import s3fs

    with pytest.MonkeyPatch.context() as env:
        for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                            "AWS_EC2_METADATA_DISABLED": "true"}.items():
            env.setenv(name, value)
        missing = str(tmp_path_factory.mktemp("aws") / "none")  # no ~/.aws config or credentials are read
        env.setenv("AWS_CONFIG_FILE", missing)
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", missing)
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        # the region comes from AWS_DEFAULT_REGION: s3fs would send a region in client_kwargs as the bucket's
        # LocationConstraint, which S3 refuses for us-east-1
        options = {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
        if not fs.exists(S3_BUCKET):  # moto keeps its buckets per process, across servers: a module before may have made it
            fs.mkdir(S3_BUCKET)
        yield fs, options
        server.stop()
