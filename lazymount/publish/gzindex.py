"""Seek points of a gzip file, found by ``indexed_gzip`` (zlib's zran, as a library).

zran records a point as the first whole byte after the block boundary plus the number of bits
of the byte before it that belong to the new block; ``buildcache/toc.py`` names the byte that
holds the boundary and how many of its bits belong to the block before. Both are read here
from the index ``indexed_gzip`` exports (its documented ``GZIDX`` file: a header, the points,
then each point's window).
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import indexed_gzip

from lazymount.errors import FormatError

SPACING = 4 << 20  # uncompressed bytes between points
WINDOW = 32 << 10

_HEADER = struct.Struct("<5sBBQQIII")  # id, version, flags, sizes, spacing, window, npoints
_POINT = struct.Struct("<QQBB")  # compressed, uncompressed, bits, has window (version 1)


@dataclass(frozen=True)
class Point:
    compressed: int  # the byte holding the point's first bit
    bits: int  # bits of that byte that belong to the block before
    uncompressed: int
    window: bytes  # the 32 KiB before the point; b"" at the start of the stream


class GzipIndex:
    """An open gzip file (``file``, seekable, at any position) with its index built as it
    is read: ``read`` gives the uncompressed stream front to back, ``pread`` any part of it
    after, ``points`` the seek points once it was read through."""

    def __init__(self, file: BinaryIO, what: str, spacing: int = SPACING):
        self.what = what
        file.seek(0)
        try:
            self._gz = indexed_gzip.IndexedGzipFile(fileobj=file, spacing=spacing,
                                                    window_size=WINDOW, auto_build=True)
        except (indexed_gzip.ZranError, OSError, ValueError) as exc:
            raise FormatError(f"{what}: not a gzip stream ({exc})") from None

    def chunks(self, size: int = 1 << 20) -> Iterator[bytes]:
        """The uncompressed stream, front to back. FormatError if it is corrupt."""
        try:
            while chunk := self._gz.read(size):
                yield chunk
        except (indexed_gzip.ZranError, OSError, ValueError) as exc:
            raise FormatError(f"{self.what}: corrupt gzip stream ({exc})") from None

    def pread(self, offset: int, size: int) -> bytes:
        """``size`` uncompressed bytes at ``offset`` (read through the index)."""
        try:
            self._gz.seek(offset)
            return bytes(self._gz.read(size))
        except (indexed_gzip.ZranError, OSError, ValueError) as exc:
            raise FormatError(f"{self.what}: corrupt gzip stream ({exc})") from None

    def points(self) -> list[Point]:
        """The seek points of a stream read through; FormatError if the file holds more than
        one gzip stream (a point without a window after the first)."""
        with tempfile.TemporaryDirectory(prefix="lazymount-gzindex-") as folder:
            path = os.path.join(folder, "index")
            self._gz.export_index(filename=path)  # it takes files opened "wb" only
            with open(path, "rb") as exported:
                return list(_parse_export(exported, self.what))

    def close(self) -> None:
        self._gz.close()

    def __enter__(self) -> GzipIndex:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _parse_export(file: BinaryIO, what: str) -> Iterator[Point]:
    ident, version, _flags, _csize, _usize, _spacing, window, count = _HEADER.unpack(
        file.read(_HEADER.size))
    if ident != b"GZIDX" or version != 1 or window != WINDOW:
        raise FormatError(f"{what}: indexed_gzip exported an index of an unknown form")
    rows = [_POINT.unpack(file.read(_POINT.size)) for _ in range(count)]
    for n, (compressed, uncompressed, bits, has_window) in enumerate(rows):
        if bool(has_window) != (n > 0):
            raise FormatError(f"{what}: more than one gzip stream; a table of contents "
                              "describes tarballs of one")
        data = file.read(WINDOW) if has_window else b""
        if bits:  # zran: the first whole byte, and the bits of the one before
            yield Point(compressed - 1, 8 - bits, uncompressed, data)
        else:
            yield Point(compressed, 0, uncompressed, data)
