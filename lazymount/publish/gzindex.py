"""Seek points of a gzip file, found by ``rapidgzip`` (its own inflate, which keeps a seek
point every few MiB as it reads).

Points are read from the index ``rapidgzip`` exports in ``indexed_gzip``'s documented
``GZIDX`` form (a header, the points, then their windows). That form records a point as the
first whole byte after the block boundary plus the number of bits of the byte before it that
belong to the new block; ``buildcache/toc.py`` names the byte that holds the boundary and how
many of its bits belong to the block before. The exported windows may be sparse (only the
bytes the next block refers to); the TOC keeps the real 32 KiB before each point, read back
through the index.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import rapidgzip

from lazymount.errors import FormatError

WINDOW = 32 << 10
CHUNK = 4 << 20  # rapidgzip's chunk: about one seek point per this many bytes

_HEADER = struct.Struct("<5sBBQQIII")  # id, version, flags, sizes, spacing, window, npoints
_POINT = struct.Struct("<QQBB")  # compressed, uncompressed, bits, has window (version 1)
_ERRORS = (RuntimeError, ValueError, OSError, EOFError)


@dataclass(frozen=True)
class Point:
    compressed: int  # the byte holding the point's first bit
    bits: int  # bits of that byte that belong to the block before
    uncompressed: int
    window: bytes  # the 32 KiB before the point; b"" at the start of the stream


class GzipIndex:
    """A gzip file with its index built as it is read: ``chunks`` gives the uncompressed
    stream front to back, then ``pread`` any part of it and ``points`` the seek points."""

    def __init__(self, path: Path, what: str, chunk: int = CHUNK):
        self.path = path
        self.what = what
        self._crc = 0  # CRC-32 and length of what chunks() gave
        self._size = 0
        try:  # one thread: the host is shared, and one is several times zlib's speed
            self._gz = rapidgzip.RapidgzipFile(str(path), parallelization=1, chunk_size=chunk)
        except _ERRORS as exc:
            raise FormatError(f"{what}: not a gzip stream ({exc})") from None

    def chunks(self, size: int = 1 << 20) -> Iterator[bytes]:
        """The uncompressed stream, front to back. FormatError if it is corrupt."""
        try:
            while chunk := self._gz.read(size):
                self._crc = zlib.crc32(chunk, self._crc)
                self._size += len(chunk)
                yield chunk
        except _ERRORS as exc:
            raise FormatError(f"{self.what}: corrupt gzip stream ({exc})") from None

    def check_one_stream(self) -> None:
        """After ``chunks`` was read to its end: FormatError unless the file is one gzip
        stream, whose trailer gives the CRC-32 and length of everything read (in a file of
        several, the last trailer covers only the last stream; inflating from a point would
        stop at the end of its own)."""
        with open(self.path, "rb") as file:
            file.seek(-8, 2)
            crc, size = struct.unpack("<II", file.read(8))
        if crc != self._crc or size != self._size & 0xFFFFFFFF:
            raise FormatError(f"{self.what}: not one gzip stream; a table of contents "
                              "describes tarballs of one")

    def pread(self, offset: int, size: int) -> bytes:
        """``size`` uncompressed bytes at ``offset`` (read through the index)."""
        try:
            self._gz.seek(offset)
            data = bytes(self._gz.read(size))
        except _ERRORS as exc:
            raise FormatError(f"{self.what}: corrupt gzip stream ({exc})") from None
        if len(data) != size:
            raise FormatError(f"{self.what}: the gzip stream ends early")
        return data

    def points(self) -> list[Point]:
        """The seek points of a stream read through, each with the real 32 KiB before it
        (rapidgzip leaves out a window the data after the point does not refer to)."""
        exported = io.BytesIO()
        try:
            self._gz.export_index(exported)
        except _ERRORS as exc:
            raise FormatError(f"{self.what}: cannot index the gzip stream ({exc})") from None
        found = _parse_export(exported.getvalue(), self.what)
        return [Point(c, b, u, self.pread(u - WINDOW, WINDOW) if u else b"")
                for c, b, u in found]

    def close(self) -> None:
        self._gz.close()

    def __enter__(self) -> GzipIndex:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _parse_export(data: bytes, what: str) -> list[tuple[int, int, int]]:
    """(compressed byte, bits of it before the point, uncompressed offset) of each point."""
    try:
        ident, version, _flags, _csize, _usize, _spacing, window, count = \
            _HEADER.unpack_from(data)
        rows = [_POINT.unpack_from(data, _HEADER.size + n * _POINT.size) for n in range(count)]
    except struct.error:
        raise FormatError(f"{what}: the exported gzip index is truncated") from None
    if ident != b"GZIDX" or version != 1 or window != WINDOW:
        raise FormatError(f"{what}: rapidgzip exported an index of an unknown form")
    points = []
    for compressed, uncompressed, bits, _has_window in rows:
        if 0 < uncompressed < WINDOW:  # too early to carry a whole window: not needed
            continue
        # the first whole byte, and the bits of the one before that start the block
        points.append((compressed - 1, 8 - bits, uncompressed) if bits else
                      (compressed, 0, uncompressed))
    if not points or points[0][2] != 0:
        raise FormatError(f"{what}: the gzip index does not start at the stream's start")
    return points
