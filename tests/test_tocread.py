"""Reading one member from its spans and window (``install/tocread.py``), over seek points
``rapidgzip`` found in a real gzip stream: every byte range reads back, whatever bit its
point starts at, and a flipped byte anywhere is refused."""

from __future__ import annotations

import functools
import gzip
import hashlib
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lazymount.buildcache.toc import SeekPoint, Toc, TocMember, points_for
from lazymount.errors import IntegrityError
from lazymount.install.tocread import read_member
from lazymount.publish.gzindex import GzipIndex

SPACING = 1 << 20


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@functools.cache
def stream() -> tuple[bytes, bytes, Toc, dict[str, bytes]]:
    """Incompressible runs (stored blocks), text and repeats: points at every bit offset."""
    rng = random.Random(7)
    parts = []
    for n in range(24):
        parts.append(rng.randbytes(rng.randrange(100_000, 700_000)))
        parts.append(b" ".join(str(rng.random()).encode() for _ in range(40_000 + n)))
    data = b"".join(parts)
    blob = gzip.compress(data, 6, mtime=0)
    path = Path(tempfile.mkdtemp(prefix="lazymount-test-")) / "blob.gz"
    path.write_bytes(blob)
    with GzipIndex(path, "t", chunk=SPACING) as index:
        assert b"".join(index.chunks()) == data
        found = [p for p in index.points() if p.uncompressed < len(data)]  # none at the end
    windows = {sha(p.window): p.window for p in found if p.window}
    points = []
    for n, p in enumerate(found):
        end = found[n + 1].compressed + 1 if n + 1 < len(found) else len(blob)
        points.append(SeekPoint(p.compressed, p.bits, p.uncompressed,
                                sha(p.window) if p.window else "", sha(blob[p.compressed:end])))
    toc = Toc(sha(blob), len(blob), len(data), "", "", (), tuple(points), ())
    return data, blob, toc, windows


def member(offset: int, size: int) -> TocMember:
    data = stream()[0]
    return TocMember("f", "file", 0o644, size, "", offset, sha(data[offset:offset + size]))


def fetch(item: TocMember) -> tuple[bytes, bytes]:
    """What a client fetches: the byte range points_for names and the window blob."""
    _, blob, toc, windows = stream()
    point, last = points_for(toc, item)
    return blob[point.compressed:last + 1], windows.get(point.window, b"")


def test_points_start_inside_bytes():
    toc = stream()[2]
    assert len(toc.points) > 20 and len({p.bits for p in toc.points}) >= 4


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_every_range_reads_back(draw):
    data, _, toc, _ = stream()
    offset = draw.draw(st.one_of(
        st.integers(0, len(data) - 1),
        st.sampled_from([p.uncompressed for p in toc.points]),
        st.sampled_from([max(0, p.uncompressed - 1) for p in toc.points])))
    size = draw.draw(st.one_of(st.integers(0, 3000), st.integers(0, 3 * SPACING)))
    size = min(size, len(data) - offset)
    item = member(offset, size)
    assert read_member(toc, item, *fetch(item)) == data[offset:offset + size]


def test_the_last_byte_reads_back():
    data, _, toc, _ = stream()
    item = member(len(data) - 10, 10)
    assert read_member(toc, item, *fetch(item)) == data[-10:]


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x20]) + data[at + 1:]


def test_a_flipped_span_byte_is_refused():
    toc = stream()[2]
    item = member(toc.points[5].uncompressed + 100, 2 * SPACING)
    spans, window = fetch(item)
    for at in (0, len(spans) // 2, len(spans) - 1):
        with pytest.raises(IntegrityError, match="compressed span"):
            read_member(toc, item, _flip(spans, at), window)
    with pytest.raises(IntegrityError, match="compressed bytes"):
        read_member(toc, item, spans[:-1], window)


def test_a_flipped_window_byte_is_refused():
    toc = stream()[2]
    item = member(toc.points[5].uncompressed + 100, 1000)
    spans, window = fetch(item)
    with pytest.raises(IntegrityError, match="window"):
        read_member(toc, item, spans, _flip(window, 100))
    with pytest.raises(IntegrityError, match="window"):
        read_member(toc, item, spans, b"")


def test_a_wrong_recorded_sha256_is_refused():
    toc = stream()[2]
    item = member(toc.points[5].uncompressed + 100, 1000)
    spans, window = fetch(item)
    wrong = TocMember(item.path, "file", item.mode, item.size, "", item.offset,
                      sha(b"something else"))
    with pytest.raises(IntegrityError, match="content does not match"):
        read_member(toc, wrong, spans, window)
    shifted = TocMember(item.path, "file", item.mode, item.size, "", item.offset + 1,
                        item.sha256)
    with pytest.raises(IntegrityError, match="content does not match"):
        read_member(toc, shifted, *fetch(shifted))
