"""What a store folder holds and whether two stores agree: records read, identities compared, partitions joined.

    check_output_folder(Path("out"))         # a new or empty folder, or a kdstore store: else OutputFolderError
    record = read_record(Path("store/_partitions/part-00000.json"))
    refuse_if_different(found, wanted, source)             # StoreMismatchError naming the field and both values
    manifest = union_manifest([(path, record), ...])       # None while partitions are missing
    manifest, note = keep_scores(previous, manifest)       # a rewritten manifest keeps the score files it may

The writer (local folders), the mirror (URLs) and merge (kdstore.transfer) share these, so a store is
recognised, and a mismatch is worded, one way everywhere.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from kdstore import __version__
from kdstore.errors import ManifestError, OutputFolderError, StoreMismatchError
from kdstore.format import (
    FORMAT_VERSION,
    LOCK_DIR,
    MANIFEST_NAME,
    PARTITION_DIR,
    SHARD_DIR,
    Manifest,
    ShardInfo,
    new_created_at,
)


def check_output_folder(root: Path) -> None:
    """Refuse a folder that holds files of its own: write only into a new or empty folder or a kdstore store.

    A store is a folder with a kdstore ``manifest.json``, or one a writer began (every writer makes ``_locks/``
    before anything else), or partitions copied together for ``--finalize`` (``_partitions/``, or ``shards/``
    holding only ``part-*`` files). Nothing is created or changed here.
    """
    if not root.exists():
        return
    if not root.is_dir():
        raise OutputFolderError(f"{root} is a file, not a folder")
    if (root / MANIFEST_NAME).exists():
        read_record(root / MANIFEST_NAME)  # a kdstore manifest, or refused
        return
    entries = sorted(entry.name for entry in root.iterdir())
    shards = sorted(p.name for p in (root / SHARD_DIR).iterdir()) if (root / SHARD_DIR).is_dir() else []
    begun = (root / LOCK_DIR).is_dir() or (root / PARTITION_DIR).is_dir() or (
        shards and all(name.startswith("part-") for name in shards))
    if entries and not begun:
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise OutputFolderError(f"{root} is not empty ({shown}) and is not a kdstore store")


def read_record(path: Path) -> dict[str, Any]:
    """A store's ``manifest.json`` or partition record as a dict; one-line errors when it is not one."""
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        data, problem = None, f"not JSON ({exc})"
    else:
        problem = "not a kdstore manifest"
    if isinstance(data, dict) and (data.get("format") == "kdstore" or path.name != MANIFEST_NAME):
        return data
    if path.name == MANIFEST_NAME:
        raise OutputFolderError(f"{path} is {problem}", hint="pick a new or empty --out folder; if it was a kdstore "
                                                              "store, restore its manifest.json from a good copy")
    raise ManifestError(f"{path} is {problem if data is None else 'not a partition record'}",
                        hint=f"delete it and rerun partition {path.stem.split('-')[-1].lstrip('0') or '0'}")


_ABSENT = "(absent)"


def refuse_if_different(found: dict[str, Any], wanted: dict[str, Any], source: Path | str,
                         sides: tuple[str, str] = ("the store", "this build")) -> None:
    """StoreMismatchError naming, for each differing key, the first differing field and its value on both sides.

    ``source``: the record's local path, or its URL (a string, so that ``s3://`` keeps its two slashes)."""
    different = [key for key in wanted if found.get(key) != wanted[key]]
    if different:
        details = "; ".join(first_difference(found.get(key), wanted[key], key, sides) for key in different)
        if isinstance(source, str):
            where = source.removesuffix(f"/{MANIFEST_NAME}")
        else:
            where = source.parent if source.name == MANIFEST_NAME else source
        raise StoreMismatchError(f"{where} holds a store with a different {', '.join(different)} than this build: "
                                 f"{details}")


def first_difference(found: Any, wanted: Any, field: str, sides: tuple[str, str]) -> str:
    """The first field at which two records differ (dotted, in the wanted record's order), with both values."""
    if isinstance(found, dict) and isinstance(wanted, dict):
        for key in [*wanted, *(k for k in found if k not in wanted)]:  # the record's order: teacher.model first
            if found.get(key, _ABSENT) != wanted.get(key, _ABSENT):
                return first_difference(found.get(key, _ABSENT), wanted.get(key, _ABSENT), f"{field}.{key}", sides)
    return f"{field} is {_shown(found)} in {sides[0]}, {_shown(wanted)} in {sides[1]}"


def _shown(value: Any, limit: int = 70) -> str:
    text = value if value is _ABSENT else repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def union_manifest(records: list[tuple[Path, dict[str, Any]]]) -> Manifest | None:
    """The manifest of a store whose partition records are ``records`` ((where, record) pairs); None while
    partitions are missing. Records that disagree on anything but their partition and shards are refused."""
    first = records[0][1]
    if len(records) < first["num_partitions"]:
        return None
    shards: list[ShardInfo] = []
    shared = [k for k in first if k not in ("partition", "shards")]
    for source, data in records:
        refuse_if_different({k: data.get(k) for k in shared}, {k: first[k] for k in shared}, source,
                             (source.name, records[0][0].name))
        shards += [ShardInfo(**s) for s in data["shards"]]
    fields = {k: first[k] for k in shared}
    return Manifest(**fields, shards=sorted(shards, key=lambda s: s.path), kdstore_version=__version__,
                    created_at=new_created_at())


def keep_scores(previous: Manifest | None, manifest: Manifest, where: str = "the store") -> tuple[Manifest, str | None]:
    """``manifest`` (a union of partition records, which know nothing of score files) with the score files that
    ``previous`` (the manifest it replaces) lists, when they score exactly its shards (paths and sha256s): a rerun
    of ``kdstore build`` or ``--finalize`` over a finished scored store must not unlist them. When a shard they
    score has changed they are dropped, with the note saying so (else None)."""
    if previous is None or not previous.scores:
        return manifest, None
    scored = [(f["shard"], f["shard_sha256"]) for f in previous.scores["files"]]
    if scored == [(s.path, s.sha256) for s in manifest.shards]:
        return replace(manifest, scores=previous.scores, format_version=FORMAT_VERSION), None
    return manifest, (f"the score files of {where} scored shards that have changed since; the manifest no longer "
                      f"lists them (delete {where}/scores and run `kdstore score` again to rescore)")


__all__ = ["check_output_folder", "first_difference", "keep_scores", "read_record", "refuse_if_different",
           "union_manifest"]
