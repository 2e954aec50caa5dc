"""Describing one tarball (``publish/describe.py``) refuses what would give clients a TOC
they cannot use, and what extraction refuses."""

from __future__ import annotations

import gzip
import hashlib
import random
from pathlib import Path

import pytest
import tarfactory as tf

from lazymount.buildcache.toc import points_for
from lazymount.errors import FormatError, UnsafeArchiveError
from lazymount.install.tocread import read_member
from lazymount.publish.describe import describe


def spack_tar(*entries: tf.Entry) -> bytes:
    return tf.tar(tf.package(*entries))


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "tarball"
    path.write_bytes(data)
    return path


def test_a_tarball_of_two_gzip_streams_is_refused(tmp_path: Path):
    data = spack_tar(tf.file(f"{tf.PREFIX}/lib/a", random.Random(1).randbytes(3 << 20)))
    half = len(data) // 2
    path = write(tmp_path, gzip.compress(data[:half]) + gzip.compress(data[half:]))
    with pytest.raises(FormatError, match="not one gzip stream"):
        describe(path, "0" * 64, "pkg")


def test_one_stream_is_described_and_reads_back(tmp_path: Path):
    content = random.Random(2).randbytes(6 << 20)
    path = write(tmp_path, gzip.compress(spack_tar(tf.file(f"{tf.PREFIX}/lib/a", content))))
    blob = path.read_bytes()
    described = describe(path, hashlib.sha256(blob).hexdigest(), "pkg")
    toc = described.toc
    (member,) = (m for m in toc.members if m.path.endswith("/lib/a"))
    point, last = points_for(toc, member)
    assert read_member(toc, member, blob[point.compressed:last + 1],
                       described.windows.get(point.window, b"")) == content


def test_what_extraction_refuses_gets_no_toc(tmp_path: Path):
    path = write(tmp_path, gzip.compress(spack_tar(tf.file(f"{tf.PREFIX}/../../etc/x", b"x"))))
    with pytest.raises(UnsafeArchiveError):
        describe(path, "0" * 64, "pkg")
    path = write(tmp_path, gzip.compress(tf.tar(tf.package(buildinfo=None))))
    with pytest.raises(FormatError, match="not a Spack package"):
        describe(path, "0" * 64, "pkg")


def test_a_tarball_shorter_than_the_checked_bytes_is_described(tmp_path: Path):
    """Each point is checked by inflating up to 64 KiB from it; less is there after the last
    one here (the whole tar is a few KiB)."""
    path = write(tmp_path, gzip.compress(spack_tar(tf.file(f"{tf.PREFIX}/lib/a", b"tiny"))))
    toc = describe(path, "0" * 64, "pkg").toc
    assert len(toc.points) == 1 and toc.uncompressed_size < 64 << 10
