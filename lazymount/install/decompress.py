"""Decompression of a stored tarball blob (gzip, zstd or none) into bounded chunks.

Every generator here yields decompressed chunks of at most ``CHUNK`` bytes, never empty, so a
decompression bomb never sits in memory. ``read_ahead`` runs such a generator in a thread of its
own. A broken stream raises ``Fault``; the tar reader turns it into a one-line error.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterator
from typing import BinaryIO, cast

import zstandard
from isal import isal_zlib  # ISA-L's inflate: the zlib API at about twice the speed

from lazymount.errors import FormatError

CHUNK = 1 << 20  # compressed reads, decompressed chunks and file copies
INFLATE_ERROR = cast(type[Exception], isal_zlib.error)  # its stubs call it an instance


class Fault(Exception):
    """The compressed stream is broken; the subclass says how."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Truncated(Fault):
    """The stream stops before its end."""


class Corrupt(Fault):
    """Bytes that do not decode."""


class Trailing(Fault):
    """Bytes after the end of the stream: nothing checked them."""


def decompressed(stream: BinaryIO, compression: str) -> Iterator[bytes]:
    """Chunks of the decompressed blob. Raises FormatError at once for an unknown codec."""
    if compression == "gzip":
        return _gunzip(stream)
    if compression == "zstd":
        return _unzstd(stream)
    if compression == "none":
        return iter(lambda: stream.read(CHUNK), b"")
    raise FormatError(f"unknown tarball compression {compression!r}")


_END = object()


def read_ahead(chunks: Iterator[bytes], depth: int = 8) -> Generator[bytes, None, None]:
    """Run ``chunks`` in a thread of its own, up to ``depth`` chunks ahead of the consumer.

    zlib and zstd release the GIL while they work, so decompression overlaps the tar parsing
    and file writes of the extracting thread. Errors of the producer are raised here, in order.
    The caller must close() this generator, which stops and joins the producer.
    """
    ahead: queue.Queue[object] = queue.Queue(depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                ahead.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for chunk in chunks:
                if not put(chunk):
                    return
            put(_END)
        except BaseException as exc:  # handed to the consumer, raised there
            put(exc)

    producer = threading.Thread(target=produce, name="decompress", daemon=True)
    producer.start()
    try:
        while True:
            item = ahead.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        producer.join()


def _gunzip(stream: BinaryIO) -> Iterator[bytes]:
    """Inflate gzip members (RFC 1952 allows several in a row); anything else after is refused.

    ``max_length`` bounds every output chunk, so a bomb never sits in memory.
    """
    data = b""
    while True:
        inflater = isal_zlib.decompressobj(wbits=31)
        while not inflater.eof:
            if not data:
                data = stream.read(CHUNK)
            if not data:  # input ended: flush what zlib holds, then it must be complete
                tail = inflater.flush()
                if not inflater.eof:
                    raise Truncated("gzip stream is truncated")
                if tail:
                    yield tail
                break
            try:
                out = inflater.decompress(data, CHUNK)
            except INFLATE_ERROR as exc:
                raise Corrupt(f"corrupt gzip stream ({exc})") from None
            data = inflater.unconsumed_tail
            if out:
                yield out
        data = inflater.unused_data or stream.read(CHUNK)
        if len(data) == 1:  # the next member's magic may straddle two reads
            data += stream.read(CHUNK)
        if not data:
            return
        if not data.startswith(b"\x1f\x8b"):
            raise Trailing("trailing data after the end of the gzip stream")


def _unzstd(stream: BinaryIO) -> Iterator[bytes]:
    """Decompress zstd frames (several in a row are fine), bounded by ``read(CHUNK)``."""
    frames = _ZstdFrames(stream)
    reader = zstandard.ZstdDecompressor().stream_reader(
        frames,  # type: ignore[arg-type]  # only read() is used
        read_across_frames=True,
        closefd=False,
    )
    try:
        while chunk := reader.read(CHUNK):
            yield chunk
    except zstandard.ZstdError as exc:  # garbage after a frame also lands here
        raise frames.explain(exc) from None
    if frames.fault:
        raise frames.fault


_ZSTD_MAGIC = 0xFD2FB528
_ZSTD_SKIPPABLE = 0x184D2A50  # the low 4 bits are free
_FCS_SIZES = (0, 2, 4, 8)  # by Frame_Content_Size_flag (0 means 1 byte if single segment)
_DICT_ID_SIZES = (0, 1, 2, 4)


class _ZstdFrames:
    """The compressed stream, passed to python-zstandard unchanged while its frame and block
    headers are walked (RFC 8878: a few bytes per block of at most 128 KiB).

    python-zstandard reports neither a frame cut short nor garbage after the last frame
    reliably; this walk finds both and records them in ``fault``.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._state = "magic"
        self._want = 4  # header bytes the current state needs
        self._head = b""  # header bytes collected so far
        self._skip = 0  # payload bytes to pass over
        self._checksum = False
        self._frames = 0
        self.fault: Fault | None = None

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        if self.fault is None:
            if data:
                self._walk(data)
            elif self._state != "magic" or self._skip or not self._frames:
                self.fault = Truncated("zstd stream is truncated")
            elif self._head:  # a few stray bytes after the last frame
                self.fault = self._trailing()
        return data

    def explain(self, exc: zstandard.ZstdError) -> Fault:
        """The fault behind a decoding error (libzstd may fail before this walk sees why)."""
        if self.fault:
            return self.fault
        if self._state == "magic" and self._frames and self._head:
            return self._trailing()
        return Corrupt(f"bad zstd stream ({exc})")

    def _trailing(self) -> Fault:
        return Trailing("trailing data after the end of the zstd stream")

    def _walk(self, data: bytes) -> None:
        pos = 0
        while pos < len(data) and self.fault is None:
            if self._skip:
                step = min(self._skip, len(data) - pos)
                self._skip -= step
                pos += step
                continue
            take = self._want - len(self._head)
            self._head += data[pos : pos + take]
            pos += take
            if len(self._head) == self._want:
                head, self._head = self._head, b""
                self._advance(head)

    def _advance(self, head: bytes) -> None:
        value = int.from_bytes(head, "little")
        if self._state == "magic":
            if value == _ZSTD_MAGIC:
                self._state, self._want = "descriptor", 1
            elif value & ~0xF == _ZSTD_SKIPPABLE:
                self._state, self._want = "skippable", 4
            elif self._frames:
                self.fault = self._trailing()
            else:
                self.fault = Corrupt("bad zstd stream (no zstd frame)")
        elif self._state == "descriptor":
            if value & 0x08:
                self.fault = Corrupt("bad zstd stream (reserved bit set)")
            single_segment = value >> 5 & 1
            self._checksum = bool(value & 0x04)
            self._skip = (
                (1 - single_segment)  # Window_Descriptor
                + _DICT_ID_SIZES[value & 3]
                + (_FCS_SIZES[value >> 6] or single_segment)
            )
            self._state, self._want = "block", 3
        elif self._state == "block":
            block_type = value >> 1 & 3
            if block_type == 3:
                self.fault = Corrupt("bad zstd stream (reserved block type)")
            self._skip = 1 if block_type == 1 else value >> 3  # RLE blocks store one byte
            if value & 1:  # last block of the frame
                self._frames += 1
                self._skip += 4 if self._checksum else 0
                self._state, self._want = "magic", 4
        else:  # skippable frame: its length, then that many bytes
            self._skip = value
            self._state, self._want = "magic", 4
