"""The host path (kdstore.pipeline): whole-batch encoding gives exactly the rows a row-by-row encoder gives, in
sequence order, and errors of either thread reach the caller."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import make_manifest, teacher_outputs
from kdstore.codec import CodecConfig, encode_positions
from kdstore.errors import BuildError, CodecError
from kdstore.format import logits_schema, rows_to_table
from kdstore.pipeline import HostPipeline, SparseBatch, batch_table
from kdstore.teacher import HostCopy, predicted_positions
from kdstore.writer import ShardWriter


@dataclass
class Seq:
    sequence_id: str
    input_ids: np.ndarray


def _unit(codec: CodecConfig, lengths: list[int], seed: int = 0):
    """Sequences and their teacher outputs (dicts of [P, ...] arrays), with systematic-looking sampled draws."""
    rng = np.random.default_rng(seed)
    sequences, outputs = [], []
    for i, length in enumerate(lengths):
        tokens, ids, values, tail, target = teacher_outputs(rng, length, codec.vocab_size, codec.k)
        out = {"topk_ids": ids, "topk_logprobs": values.astype(np.float32), "tail_logmass": tail.astype(np.float32),
               "target_logprob": target.astype(np.float32), "lse": np.zeros(length - 1, dtype=np.float32)}
        if codec.sampled_draws:
            drawn = np.sort(rng.integers(0, codec.vocab_size, (length - 1, codec.sampled_draws)), axis=1)
            sampled_ids, sampled_counts = np.full_like(drawn, -1), np.zeros_like(drawn)
            for p, row in enumerate(drawn):
                uniq, counts = np.unique(row, return_counts=True)
                sampled_ids[p, :len(uniq)], sampled_counts[p, :len(uniq)] = uniq, counts
            out.update(sampled_ids=sampled_ids, sampled_counts=sampled_counts)
        sequences.append(Seq(f"s{i:03d}", tokens))
        outputs.append(out)
    return sequences, outputs


def _row_by_row(codec: CodecConfig, schema, sequences, outputs):
    """The reference: each sequence encoded alone, as builds did before kdstore.pipeline."""
    rows = []
    for sequence, out in zip(sequences, outputs):
        columns = encode_positions(codec, out["topk_ids"], out["topk_logprobs"], out["tail_logmass"],
                                   out["target_logprob"], out.get("sampled_ids"), out.get("sampled_counts"))
        score = float(np.mean(out["target_logprob"]))
        rows.append({"sequence_id": sequence.sequence_id, "input_ids": sequence.input_ids, "teacher_score": score,
                     **columns})
    return rows_to_table(schema, rows)


def _batch_arrays(outputs, indices):
    return {name: np.concatenate([outputs[i][name] for i in indices]) for name in outputs[0]}


@pytest.mark.parametrize("draws", [0, 6])
def test_a_batch_table_equals_the_rows_encoded_one_by_one(draws):
    codec = CodecConfig(k=8, vocab_size=300, sampled_draws=draws)
    schema = logits_schema(codec, ("teacher_score",))
    sequences, outputs = _unit(codec, [17, 2, 40, 9, 33])
    table = batch_table(codec, schema, sequences, _batch_arrays(outputs, range(5)))
    assert table.equals(_row_by_row(codec, schema, sequences, outputs))


def test_the_pipeline_writes_the_unit_in_sequence_order_and_skips_the_committed_prefix(tmp_path):
    codec = CodecConfig(k=8, vocab_size=300, sampled_draws=4)
    schema = logits_schema(codec, ("teacher_score",))
    sequences, outputs = _unit(codec, [12, 30, 5, 30, 18, 7], seed=3)
    batches = [[1, 3], [4, 0], [5, 2]]  # longest first, as kdstore.build._batches forms them

    def sparse_batches():
        for indices in batches:
            tensors = {name: torch.from_numpy(values) for name, values in _batch_arrays(outputs, indices).items()}
            yield SparseBatch(np.asarray(indices), HostCopy(tensors))

    with ShardWriter(tmp_path / "store", make_manifest(codec), schema) as writer, \
            HostPipeline(writer, codec, schema) as pipeline:
        pipeline.put_unit(sequences, sparse_batches(), skip=2)
    written = pq.read_table(next((tmp_path / "store" / "shards").glob("*.parquet")))
    want = _row_by_row(codec, schema, sequences[2:], outputs[2:])
    assert written.equals(want.cast(written.schema))


def test_nan_logits_name_their_sequence_and_leave_no_shard(tmp_path):
    codec = CodecConfig(k=8, vocab_size=300)
    schema = logits_schema(codec, ("teacher_score",))
    sequences, outputs = _unit(codec, [10, 10, 10])
    outputs[2]["lse"][4] = np.nan
    tensors = {name: torch.from_numpy(values) for name, values in _batch_arrays(outputs, [0, 1, 2]).items()}
    with pytest.raises(BuildError, match="sequence s002"):
        with ShardWriter(tmp_path / "store", make_manifest(codec), schema) as writer, \
                HostPipeline(writer, codec, schema) as pipeline:
            pipeline.put_unit(sequences, [SparseBatch(np.arange(3), HostCopy(tensors))])
    assert not list((tmp_path / "store" / "shards").iterdir())
    assert not (tmp_path / "store" / "manifest.json").exists()


def test_a_codec_error_on_the_encoder_thread_reaches_the_caller(tmp_path):
    codec = CodecConfig(k=8, vocab_size=300)
    schema = logits_schema(codec, ("teacher_score",))
    sequences, outputs = _unit(codec, [10])
    outputs[0]["topk_ids"][3, :] = 5  # repeated ids within a position
    tensors = {name: torch.from_numpy(values) for name, values in outputs[0].items()}
    with pytest.raises(CodecError, match="repeat an id"):
        with ShardWriter(tmp_path / "store", make_manifest(codec), schema) as writer, \
                HostPipeline(writer, codec, schema) as pipeline:
            pipeline.put_unit(sequences, [SparseBatch(np.arange(1), HostCopy(tensors))])


def test_positions_from_host_lengths_equal_the_masks_nonzero():
    lengths = [7, 3, 7, 2]
    mask = torch.zeros((4, 7), dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    from_mask = predicted_positions(mask)
    from_lengths = predicted_positions(mask, lengths)
    assert all(torch.equal(a, b) for a, b in zip(from_mask, from_lengths))
