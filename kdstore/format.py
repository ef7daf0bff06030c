"""The on-disk format: version, Arrow schemas, the manifest, and where files live.

A store is a folder::

    manifest.json                 written last; lists every shard (the store's index)
    README.md                     a dataset card
    tokenizer/                    the teacher's tokenizer files (optional)
    shards/part-PPPPP-NNNNNN.parquet   partition P, shard N; plain Parquet, zstd
    _partitions/part-PPPPP.json   one record per finished partition (build bookkeeping)
    _locks/                       advisory locks of running writers
    scores/part-PPPPP-NNNNNN.parquet   per-sequence scores of that shard (kdstore score; format 3)

A selection view (kdstore select; format 3) is a folder with ``manifest.json``, ``selection.parquet`` and a copy
of ``tokenizer/``: its manifest names the parent store and the parent's shards with their hashes.

docs/format.md walks through an example; schemas/ holds the same contract as
data (JSON Schema of the manifest, Arrow schemas of the tables) and a test keeps
this module and those files in agreement.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import pyarrow as pa

from kdstore.codec import CodecConfig
from kdstore.errors import FormatVersionError, ManifestError

FORMAT_NAME = "kdstore"
# The newest version this kdstore reads. A writer records the lowest version that describes what it wrote:
# 2: shards list footer_sha256 and row_group_sha256 (version 1 stores are read, checked whole);
# 3: generations tables (revised schema), score files beside the shards, selection views over a parent store.
FORMAT_VERSION = 3
LOGITS_FORMAT_VERSION = 2  # a plain logits store needs nothing newer
MANIFEST_NAME = "manifest.json"
SHARD_DIR = "shards"
PARTITION_DIR = "_partitions"
LOCK_DIR = "_locks"
TOKENIZER_DIR = "tokenizer"
METADATA_KEY = b"kdstore"  # Parquet key-value metadata key of every shard

TABLE_LOGITS = "logits"
TABLE_GENERATIONS = "generations"

# The per-sequence score column a logits shard may carry: the build's teacher mean log-likelihood per predicted
# token, from the unquantised log-probs. Every other score (the reference model's, kdstore.score) lives in score
# files beside the shards, never in a logits shard; Store.score_table joins both by sequence id.
SCORE_COLUMNS = ("teacher_score",)
SCORE_DIR = "scores"
SELECTION_NAME = "selection.parquet"  # a view's chosen sequences


def score_columns_schema(per_token: bool) -> pa.Schema:
    """Arrow schema of a score file: one row per sequence of its shard, in the shard's order.

    ``teacher_score`` / ``reference_score``: mean log-prob of the next token over the sequence's ``num_positions``
    positions (teacher: from the store; reference: the scoring model); ``reference_logprobs`` [num_positions]
    the reference's log-prob of each next token, with ``per_token``.
    """
    fields = [
        pa.field("sequence_id", pa.string(), nullable=False),
        pa.field("num_positions", pa.int32(), nullable=False),
        pa.field("teacher_score", pa.float32(), nullable=False),
        pa.field("reference_score", pa.float32(), nullable=False),
    ]
    if per_token:
        fields.append(pa.field("reference_logprobs", _list(pa.float32()), nullable=False))
    return pa.schema(fields)


def score_file_name(shard_path: str) -> str:
    """The score file of the shard at ``shard_path`` (shards/part-P-N.parquet -> scores/part-P-N.parquet)."""
    return f"{SCORE_DIR}/{posixpath.basename(shard_path)}"


def _list(item: pa.DataType) -> pa.DataType:
    return pa.list_(pa.field("element", item, nullable=False))


def _position_fields(codec: CodecConfig, tail: bool, target: bool) -> list[pa.Field]:
    """The per-position columns, coded by ``codec``, that the logits and generations tables share."""
    code = pa.from_numpy_dtype(codec.codebook.dtype)
    fields = [
        pa.field("topk_id_deltas", _list(pa.uint32()), nullable=False),
        pa.field("topk_logprob_codes", _list(code), nullable=False),
    ]
    if tail:
        fields.append(pa.field("tail_logmass_codes", _list(code), nullable=False))
    if target:
        fields.append(pa.field("target_logprob_codes", _list(code), nullable=False))
    if codec.sampled_draws:
        fields += [
            pa.field("sampled_num_ids", _list(pa.uint16()), nullable=False),
            pa.field("sampled_id_deltas", _list(pa.uint32()), nullable=False),
            pa.field("sampled_counts", _list(pa.uint16()), nullable=False),
        ]
    return fields


def logits_schema(codec: CodecConfig, score_columns: tuple[str, ...] = ()) -> pa.Schema:
    """Arrow schema of a logits shard: one row per sequence, positions flattened.

    A sequence of T tokens has P = T - 1 positions; position t predicts token t+1.
    Per-position columns hold P values, per-entry columns P*K (position-major).
    """
    fields = [
        pa.field("sequence_id", pa.string(), nullable=False),
        pa.field("input_ids", _list(pa.int32()), nullable=False),
        *_position_fields(codec, tail=codec.tail, target=codec.target),
    ]
    for name in score_columns:
        if name not in SCORE_COLUMNS:
            raise ManifestError(f"unknown score column {name!r}; known: {', '.join(SCORE_COLUMNS)}")
        fields.append(pa.field(name, pa.float32(), nullable=True))
    return pa.schema(fields)


# Per-completion columns of a generations table besides the per-position ones it shares with the logits table.
GENERATION_COLUMNS = ("prompt_id", "sample_index", "prompt", "reference_answer", "prompt_num_tokens", "text",
                      "token_logprobs", "total_logprob", "finish_reason", "seed", "temperature", "top_p", "top_k",
                      "answer", "correct", "majority_answer", "agrees_with_majority", "vote_share")


def generations_schema(codec: CodecConfig) -> pa.Schema:
    """Arrow schema of a generations shard: one row per completion (docs/format.md says why).

    ``input_ids`` [T] holds the prompt's P tokens then the completion's C tokens. The per-position columns
    (``topk_*``, ``tail_logmass_codes``, ``target_logprob_codes``, sampled draws) hold C positions, coded as in
    the logits table: completion position c is the teacher's distribution over ``input_ids[P + c]`` given the
    tokens before it, at temperature 1, whatever the sampling temperature was. ``token_logprobs`` [C] is the
    same target log-prob unquantised (float32).
    """
    fields = [
        pa.field("sequence_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("reference_answer", pa.string(), nullable=True),
        pa.field("input_ids", _list(pa.int32()), nullable=False),
        pa.field("prompt_num_tokens", pa.int32(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        *_position_fields(codec, tail=True, target=True),  # a completion always has both
    ]
    fields += [
        pa.field("token_logprobs", _list(pa.float32()), nullable=False),
        pa.field("total_logprob", pa.float64(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("temperature", pa.float32(), nullable=False),
        pa.field("top_p", pa.float32(), nullable=False),
        pa.field("top_k", pa.int32(), nullable=False),
        pa.field("answer", pa.string(), nullable=True),
        pa.field("correct", pa.bool_(), nullable=True),
        pa.field("majority_answer", pa.string(), nullable=True),
        pa.field("agrees_with_majority", pa.bool_(), nullable=True),
        pa.field("vote_share", pa.float32(), nullable=True),
    ]
    return pa.schema(fields)


def table_schema(table: str, codec: CodecConfig, columns: list[str] | tuple[str, ...] = ()) -> pa.Schema:
    """The schema a manifest's ``table`` and codec describe (score columns: those of ``columns`` a logits store has)."""
    if table == TABLE_GENERATIONS:
        return generations_schema(codec)
    return logits_schema(codec, tuple(c for c in columns if c in SCORE_COLUMNS))


def shard_name(partition: int, index: int) -> str:
    """Relative path of shard ``index`` written by ``partition``."""
    return f"{SHARD_DIR}/part-{partition:05d}-{index:06d}.parquet"


def partition_record_name(partition: int) -> str:
    return f"{PARTITION_DIR}/part-{partition:05d}.json"


def safe_relative_path(path: str) -> str:
    """Refuse manifest paths that leave the store (``../x``, ``/etc/x``)."""
    normal = posixpath.normpath(path)
    if path.startswith("/") or "\\" in path or normal.startswith("..") or normal in ("", "."):
        raise ManifestError(f"manifest names a path outside the store: {path!r}")
    return normal


@dataclass(frozen=True)
class ShardInfo:
    path: str
    num_rows: int
    num_tokens: int
    num_bytes: int
    sha256: str  # of the whole file
    # sha256 of the footer and of each row group's byte range (kdstore.integrity): lets a loader check exactly
    # the bytes it reads. None in version 1 stores, whose shards are checked whole before use.
    footer_sha256: str | None = None
    row_group_sha256: list[str] | None = None


def shard_info(path: Path, relative: str, num_rows: int, num_tokens: int) -> ShardInfo:
    """The manifest's record of a finished local shard file: sizes and checksums."""
    from kdstore.integrity import local_reader, shard_checksums

    size = path.stat().st_size
    footer, row_groups = shard_checksums(local_reader(path), size, relative)
    return ShardInfo(relative, num_rows, num_tokens, size, sha256_file(path), footer, row_groups)


@dataclass
class Manifest:
    """The store's index and provenance. ``manifest.json`` is this, as JSON."""

    table: str
    teacher: dict[str, Any]
    tokenizer: dict[str, Any]
    codec: dict[str, Any]
    build: dict[str, Any]
    shards: list[ShardInfo] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    num_partitions: int = 1
    format_version: int = LOGITS_FORMAT_VERSION
    kdstore_version: str = ""
    created_at: str = ""
    # format 3: the score files (kdstore.score): {"reference", "columns", "shards_format_version", "files": [...]}
    scores: dict[str, Any] | None = None
    # format 3, a selection view (kdstore.selection): {"parent", "shards_format_version", "selection", ...}
    view: dict[str, Any] | None = None

    @property
    def shards_format_version(self) -> int:
        """The version the shards were written as (their footers say so); score files or a view make the manifest 3."""
        extra = self.view or self.scores
        return int(extra.get("shards_format_version", self.format_version)) if extra else self.format_version

    @property
    def num_sequences(self) -> int:
        if self.view is not None:  # the chosen ones; the shards are the parent's
            return int(self.view["selection"]["num_sequences"])
        return sum(s.num_rows for s in self.shards)

    @property
    def num_tokens(self) -> int:
        if self.view is not None:
            return int(self.view["selection"]["num_tokens"])
        return sum(s.num_tokens for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.num_bytes for s in self.shards)

    def codec_config(self) -> CodecConfig:
        return CodecConfig.from_dict(self.codec)

    def identity(self) -> dict[str, Any]:
        """What two writers into one store must agree on."""
        return {
            "format_version": self.shards_format_version,
            "table": self.table,
            "teacher": self.teacher,
            "tokenizer": self.tokenizer,
            "codec": self.codec,
            "build": self.build,
            "num_partitions": self.num_partitions,
        }

    def to_json(self) -> str:
        data = asdict(self)
        for optional in ("scores", "view"):
            if data[optional] is None:
                del data[optional]
        head = ("format_version", "kdstore_version", "created_at", "table")
        data = {"format": FORMAT_NAME, **{k: data.pop(k) for k in head}, **data}
        data["stats"] = {
            "num_sequences": self.num_sequences,
            "num_tokens": self.num_tokens,
            "total_bytes": self.total_bytes,
        }
        return json.dumps(data, indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "manifest.json") -> Manifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{source} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise ManifestError(f"{source} is not a kdstore manifest")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
            raise FormatVersionError(f"{source} has format version {version!r}; "
                                     f"this kdstore reads versions 1 to {FORMAT_VERSION}")
        validate_manifest(data, source)
        data.pop("format")
        data.pop("stats", None)
        data["shards"] = [ShardInfo(**s) for s in data["shards"]]
        for shard in data["shards"]:
            safe_relative_path(shard.path)
            if (shard.footer_sha256 is None) != (shard.row_group_sha256 is None) or (version > 1 and shard.footer_sha256 is None):
                raise ManifestError(f"{source}: shard {shard.path} lacks its footer_sha256 or row_group_sha256")
        for entry in (data.get("scores") or {}).get("files", []):
            safe_relative_path(entry["path"])
        if data.get("view"):
            safe_relative_path(data["view"]["selection"]["file"])
        return cls(**data)


def new_created_at() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def load_schema_file(name: str) -> dict[str, Any]:
    """A file of the shipped spec in ``kdstore.schemas`` (the repo's schemas/)."""
    return json.loads(resources.files("kdstore.schemas").joinpath(name).read_text())


def validate_manifest(data: dict[str, Any], source: str = "manifest.json") -> None:
    """Check a manifest dict against schemas/manifest.schema.json; one line per failure."""
    import jsonschema  # imported here: only reading or writing a manifest needs it

    validator = jsonschema.Draft202012Validator(load_schema_file("manifest.schema.json"))
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(top level)"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ManifestError(f"{source} does not match the format spec at {where}: {first.message}{more}")


def arrow_schema_to_spec(schema: pa.Schema) -> list[dict[str, Any]]:
    """An Arrow schema as plain data: name, type string, nullable. Used by tests and docs."""
    return [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema]


def rows_to_table(schema: pa.Schema, rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (column name -> 1-D array for list columns, scalar otherwise) -> a Table in ``schema``.

    Missing optional (nullable) columns become nulls. Lists are assembled from
    one concatenated array and offsets: no per-element Python work.
    """
    import numpy as np

    arrays = []
    for column in schema:
        values = [row.get(column.name) for row in rows]
        if pa.types.is_list(column.type):
            if any(v is None for v in values):
                raise ManifestError(f"every row needs a value for {column.name!r}")
            parts = [np.asarray(v) for v in values]
            offsets = np.zeros(len(parts) + 1, dtype=np.int32)
            np.cumsum([p.size for p in parts], out=offsets[1:])
            item_type = column.type.value_type
            flat = np.concatenate(parts) if parts else np.zeros(0)
            arrays.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=item_type), type=column.type))
        else:
            arrays.append(pa.array(values, type=column.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """sha256 of one file's bytes (the manifest's per-shard checksum)."""
    return sha256_named_files([path], chunk_bytes, with_names=False)


def sha256_named_files(paths: Iterable[Path], chunk_bytes: int = 1 << 22, with_names: bool = True) -> str:
    """sha256 over each file's ``name + NUL`` then its bytes, in the order given.

    The fingerprint of a set of files (a teacher's weights, a tokenizer's files):
    renaming or changing any file changes it; where the folder lives does not.
    """
    digest = hashlib.sha256()
    for path in paths:
        if with_names:
            digest.update(Path(path).name.encode() + b"\0")
        with open(path, "rb") as handle:
            while block := handle.read(chunk_bytes):
                digest.update(block)
    return digest.hexdigest()
