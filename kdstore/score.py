"""``kdstore score``: run a small reference model over a store's own input ids and write per-sequence score
files beside its shards, for MiniPLM difference sampling (kdstore.selection chooses from them).

    result = score_store(ScoreConfig(store="my-store", reference="small-model"))

The teacher side costs nothing: the store already holds the teacher's log-prob of every next token
(``target_logprob``), and the build's ``teacher_score`` column when it wrote one. Only the reference runs,
over the stored ``input_ids`` (no re-tokenisation), so its tokenizer must be the store's (kdstore.vocab).

One score file per shard (``scores/part-P-N.parquet``, schemas/scores.arrow.json), row for row in the shard's
order; the logits shards are never rewritten. Partition p of n scores the shards whose index in the manifest
is p modulo n. Each file is written whole under a temporary name and renamed (kdstore.writer.write_atomic) and
records in its footer which shard (with sha256) and which reference it scores, so a rerun after kill -9 keeps
the finished files and redoes the rest; the manifest (format 3, its ``scores`` section listing every file with
sha256) is rewritten by whichever partition finds every shard with its file. ``kdstore build --reference``
(kdstore.reference_pass) writes the same files, each build partition those of its own shards. Scores are means
of log-probs per predicted token, in nats: higher is easier (docs/select.md).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Iterable, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from kdstore.config_file import check_config
from kdstore.errors import ScoreError
from kdstore.format import (
    FORMAT_VERSION,
    LOCK_DIR,
    MANIFEST_NAME,
    SCORE_DIR,
    Manifest,
    score_columns_schema,
    score_file_name,
)
from kdstore.store import Store, StoredRows, open_store

if TYPE_CHECKING:
    from kdstore.build import ProgressCallback
    from kdstore.teacher import Teacher

SCORES_KEY = b"kdstore_scores"  # Parquet key-value metadata of a score file: what it scores, with what


@dataclass(frozen=True)
class ScoreConfig:
    """A scoring pass; the device options mean what they mean for ``kdstore build``."""

    store: str
    reference: str
    per_token: bool = False  # also keep each position's reference log-prob (token-level selection)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"
    batch_tokens: Annotated[int, Field(ge=1)] = 8192  # tokens per reference batch, padding included
    num_partitions: Annotated[int, Field(ge=1)] = 1
    partition: Annotated[int, Field(ge=0)] = 0
    trust_remote_code: bool = False
    progress: bool = True
    # where the partitions run (kdstore/engine.py), as for kdstore build
    engine: Literal["local", "ray"] = "local"
    ray_address: str = ""  # "": RAY_ADDRESS, else a new local cluster; "auto": the one `ray start` made here
    num_gpus_per_worker: Annotated[float, Field(ge=0)] = 0.0  # Ray: GPUs per partition task; 0 runs it on CPU

    def __post_init__(self) -> None:
        check_config(type(self), vars(self), ScoreError, what="invalid score settings")
        if self.partition >= self.num_partitions:
            raise ScoreError(f"--partition {self.partition}: expected 0 to {self.num_partitions - 1} "
                             f"(--num-partitions {self.num_partitions})")


@dataclass
class ScoreResult:
    store: str
    num_files: int = 0  # written by this run (a resume keeps the finished ones)
    num_sequences: int = 0
    num_tokens: int = 0
    seconds: float = 0.0  # reference loading included
    forward_seconds: float = 0.0  # the reference's forward passes alone
    finished: bool = False  # the manifest lists every score file
    score_bytes: int = 0  # of every score file, once finished
    notes: list[str] = field(default_factory=list)  # how the engine ran it (kdstore/engine.py), shown last

    def summary_lines(self) -> list[str]:
        rate = self.num_tokens / self.seconds if self.seconds else 0.0
        lines = [f"scored {self.num_sequences} sequences, {self.num_tokens} tokens into {self.num_files} score files "
                 f"in {self.seconds:.1f} s ({rate:,.0f} tokens/s)"]
        if self.finished:
            lines.append(f"store {self.store}: score files {self.score_bytes:,} bytes; choose with "
                         f"`kdstore select {self.store} --by difference --keep 0.5 --out NEW`")
        else:
            lines.append("partition done; the manifest lists the score files once every partition has scored")
        return lines + self.notes


# -- the reference model -----------------------------------------------------
def check_reference_tokenizer(store: Store, reference: str) -> None:
    """ScoreError unless ``reference`` tokenizes like the store: the same files (sha256), or the same ids."""
    from kdstore.teacher import load_tokenizer
    from kdstore.vocab import IDENTICAL, compare_vocab

    tokenizer = load_tokenizer(reference)
    theirs = tokenizer_sha256(tokenizer)
    ours = store.manifest.tokenizer.get("files_sha256")
    if theirs == ours:
        return
    report = compare_vocab(store, tokenizer)
    if report.kind != IDENTICAL:
        raise ScoreError(f"the reference {reference} has another tokenizer than the store (reference files_sha256 "
                         f"{theirs}, store {ours}): {report.kind}, {report.num_mismatched} ids differ",
                         hint="the reference reads the store's own token ids; use a reference trained with the "
                              "store's tokenizer (kdstore check STORE --student REFERENCE shows the differences)")


def reference_info(model: Teacher, per_token: bool) -> dict[str, Any]:
    """The manifest's record of the reference, and what a resumed pass must agree on (``identity``)."""
    return {**model.info(), "max_positions": model.max_positions, "per_token": per_token}


def reference_identity(info: dict[str, Any]) -> dict[str, Any]:
    """Two passes agree when the weights, dtype and per-token choice agree (not the path they were loaded from)."""
    return {"content_sha256": info.get("content_sha256"), "dtype": info.get("dtype"), "per_token": info.get("per_token"),
            **({"model": info.get("model")} if info.get("content_sha256") is None else {})}


def reference_logprobs(model: Teacher, sequences: list[np.ndarray], batch_tokens: int) -> list[np.ndarray]:
    """The reference's log-prob of each next token: one float32 [len - 1] per sequence of token ids.

    Sequences are batched by length (longest first) within ``batch_tokens`` padded tokens, right-padded; the
    full-vocabulary logits stay on the device, a chunk of positions at a time (kdstore.teacher).
    """
    import torch

    with torch.inference_mode():
        return _reference_logprobs(model, sequences, batch_tokens)


def _reference_logprobs(model: Teacher, sequences: list[np.ndarray], batch_tokens: int) -> list[np.ndarray]:
    import torch

    from kdstore.teacher import teacher_logits_chunks

    out = [np.zeros(0, np.float32) for _ in sequences]
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    batches: list[list[int]] = []
    for index in order:
        if batches and (len(batches[-1]) + 1) * len(sequences[batches[-1][0]]) <= batch_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    for batch in batches:
        width = len(sequences[batch[0]])
        if width < 2:
            continue
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, index in enumerate(batch):
            tokens = torch.from_numpy(np.asarray(sequences[index], dtype=np.int64))
            ids[row, :len(tokens)], mask[row, :len(tokens)] = tokens, 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        rows, values = [], []
        for r, p, logits in teacher_logits_chunks(model, ids, mask):
            target = logits.gather(1, ids[r, p + 1][:, None]).squeeze(1)
            values.append((target - torch.logsumexp(logits, dim=1)).float().cpu().numpy())
            rows.append(r.cpu().numpy())
        flat_rows, flat = np.concatenate(rows), np.concatenate(values)  # row-major: each row's positions in order
        for row, index in enumerate(batch):
            out[index] = flat[flat_rows == row].astype(np.float32)
    return out


# -- one shard ----------------------------------------------------------------
def shard_rows(store: Store, index: int) -> dict[str, Any]:
    """What scoring needs from shard ``index``: ids, token arrays and the teacher's mean log-prob per sequence."""
    teacher = "teacher_score" if "teacher_score" in store.manifest.columns else "target_logprob"
    parquet = store.open_shard(index)
    stored = store.stored_columns(["sequence_id", "input_ids", teacher])
    ids, tokens, teacher_scores = [], [], []
    for group in range(parquet.num_row_groups):
        batch = StoredRows(store.codec, store.read_row_group(parquet, index, group, stored)).ragged()
        offsets = batch["token_offsets"]
        ids += batch["sequence_id"]
        tokens += [batch["input_ids"][offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
        if teacher == "teacher_score":
            teacher_scores.append(np.nan_to_num(batch["teacher_score"], nan=0.0))
        else:
            cut = batch["position_offsets"]
            teacher_scores.append(np.array([_mean(batch["target_logprob"][cut[i]:cut[i + 1]])
                                            for i in range(len(cut) - 1)], np.float32))
    scores = np.concatenate(teacher_scores) if teacher_scores else np.zeros(0, np.float32)
    return {"sequence_id": ids, "input_ids": tokens, "teacher_score": scores}


def _mean(values: np.ndarray) -> float:
    return float(values.astype(np.float64).mean()) if len(values) else 0.0  # a 1-token sequence predicts nothing


def score_table(rows: dict[str, Any], logprobs: list[np.ndarray], per_token: bool) -> pa.Table:
    """One score file's rows (schemas/scores.arrow.json) from a shard's rows and the reference's log-probs."""
    columns: dict[str, Any] = {
        "sequence_id": rows["sequence_id"],
        "num_positions": np.array([len(v) for v in logprobs], np.int32),
        "teacher_score": np.asarray(rows["teacher_score"], np.float32),
        "reference_score": np.array([_mean(v) for v in logprobs], np.float32),
    }
    if per_token:
        columns["reference_logprobs"] = logprobs
    schema = score_columns_schema(per_token)
    arrays = [pa.array(columns[f.name], f.type) if not pa.types.is_list(f.type) else
              pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum([len(v) for v in logprobs])]), pa.int32()),
                                       pa.array(np.concatenate(logprobs or [np.zeros(0, np.float32)]), pa.float32()),
                                       type=f.type)
              for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def score_file_bytes(table: pa.Table, record: dict[str, Any]) -> bytes:
    """A score file's bytes: Parquet, zstd, page checksums, and ``record`` (what it scores) in its footer."""
    sink = pa.BufferOutputStream()
    schema = table.schema.with_metadata({SCORES_KEY: json.dumps(record, sort_keys=True).encode()})
    pq.write_table(table.replace_schema_metadata(schema.metadata), sink, compression="zstd", write_statistics=False,
                   write_page_checksum=True)
    return sink.getvalue().to_pybytes()


def _file_record(path: Path) -> dict[str, Any] | None:
    """The footer record of a finished score file, or None when there is none (or it cannot be read)."""
    try:
        return json.loads((pq.read_schema(path).metadata or {})[SCORES_KEY])
    except (OSError, pa.ArrowException, KeyError, ValueError):
        return None


# -- the pass -------------------------------------------------------------------
def open_scorable(location: str) -> Store:
    """The store to score: local, a real store (not a view), with the teacher's next-token log-probs."""
    store = open_store(location)
    if not store.is_local:
        raise ScoreError(f"kdstore score writes score files beside the shards; {location} is not a local folder",
                         hint="kdstore copy it to a local folder, score it there, and copy it back")
    if store.parent is not None:
        raise ScoreError(f"{location} is a selection view; score its parent {store.parent.location}",
                         hint="the view reads the parent's scores once the parent has them")
    if "teacher_score" not in store.manifest.columns and not store.codec.target:
        raise ScoreError(f"{location} stores no teacher log-prob of the next token (no target column)",
                         hint="build the store again with the default codec, which keeps target_logprob")
    return store


def check_context(store: Store, model: Teacher, reference: str) -> None:
    """ScoreError when the store's sequences are longer than the reference's context."""
    if not model.max_positions:
        return
    longest = store.manifest.build.get("seq_len")
    if not isinstance(longest, int):
        longest = max((int(np.diff(b["token_offsets"]).max(initial=0)) for b in store.iter_batches(["input_ids"])),
                      default=0)
    if longest > model.max_positions:
        raise ScoreError(f"the reference {reference} reads at most {model.max_positions} positions; the store's "
                         f"sequences have up to {longest} tokens",
                         hint="use a reference with a longer context (max_position_embeddings)")


def score_store(config: ScoreConfig, on_progress: ProgressCallback | None = None) -> ScoreResult:
    """Score (or resume scoring) partition ``config.partition`` of the store; ``on_progress`` gets (shards done,
    shards of the partition, tokens scored).

    ``config.engine == "ray"`` runs every partition as a task on a Ray cluster instead (kdstore.engine)."""
    if config.engine != "local":
        from kdstore.engine import run_partitions

        return run_partitions(config)
    started = time.perf_counter()
    store = open_scorable(config.store)
    check_reference_tokenizer(store, config.reference)
    from kdstore.teacher import load_teacher

    model = load_teacher(config.reference, config.dtype, config.device, config.trust_remote_code)
    check_context(store, model, config.reference)
    info = reference_info(model, config.per_token)
    recorded = store.manifest.scores
    if recorded is not None and reference_identity(recorded["reference"]) != reference_identity(info):
        raise ScoreError(f"{config.store} is already scored by {recorded['reference']['model']} "
                         f"({reference_identity(recorded['reference'])}); this pass is {reference_identity(info)}",
                         hint="score a copy (kdstore copy STORE NEW) to keep both")
    result = ScoreResult(store=config.store)
    root = Path(store.root)
    from kdstore.writer import _lock

    with _lock(prepare_score_folders(root) / f"score-{config.partition:05d}.lock", blocking=False):
        mine = [i for i in range(len(store.manifest.shards)) if i % config.num_partitions == config.partition]
        report = on_progress or (lambda done, total, tokens: None)

        def reported() -> Iterable[int]:  # the bar and on_progress advance as each shard's turn comes
            for num_done, index in enumerate(_progress(mine, config)):
                report(num_done, len(mine), result.num_tokens)
                yield index
            report(len(mine), len(mine), result.num_tokens)

        write_score_files(store, reported(), model, info, config.batch_tokens, result, lambda ids: {})
    finished = finalize_scores(root, info)
    result.seconds = time.perf_counter() - started
    if finished is not None:
        result.finished, result.score_bytes = True, sum(f["num_bytes"] for f in finished.scores["files"])
    return result


def prepare_score_folders(root: Path) -> Path:
    """Make the store's ``scores/`` and ``_locks/`` folders; the locks folder."""
    (root / SCORE_DIR).mkdir(exist_ok=True)
    (root / LOCK_DIR).mkdir(exist_ok=True)
    return root / LOCK_DIR


# the reference log-probs already computed for some of the given sequence ids (by id)
Lookup = Callable[[list[str]], dict[str, np.ndarray]]


def write_score_files(store: Store, indices: Iterable[int], model: Teacher, info: dict[str, Any], batch_tokens: int,
                      result: ScoreResult, lookup: Lookup) -> None:
    """The score file of each shard ``indices`` names that lacks one: the reference log-probs ``lookup`` has, the
    rest computed here a shard's sequences at a time. A file already there whole (its footer record names this
    shard and reference) is kept; a half-written one (a killed pass's) is deleted."""
    from kdstore.writer import write_atomic

    root = Path(store.root)
    per_token = bool(info["per_token"])
    for index in indices:
        shard = store.manifest.shards[index]
        path = root / score_file_name(shard.path)
        for stale in path.parent.glob(path.name + ".*.tmp"):
            stale.unlink()
        record = {"shard": shard.path, "shard_sha256": shard.sha256, "reference": reference_identity(info)}
        if path.exists():
            if _file_record(path) == record:
                continue
            raise ScoreError(f"{path} scores another shard or reference than this pass",
                             hint=f"delete {root / SCORE_DIR} to score the store again")
        rows = shard_rows(store, index)
        known = lookup(rows["sequence_id"])
        forward = time.perf_counter()
        todo = [i for i, s in enumerate(rows["sequence_id"]) if s not in known]
        computed = reference_logprobs(model, [rows["input_ids"][i] for i in todo], batch_tokens)
        result.forward_seconds += time.perf_counter() - forward
        logprobs = [known.get(s) for s in rows["sequence_id"]]
        for i, values in zip(todo, computed):
            logprobs[i] = values
        write_atomic(path, score_file_bytes(score_table(rows, logprobs, per_token), record))
        result.num_files += 1
        result.num_sequences += len(rows["sequence_id"])
        result.num_tokens += sum(len(t) for t in rows["input_ids"])


def _progress(items: list[int], config: ScoreConfig) -> Any:
    from tqdm import tqdm

    return tqdm(items, unit="shard", desc=f"score partition {config.partition}", disable=not config.progress,
                mininterval=2.0)


def finalize_scores(root: Path, info: dict[str, Any]) -> Manifest | None:
    """List every score file in the manifest (format 3) once each shard has its file; None while some lack one."""
    from kdstore.format import sha256_file
    from kdstore.writer import _lock, write_atomic

    if not (root / MANIFEST_NAME).exists():  # kdstore build --reference: partitions are still being built
        return None
    with _lock(root / LOCK_DIR / "finalize.lock", blocking=True):
        manifest = Manifest.from_json((root / MANIFEST_NAME).read_text(), str(root / MANIFEST_NAME))
        files = []
        for shard in manifest.shards:
            path = root / score_file_name(shard.path)
            record = {"shard": shard.path, "shard_sha256": shard.sha256, "reference": reference_identity(info)}
            if not path.exists() or _file_record(path) != record:
                return None
            files.append({"path": score_file_name(shard.path), "shard": shard.path, "shard_sha256": shard.sha256,
                          "num_rows": pq.read_metadata(path).num_rows, "num_bytes": path.stat().st_size,
                          "sha256": sha256_file(path)})
        columns = list(score_columns_schema(bool(info["per_token"])).names)
        scores = {"reference": info, "columns": columns, "shards_format_version": manifest.shards_format_version,
                  "files": files}
        if manifest.scores != scores:
            manifest = replace(manifest, scores=scores, format_version=FORMAT_VERSION)
            write_atomic(root / MANIFEST_NAME, manifest.to_json())
        return manifest


def tokenizer_sha256(tokenizer: Any) -> str:
    import tempfile

    from kdstore.build import tokenizer_info

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        return tokenizer_info(tokenizer, Path(scratch))["files_sha256"]
