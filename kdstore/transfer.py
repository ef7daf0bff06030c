"""Stores between locations and teams: copy a store anywhere fsspec reaches, merge stores into one.

    copy_store("store", "s3://bucket/store", target_options={"endpoint_url": ...})  # verified, manifest last
    merge_stores(["run-a/store", "s3://bucket/run-b"], "merged")                     # one store, ids deduplicated

``copy_store`` reads every file through the source ``Store`` (hashing what it
reads), writes it to the target (a local file under a temporary name then
renamed; an object, which appears only once whole), reads it back from the
target and compares its sha256 with the manifest's, and writes
``manifest.json`` last. A rerun skips files already there whole, so an
interrupted copy resumes; a target holding anything else is refused.

``merge_stores`` checks that the stores share table, teacher, tokenizer, codec
and columns (naming the first field that differs, with both values), then
writes their rows, in the order given, into a new store through
``ShardWriter``; a sequence id met again is dropped. The merged manifest's
``build`` lists where each part came from. When every store is scored by one
reference (kdstore.score: the same weights, dtype and per-token choice), the
merged store gets score files for its own shards, cut from theirs, listed with
sha256 as ``kdstore score`` lists them; when they disagree (one scored, one
not, or two references), the merged store has none and ``notes`` says why.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from kdstore.errors import ChecksumError, KdstoreError, StorageError, StoreMismatchError, VerifyError
from kdstore.format import MANIFEST_NAME, TABLE_GENERATIONS, TABLE_LOGITS, Manifest, safe_relative_path
from kdstore.records import first_difference
from kdstore.store import HASH_CHUNK_BYTES, Store, filesystem, is_local_filesystem, open_store
from kdstore.writer import ShardWriter, temporary_name, write_atomic

README_NAME = "README.md"


@dataclass
class CopyResult:
    target: str
    num_files_copied: int = 0
    num_files_present: int = 0  # already at the target, whole (a resumed copy)
    num_bytes_copied: int = 0


@dataclass
class MergeResult:
    out: str
    num_sequences: int = 0
    num_duplicates: int = 0  # rows dropped because an earlier store held their sequence id
    per_store: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # one line each: why the merged store has no score files


# -- copy ------------------------------------------------------------------
def copy_store(source: str | os.PathLike[str] | Store, target: str | os.PathLike[str],
               source_options: dict[str, Any] | None = None, target_options: dict[str, Any] | None = None) -> CopyResult:
    """Copy the store at ``source`` to ``target`` (folders or fsspec URLs), verified on arrival, manifest last.
    Any table kind: a generations store copies as its files, like a logits store."""
    store = open_store(source, source_options, tables=(TABLE_LOGITS, TABLE_GENERATIONS))
    if store.parent is not None:
        raise KdstoreError(f"{source} is a selection view of {store.parent.location}; copy writes whole stores",
                           hint="kdstore select ... --materialize writes the view's sequences as a store to copy")
    fs, root = filesystem(str(target), target_options)
    expected = {shard.path: (shard.num_bytes, shard.sha256) for shard in store.manifest.shards}
    expected.update({f["path"]: (f["num_bytes"], f["sha256"]) for f in (store.manifest.scores or {}).get("files", [])})
    extra = list(store.manifest.tokenizer.get("files") or []) + _readme(store)
    _refuse_other_content(fs, root, str(target), store, set(expected) | set(extra))
    result = CopyResult(str(target))
    root_existed = is_local_filesystem(fs) and os.path.exists(root)
    try:
        for relative in list(expected) + extra:
            size, sha256 = expected.get(relative, (None, None))
            target_path = f"{root}/{safe_relative_path(relative)}"
            if sha256 is None:  # the card: small, not in the manifest, compared byte for byte
                size, sha256 = _size_and_sha256(store.fs, store.file_path(relative))
            if _whole(fs, target_path, size, sha256):
                result.num_files_present += 1
                continue
            result.num_bytes_copied += _copy_file(store, relative, fs, target_path, sha256, str(target))
            result.num_files_copied += 1
    except BaseException:
        if is_local_filesystem(fs):  # whole files stay for a resume; folders left empty go
            _remove_empty_folders(Path(root), keep_root=root_existed)
        raise
    _check_tokenizer_files(store, fs, root, str(target), target_options)
    _write_file(fs, f"{root}/{MANIFEST_NAME}", store.manifest.to_json().encode())
    return result


def _remove_empty_folders(root: Path, keep_root: bool) -> None:
    """Remove the folders under ``root`` (and ``root`` unless ``keep_root``) that hold nothing, deepest first."""
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()
    if not keep_root and root.is_dir() and not any(root.iterdir()):
        root.rmdir()


def _readme(store: Store) -> list[str]:
    try:
        return [README_NAME] if store.fs.exists(f"{store.root}/{README_NAME}") else []
    except OSError:
        return []


def _refuse_other_content(fs: Any, root: str, target: str, store: Store, allowed: set[str]) -> None:
    """A target may be empty, a partial copy of this store, or this store already: nothing else."""
    try:
        found = [path[len(root) + 1:] for path in fs.find(root)] if fs.exists(root) else []
    except Exception as exc:  # noqa: BLE001  every backend has its own errors: name the target once
        raise StorageError(f"cannot list {target}: {type(exc).__name__}: {exc}") from None
    if MANIFEST_NAME in found:
        there = Manifest.from_json(fs.cat_file(f"{root}/{MANIFEST_NAME}").decode(), f"{target}/{MANIFEST_NAME}")
        if there.identity() != store.manifest.identity() or there.shards != store.manifest.shards:
            raise StoreMismatchError(f"{target} already holds another store",
                                     hint="copy into a new location, or delete the old store first")
    unknown = sorted(p for p in found if p not in allowed | {MANIFEST_NAME} and not p.endswith(".tmp"))
    if unknown:
        raise StoreMismatchError(f"{target} is not empty and holds files that are not part of {store.location}: "
                                 f"{', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}",
                                 hint="copy into an empty or new location; nothing was written")


def _sha256_at(fs: Any, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        while block := handle.read(HASH_CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _size_and_sha256(fs: Any, path: str) -> tuple[int, str]:
    return fs.size(path), _sha256_at(fs, path)


def _whole(fs: Any, path: str, size: int, sha256: str) -> bool:
    try:
        return fs.size(path) == size and _sha256_at(fs, path) == sha256
    except FileNotFoundError:
        return False


def _copy_file(store: Store, relative: str, fs: Any, target_path: str, sha256: str, target: str) -> int:
    """Stream one file from the store to ``target_path``; check the source and the arrival against ``sha256``."""
    digest, size = hashlib.sha256(), 0
    local = is_local_filesystem(fs)
    write_path = str(temporary_name(Path(target_path))) if local else target_path  # an object appears whole
    fs.makedirs(target_path.rsplit("/", 1)[0], exist_ok=True)
    try:
        with store.fs.open(store.file_path(relative), "rb") as reading, fs.open(write_path, "wb") as writing:
            while block := reading.read(HASH_CHUNK_BYTES):
                digest.update(block)
                writing.write(block)
                size += len(block)
        if digest.hexdigest() != sha256:
            raise ChecksumError(f"{relative} in {store.location} does not match its sha256 in the manifest",
                                hint="restore the source file (kdstore verify names every damaged one), then copy again")
        if local:
            os.replace(write_path, target_path)
    except BaseException:
        _remove(fs, write_path)
        raise
    if _sha256_at(fs, target_path) != sha256:
        _remove(fs, target_path)
        raise ChecksumError(f"{relative} arrived at {target} with other bytes than it was sent",
                            hint="check the target storage, then copy again: finished files are kept")
    return size


def _check_tokenizer_files(store: Store, fs: Any, root: str, target: str, target_options: dict[str, Any] | None) -> None:
    """The copied tokenizer files, read back from the target and checked as any store's (Store.local_tokenizer)."""
    arrived = Store(target, store.manifest, None if is_local_filesystem(fs) else dict(target_options or {}), root, fs,
                    tables=(store.manifest.table,))
    try:
        with arrived.local_tokenizer():
            pass
    except VerifyError as exc:
        raise ChecksumError(str(exc), hint="restore the source store's tokenizer/ folder, then copy again") from None


def _write_file(fs: Any, path: str, data: bytes) -> None:
    if is_local_filesystem(fs):
        write_atomic(Path(path), data)
    else:
        fs.pipe_file(path, data)


def _remove(fs: Any, path: str) -> None:
    try:
        fs.rm_file(path)
    except (FileNotFoundError, OSError):
        pass


# -- merge -----------------------------------------------------------------
def merge_stores(sources: list[str | os.PathLike[str]], out: str | os.PathLike[str],
                 storage_options: dict[str, Any] | None = None) -> MergeResult:
    """Merge stores with the same table, teacher, tokenizer, codec and columns into a new local store ``out``."""
    if len(sources) < 2:
        raise KdstoreError("merge needs at least two stores", hint="kdstore merge STORE_A STORE_B ... --out MERGED")
    if "://" in str(out):
        raise KdstoreError(f"merge writes a local folder; {out} is a URL",
                           hint="merge into a local folder, then `kdstore copy` it to the bucket")
    stores = [open_store(source, storage_options) for source in sources]
    first = stores[0]
    for other in stores[1:]:
        for name in ("shards_format_version", "table", "teacher", "tokenizer", "codec", "columns"):
            mine, theirs = getattr(other.manifest, name), getattr(first.manifest, name)
            if mine != theirs:
                raise StoreMismatchError(f"{other.location} differs from {first.location}: "
                                         f"{first_difference(mine, theirs, name, (other.location, first.location))}",
                                         hint="merge only stores of the same teacher, tokenizer and codec "
                                              "(kdstore info shows them)")
    result = MergeResult(str(out))
    reference = _shared_reference(stores, result.notes, out)
    parts = [{"location": s.location, "build": s.manifest.build, "num_sequences": s.manifest.num_sequences}
             for s in stores]
    manifest = Manifest(table=first.manifest.table, teacher=first.manifest.teacher, tokenizer=first.manifest.tokenizer,
                        codec=first.manifest.codec, build={"merged_from": parts})
    seen: set[str] = set()
    with first.local_tokenizer() as tokenizer, ShardWriter(out, manifest, first.schema, tokenizer_dir=tokenizer) as writer:
        for store in stores:
            kept = 0
            for table in store.iter_tables():
                table, dropped = _new_rows(table, seen)
                result.num_duplicates += dropped
                kept += table.num_rows
                writer.write(table.replace_schema_metadata(None))
            result.per_store.append({"location": store.location, "num_sequences": kept})
    result.num_sequences = len(seen)
    if reference is not None:
        _write_merged_scores(stores, open_store(out), reference)
    return result


def _shared_reference(stores: list[Store], notes: list[str], out: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The reference record (``manifest.scores["reference"]``) of the score files every store has, when one
    reference scored them all; else None, with a note when some store's score files are left out."""
    from kdstore.score import reference_identity

    scores = [(s.parent or s).manifest.scores for s in stores]  # a view reads its parent's score files
    if not any(scores):
        return None
    identities = [reference_identity(entry["reference"]) if entry else None for entry in scores]
    if all(i == identities[0] for i in identities):
        return scores[0]["reference"]
    unscored = [s.location for s, entry in zip(stores, scores) if not entry]
    why = (f"{', '.join(unscored)} {'has' if len(unscored) == 1 else 'have'} none" if unscored else
           "they were made by different references (or dtypes, or --per-token choices)")
    notes.append(f"the merged store has no score files: {why}; score it with `kdstore score {out} --reference MODEL`")
    return None


def _write_merged_scores(stores: list[Store], merged: Store, reference: dict[str, Any]) -> None:
    """The score file of each merged shard: the inputs' score rows of its sequences (the first store's row of a
    repeated id, as the merge keeps its first row), then the manifest lists them (kdstore.score.finalize_scores)."""
    from kdstore.format import score_columns_schema, score_file_name
    from kdstore.score import finalize_scores, reference_identity, score_file_bytes

    schema = score_columns_schema(bool(reference.get("per_token")))
    table = pa.concat_tables([s.score_table(schema.names[1:]) for s in stores]).select(schema.names).cast(schema)
    row_of: dict[str, int] = {}
    for row, sequence_id in enumerate(table["sequence_id"].to_pylist()):
        row_of.setdefault(sequence_id, row)
    root = Path(merged.root)
    (root / "scores").mkdir(exist_ok=True)
    ids = [i for t in merged.iter_tables(["sequence_id"]) for i in t["sequence_id"].to_pylist()]  # merged order
    start = 0
    for shard in merged.manifest.shards:
        rows = table.take(pa.array([row_of[i] for i in ids[start:start + shard.num_rows]], pa.int64()))
        start += shard.num_rows
        record = {"shard": shard.path, "shard_sha256": shard.sha256, "reference": reference_identity(reference)}
        write_atomic(root / score_file_name(shard.path), score_file_bytes(rows, record))
    finalize_scores(root, reference)


def _new_rows(table: pa.Table, seen: set[str]) -> tuple[pa.Table, int]:
    """``table`` without the rows whose sequence id is in ``seen`` (or repeats within it); adds the kept ids."""
    ids = table.column("sequence_id").to_pylist()
    keep = []
    for index, sequence_id in enumerate(ids):
        if sequence_id not in seen:
            seen.add(sequence_id)
            keep.append(index)
    if len(keep) == len(ids):
        return table, 0
    return table.take(pa.array(keep, pa.int64())), len(ids) - len(keep)


__all__ = ["CopyResult", "MergeResult", "copy_store", "merge_stores"]
