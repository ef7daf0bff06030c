"""``kdstore build``: run a teacher once over a corpus and write a store.

    result = build(BuildConfig(corpus=["docs/"], teacher="my-teacher", out="store"))

The corpus is cut into work units (kdstore.corpus); a partition owns the units
whose stable key hashes to it. Units are processed in order and their rows
written in order, so what a partition has committed is always a prefix of its
rows: a rerun skips that prefix and recomputes only the unit it stopped in
(batches are formed within a unit, so the recomputed rows are bit-identical).

The teacher runs on the main thread; the copy of its sparse outputs to the
host, their encoding and the Parquet writing run behind it (kdstore.pipeline:
two threads fed through bounded queues), so the device does not wait on
compression and memory stays flat.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import numpy as np
import torch
from pydantic import Field

from kdstore.codec import CodecConfig
from kdstore.config_file import check_config, read_toml_config
from kdstore.corpus import CorpusConfig, CorpusStats, iter_units, partition_of, tokenize_unit
from kdstore.errors import BuildError
from kdstore.format import PARTITION_DIR, Manifest, logits_schema, sha256_named_files
from kdstore.mirror import RemoteMirror
from kdstore.pipeline import HostPipeline, SparseBatch
from kdstore.records import check_output_folder
from kdstore.store import is_url
from kdstore.teacher import (
    HostCopy,
    Teacher,
    load_teacher,
    load_tokenizer,
    sample_sparse,
    sparsify,
    teacher_logits_chunks,
    to_device,
)
from kdstore.writer import DEFAULT_ROW_GROUP_BYTES, DEFAULT_ZSTD_LEVEL, ShardWriter

ASSETS = Path(__file__).with_name("assets")
DEFAULT_TEACHER = str(ASSETS / "teacher")
DEFAULT_CORPUS = str(ASSETS / "corpus")


@dataclass(frozen=True)
class BuildConfig:
    """Everything a build needs. Fields marked (recorded) go into the manifest's ``build``."""

    # Types, ranges and choices are checked on construction (kdstore.config_file.check_config), before any
    # model loads; a TOML list is accepted for ``corpus``.
    corpus: tuple[str, ...] = (DEFAULT_CORPUS,)  # (recorded)
    teacher: str = DEFAULT_TEACHER
    out: str = "kdstore-store"
    k: Annotated[int, Field(ge=1)] = 64  # (recorded via codec) at most the vocabulary, checked once the teacher loads
    seq_len: Annotated[int, Field(ge=2)] = 256  # (recorded) a sequence predicts at least one token
    split: Literal["file", "blank-line"] = "blank-line"  # (recorded) plain text: one document per file or per block
    text_field: str = "text"  # (recorded)
    pack: bool = False  # (recorded)
    errors: Literal["strict", "replace"] = "strict"  # (recorded)
    unit_documents: Annotated[int, Field(ge=1)] = 256  # (recorded) documents per work unit
    dtype: Literal["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"] = "float32"  # (recorded via teacher)
    device: str = "auto"
    trust_remote_code: bool = False  # never from build.toml: only --trust-remote-code or KDSTORE_TRUST_REMOTE_CODE=1
    sampled_draws: Annotated[int, Field(ge=0, le=65535)] = 0  # (recorded via codec) 0: no sampled-sparse columns
    sampled_mode: Literal["full", "tail"] = "full"  # (recorded via codec) "tail": draws from outside the top-K
    # (recorded via codec) "systematic" or "iid" draws (docs/format.md); systematic recovered more of online KD at
    # every size measured (docs/fidelity.md: 86.5 vs 76.9 % at 16 draws), at the same bytes
    sampled_scheme: Literal["systematic", "iid"] = "systematic"
    seed: int = 0  # (recorded) seeds the sampled draws
    license: str = ""  # (recorded) the data's licence for the dataset card (a Hub id such as "apache-2.0"); "": other
    batch_tokens: Annotated[int, Field(ge=1)] = 8192  # tokens per teacher batch, padding included
    num_partitions: Annotated[int, Field(ge=1)] = 1
    partition: Annotated[int, Field(ge=0)] = 0  # below num_partitions
    shard_bytes: Annotated[int, Field(ge=1)] = 256 << 20
    # uncompressed Arrow bytes per Parquet row group (kdstore/writer.py: 1 MiB gives the bundled demo store 26 row
    # groups); a loader needs at least one row group per rank, so small stores read by many ranks want less
    row_group_bytes: Annotated[int, Field(ge=1)] = DEFAULT_ROW_GROUP_BYTES
    # zstd level of the shards; readers need no setting, so it is not recorded. One thread compresses a partition's
    # shards: at K=64 it wrote ~320k tokens/s at level 9 and ~2.4x that at level 3 for 3 % more bytes on the
    # development CPU (benchmarks/build.py; docs/build.md "Host path")
    zstd_level: Annotated[int, Field(ge=1, le=22)] = DEFAULT_ZSTD_LEVEL
    progress: bool = True
    # where the partitions run (kdstore/engine.py); not recorded: a Ray build writes the store a local one writes
    engine: Literal["local", "ray"] = "local"
    ray_address: str = ""  # "": RAY_ADDRESS, else a new local cluster; "auto": the one `ray start` made here
    num_gpus_per_worker: Annotated[float, Field(ge=0)] = 0.0  # Ray: GPUs per partition task; 0 runs it on CPU
    # what runs the teacher (recorded via teacher.backend when vllm): transformers here, or vLLM (kdstore/vllm_backend.py)
    backend: Literal["transformers", "vllm"] = "transformers"
    vllm_options: dict[str, int | float | str | bool] = field(default_factory=dict)  # keyword arguments of vllm.LLM
    # a reference model run over the same sequences in the same pass: the store gets kdstore score's files too
    reference: str | None = None

    def __post_init__(self) -> None:
        for name, value in check_config(type(self), vars(self), BuildError).items():
            object.__setattr__(self, name, value)  # a list given for corpus becomes a tuple
        if self.partition >= self.num_partitions:
            raise BuildError(f"partition = {self.partition}: expected 0 to {self.num_partitions - 1} "
                             f"(num_partitions = {self.num_partitions})")
        if self.backend == "vllm":
            from kdstore.vllm_backend import check_settings

            check_settings(self.k, self.sampled_draws, self.vllm_options)

    def recorded(self) -> dict[str, Any]:
        keys = ("seq_len", "split", "text_field", "pack", "errors", "unit_documents", "seed", "license")
        return {"corpus": [str(Path(c)) for c in self.corpus], **{k: getattr(self, k) for k in keys}}

    def corpus_config(self) -> CorpusConfig:
        return CorpusConfig(seq_len=self.seq_len, split=self.split, text_field=self.text_field, pack=self.pack,
                            errors=self.errors, unit_documents=self.unit_documents)


@dataclass
class BuildResult:
    out: str
    num_sequences: int = 0  # written by this run (a resume skips what was committed)
    num_tokens: int = 0
    seconds: float = 0.0  # wall time, teacher loading included
    compute_seconds: float = 0.0  # first unit to closed store: teacher, encoding and writing
    finished: bool = False  # True when the manifest was written (every partition done)
    total_bytes: int = 0  # of the whole store, once finished
    store_tokens: int = 0  # of the whole store, once finished
    corpus: CorpusStats = field(default_factory=CorpusStats)
    notes: list[str] = field(default_factory=list)  # how the engine ran it (kdstore/engine.py), shown last
    reference_lines: list[str] = field(default_factory=list)  # --reference: what the score files came to

    def summary_lines(self) -> list[str]:
        rate = self.num_tokens / self.seconds if self.seconds else 0.0
        lines = [f"wrote {self.num_sequences} sequences, {self.num_tokens} tokens in {self.seconds:.1f} s ({rate:,.0f} tokens/s)"]
        if self.corpus.num_empty_documents:
            lines.append(f"skipped {self.corpus.num_empty_documents} empty documents")
        if self.finished:
            per_token = self.total_bytes / max(1, self.store_tokens)
            lines.append(f"store {self.out}: {self.total_bytes:,} bytes, {per_token:.1f} bytes/token (kdstore info {self.out})")
        else:
            lines.append(f"partition done; the manifest is written when every partition of {self.out} has finished")
        return lines + self.reference_lines + self.notes


def tokenizer_info(tokenizer: Any, saved: Path) -> dict[str, Any]:
    files = sorted(p for p in saved.iterdir() if p.is_file())
    special = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")}
    return {"name": str(tokenizer.name_or_path), "files_sha256": sha256_named_files(files), "vocab_size": len(tokenizer),
            "special_ids": special, "files": [f"tokenizer/{p.name}" for p in files]}


def _check_inputs(config: BuildConfig, teacher: Teacher, tokenizer: Any) -> None:
    if config.seq_len < 2:
        raise BuildError(f"--seq-len must be at least 2, got {config.seq_len}")
    if teacher.max_positions and config.seq_len > teacher.max_positions:
        raise BuildError(f"--seq-len {config.seq_len} is above the teacher's maximum of {teacher.max_positions} positions",
                         hint=f"use --seq-len {teacher.max_positions} or less")
    if len(tokenizer) > teacher.vocab_size:
        raise BuildError(f"the tokenizer has {len(tokenizer)} tokens but the teacher only {teacher.vocab_size} logits",
                         hint="use the tokenizer that was trained with this teacher")


# (units done, units of the partition, tokens written by this run): called before the first unit and after each
ProgressCallback = Callable[[int, int, int], None]


def build(config: BuildConfig, storage_options: dict[str, Any] | None = None,
          on_progress: ProgressCallback | None = None) -> BuildResult:
    """Build (or resume) partition ``config.partition`` of the store at ``config.out``: a folder, or a URL
    (``s3://``, ``gs://``, ...: written through a local staging folder, kdstore.mirror; fsspec options such
    as ``endpoint_url`` in ``storage_options``, kept out of the recorded config).

    ``config.engine == "ray"`` runs every partition as a task on a Ray cluster instead (kdstore.engine)."""
    if config.engine != "local":
        from kdstore.engine import run_partitions

        return run_partitions(config, storage_options)
    started = time.perf_counter()
    result = BuildResult(out=config.out)
    mirror = RemoteMirror(config.out, storage_options) if is_url(config.out) else None
    if mirror is not None:
        mirror.check_target(None)  # a prefix holding other files is refused before minutes of loading
    else:
        check_output_folder(Path(config.out))  # someone's folder is refused before minutes of loading
    # Read the corpus once before loading the teacher: a bad corpus fails before
    # minutes of loading, and the count gives the progress bar its total. Only
    # the count is kept; the build pass streams the units again.
    num_units = sum(1 for u in iter_units(config.corpus, config.corpus_config(), result.corpus)
                    if partition_of(u.key, config.num_partitions) == config.partition)
    tokenizer = load_tokenizer(config.teacher, config.trust_remote_code)  # first: it loads in a second
    if config.backend == "vllm":
        from kdstore.vllm_backend import load_vllm_teacher

        teacher = load_vllm_teacher(config.teacher, config.k, config.dtype, config.trust_remote_code, config.vllm_options)
    else:
        teacher = load_teacher(config.teacher, config.dtype, config.device, config.trust_remote_code)
    _check_inputs(config, teacher, tokenizer)
    reference = _reference_pass(config, tokenizer, mirror is not None)
    codec = CodecConfig(k=config.k, vocab_size=teacher.vocab_size, sampled_draws=config.sampled_draws,
                        sampled_mode=config.sampled_mode, sampled_scheme=config.sampled_scheme)
    schema = logits_schema(codec, ("teacher_score",))
    with tempfile.TemporaryDirectory() as scratch, tempfile.TemporaryDirectory(prefix="kdstore-staging-") as staging:
        tokenizer.save_pretrained(scratch)
        manifest = Manifest(table="logits", teacher=teacher.info(), tokenizer=tokenizer_info(tokenizer, Path(scratch)),
                            codec=codec.to_dict(), build=config.recorded())
        writer = ShardWriter(staging if mirror else config.out, manifest, schema, partition=config.partition,
                             num_partitions=config.num_partitions, shard_bytes=config.shard_bytes,
                             row_group_bytes=min(config.row_group_bytes, config.shard_bytes), tokenizer_dir=scratch,
                             zstd_level=config.zstd_level,
                             mirror=mirror)
        compute_started = time.perf_counter()
        try:
            with writer, HostPipeline(writer, codec, schema) as background:
                _run_partition(config, num_units, teacher, tokenizer, writer, background, result, on_progress, reference)
        except OSError as exc:  # read-only folder, full disk, ...
            raise _write_error(config.out, exc) from None
    result.seconds = time.perf_counter() - started
    result.compute_seconds = time.perf_counter() - compute_started
    done, result.notes = writer.finalized, [*writer.notes, *result.notes]
    if done is not None:
        result.finished, result.total_bytes, result.store_tokens = True, done.total_bytes, done.num_tokens
    if reference is not None:
        result.reference_lines = reference.finish(writer)
    return result


def _reference_pass(config: BuildConfig, tokenizer: Any, remote: bool) -> Any:
    """--reference: the reference model, checked against the teacher's tokenizer and --seq-len (kdstore.score)."""
    if config.reference is None:
        return None
    if remote:
        raise BuildError(f"--reference writes score files beside the shards; {config.out} is a URL",
                         hint="build into a local folder, or run `kdstore score` on a local copy")
    from kdstore.reference_pass import ReferencePass

    return ReferencePass(config.reference, dtype=config.dtype, device=config.device, batch_tokens=config.batch_tokens,
                         trust_remote_code=config.trust_remote_code, seq_len=config.seq_len, teacher_tokenizer=tokenizer)


def _write_error(out: str, exc: OSError) -> BuildError:
    """What failed, on which file, and the fix that fits the cause (only a full disk asks for space)."""
    what = exc.strerror or str(exc) or type(exc).__name__
    names = [str(n) for n in (exc.filename, exc.filename2) if n]
    on = f" ({' -> '.join(names)})" if names else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        hint = "free space or raise the quota, or pick another --out; committed shards are kept"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "pick an --out folder you can write to; committed shards are kept"
    elif exc.errno in (errno.ENOTDIR, errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR):
        hint = "--out must be a folder (new, empty, or a kdstore store), and nothing else may write its files"
    else:
        hint = "fix the cause named above and rerun; committed shards are kept"
    return BuildError(f"cannot write the store at {out}: {what}{on}", hint=hint)


def _run_partition(config: BuildConfig, num_units: int, teacher: Teacher, tokenizer: Any, writer: ShardWriter,
                   background: HostPipeline, result: BuildResult, on_progress: ProgressCallback | None,
                   reference: Any = None) -> None:
    corpus_config = config.corpus_config()
    skip = writer.num_committed_rows
    progress = _progress(config, num_units)
    report = on_progress or (lambda done, total, tokens: None)
    report(0, num_units, 0)
    started = time.perf_counter()
    units = (u for u in iter_units(config.corpus, corpus_config)
             if partition_of(u.key, config.num_partitions) == config.partition)
    for num_done, unit in enumerate(units, start=1):
        sequences = tokenize_unit(unit, tokenizer, corpus_config)
        if skip >= len(sequences):
            skip -= len(sequences)
            if reference is not None:  # committed: the reference runs it only if its score file is missing
                reference.add(sequences, skip=len(sequences))
            progress.update(1)
            continue
        background.put_unit(sequences, _teacher_batches(teacher, sequences, config), skip)
        if reference is not None:  # the reference over the same unit (kdstore.reference_pass)
            reference.add(sequences, skip)
        result.num_sequences += len(sequences) - skip
        result.num_tokens += sum(len(s.input_ids) for s in sequences[skip:])
        skip = 0
        progress.update(1)
        seconds = time.perf_counter() - started
        progress.set_postfix(sequences=result.num_sequences, tokens=result.num_tokens,
                             tokens_per_s=f"{result.num_tokens / max(seconds, 1e-9):,.0f}", refresh=False)
        report(num_done, num_units, result.num_tokens)
    progress.close()


def _teacher_batches(teacher: Any, sequences: list[Any], config: BuildConfig) -> Iterator[SparseBatch]:
    """The backend's outputs for ``sequences``: run_teacher below, or vLLM's prompt log-probs."""
    if config.backend == "vllm":
        from kdstore.vllm_backend import run_vllm_teacher

        return run_vllm_teacher(teacher, sequences, config.k)
    return run_teacher(teacher, sequences, config)


def _progress(config: BuildConfig, total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="unit", desc=f"partition {config.partition}", disable=not config.progress,
                mininterval=2.0)


def _uniforms(config: BuildConfig, sequence_id: str, num_positions: int) -> torch.Tensor:
    """Per-sequence uniforms [positions, draws] for sampled draws: a function of (seed, sequence id) only.
    "systematic": one uniform u per position and the points (u + j) / draws, j = 0 .. draws - 1."""
    seed = int.from_bytes(hashlib.sha256(f"{config.seed}:{sequence_id}".encode()).digest()[:8], "little")
    generator = torch.Generator().manual_seed(seed)
    if config.sampled_scheme == "systematic":
        start = torch.rand((num_positions, 1), generator=generator, dtype=torch.float64)
        return (start + torch.arange(config.sampled_draws, dtype=torch.float64)) / config.sampled_draws
    return torch.rand((num_positions, config.sampled_draws), generator=generator, dtype=torch.float64)


def _batches(sequences: list[Any], batch_tokens: int) -> list[list[int]]:
    """Indices of sequences grouped by length (longest first) into batches of <= batch_tokens padded tokens."""
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i].input_ids))
    batches: list[list[int]] = []
    for index in order:
        width = len(sequences[batches[-1][0]].input_ids) if batches else 0
        if batches and (len(batches[-1]) + 1) * width <= batch_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


@torch.inference_mode()  # the chunks' logits are inference tensors; sparsify works on them in place
def run_teacher(teacher: Teacher, sequences: list[Any], config: BuildConfig) -> Iterator[SparseBatch]:
    """Teacher outputs for ``sequences``, a batch at a time: each batch's sparse arrays stay on the device until
    their copy to the host (started here, awaited by the encoder) is done; nothing here waits on the device."""
    for batch in _batches(sequences, config.batch_tokens):
        width = len(sequences[batch[0]].input_ids)
        lengths = [len(sequences[index].input_ids) for index in batch]
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, index in enumerate(batch):
            ids[row, :lengths[row]], mask[row, :lengths[row]] = torch.from_numpy(sequences[index].input_ids.astype(np.int64)), 1
        ids, mask = to_device(ids, teacher.device), to_device(mask, teacher.device)
        uniforms = to_device(torch.stack([_uniforms(config, sequences[i].sequence_id, width) for i in batch]),
                             teacher.device) if config.sampled_draws else None
        parts: list[dict[str, torch.Tensor]] = []
        for r, p, logits in teacher_logits_chunks(teacher, ids, mask, lengths):
            sparse = sparsify(logits, ids[r, p + 1], config.k, overwrite=uniforms is None)  # draws need the logits
            if uniforms is not None:
                sparse["sampled_ids"], sparse["sampled_counts"] = sample_sparse(
                    logits, sparse["topk_ids"], uniforms[r, p], config.sampled_mode)
            parts.append(sparse)
        merged = {name: torch.cat([part[name] for part in parts]) if len(parts) > 1 else parts[0][name]
                  for name in parts[0]}
        yield SparseBatch(np.asarray(batch), HostCopy(merged))  # lse goes along: the encoder checks it is finite


def finalize_store(out: str) -> str:
    """``kdstore build --finalize``: write the manifest if every partition has finished."""
    from kdstore.writer import finalize

    if is_url(out):
        raise BuildError(f"--finalize takes a local folder; a build into {out} writes its manifest when its last "
                         "partition finishes", hint="rerun the partitions that have not finished, with the same --out")
    if not Path(out, PARTITION_DIR).is_dir():
        raise BuildError(f"{out} holds no finished partitions", hint="run the partitions first")
    notes: list[str] = []
    manifest = finalize(out, notes)
    if manifest is None:
        done = sorted(p.stem for p in Path(out, PARTITION_DIR).glob("part-*.json"))
        raise BuildError(f"{out}: only {len(done)} partition(s) finished ({', '.join(done)})",
                         hint="run the missing partitions, then --finalize again")
    return "\n".join([f"store {out}: {manifest.num_sequences} sequences, {manifest.num_tokens} tokens, "
                      f"{len(manifest.shards)} shards", *notes])


def _launcher_partition(values: dict[str, Any]) -> dict[str, int]:
    """Under torchrun (or any launcher setting WORLD_SIZE and RANK), each rank builds partition RANK of WORLD_SIZE.

    Only when neither the flags nor the config file name a partition: explicit settings win.
    """
    if "partition" in values or "num_partitions" in values or "WORLD_SIZE" not in os.environ:
        return {}
    try:
        return {"num_partitions": int(os.environ["WORLD_SIZE"]), "partition": int(os.environ.get("RANK", "0"))}
    except ValueError:
        raise BuildError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} / RANK={os.environ.get('RANK')!r} are not integers",
                         hint="unset them, or pass --num-partitions and --partition") from None


def resolved_config(overrides: dict[str, Any], config_file: str | None) -> BuildConfig:
    """Defaults < TOML file < explicit overrides (flags), every value checked before any model loads.

    ``trust_remote_code`` comes only from the flag or ``KDSTORE_TRUST_REMOTE_CODE=1``, never from the file:
    a build.toml passed around must not be able to run a teacher's own Python code.
    """
    values: dict[str, Any] = read_toml_config(config_file, BuildError) if config_file else {}
    if "trust_remote_code" in values:
        raise BuildError(f"{config_file} sets trust_remote_code; a config file may not turn on a teacher's own code",
                         hint="pass --trust-remote-code on the command line or set KDSTORE_TRUST_REMOTE_CODE=1")
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "trust_remote_code" not in values and os.environ.get("KDSTORE_TRUST_REMOTE_CODE") == "1":
        values["trust_remote_code"] = True
    values.update(_launcher_partition(values))
    if isinstance(values.get("corpus"), str):  # corpus = "docs/" in the file
        values["corpus"] = (values["corpus"],)
    where = f" (from {config_file} and the flags)" if config_file else ""
    return BuildConfig(**check_config(BuildConfig, values, BuildError, what=f"invalid build settings{where}"))


