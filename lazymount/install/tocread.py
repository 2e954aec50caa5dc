"""One member of a tarball read from its table of contents: the compressed spans it lies in
and the window before the first one, inflated from that seek point (``buildcache/toc.py``).

Only zlib is needed: a raw inflate with the window as its preset dictionary. A point that
starts inside a byte (the deflate block before it ends there) cannot simply be shifted to bit
0: a stored block pads to the next byte boundary, so every bit must keep its place modulo 8
(zlib's C API has ``inflatePrime`` for this; Python's zlib does not). Instead the low
``bits`` bits of that byte are replaced by empty deflate blocks of exactly that length modulo
8 (10-bit fixed blocks, one 95-bit dynamic block for an odd count), which inflate to nothing.
Every
input is checked against the TOC (spans, window) and the output against the member's sha256:
the TOC is signed, the bytes fetched are not. Blocking; run it in a worker thread.
"""

from __future__ import annotations

import hashlib
import zlib

from isal import isal_zlib

from lazymount.buildcache.toc import Toc, TocMember, span_end, spans_of
from lazymount.errors import IntegrityError, about
from lazymount.install.decompress import INFLATE_ERROR


def read_member(toc: Toc, member: TocMember, span_bytes: bytes, window_bytes: bytes) -> bytes:
    """The content of file ``member``: ``span_bytes`` are the tarball's bytes from its first
    point's ``compressed`` to the end of its last span (``toc.points_for``), ``window_bytes``
    the first point's window blob. IntegrityError if a span, the window or the content does
    not match the TOC."""
    what = f"{member.path[:200]!r}"
    if member.kind != "file":
        raise ValueError(f"{what} is a {member.kind}; read its target")
    with about(what):
        if member.size == 0:
            return _checked(b"", member)
        spans = spans_of(toc, member)
        point = toc.points[spans.start]
        _check_spans(toc, spans, span_bytes)
        if (hashlib.sha256(window_bytes).hexdigest() != point.window if point.window
                else window_bytes):
            raise IntegrityError("the window of its seek point does not match the "
                                 "table of contents")
        skip = member.offset - point.uncompressed
        data = inflate_from(span_bytes, point.bits, window_bytes, skip + member.size, what)
        return _checked(data[skip:], member)


def inflate_from(data: bytes, bits: int, window: bytes, size: int, what: str) -> bytes:
    """Up to ``size`` bytes inflated from a seek point: ``data`` starts with the byte
    holding its first bit, of which ``bits`` belong to the block before; ``window``: the
    32 KiB before it (b"" at the start). IntegrityError if the stream is not deflate."""
    inflate = zlib.decompressobj(-15, zdict=window) if window else zlib.decompressobj(-15)
    try:
        return inflate.decompress(_aligned(data, bits), size)
    except zlib.error as exc:
        raise IntegrityError(f"{what}: cannot inflate from its seek point ({exc})") from None


def inflate_span(toc: Toc, index: int, span_bytes: bytes, window_bytes: bytes,
                 span_checked: bool = False) -> bytes:
    """The uncompressed bytes of span ``index``: from its point to the next one (or the end
    of the tar). ``span_bytes``: that span as the TOC names it; ``window_bytes``: the 32 KiB
    before its point (its window blob, or the end of the span before, inflated). A client
    that reads many members of one span inflates it once. IntegrityError if the span or the
    window does not match the TOC, or the span does not inflate to its length.
    ``span_checked``: the caller checked ``span_bytes`` against the TOC as they arrived (an
    immutable copy), so they are not hashed twice."""
    with about(f"span {index}"):
        return _inflate_span(toc, index, span_bytes, window_bytes, span_checked)


def _inflate_span(toc: Toc, index: int, span_bytes: bytes, window_bytes: bytes,
                  span_checked: bool) -> bytes:
    point = toc.points[index]
    if not span_checked:
        _check_spans(toc, range(index, index + 1), span_bytes)
    if (hashlib.sha256(window_bytes).hexdigest() != point.window if point.window
            else window_bytes):
        raise IntegrityError("the window of its seek point does not match the "
                             "table of contents")
    end = (toc.points[index + 1].uncompressed if index + 1 < len(toc.points)
           else toc.uncompressed_size)
    # ISA-L's inflate, as a whole tarball is inflated (about twice zlib's speed)
    inflate = (isal_zlib.decompressobj(wbits=-15, zdict=window_bytes) if window_bytes
               else isal_zlib.decompressobj(wbits=-15))
    try:
        data = inflate.decompress(_aligned(span_bytes, point.bits), end - point.uncompressed)
    except INFLATE_ERROR as exc:
        raise IntegrityError(f"cannot inflate from its seek point ({exc})") from None
    if len(data) != end - point.uncompressed:
        raise IntegrityError(f"inflates to {len(data)} bytes, the table of contents "
                             f"says {end - point.uncompressed}")
    return data


def check_member(member: TocMember, data: bytes) -> bytes:
    """``data`` if it is ``member``'s content as the TOC names it; else IntegrityError."""
    with about(f"{member.path[:200]!r}"):
        return _checked(data, member)


def _check_spans(toc: Toc, spans: range, data: bytes) -> None:
    base = toc.points[spans.start].compressed
    if len(data) != span_end(toc, spans[-1]) - base:
        raise IntegrityError(f"got {len(data)} compressed bytes, the table of "
                             f"contents says {span_end(toc, spans[-1]) - base}")
    for index in spans:
        start = toc.points[index].compressed - base
        piece = memoryview(data)[start:span_end(toc, index) - base]
        if hashlib.sha256(piece).hexdigest() != toc.points[index].span:
            raise IntegrityError(f"compressed span {index} does not match the table "
                                 "of contents")


def _aligned(data: bytes, bits: int) -> bytes:
    """``data`` with its first ``bits`` bits (the end of the block before the point) replaced
    by empty blocks that end at the same bit, so the point's block keeps its alignment."""
    if not bits:
        return data
    filler, length = _FILLERS[bits]
    whole = length // 8
    last = filler[whole] | (data[0] & (0xFF << bits) & 0xFF)
    return filler[:whole] + bytes([last]) + data[1:]


class _Bits:
    """A deflate bit stream being written: fields from their lowest bit, Huffman codes from
    their highest (RFC 1951, 3.1.1)."""

    def __init__(self) -> None:
        self.value = 0
        self.length = 0

    def field(self, value: int, length: int) -> None:
        self.value |= value << self.length
        self.length += length

    def code(self, code: int, length: int) -> None:
        for shift in range(length - 1, -1, -1):
            self.field((code >> shift) & 1, 1)

    def fixed_empty(self) -> None:
        """A non-final block with fixed codes and only its end: 10 bits."""
        self.field(0, 1)
        self.field(1, 2)
        self.code(0, 7)

    def dynamic_empty(self) -> None:
        """A non-final block with its own codes and only its end: 95 bits. The literal code
        has one symbol (end of block, length 1), there are no distance codes; the code-length
        code {18: 1, 0: 2, 1: 2 bits} sends 256 zero lengths as two runs, then 1, then 0."""
        self.field(0, 1)
        self.field(2, 2)
        self.field(0, 5)  # 257 literal/length codes
        self.field(0, 5)  # 1 distance code
        self.field(15, 4)  # all 19 code-length code lengths follow
        lengths = {18: 1, 0: 2, 1: 2}
        for symbol in (16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15):
            self.field(lengths.get(symbol, 0), 3)
        self.code(0b0, 1)  # 18: a run of 11 + 127 zeros
        self.field(127, 7)
        self.code(0b0, 1)  # 18: a run of 11 + 107 zeros
        self.field(107, 7)
        self.code(0b11, 2)  # 1: end of block has a code of one bit
        self.code(0b10, 2)  # 0: the one distance code is unused
        self.code(0b0, 1)  # end of block


def _filler(bits: int) -> tuple[bytes, int]:
    """Empty blocks whose length is ``bits`` modulo 8, as bytes, and that length in bits."""
    stream = _Bits()
    if bits % 2:
        stream.dynamic_empty()
    while stream.length % 8 != bits:
        stream.fixed_empty()
    return stream.value.to_bytes(stream.length // 8 + 1, "little"), stream.length


_FILLERS = {bits: _filler(bits) for bits in range(1, 8)}


def _checked(data: bytes, member: TocMember) -> bytes:
    if len(data) != member.size or hashlib.sha256(data).hexdigest() != member.sha256:
        raise IntegrityError("its content does not match the sha256 of the table of "
                             "contents")
    return data
