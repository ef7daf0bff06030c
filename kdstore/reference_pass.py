"""``kdstore build --reference``: the reference model in the build's own corpus pass, writing the score files
``kdstore score`` writes (kdstore.score) without a second pass over the store.

    reference = ReferencePass("small-model", dtype="float32", device="cpu", batch_tokens=8192,
                              trust_remote_code=False, seq_len=256, teacher_tokenizer=tokenizer)
    reference.add(unit_sequences, skip)          # for each work unit the build partition reads
    lines = reference.finish(writer)             # once the partition's ShardWriter has closed
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np

from kdstore.score import (
    ScoreResult,
    finalize_scores,
    prepare_score_folders,
    reference_info,
    reference_logprobs,
    tokenizer_sha256,
    write_score_files,
)
from kdstore.store import Store


class ReferencePass:
    """The reference's next-token log-probs of the sequences a build partition writes, a work unit at a time
    (in the corpus pass); ``finish`` then writes the score files of the partition's own shards (those
    ``kdstore score`` writes), and the partition that finds every shard scored lists them in the manifest.

    A unit a resumed build skips, wholly or in part (its rows are committed), is kept aside and run only if a
    shard of it still lacks its score file, and then whole: the reference always sees a unit in the same
    batches, so a build killed and rerun writes the very files an uninterrupted one does."""

    def __init__(self, reference: str, *, dtype: str, device: str, batch_tokens: int, trust_remote_code: bool,
                 seq_len: int, teacher_tokenizer: Any) -> None:
        from kdstore.errors import BuildError
        from kdstore.teacher import load_teacher, load_tokenizer

        tokenizer = load_tokenizer(reference, trust_remote_code)
        theirs, ours = tokenizer_sha256(tokenizer), tokenizer_sha256(teacher_tokenizer)
        if theirs != ours and tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
            raise BuildError(f"the reference {reference} has another tokenizer than the teacher (reference files_sha256 "
                             f"{theirs}, teacher {ours})", hint="use a reference trained with the teacher's tokenizer")
        self.model = load_teacher(reference, dtype, device, trust_remote_code)
        if self.model.max_positions and seq_len > self.model.max_positions:
            raise BuildError(f"the reference {reference} reads at most {self.model.max_positions} positions; "
                             f"--seq-len is {seq_len}", hint=f"use --seq-len {self.model.max_positions} or less")
        self.reference, self.batch_tokens = reference, batch_tokens
        self.logprobs: dict[str, np.ndarray] = {}
        self.skipped: list[list[Any]] = []  # units a resume skipped (in part): run only when a shard needs them
        self.skipped_unit: dict[str, int] = {}  # sequence id -> its index in ``skipped``

    def add(self, sequences: list[Any], skip: int = 0) -> None:
        """A work unit the build reads (objects with ``sequence_id`` and ``input_ids``), its first ``skip``
        sequences committed by an earlier run."""
        if skip:
            self.skipped_unit.update({s.sequence_id: len(self.skipped) for s in sequences})
            self.skipped.append(sequences)
        else:
            self._run(sequences)

    def _run(self, sequences: list[Any]) -> None:
        values = reference_logprobs(self.model, [s.input_ids for s in sequences], self.batch_tokens)
        self.logprobs.update({s.sequence_id: v for s, v in zip(sequences, values)})

    def lookup(self, ids: list[str]) -> dict[str, np.ndarray]:
        """The log-probs of ``ids``, running the skipped units they belong to (whole) first."""
        for unit in sorted({self.skipped_unit[i] for i in ids if i not in self.logprobs and i in self.skipped_unit}):
            self._run(self.skipped[unit])
        return {i: self.logprobs[i] for i in ids if i in self.logprobs}

    def finish(self, writer: Any) -> list[str]:
        """Write the score files of the shards ``writer`` (the partition's kdstore.writer.ShardWriter, closed)
        committed; list every store's score file in the manifest once each shard has one."""
        from kdstore.writer import _lock

        root, started = writer.root, time.perf_counter()
        partition = Store(str(root), replace(writer.manifest, shards=list(writer.shards)), None, str(root))
        info = reference_info(self.model, per_token=False)
        result = ScoreResult(store=str(root))
        with _lock(prepare_score_folders(root) / f"reference-{writer.partition:05d}.lock", blocking=False):
            write_score_files(partition, range(len(writer.shards)), self.model, info, self.batch_tokens, result,
                              self.lookup)
        finished = finalize_scores(root, info)
        result.seconds = time.perf_counter() - started
        if finished is not None:
            result.finished, result.score_bytes = True, sum(f["num_bytes"] for f in finished.scores["files"])
        return result.summary_lines()
