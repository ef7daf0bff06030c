"""Checksums that let a reader trust every byte it serves, and the reads that check them.

    sums = shard_checksums(ranged_file)          # at write time: footer + one sha256 per row group
    verified = VerifiedShardFile(ranged_file, shard_info, "shards/part-00000-000000.parquet")
    parquet = pq.ParquetFile(verified, metadata=verified.metadata)   # sees verified bytes only

A shard's whole-file sha256 (the manifest's ``sha256``) needs every byte of the
file, so a loader reading one row group at a time could not check it without
reading the shard twice. The manifest therefore also records, per shard, the
sha256 of the footer (the Parquet FileMetaData with its length and magic) and
of each row group's byte range (its column chunks, which pyarrow's writer lays
out contiguously). ``VerifiedShardFile`` is the file object pyarrow reads
through: it parses the footer only after its hash matched, fetches a row
group's range whole and checks its hash before serving any of its bytes, and
refuses reads outside the footer and the row groups. So a flipped bit anywhere
a reader looks is a ChecksumError before a value is decoded.

The Arrow copy of the memory-mapped loader gets the same treatment per record
batch (kdstore.arrow_copy): a sidecar lists each batch's buffer layout and the
sha256 of its bytes, checked the first time a batch is touched.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kdstore.errors import ChecksumError, ShardCorruptError

PARQUET_MAGIC = b"PAR1"
FOOTER_TAIL_BYTES = 8  # int32 footer length + magic
MIN_PARQUET_BYTES = 12  # magic, an empty footer, its length, magic
CACHED_ROW_GROUPS = 2  # verified row groups kept in memory per open shard (pyarrow reads one column chunk at a time)

# (start, end) -> bytes: a ranged read of one file (local or fsspec)
RangeReader = Callable[[int, int], bytes]


def footer_range(read: RangeReader, size: int, where: str) -> tuple[int, int]:
    """Byte range of the footer (FileMetaData, its length, the magic) of a Parquet file of ``size`` bytes."""
    if size < MIN_PARQUET_BYTES:
        raise ShardCorruptError(f"{where} has {size} bytes: too short to be Parquet")
    tail = read(size - FOOTER_TAIL_BYTES, size)
    length = int.from_bytes(tail[:4], "little")
    if tail[4:] != PARQUET_MAGIC or length > size - FOOTER_TAIL_BYTES - len(PARQUET_MAGIC):
        raise ShardCorruptError(f"{where} does not end like a Parquet file (truncated or damaged)")
    return size - FOOTER_TAIL_BYTES - length, size


def parse_footer(footer: bytes, where: str) -> pq.FileMetaData:
    """FileMetaData from a footer's bytes (as ``footer_range`` delimits them)."""
    try:
        return pq.read_metadata(pa.BufferReader(PARQUET_MAGIC + footer))
    except (OSError, pa.ArrowException) as exc:
        raise ShardCorruptError(f"{where} has an unreadable footer: {exc}") from None


def row_group_ranges(metadata: pq.FileMetaData) -> list[tuple[int, int]]:
    """(start, end) in the file of each row group's column chunks."""
    ranges = []
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        starts, ends = [], []
        for column in range(row_group.num_columns):
            chunk = row_group.column(column)
            start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
            starts.append(start)
            ends.append(start + chunk.total_compressed_size)
        ranges.append((min(starts), max(ends)) if starts else (0, 0))
    return ranges


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def local_reader(path: str | os.PathLike[str]) -> RangeReader:
    """Ranged reads of a local file (opened per read: a writer checksums each shard once)."""
    def read(start: int, end: int) -> bytes:
        with open(path, "rb") as handle:
            return os.pread(handle.fileno(), end - start, start)
    return read


def shard_checksums(read: RangeReader, size: int, where: str) -> tuple[str, list[str]]:
    """(footer sha256, [sha256 of each row group's range]) of a Parquet file: what the manifest records."""
    start, end = footer_range(read, size, where)
    footer = read(start, end)
    return sha256_bytes(footer), [sha256_bytes(read(a, b)) for a, b in row_group_ranges(parse_footer(footer, where))]


class VerifiedShardFile(io.RawIOBase):
    """A read-only file object over one shard that serves only bytes whose sha256 matched the manifest.

    ``read``: ranged reads of the underlying file; ``size``: its length in the manifest; ``footer_sha256`` and
    ``row_group_sha256``: the manifest's checksums; ``where``: the shard's name for messages. Raises
    ChecksumError (a hash differs) or ShardCorruptError (not Parquet, a read outside known ranges).
    """

    def __init__(self, read: RangeReader, size: int, footer_sha256: str, row_group_sha256: list[str], where: str) -> None:
        super().__init__()
        self._read, self.size, self.where = read, size, where
        mismatch = ChecksumError(f"shard {where}: its footer does not match the manifest's checksum")
        try:
            self._footer_start, _ = footer_range(read, size, where)
        except ShardCorruptError:  # the size matched the manifest, so the closing bytes changed
            raise mismatch from None
        self._footer = read(self._footer_start, size)
        if len(self._footer) != size - self._footer_start or sha256_bytes(self._footer) != footer_sha256:
            raise mismatch
        self.metadata = parse_footer(self._footer, where)
        self._ranges = row_group_ranges(self.metadata)
        if len(self._ranges) != len(row_group_sha256):
            raise ChecksumError(f"shard {where} has {len(self._ranges)} row groups, the manifest lists {len(row_group_sha256)}")
        self._starts = [a for a, _ in self._ranges]
        self._expected = row_group_sha256
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._position = 0

    # -- io.RawIOBase ------------------------------------------------------
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.size}[whence]
        self._position = base + offset
        return self._position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        end = min(self._position + len(view), self.size)
        done = 0
        while self._position < end:
            piece = self._piece(self._position, end)
            view[done:done + len(piece)] = piece
            done += len(piece)
            self._position += len(piece)
        return done

    # -- verified pieces ---------------------------------------------------
    def _piece(self, start: int, end: int) -> bytes | memoryview:
        """The verified bytes from ``start``, up to ``end`` or the end of the range holding ``start``."""
        if start >= self._footer_start:
            return memoryview(self._footer)[start - self._footer_start:end - self._footer_start]
        if start < len(PARQUET_MAGIC):
            return PARQUET_MAGIC[start:min(end, len(PARQUET_MAGIC))]
        group = bisect.bisect_right(self._starts, start) - 1
        if group < 0 or start >= self._ranges[group][1]:
            raise ShardCorruptError(f"shard {self.where}: a read at byte {start} falls outside its row groups")
        data = self._row_group(group)
        first = self._ranges[group][0]
        return memoryview(data)[start - first:min(end, self._ranges[group][1]) - first]

    def _row_group(self, group: int) -> bytes:
        if group in self._cache:
            self._cache.move_to_end(group)
            return self._cache[group]
        start, end = self._ranges[group]
        data = self._read(start, end)
        if len(data) != end - start or sha256_bytes(data) != self._expected[group]:
            raise ChecksumError(f"shard {self.where} row group {group} does not match the manifest's checksum")
        self._cache[group] = data
        while len(self._cache) > CACHED_ROW_GROUPS:
            self._cache.popitem(last=False)
        return data


__all__ = ["VerifiedShardFile", "footer_range", "local_reader", "parse_footer", "row_group_ranges", "sha256_bytes",
           "shard_checksums"]
