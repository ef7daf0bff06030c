"""Building into a URL: shards are written in a local staging folder and uploaded whole, the manifest last.

    mirror = RemoteMirror("s3://bucket/store", {"endpoint_url": ...})
    with ShardWriter(staging_folder, manifest, schema, partition=p, num_partitions=n, mirror=mirror) as writer:
        ...                                    # each committed shard is uploaded, then deleted from staging

An object appears in a bucket only once its upload completes, so a shard
object is always whole. After each shard, a small record
``_partitions/part-PPPPP/shard-NNNNNN.json`` (its ShardInfo) is uploaded; a
rerun of the partition, on this machine or another, adopts the shards whose
record and object are there (the committed prefix of its rows) and goes on
from the next row, exactly as a local resume does. At the end of a partition
its record ``_partitions/part-PPPPP.json`` is uploaded; the writer that finds
every partition's record there uploads the dataset card and, last, the
manifest. Partitions on several machines can write one store: each writes its
own files, and a manifest written twice is the same union.

A prefix holding anything but a kdstore store is refused before anything is
uploaded, as ``check_output_folder`` refuses a local folder.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kdstore.card import dataset_card, is_kdstore_card
from kdstore.errors import OutputFolderError, StorageError, StoreMismatchError
from kdstore.format import (
    MANIFEST_NAME,
    PARTITION_DIR,
    SHARD_DIR,
    TOKENIZER_DIR,
    Manifest,
    ShardInfo,
    partition_record_name,
    shard_name,
)
from kdstore.records import refuse_if_different, union_manifest
from kdstore.store import filesystem

README_NAME = "README.md"
STORE_ENTRIES = (MANIFEST_NAME, README_NAME, PARTITION_DIR, SHARD_DIR, TOKENIZER_DIR)


def shard_record_name(partition: int, index: int) -> str:
    return f"{PARTITION_DIR}/part-{partition:05d}/shard-{index:06d}.json"


class RemoteMirror:
    """The store at ``url`` that a ShardWriter's staging folder is uploaded to (see the module docstring)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.fs, self.root = filesystem(url, storage_options)

    def _path(self, relative: str) -> str:
        return f"{self.root}/{relative}"

    def _call(self, what: str, action: Any, *args: Any) -> Any:
        try:
            return action(*args)
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001  every backend has its own errors: name the URL once
            raise StorageError(f"cannot {what} {self.url}: {type(exc).__name__}: {exc}") from None

    def _read_json(self, relative: str) -> dict[str, Any]:
        return json.loads(self._call("read", self.fs.cat_file, self._path(relative)).decode())

    # -- before writing ------------------------------------------------------
    def check_target(self, identity: dict[str, Any] | None) -> None:
        """Refuse a prefix holding other files, or (given ``identity``) a store of another teacher, tokenizer,
        codec or build."""
        try:
            entries = {posixpath.basename(p.rstrip("/")) for p in self._call("list", self.fs.ls, self.root, False)}
        except FileNotFoundError:
            return
        if not entries:
            return
        if not entries <= set(STORE_ENTRIES):
            shown = ", ".join(sorted(entries - set(STORE_ENTRIES))[:3])
            raise OutputFolderError(f"{self.url} is not empty ({shown}) and is not a kdstore store")
        if identity is None:
            return
        sources = [MANIFEST_NAME] if MANIFEST_NAME in entries else []
        sources += sorted(posixpath.relpath(p, self.root)
                          for p in self._call("list", self.fs.glob, self._path(f"{PARTITION_DIR}/part-*.json")))
        for source in sources:
            found = self._read_json(source)
            if source == MANIFEST_NAME:
                found["num_partitions"] = identity["num_partitions"]  # a finished store may be extended
            refuse_if_different({key: found.get(key) for key in identity}, identity, f"{self.url}/{source}")

    def adopt(self, partition: int) -> list[ShardInfo]:
        """The shards of ``partition`` already uploaded whole, in order (a prefix of its rows)."""
        adopted: list[ShardInfo] = []
        while True:
            try:
                info = ShardInfo(**self._read_json(shard_record_name(partition, len(adopted))))
                size = self._call("read", self.fs.size, self._path(info.path))
            except FileNotFoundError:
                return adopted
            if info.path != shard_name(partition, len(adopted)) or size != info.num_bytes:
                return adopted  # an upload that did not finish: redone from here
            adopted.append(info)

    def upload_tokenizer(self, folder: Path) -> None:
        """The tokenizer files, unless an identical copy is there (another partition put it)."""
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            target = self._path(f"{TOKENIZER_DIR}/{path.name}")
            try:
                there = self._call("read", self.fs.cat_file, target)
            except FileNotFoundError:
                self._call("write", self.fs.pipe_file, target, path.read_bytes())
                continue
            if there != path.read_bytes():
                raise StoreMismatchError(f"{self.url}/{TOKENIZER_DIR}/{path.name} differs from this build's tokenizer")

    # -- while and after writing -------------------------------------------
    def upload_shard(self, local: Path, partition: int, index: int, info: ShardInfo) -> None:
        """The shard object first, then its record: a record always names a whole object."""
        self._call("write", self.fs.put_file, str(local), self._path(info.path))
        self._call("write", self.fs.pipe_file, self._path(shard_record_name(partition, index)),
                   json.dumps(asdict(info)).encode())

    def finish(self, record: dict[str, Any]) -> Manifest | None:
        """Upload the partition record; when every partition's is there, the card and then the manifest."""
        name = partition_record_name(record["partition"])
        self._call("write", self.fs.pipe_file, self._path(name), json.dumps(record, indent=1).encode())
        names = sorted(posixpath.relpath(p, self.root)
                       for p in self._call("list", self.fs.glob, self._path(f"{PARTITION_DIR}/part-*.json")))
        manifest = union_manifest([(Path(n), self._read_json(n)) for n in names])
        if manifest is None:
            return None
        try:
            card = self._call("read", self.fs.cat_file, self._path(README_NAME)).decode(errors="replace")
        except FileNotFoundError:
            card = None
        if card is None or is_kdstore_card(card):
            self._call("write", self.fs.pipe_file, self._path(README_NAME), dataset_card(manifest).encode())
        self._call("write", self.fs.pipe_file, self._path(MANIFEST_NAME), manifest.to_json().encode())
        return manifest


__all__ = ["RemoteMirror", "shard_record_name"]
