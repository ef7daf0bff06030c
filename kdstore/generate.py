"""``kdstore generate``: sample teacher completions for prompts and write a generations store.

    result = generate(GenerateConfig(prompts="problems.jsonl", out="gens", n=4, temperature=0.8, stop=("\\n\\n",)))

Per completion the store keeps the text and tokens, the teacher's top-K / tail / token log-prob at each
generated token (temperature 1, the logits table's codec), the seed, the sampling settings, the finish reason,
the extracted answer, whether it matches the reference and whether it agrees with the majority of the
prompt's n samples (docs/generate.md, docs/format.md).

Prompts are assigned to partitions by the sha256 of their stable id, like build's work units; a partition's
prompts are taken in file order, ``unit_prompts`` at a time. Within a unit the n samples of every prompt are
batched by prompt length (longest first), and rows are written in prompt order, samples in order, so a
partition's committed rows are a prefix of a fixed order: a rerun after kill -9 skips the committed units,
recomputes the unit it stopped in (the same batches, the same seeds: the same bits) and writes the rest.
Sampling runs on the main thread; encoding and Parquet writing on the host pipeline's threads, as in build
(kdstore.pipeline.HostPipeline.put_rows).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field

from kdstore.answers import AnswerConfig, answer_extractor, answers_match, majority, normalise
from kdstore.build import DEFAULT_TEACHER, ProgressCallback, _write_error, tokenizer_info
from kdstore.codec import CodecConfig, encode_positions
from kdstore.config_file import check_config, read_toml_config
from kdstore.corpus import partition_of
from kdstore.decode import BatchOutput, SamplingSettings, decode_batch
from kdstore.errors import GenerateError
from kdstore.format import FORMAT_VERSION, TABLE_GENERATIONS, Manifest, generations_schema, sha256_named_files
from kdstore.pipeline import HostPipeline
from kdstore.prompts import Prompt, PromptFields, check_chat_template, prompt_token_ids, read_prompts
from kdstore.records import check_output_folder
from kdstore.store import is_url
from kdstore.teacher import Teacher, load_teacher, load_tokenizer
from kdstore.writer import DEFAULT_ROW_GROUP_BYTES, ShardWriter


@dataclass(frozen=True)
class GenerateConfig:
    """Everything a generation pass needs; fields marked (recorded) go into the manifest's ``build``."""

    prompts: str = ""  # (recorded) a .jsonl / .parquet file or a saved HF dataset folder
    teacher: str = DEFAULT_TEACHER
    out: str = "kdstore-generations"
    n: Annotated[int, Field(ge=1)] = 4  # (recorded) completions per prompt
    temperature: Annotated[float, Field(ge=0)] = 1.0  # (recorded) 0: greedy
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0  # (recorded)
    top_k: Annotated[int, Field(ge=0)] = 0  # (recorded) sampling top-k, 0: off (the stored K is ``k``)
    max_new_tokens: Annotated[int, Field(ge=1)] = 128  # (recorded)
    stop: tuple[str, ...] = ()  # (recorded) stop strings, kept at the end of the completion
    chat_template: bool = False  # (recorded) render prompts with the tokenizer's chat template
    system: str | None = None  # (recorded) a system message (a first line without a chat template)
    prompt_field: str = "prompt"  # (recorded)
    answer_field: str = "answer"  # (recorded) the reference answer; optional per record
    id_field: str = "id"  # (recorded) used when a record has it, else a hash of the prompt
    answer_extractor: Literal["numeric", "boxed", "regex", "none"] = "numeric"  # (recorded) kdstore/answers.py
    answer_pattern: str | None = None  # (recorded) for answer_extractor = "regex": group 1 is the answer
    too_long: Literal["refuse", "skip"] = "refuse"  # (recorded) prompt + max_new_tokens above the teacher's context
    k: Annotated[int, Field(ge=1)] = 32  # (recorded via codec) top-K entries per generated token
    sampled_draws: Annotated[int, Field(ge=0, le=65535)] = 0  # (recorded via codec)
    sampled_mode: Literal["full", "tail"] = "full"  # (recorded via codec)
    seed: int = 0  # (recorded) with the prompt id and sample index, gives each sample's seed
    # (recorded) samples per decoding batch and prompts per work unit: both change which rows share a batch,
    # hence the last bits of the logits, so a resume must use the ones the store was started with
    batch_size: Annotated[int, Field(ge=1)] = 64
    unit_prompts: Annotated[int, Field(ge=1)] = 64
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # (recorded via teacher)
    device: str = "auto"
    trust_remote_code: bool = False  # never from the TOML file
    num_partitions: Annotated[int, Field(ge=1)] = 1
    partition: Annotated[int, Field(ge=0)] = 0
    shard_bytes: Annotated[int, Field(ge=1)] = 256 << 20
    row_group_bytes: Annotated[int, Field(ge=1)] = DEFAULT_ROW_GROUP_BYTES
    progress: bool = True
    # where the partitions run (kdstore/engine.py), as for kdstore build; not recorded
    engine: Literal["local", "ray"] = "local"
    ray_address: str = ""  # "": RAY_ADDRESS, else a new local cluster; "auto": the one `ray start` made here
    num_gpus_per_worker: Annotated[float, Field(ge=0)] = 0.0  # Ray: GPUs per partition task; 0 runs it on CPU

    def __post_init__(self) -> None:
        for name, value in check_config(type(self), vars(self), GenerateError).items():
            object.__setattr__(self, name, value)
        if not self.prompts:
            raise GenerateError("no prompt file given", hint="kdstore generate PROMPTS.jsonl --out STORE")
        if self.partition >= self.num_partitions:
            raise GenerateError(f"partition = {self.partition}: expected 0 to {self.num_partitions - 1}")
        if any(not s for s in self.stop):
            raise GenerateError("a stop string is empty", hint="drop the empty --stop")
        answer_extractor(self.answer_config())  # a bad pattern fails before any model loads

    def recorded(self) -> dict[str, Any]:
        keys = ("n", "temperature", "top_p", "top_k", "max_new_tokens", "stop", "chat_template", "system",
                "prompt_field", "answer_field", "id_field", "answer_extractor", "answer_pattern", "too_long", "seed",
                "batch_size", "unit_prompts")
        return {"prompts": str(Path(self.prompts)), "prompts_sha256": _prompts_sha256(Path(self.prompts)),
                **{k: getattr(self, k) for k in keys}, "stop": list(self.stop)}

    def answer_config(self) -> AnswerConfig:
        return AnswerConfig(self.answer_extractor, self.answer_pattern)

    def sampling(self) -> SamplingSettings:
        return SamplingSettings(self.temperature, self.top_p, self.top_k, self.max_new_tokens)


@dataclass
class GenerateResult:
    out: str
    num_prompts: int = 0  # generated by this run (a resume skips what was committed)
    num_completions: int = 0
    num_tokens: int = 0  # generated tokens
    num_skipped_too_long: int = 0
    num_without_answer: int = 0
    num_with_reference: int = 0
    num_correct: int = 0
    seconds: float = 0.0
    compute_seconds: float = 0.0
    finished: bool = False
    total_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def summary_lines(self) -> list[str]:
        rate = self.num_tokens / self.compute_seconds if self.compute_seconds else 0.0
        lines = [f"wrote {self.num_completions} completions of {self.num_prompts} prompts, {self.num_tokens} generated "
                 f"tokens in {self.seconds:.1f} s ({rate:,.0f} tokens/s)"]
        if self.num_skipped_too_long:
            lines.append(f"skipped {self.num_skipped_too_long} prompts longer than the teacher's context allows")
        if self.num_without_answer:
            lines.append(f"{self.num_without_answer} of {self.num_completions} completions have no answer the "
                         "extractor could find (stored with answer null, correct false)")
        if self.num_with_reference:
            lines.append(f"correct: {self.num_correct} of {self.num_with_reference} completions with a reference "
                         f"({self.num_correct / self.num_with_reference:.1%})")
        lines += self.notes
        lines.append(f"store {self.out}: {self.total_bytes:,} bytes (kdstore info {self.out})" if self.finished else
                     f"partition done; the manifest is written when every partition of {self.out} has finished")
        return lines


def _prompts_sha256(path: Path) -> str | None:
    """The prompt file's content hash (a saved dataset: its files'), so a resume from an edited file is refused."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return sha256_named_files(files, with_names=path.is_dir()) if all(f.is_file() for f in files) else None


def sample_seed(seed: int, prompt_id: str, sample_index: int) -> int:
    """A sample's seed: a function of the run's seed, the prompt id and the sample index only (< 2**63)."""
    digest = hashlib.sha256(f"{seed}:{prompt_id}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _sample_uniforms(seed: int, steps: int, draws: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[steps] float64 uniforms that pick the tokens, and [steps, draws] systematic points for the sampled draws."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.rand(steps, generator=generator, dtype=torch.float64)
    if not draws:
        return picks, None
    start = torch.rand((steps, 1), generator=generator, dtype=torch.float64)
    return picks, (start + torch.arange(draws, dtype=torch.float64)) / draws


@dataclass(frozen=True)
class _Job:
    """A partition's prompts, tokenized and checked."""

    prompts: list[Prompt]
    token_ids: list[list[int]]


def _prepare(config: GenerateConfig, every: list[Prompt], tokenizer: Any, max_positions: int | None,
             result: GenerateResult) -> _Job:
    mine = [p for p in every if partition_of(p.prompt_id, config.num_partitions) == config.partition]
    kept, ids = [], []
    for prompt in mine:
        tokens = prompt_token_ids(prompt, tokenizer, config.chat_template, config.system)
        if max_positions is not None and len(tokens) + config.max_new_tokens > max_positions:
            if config.too_long == "refuse":
                raise GenerateError(f"prompt {prompt.prompt_id} has {len(tokens)} tokens; with max_new_tokens "
                                    f"{config.max_new_tokens} that passes the teacher's context of {max_positions}",
                                    hint="lower --max-new-tokens, shorten the prompt, or pass --too-long skip to "
                                         "skip such prompts (they are counted)")
            result.num_skipped_too_long += 1
            continue
        kept.append(prompt)
        ids.append(tokens)
    return _Job(kept, ids)


def check_generate_out(config: GenerateConfig) -> None:
    """GenerateError unless ``config.out`` is a local folder that is new, empty or a generations store of ours."""
    if is_url(config.out):
        raise GenerateError(f"--out {config.out}: kdstore generate writes a local folder",
                            hint="generate into a local folder; the store can then be read or shared from there")
    check_output_folder(Path(config.out))  # someone's folder is refused before minutes of loading


def generate(config: GenerateConfig, on_progress: ProgressCallback | None = None) -> GenerateResult:
    """Generate (or resume) partition ``config.partition`` of the generations store at ``config.out``;
    ``on_progress`` gets (prompts done, prompts of the partition, tokens generated by this run).

    ``config.engine == "ray"`` runs every partition as a task on a Ray cluster instead (kdstore.engine)."""
    if config.engine != "local":
        from kdstore.engine import run_partitions

        return run_partitions(config)
    started = time.perf_counter()
    result = GenerateResult(out=config.out)
    check_generate_out(config)
    tokenizer = load_tokenizer(config.teacher, config.trust_remote_code)
    fields = PromptFields(config.prompt_field, config.answer_field or None, config.id_field or None)
    prompts = read_prompts(config.prompts, fields)  # a bad prompt file fails before the teacher loads
    if config.chat_template:
        check_chat_template(tokenizer, config.teacher)
    teacher = load_teacher(config.teacher, config.dtype, config.device, config.trust_remote_code)
    if config.k > teacher.vocab_size:
        raise GenerateError(f"k = {config.k} is above the teacher's vocabulary of {teacher.vocab_size}",
                            hint=f"use -k {teacher.vocab_size} or less")
    job = _prepare(config, prompts, tokenizer, teacher.max_positions, result)
    codec = CodecConfig(k=config.k, vocab_size=teacher.vocab_size, sampled_draws=config.sampled_draws,
                        sampled_mode=config.sampled_mode, sampled_scheme="systematic")
    schema = generations_schema(codec)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        manifest = Manifest(table=TABLE_GENERATIONS, teacher=teacher.info(),
                            tokenizer=tokenizer_info(tokenizer, Path(scratch)), codec=codec.to_dict(),
                            build=config.recorded(), format_version=FORMAT_VERSION)
        writer = ShardWriter(config.out, manifest, schema, partition=config.partition,
                             num_partitions=config.num_partitions, shard_bytes=config.shard_bytes,
                             row_group_bytes=min(config.row_group_bytes, config.shard_bytes), tokenizer_dir=scratch)
        compute_started = time.perf_counter()
        created = not Path(config.out).exists()
        try:
            with writer, HostPipeline(writer, codec, schema) as background:
                _run_partition(config, job, teacher, tokenizer, writer, background, result, on_progress)
        except BaseException as exc:
            # a folder this run made and committed nothing to is removed: a failed first run leaves nothing that
            # looks like a store. Only with one partition: others may be writing into a folder they share.
            if created and config.num_partitions == 1 and not writer.shards:
                shutil.rmtree(config.out, ignore_errors=True)
            if isinstance(exc, OSError):
                raise _write_error(config.out, exc) from None
            raise
    result.compute_seconds = time.perf_counter() - compute_started
    result.seconds = time.perf_counter() - started
    if writer.finalized is not None:
        result.finished, result.total_bytes = True, writer.finalized.total_bytes
    return result


def _run_partition(config: GenerateConfig, job: _Job, teacher: Teacher, tokenizer: Any, writer: ShardWriter,
                   background: HostPipeline, result: GenerateResult, on_progress: ProgressCallback | None) -> None:
    from tqdm import tqdm

    skip = writer.num_committed_rows
    extract = answer_extractor(config.answer_config())
    progress = tqdm(total=len(job.prompts), unit="prompt", desc=f"partition {config.partition}",
                    disable=not config.progress, mininterval=2.0)
    report = on_progress or (lambda done, total, tokens: None)
    report(0, len(job.prompts), 0)
    try:  # closed on an error too, so the error line starts a line of its own
        for start in range(0, len(job.prompts), config.unit_prompts):
            prompts = job.prompts[start:start + config.unit_prompts]
            token_ids = job.token_ids[start:start + config.unit_prompts]
            if skip >= len(prompts) * config.n:
                skip -= len(prompts) * config.n
                progress.update(len(prompts))
                report(start + len(prompts), len(job.prompts), result.num_tokens)
                continue
            rows = _generate_unit(config, prompts, token_ids, teacher, tokenizer, extract)
            new = rows[skip:]
            background.put_rows(new, partial(encode_completion, background.codec))
            skip = 0
            result.num_prompts += len({r["prompt_id"] for r in new})
            result.num_completions += len(new)
            result.num_tokens += sum(len(r["token_logprobs"]) for r in new)
            result.num_without_answer += sum(r["answer"] is None for r in new if config.answer_extractor != "none")
            result.num_with_reference += sum(r["correct"] is not None for r in new)
            result.num_correct += sum(bool(r["correct"]) for r in new)
            progress.update(len(prompts))
            report(start + len(prompts), len(job.prompts), result.num_tokens)
    finally:
        progress.close()
    if result.num_completions and result.num_without_answer == result.num_completions:
        result.notes.append(f"the answer extractor ({config.answer_extractor}) found no answer in any completion; "
                            "check --answer-extractor / --answer-pattern against `kdstore head`")


def _stop_check(tokenizer: Any, stops: tuple[str, ...]) -> Any:
    if not stops:
        return None
    window = max(len(s) for s in stops) + 2  # tokens: every token but a special one decodes to >= 1 character

    def hit(row: int, ids: list[int]) -> bool:
        text = tokenizer.decode(ids[-window:], skip_special_tokens=True)
        return any(s in text for s in stops)
    return hit


def _generate_unit(config: GenerateConfig, prompts: list[Prompt], token_ids: list[list[int]], teacher: Teacher,
                   tokenizer: Any, extract: Any) -> list[dict[str, Any]]:
    """Rows for the n samples of each prompt, in prompt order then sample order."""
    samples = [(p, s) for p in range(len(prompts)) for s in range(config.n)]
    order = sorted(range(len(samples)), key=lambda i: -len(token_ids[samples[i][0]]))  # stable: ties keep order
    eos_ids = teacher.model.generation_config.eos_token_id or tokenizer.eos_token_id or []
    eos = {int(i) for i in np.atleast_1d(eos_ids) if i is not None}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows: list[dict[str, Any]] = [{} for _ in samples]
    for begin in range(0, len(order), config.batch_size):
        batch = order[begin:begin + config.batch_size]
        seeds = [sample_seed(config.seed, prompts[samples[i][0]].prompt_id, samples[i][1]) for i in batch]
        drawn = [_sample_uniforms(seed, config.max_new_tokens, config.sampled_draws) for seed in seeds]
        uniforms = torch.stack([d[0] for d in drawn])
        draw_uniforms = torch.stack([d[1] for d in drawn]) if config.sampled_draws else None
        output = decode_batch(teacher, [token_ids[samples[i][0]] for i in batch], uniforms, config.sampling(), config.k,
                              eos, pad, _stop_check(tokenizer, config.stop), draw_uniforms, config.sampled_mode)
        for row, index in enumerate(batch):
            prompt_index, sample_index = samples[index]
            if output.non_finite[row]:
                raise GenerateError(f"the teacher produced NaN or inf log-probs for prompt {prompts[prompt_index].prompt_id}",
                                    hint="try --dtype float32; check the teacher weights")
            rows[index] = _row(config, prompts[prompt_index], token_ids[prompt_index], sample_index, seeds[row],
                               output, row, tokenizer, extract)
    for start in range(0, len(rows), config.n):
        _vote(rows[start:start + config.n])
    return rows


def _row(config: GenerateConfig, prompt: Prompt, prompt_ids: list[int], sample_index: int, seed: int,
         output: BatchOutput, row: int, tokenizer: Any, extract: Any) -> dict[str, Any]:
    length = int(output.lengths[row])
    tokens = output.tokens[row, :length]
    text = tokenizer.decode(tokens.tolist(), skip_special_tokens=True)
    answer = extract(text)
    reference = prompt.reference_answer
    logprobs = output.target_logprob[row, :length].astype(np.float32)
    out = {
        "sequence_id": f"{prompt.prompt_id}/{sample_index:04d}", "prompt_id": prompt.prompt_id,
        "sample_index": sample_index, "prompt": prompt.stored, "reference_answer": reference,
        "input_ids": np.concatenate([np.asarray(prompt_ids, dtype=np.int32), tokens.astype(np.int32)]),
        "prompt_num_tokens": len(prompt_ids), "text": text,
        "topk_ids": output.topk_ids[row, :length], "topk_logprobs": output.topk_logprobs[row, :length],
        "tail_logmass": output.tail_logmass[row, :length], "target_logprob": logprobs,
        "token_logprobs": logprobs, "total_logprob": float(logprobs.astype(np.float64).sum()),
        "finish_reason": "stop" if output.stopped[row] else "length", "seed": seed,
        "temperature": config.temperature, "top_p": config.top_p, "top_k": config.top_k,
        "answer": answer, "correct": None if reference is None else answers_match(answer, reference),
    }
    if output.sampled_ids is not None:
        out["sampled_ids"], out["sampled_counts"] = output.sampled_ids[row, :length], output.sampled_counts[row, :length]
    return out


def _vote(rows: list[dict[str, Any]]) -> None:
    """Self-consistency over one prompt's completions: the majority answer, each one's agreement, the share."""
    winner, share = majority([r["answer"] for r in rows])
    for r in rows:
        r["majority_answer"], r["vote_share"] = winner, share
        # the same equality the vote counted by (normalised text), not the looser mathematical one
        r["agrees_with_majority"] = None if winner is None else \
            (r["answer"] is not None and normalise(r["answer"]) == normalise(winner))


def encode_completion(codec: CodecConfig, row: dict[str, Any]) -> dict[str, Any]:
    """One completion's arrays -> one stored row (per-position columns through the codec)."""
    columns = encode_positions(codec, row["topk_ids"], row["topk_logprobs"], row["tail_logmass"], row["target_logprob"],
                               row.get("sampled_ids"), row.get("sampled_counts"))
    skip = ("topk_ids", "topk_logprobs", "tail_logmass", "target_logprob", "sampled_ids", "sampled_counts")
    return {**{k: v for k, v in row.items() if k not in skip}, **columns}


def resolved_config(overrides: dict[str, Any], config_file: str | None) -> GenerateConfig:
    """Defaults < TOML file < flags, every value checked before any model loads (as ``kdstore build``)."""
    values: dict[str, Any] = read_toml_config(config_file, GenerateError) if config_file else {}
    if "trust_remote_code" in values:
        raise GenerateError(f"{config_file} sets trust_remote_code; a config file may not turn on a teacher's own code",
                            hint="pass --trust-remote-code on the command line or set KDSTORE_TRUST_REMOTE_CODE=1")
    values.update({k: v for k, v in overrides.items() if v is not None and v != ()})
    if "trust_remote_code" not in values and os.environ.get("KDSTORE_TRUST_REMOTE_CODE") == "1":
        values["trust_remote_code"] = True
    if isinstance(values.get("stop"), str):
        values["stop"] = (values["stop"],)
    where = f" (from {config_file} and the flags)" if config_file else ""
    return GenerateConfig(**check_config(GenerateConfig, values, GenerateError, what=f"invalid generate settings{where}"))
