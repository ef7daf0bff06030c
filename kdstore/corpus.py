"""Corpus: documents on disk -> work units -> fixed-length token sequences with stable ids.

A teacher build runs as independent partitions and must resume deterministically,
so everything here is a pure function of the corpus bytes, the tokenizer and the
config; nothing depends on how many partitions run or in which order.

* ``iter_units`` streams documents from plain text (``.txt``/``.md``: one document
  per file, or blocks separated by blank lines), JSON Lines (``.jsonl``/``.json``,
  one object per line), Parquet (read in batches) and saved Hugging Face datasets
  (a folder holding ``dataset_info.json`` and ``state.json``; its ``*.arrow``
  files are read as Arrow IPC streams, without importing ``datasets``). Sources
  are sorted by their posix path relative to the root argument they came from;
  documents keep file order (a whole file is kept as is; a blank-line block loses
  its final line ending); whitespace-only documents are dropped and counted.
  Every ``unit_documents`` kept documents of one source form a ``WorkUnit`` keyed
  ``"<source>#<block>"`` -- the partitioning and resume granule.
* ``partition_of(key, N)`` maps a unit to one of N partitions through sha256, so
  each partition's work is the same on every machine and every run.
* ``tokenize_unit`` encodes a unit's documents in one tokenizer call and cuts
  each token stream (or, with ``pack=True``, the unit's streams concatenated)
  into chunks of at most ``seq_len`` tokens starting at multiples of
  ``seq_len - 1``. Consecutive chunks overlap by one token, so every token after
  the first of a stream is a prediction target exactly once; a trailing chunk of
  fewer than 2 tokens predicts nothing and is dropped. Short chunks are stored
  unpadded (the loader pads). ``sequence_id`` is the first 24 hex digits of
  sha256("<unit key>:<chunk index>"): 96 bits, so the chance of any collision
  among 10^10 sequences is below 1e-9 (16 digits would give ~3% at 10^9).

BOS/EOS rule ("as the tokenizer expects"): each document is encoded with
``tokenizer(text, add_special_tokens=True)``. If the tokenizer has a
``bos_token_id`` and the encoding does not start with it, it is prepended; if it
has an ``eos_token_id`` and the encoding does not end with it, it is appended.
So a Llama-style tokenizer (adds BOS itself) gets EOS appended only, and a
GPT-2-style one (adds nothing; BOS == EOS) gets ``<|endoftext|>`` on both sides.

Example::

    config = CorpusConfig(seq_len=2048)
    for unit in iter_units(["data/"], config):
        if partition_of(unit.key, num_partitions) == my_partition:
            for sequence in tokenize_unit(unit, tokenizer, config):
                ...  # run the teacher on sequence.input_ids
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdstore.errors import CorpusError

if TYPE_CHECKING:  # transformers is slow to import and only the caller needs it loaded
    from transformers import PreTrainedTokenizerBase

KIND_OF_SUFFIX = {".txt": "text", ".md": "text", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
SUPPORTED = ".txt, .md, .jsonl, .json, .parquet and saved HF datasets (dataset_info.json + state.json)"
PARQUET_BATCH_ROWS = 1024  # rows per Parquet read: bounded memory, few calls
SEQUENCE_ID_HEX = 24  # 96-bit ids; see the module docstring for the collision bound


@dataclass(frozen=True)
class CorpusConfig:
    seq_len: int  # tokens per sequence (T); >= 2 so a sequence predicts at least one token
    split: str = "file"  # plain text: "file" = one document per file, "blank-line" = blank-line-separated blocks
    text_field: str = "text"  # JSONL field / Parquet column / HF datasets column
    pack: bool = False  # True: a unit's documents are concatenated, then cut
    errors: str = "strict"  # "strict": non-UTF-8 raises CorpusError; "replace": U+FFFD
    unit_documents: int = 256  # documents per work unit (the partitioning/resume granule)

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise CorpusError(f"seq_len must be >= 2, got {self.seq_len}", "a sequence needs an input and a target token")
        if self.split not in ("file", "blank-line"):
            raise CorpusError(f"split must be 'file' or 'blank-line', got {self.split!r}", "pick one of the two")
        if self.errors not in ("strict", "replace"):
            raise CorpusError(f"errors must be 'strict' or 'replace', got {self.errors!r}", "pick one of the two")
        if self.unit_documents < 1:
            raise CorpusError(f"unit_documents must be >= 1, got {self.unit_documents}", "256 is a good default")
        if not self.text_field:
            raise CorpusError("text_field is empty", "name the field or column that holds the text")


@dataclass(frozen=True)
class WorkUnit:
    key: str  # "<source>#<block>", stable across runs and partitionings
    source: str  # posix path relative to the root argument
    block: int  # index of the unit within its source
    documents: tuple[str, ...]  # texts, whitespace-only ones already dropped


@dataclass(frozen=True)
class TokenSequence:
    sequence_id: str  # from (unit key, chunk index) only
    input_ids: np.ndarray  # int32 [<= seq_len]


@dataclass
class CorpusStats:
    num_documents: int = 0  # kept documents
    num_empty_documents: int = 0  # whitespace-only documents skipped
    num_units: int = 0
    num_sequences: int = 0
    num_tokens: int = 0  # stored tokens, i.e. the sum of len(input_ids); overlaps count twice


@dataclass(frozen=True)
class _Source:
    name: str  # posix path relative to the root argument
    path: Path
    kind: str  # "text", "jsonl", "parquet" or "hf"


def _is_hf_dataset(folder: Path) -> bool:
    return (folder / "dataset_info.json").is_file() and (folder / "state.json").is_file()


def _kind(path: Path) -> str:
    if path.is_dir():
        return "hf"
    suffix = path.suffix.lower()
    if suffix in KIND_OF_SUFFIX:
        return KIND_OF_SUFFIX[suffix]
    raise CorpusError(f"corpus file {path} has an unsupported extension {suffix or '(none)'!r}",
                      f"supported inputs: {SUPPORTED}; move other files out of the corpus folder")


def _walk(folder: Path) -> Iterator[Path]:
    """Files and saved HF datasets under ``folder``, sorted by name, hidden entries skipped."""
    if _is_hf_dataset(folder):
        yield folder
        return
    for child in sorted(folder.iterdir(), key=lambda p: p.name):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            yield from _walk(child)
        elif child.name != "dataset_dict.json":  # the index of a saved DatasetDict, not text
            yield child


def _list_sources(paths: Sequence[str | Path]) -> list[_Source]:
    sources: dict[str, _Source] = {}
    for root in map(Path, paths):
        if not root.exists():
            raise CorpusError(f"corpus path {root} does not exist", "check the path and the working directory")
        found = _walk(root) if root.is_dir() else iter([root])
        for path in found:
            name = (path.name or path.resolve().name) if path == root else path.relative_to(root).as_posix()
            if name in sources and sources[name].path != path:
                raise CorpusError(f"two corpus inputs share the source name {name!r}: {sources[name].path} and {path}",
                                  "pass their common parent folder instead, so source names stay unique")
            sources[name] = _Source(name, path, _kind(path))
    return [sources[name] for name in sorted(sources)]


def _decoded_lines(path: Path, errors: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, text with its line ending), decoded line by line; a leading BOM is dropped.

    UTF-8 never uses byte 0x0A inside a multi-byte character, so decoding per line
    equals decoding the whole file, and the failing byte offset is exact.
    """
    offset = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
                raw, offset = raw[3:], 3
            try:
                yield number, raw.decode("utf-8", errors=errors)
            except UnicodeDecodeError as error:
                raise CorpusError(f"corpus file {path} is not valid UTF-8 at byte offset {offset + error.start}",
                                  "re-encode the file as UTF-8, or set errors='replace' to read bad bytes as U+FFFD") from None
            offset += len(raw)


def _text_documents(path: Path, config: CorpusConfig) -> Iterator[str | None]:
    lines = (text for _, text in _decoded_lines(path, config.errors))
    if config.split == "file":
        yield "".join(lines)
        return
    block: list[str] = []
    for line in lines:
        if line.strip():
            block.append(line)
        elif block:
            yield "".join(block).rstrip("\r\n")
            block = []
    if block:
        yield "".join(block).rstrip("\r\n")


def _jsonl_documents(path: Path, config: CorpusConfig) -> Iterator[str | None]:
    where = f"corpus file {path} line"
    hint = "each line must be one JSON object holding the text field (JSON Lines), e.g. {\"text\": \"...\"}"
    for number, line in _decoded_lines(path, config.errors):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise CorpusError(f"{where} {number} is not valid JSON: {error.msg}", hint) from None
        if not isinstance(record, dict) or config.text_field not in record:
            raise CorpusError(f"{where} {number} has no field {config.text_field!r}",
                              f"set text_field to the field that holds the text; {hint}")
        text = record[config.text_field]
        if text is not None and not isinstance(text, str):
            raise CorpusError(f"{where} {number}: field {config.text_field!r} is {type(text).__name__}, not a string", hint)
        yield text


def _require_string_column(schema: pa.Schema, config: CorpusConfig, where: str) -> None:
    if config.text_field not in schema.names:
        raise CorpusError(f"{where} has no column {config.text_field!r} (columns: {', '.join(schema.names)})",
                          "set text_field to the column that holds the text")
    column_type = schema.field(config.text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise CorpusError(f"{where} column {config.text_field!r} has type {column_type}, not string",
                          "set text_field to a string column")


def _parquet_documents(path: Path, config: CorpusConfig) -> Iterator[str | None]:
    parquet = pq.ParquetFile(path)
    _require_string_column(parquet.schema_arrow, config, f"corpus file {path}")
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[config.text_field]):
        yield from batch.column(config.text_field).to_pylist()


def _arrow_documents(path: Path, config: CorpusConfig) -> Iterator[str | None]:
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_stream(source)  # datasets.save_to_disk writes the IPC stream format
        _require_string_column(reader.schema, config, f"dataset file {path}")
        for batch in reader:
            yield from batch.column(config.text_field).to_pylist()


def _hf_documents(folder: Path, config: CorpusConfig) -> Iterator[str | None]:
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    names = [entry["filename"] for entry in state.get("_data_files", [])]
    files = [folder / name for name in names] or sorted(folder.glob("*.arrow"))
    if not files:
        raise CorpusError(f"saved dataset {folder} holds no .arrow files", "save it again with Dataset.save_to_disk")
    for path in files:
        yield from _arrow_documents(path, config)


_READERS = {"text": _text_documents, "jsonl": _jsonl_documents, "parquet": _parquet_documents, "hf": _hf_documents}


def iter_units(paths: Sequence[str | Path], config: CorpusConfig, stats: CorpusStats | None = None) -> Iterator[WorkUnit]:
    """Stream the corpus as work units, in a deterministic order; see the module docstring.

    Paths are listed and checked up front (missing paths, unknown extensions); text
    is read lazily. ``stats`` is updated as units are yielded. Raises CorpusError
    after the last source if no document was kept.
    """
    stats = stats if stats is not None else CorpusStats()
    num_kept = 0
    for source in _list_sources(paths):
        block, documents = 0, []
        for text in _READERS[source.kind](source.path, config):
            if text is None or not text.strip():
                stats.num_empty_documents += 1
                continue
            documents.append(text)
            num_kept += 1
            stats.num_documents += 1
            if len(documents) == config.unit_documents:
                stats.num_units += 1
                yield WorkUnit(f"{source.name}#{block}", source.name, block, tuple(documents))
                block, documents = block + 1, []
        if documents:
            stats.num_units += 1
            yield WorkUnit(f"{source.name}#{block}", source.name, block, tuple(documents))
    if num_kept == 0:
        raise CorpusError(f"corpus {', '.join(map(str, paths)) or '(no paths)'} has no documents",
                          "every document was empty or whitespace-only; check the paths, split and text_field")


def partition_of(unit_key: str, num_partitions: int) -> int:
    """The partition (0 .. num_partitions - 1) of a unit: sha256 of the key, modulo N.

    Python's hash() is salted per process, so it would move units between runs.
    """
    if num_partitions < 1:
        raise CorpusError(f"num_partitions must be >= 1, got {num_partitions}", "use 1 for a single-process build")
    digest = hashlib.sha256(unit_key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_partitions


def sequence_id(unit_key: str, chunk_index: int) -> str:
    """Stable id of chunk ``chunk_index`` of a unit; independent of partitioning."""
    return hashlib.sha256(f"{unit_key}:{chunk_index}".encode("utf-8")).hexdigest()[:SEQUENCE_ID_HEX]


def _with_bos_eos(ids: list[int], bos_id: int | None, eos_id: int | None) -> list[int]:
    if bos_id is not None and (not ids or ids[0] != bos_id):
        ids = [bos_id, *ids]
    if eos_id is not None and (not ids or ids[-1] != eos_id):
        ids = [*ids, eos_id]
    return ids


def _chunks(stream: np.ndarray, seq_len: int) -> Iterator[np.ndarray]:
    """Chunks of <= seq_len tokens starting at multiples of seq_len - 1 (overlap 1); chunks < 2 tokens dropped."""
    for start in range(0, len(stream), seq_len - 1):
        chunk = stream[start:start + seq_len]
        if len(chunk) >= 2:
            yield chunk


def tokenize_unit(unit: WorkUnit, tokenizer: PreTrainedTokenizerBase, config: CorpusConfig,
                  stats: CorpusStats | None = None) -> list[TokenSequence]:
    """The unit's token sequences, in order; ``tokenizer`` is a ``transformers`` tokenizer.

    One batched tokenizer call per unit. BOS/EOS follow the rule in the module
    docstring. ``stats`` (optional) gains num_sequences and num_tokens.
    """
    encoded = tokenizer(list(unit.documents), add_special_tokens=True, verbose=False)["input_ids"]
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    streams = [np.asarray(_with_bos_eos(list(ids), bos_id, eos_id), dtype=np.int32) for ids in encoded]
    if config.pack:
        streams = [np.concatenate(streams)] if streams else []
    chunks = [chunk for stream in streams for chunk in _chunks(stream, config.seq_len)]
    sequences = [TokenSequence(sequence_id(unit.key, i), chunk) for i, chunk in enumerate(chunks)]
    if stats is not None:
        stats.num_sequences += len(sequences)
        stats.num_tokens += sum(len(chunk) for chunk in chunks)
    return sequences
