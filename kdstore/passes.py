"""The teacher passes ``--engine ray`` runs (kdstore/engine.py): build, generate and score, each as a TeacherPass.

    from kdstore.passes import pass_of
    pass_of(GenerateConfig(prompts="p.jsonl")).name   # "generate"

A pass says how to run one partition in this process (the local pass with a progress callback), how to check
its output before a cluster starts, and how to merge its partitions' results into the one a local run of every
partition would print. Counts add up; the store-wide figures (bytes, tokens of the store) come from the partition
that finished the store (wrote the manifest).
"""

from __future__ import annotations

from typing import Any

from kdstore.build import BuildConfig, BuildResult, ProgressCallback, build
from kdstore.engine import TeacherPass, check_out, started_num_partitions
from kdstore.errors import BuildError, EngineError, GenerateError, ScoreError
from kdstore.generate import GenerateConfig, GenerateResult, check_generate_out, generate
from kdstore.score import ScoreConfig, ScoreResult, check_reference_tokenizer, open_scorable, score_store


# -- build -------------------------------------------------------------------------
def _run_build(config: BuildConfig, storage_options: dict[str, Any] | None, report: ProgressCallback) -> BuildResult:
    return build(config, storage_options, on_progress=report)


def _check_build(config: BuildConfig, storage_options: dict[str, Any] | None) -> None:
    if config.num_gpus_per_worker == 0 and config.backend == "vllm":
        raise EngineError("--backend vllm with --engine ray and --num-gpus-per-worker 0: vLLM runs each partition's "
                          "engine on GPUs", hint="pass --num-gpus-per-worker 1 (or the GPUs of one vLLM engine)")
    check_out(config.out, storage_options)


def _merge_build(config: BuildConfig, results: dict[int, BuildResult], seconds: float) -> BuildResult:
    merged = BuildResult(out=config.out, seconds=seconds, corpus=results[0].corpus)  # each partition read it all
    for result in results.values():
        merged.num_sequences += result.num_sequences
        merged.num_tokens += result.num_tokens
        merged.compute_seconds = max(merged.compute_seconds, result.compute_seconds)
        merged.reference_lines += [line for line in result.reference_lines if line not in merged.reference_lines]
        merged.notes += [note for note in result.notes if note not in merged.notes]
        if result.finished:
            merged.finished, merged.total_bytes, merged.store_tokens = True, result.total_bytes, result.store_tokens
    return merged


def _started(config: BuildConfig | GenerateConfig) -> int | None:
    return started_num_partitions(config.out)


BUILD = TeacherPass("build", "unit", BuildError, _run_build, _merge_build, _check_build, _started)


# -- generate ----------------------------------------------------------------------
def _run_generate(config: GenerateConfig, storage_options: dict[str, Any] | None,
                  report: ProgressCallback) -> GenerateResult:
    return generate(config, on_progress=report)


def _merge_generate(config: GenerateConfig, results: dict[int, GenerateResult], seconds: float) -> GenerateResult:
    merged = GenerateResult(out=config.out, seconds=seconds)
    counts = ("num_prompts", "num_completions", "num_tokens", "num_skipped_too_long", "num_without_answer",
              "num_with_reference", "num_correct")
    for result in results.values():
        for name in counts:
            setattr(merged, name, getattr(merged, name) + getattr(result, name))
        merged.compute_seconds = max(merged.compute_seconds, result.compute_seconds)
        merged.notes += [note for note in result.notes if note not in merged.notes]
        if result.finished:
            merged.finished, merged.total_bytes = True, result.total_bytes
    return merged


def _check_generate(config: GenerateConfig, storage_options: dict[str, Any] | None) -> None:
    check_generate_out(config)


GENERATE = TeacherPass("generate", "prompt", GenerateError, _run_generate, _merge_generate, _check_generate, _started)


# -- score -------------------------------------------------------------------------
def _run_score(config: ScoreConfig, storage_options: dict[str, Any] | None, report: ProgressCallback) -> ScoreResult:
    return score_store(config, on_progress=report)


def _check_score(config: ScoreConfig, storage_options: dict[str, Any] | None) -> None:
    check_reference_tokenizer(open_scorable(config.store), config.reference)


def _merge_score(config: ScoreConfig, results: dict[int, ScoreResult], seconds: float) -> ScoreResult:
    merged = ScoreResult(store=config.store, seconds=seconds)
    for result in results.values():
        merged.num_files += result.num_files
        merged.num_sequences += result.num_sequences
        merged.num_tokens += result.num_tokens
        merged.forward_seconds = max(merged.forward_seconds, result.forward_seconds)
        if result.finished:
            merged.finished, merged.score_bytes = True, result.score_bytes
    return merged


def _any_number(config: ScoreConfig) -> None:
    return None  # a score file depends on its shard alone: a rerun may split the shards another way


SCORE = TeacherPass("score", "shard", ScoreError, _run_score, _merge_score, _check_score, _any_number)


def pass_of(config: Any) -> TeacherPass:
    """The teacher pass that ``config`` configures."""
    for teacher_pass, kind in ((BUILD, BuildConfig), (GENERATE, GenerateConfig), (SCORE, ScoreConfig)):
        if isinstance(config, kind):
            return teacher_pass
    raise TypeError(f"no teacher pass takes a {type(config).__name__}")


__all__ = ["BUILD", "GENERATE", "SCORE", "pass_of"]
