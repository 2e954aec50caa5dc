"""lazymount.install.extract: real Spack tarballs extract faithfully; hostile ones are refused."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import tarfactory as tf

from lazymount.errors import FormatError, StoreFull, UnsafeArchiveError
from lazymount.install.buildinfo import BuildInfo, parse_buildinfo
from lazymount.install.extract import Extracted, extract_tarball
from lazymount.install.limits import Limits

BLOBS = Path(__file__).parent / "data" / "v3-own-only" / "blobs" / "sha256"
LMHELLO_BLOB = BLOBS / "ff" / "ffbd89d56eecaba88ffc49d210360e40b083fd45dbadde88109d48a4ede7988f"
LMGREET_BLOB = BLOBS / "2d" / "2dc5ac5054b7b63d66540ec8560cbd775f7c753810e48bb32574e8e4ca634ead"
LMHELLO_PREFIX = "/tmp/lm/opt/spack/linux-x86_64/lmhello-1.0-3vgakfze5q7cw5gke5wbrfotzhh2tstq"
LMGREET_PREFIX = "/tmp/lm/opt/spack/linux-x86_64/lmgreet-1.0-2zsd6bn2ih6gpzltutvgh5zkxjjtlqml"
WHAT = "evil-1.0-aaaaaaa"


@pytest.fixture
def sandbox(tmp_path: Path) -> tuple[Path, Path]:
    """(staging, outside): extraction goes to staging; outside must stay empty."""
    staging, outside = tmp_path / "staging", tmp_path / "outside"
    staging.mkdir()
    outside.mkdir()
    return staging, outside


def extract(blob: bytes, staging: Path, compression: str = "gzip", **kw: object) -> Extracted:
    return extract_tarball(io.BytesIO(blob), compression, staging, what=WHAT, **kw)  # type: ignore[arg-type]


def refused(
    sandbox: tuple[Path, Path],
    blob: bytes,
    match: str,
    exc: type[Exception] = UnsafeArchiveError,
    compression: str = "gzip",
    **kw: object,
) -> str:
    """Extract ``blob``, expect ``exc`` matching ``match``, check nothing leaked outside."""
    staging, outside = sandbox
    with pytest.raises(exc, match=match) as info:
        extract(blob, staging, compression, **kw)
    message = str(info.value)
    assert message.startswith(f"{WHAT}: ") and "\n" not in message
    assert list(outside.iterdir()) == []
    return message


def hostile(*entries: tf.Entry, **kw: object) -> bytes:
    return tf.gz(tf.tar(tf.package(*entries, **kw)))  # type: ignore[arg-type]


def tree(root: Path) -> dict[str, tuple[str, int, bytes | str]]:
    """Relative path -> (kind, permission bits, content or link target), for comparisons."""
    out: dict[str, tuple[str, int, bytes | str]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        rel = str(path.relative_to(root))
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", 0, os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", stat.S_IMODE(st.st_mode), b"")
        else:
            out[rel] = ("file", stat.S_IMODE(st.st_mode), path.read_bytes())
    return out


# --- real Spack tarballs -------------------------------------------------------------------


def test_lmhello_extracts_like_spack(tmp_path: Path) -> None:
    with LMHELLO_BLOB.open("rb") as stream:
        result = extract_tarball(stream, "gzip", tmp_path, what="lmhello-1.0-3vgakfz")
    root = result.root
    assert result.build_prefix == LMHELLO_PREFIX
    assert root == tmp_path / "raw" / LMHELLO_PREFIX.lstrip("/")
    hello = root / "bin" / "hello"
    assert hello.is_file() and not hello.is_symlink() and os.access(hello, os.X_OK)
    assert stat.S_IMODE(hello.stat().st_mode) == 0o755
    assert hello.stat().st_mtime == 0
    assert os.readlink(root / "bin" / "hi") == "hello"
    assert os.readlink(root / "share/lmhello/message-abs.txt") == (
        f"{LMHELLO_PREFIX}/share/lmhello/message.txt"
    )
    assert (root / "share/lmhello/message.txt").read_bytes().strip()
    assert root.stat().st_mtime == 0 and stat.S_IMODE(root.stat().st_mode) == 0o755

    with tarfile.open(LMHELLO_BLOB) as archive:  # the reference: Python's own reader
        files = [m for m in archive.getmembers() if m.isfile()]
        for member in archive.getmembers():
            path = tmp_path / "raw" / member.name
            if member.isfile():
                assert path.read_bytes() == archive.extractfile(member).read()  # type: ignore[union-attr]
    assert result.files == len(files) == 15
    assert result.bytes == sum(m.size for m in files)

    info = result.buildinfo
    assert info.buildpath == "/tmp/lm/opt/spack"
    assert info.sbang_install_path == "/tmp/lm/opt/spack/bin/sbang"
    assert info.relative_prefix == "linux-x86_64/lmhello-1.0-3vgakfze5q7cw5gke5wbrfotzhh2tstq"
    assert info.hash_to_prefix["3vgakfze5q7cw5gke5wbrfotzhh2tstq"] == LMHELLO_PREFIX
    assert info.hash_to_prefix["2zsd6bn2ih6gpzltutvgh5zkxjjtlqml"] == LMGREET_PREFIX
    assert len(info.hash_to_prefix) == 3
    assert info.relocate_binaries == ("bin/hello", "bin/hello-interp")
    assert info.relocate_links == ("share/lmhello/message-abs.txt",)
    assert info.relocate_textfiles == ("bin/hello-script", "bin/hello-wrapper", "bin/hello.py")
    assert info.hardlinks_deduped is True


def test_lmgreet_extracts(tmp_path: Path) -> None:
    with LMGREET_BLOB.open("rb") as stream:
        result = extract_tarball(stream, "gzip", tmp_path, what="lmgreet-1.0-2zsd6bn")
    assert result.build_prefix == LMGREET_PREFIX
    lib = result.root / "lib" / "libgreet.so"
    assert lib.read_bytes()[:4] == b"\x7fELF" and os.access(lib, os.X_OK)
    assert LMGREET_PREFIX.encode() in (result.root / "lib/pkgconfig/greet.pc").read_bytes()
    assert stat.S_IMODE((result.root / "include/greet.h").stat().st_mode) == 0o644
    assert result.buildinfo.relocate_binaries == ("lib/libgreet.so",)
    assert result.buildinfo.relocate_links == ()
    assert result.files == 13


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_other_compressions_extract_identically(tmp_path: Path, compression: str) -> None:
    raw_tar = gzip.decompress(LMHELLO_BLOB.read_bytes())
    blob = tf.zst(raw_tar) if compression == "zstd" else raw_tar
    (tmp_path / "gzip").mkdir()
    (tmp_path / compression).mkdir()
    with LMHELLO_BLOB.open("rb") as stream:
        reference = extract_tarball(stream, "gzip", tmp_path / "gzip")
    result = extract_tarball(io.BytesIO(blob), compression, tmp_path / compression)
    assert tree(result.root) == tree(reference.root)
    assert (result.buildinfo, result.files, result.bytes) == (
        reference.buildinfo,
        reference.files,
        reference.bytes,
    )


def test_concatenated_gzip_members_are_one_stream(sandbox: tuple[Path, Path]) -> None:
    raw_tar = gzip.decompress(LMHELLO_BLOB.read_bytes())
    blob = tf.gz(raw_tar[:5000]) + tf.gz(raw_tar[5000:])
    assert extract(blob, sandbox[0]).files == 15


def test_hardlinks_and_duplicate_dirs_are_fine(sandbox: tuple[Path, Path]) -> None:
    p = tf.PREFIX
    blob = hostile(
        tf.directory(f"{p}/lib"),
        tf.file(f"{p}/lib/libx.so.1", b"ELF", 0o755),
        tf.hardlink(f"{p}/lib/libx.so", f"{p}/lib/libx.so.1"),
        tf.directory(f"{p}/lib", 0o750),
        tf.file(f"{p}/implicit/dir/file", b"x"),
    )
    result = extract(blob, sandbox[0])
    first, second = result.root / "lib/libx.so.1", result.root / "lib/libx.so"
    assert first.stat().st_ino == second.stat().st_ino
    assert stat.S_IMODE((result.root / "lib").stat().st_mode) == 0o750
    assert (result.root / "implicit/dir/file").read_bytes() == b"x"
    assert (result.files, result.bytes) == (3, 3 + 1 + len(tf.BUILDINFO))


# --- hostile member names ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        (f"{tf.PREFIX}/../../../../../../../outside/x", "'..' component"),
        ("/tmp/outside/x", "absolute path"),
        (f"{tf.PREFIX}/{'d' * 100}/a\0b", "NUL byte"),  # long: only a pax path holds a NUL
        (f"{tf.PREFIX}//x", "empty or '.' component"),
        (f"{tf.PREFIX}/./x", "empty or '.' component"),
        (f"{tf.PREFIX}/{'x' * 300}", "component longer than 255"),
        (f"{tf.PREFIX}/" + "d/" * 2100 + "x", "longer than 4096 bytes"),
    ],
)
def test_bad_names_are_refused(sandbox: tuple[Path, Path], name: str, reason: str) -> None:
    message = refused(sandbox, hostile(tf.file(name, b"pwned")), reason)
    assert "tarball member" in message and message.endswith("refused")


def test_gnu_long_names_are_checked_too(sandbox: tuple[Path, Path]) -> None:
    name = f"{tf.PREFIX}/{'d' * 120}/../../../../../../../../../outside/x"
    blob = tf.gz(tf.tar(tf.package(tf.file(name, b"pwned")), fmt=tarfile.GNU_FORMAT))
    refused(sandbox, blob, "'..' component")


def test_name_length_limit_is_configurable(sandbox: tuple[Path, Path]) -> None:
    refused(sandbox, hostile(), "longer than 40 bytes", limits=Limits(max_name_length=40))


def test_member_outside_prefix_is_refused(sandbox: tuple[Path, Path]) -> None:
    message = refused(sandbox, hostile(tf.file("tmp/lm/evil.txt", b"x")), "outside the package")
    assert "'tmp/lm/evil.txt'" in message


def test_directory_outside_prefix_is_refused(sandbox: tuple[Path, Path]) -> None:
    refused(sandbox, hostile(tf.directory("tmp/other")), "'tmp/other' lies outside")


def test_other_package_prefix_is_refused(sandbox: tuple[Path, Path]) -> None:
    other = tf.PREFIX.replace("evil", "other")
    blob = hostile(*tf.parents(other)[-1:], tf.file(f"{other}/bin/x", b"x"))
    refused(sandbox, blob, "outside the package prefix")


# --- symlinks ------------------------------------------------------------------------------


def test_write_through_absolute_symlink_is_refused(sandbox: tuple[Path, Path]) -> None:
    _, outside = sandbox
    blob = hostile(
        tf.symlink(f"{tf.PREFIX}/share", str(outside)),  # allowed by itself: absolute
        tf.file(f"{tf.PREFIX}/share/pwned", b"pwned"),
    )
    refused(sandbox, blob, "written through the symlink")


def test_write_through_relative_symlink_is_refused(sandbox: tuple[Path, Path]) -> None:
    up = "../" * (len(tf.PREFIX.split("/")) + 2) + "outside"  # resolves to sandbox's outside
    blob = hostile(
        tf.symlink(f"{tf.PREFIX}/up", up),
        tf.directory(f"{tf.PREFIX}/up/sub"),
        tf.file(f"{tf.PREFIX}/up/sub/pwned", b"pwned"),
    )
    refused(sandbox, blob, "duplicate|through the symlink")


def test_hardlink_through_symlink_is_refused(sandbox: tuple[Path, Path]) -> None:
    _, outside = sandbox
    (outside / "secret").write_bytes(b"s")
    blob = hostile(
        tf.symlink(f"{tf.PREFIX}/out", str(outside)),
        tf.hardlink(f"{tf.PREFIX}/stolen", f"{tf.PREFIX}/out/secret"),
    )
    staging, _ = sandbox
    with pytest.raises(UnsafeArchiveError, match="not an earlier regular file"):
        extract(blob, staging)
    assert [p.name for p in outside.iterdir()] == ["secret"]
    assert (outside / "secret").stat().st_nlink == 1


def test_relative_symlink_climbing_out_is_refused(sandbox: tuple[Path, Path]) -> None:
    message = refused(
        sandbox,
        hostile(tf.directory(f"{tf.PREFIX}/bin"), tf.symlink(f"{tf.PREFIX}/bin/x", "../../y")),
        "climbs out of the prefix",
    )
    assert f"{tf.PREFIX}/bin/x" in message


def test_relative_symlinks_inside_prefix_are_kept(sandbox: tuple[Path, Path]) -> None:
    p = tf.PREFIX
    blob = hostile(
        tf.directory(f"{p}/bin"),
        tf.symlink(f"{p}/bin/up", "../lib/libx.so"),
        tf.symlink(f"{p}/bin/abs", "/usr/bin/env"),
        tf.symlink(f"{p}/bin/dangling", "nowhere/../x"),
    )
    root = extract(blob, sandbox[0]).root
    assert os.readlink(root / "bin/up") == "../lib/libx.so"
    assert os.readlink(root / "bin/abs") == "/usr/bin/env"
    assert os.readlink(root / "bin/dangling") == "nowhere/../x"


# --- hard links ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("/etc/passwd", "absolute path"),
        (f"{tf.PREFIX}/../../../../../../../etc/passwd", "'..' component"),
        ("etc/passwd", "not an earlier regular file"),
        (f"{tf.PREFIX}/.spack", "not an earlier regular file"),
        (f"{tf.PREFIX}/later", "not an earlier regular file"),
    ],
)
def test_bad_hardlinks_are_refused(sandbox: tuple[Path, Path], target: str, reason: str) -> None:
    blob = hostile(tf.hardlink(f"{tf.PREFIX}/h", target), tf.file(f"{tf.PREFIX}/later", b"x"))
    message = refused(sandbox, blob, reason)
    assert f"{tf.PREFIX}/h" in message


def test_hardlink_to_file_outside_prefix_is_refused(sandbox: tuple[Path, Path]) -> None:
    blob = hostile(tf.file("tmp/lm/x", b"x"), tf.hardlink(f"{tf.PREFIX}/h", "tmp/lm/x"))
    refused(sandbox, blob, "'tmp/lm/x' lies outside")


def test_hardlink_to_symlink_is_refused(sandbox: tuple[Path, Path]) -> None:
    blob = hostile(
        tf.symlink(f"{tf.PREFIX}/s", "/etc/passwd"), tf.hardlink(f"{tf.PREFIX}/h", f"{tf.PREFIX}/s")
    )
    refused(sandbox, blob, "not an earlier regular file")


# --- special members, modes, duplicates ----------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        (tarfile.CHRTYPE, "character device"),
        (tarfile.BLKTYPE, "block device"),
        (tarfile.FIFOTYPE, "FIFO"),
    ],
)
def test_special_files_are_refused(sandbox: tuple[Path, Path], kind: bytes, reason: str) -> None:
    refused(sandbox, hostile(tf.special(f"{tf.PREFIX}/dev", kind)), reason)
    assert not any(p.name == "dev" for p in sandbox[0].rglob("*"))


def test_setuid_setgid_sticky_bits_are_stripped(sandbox: tuple[Path, Path]) -> None:
    p = tf.PREFIX
    blob = hostile(
        tf.file(f"{p}/suid", b"x", 0o4755),
        tf.file(f"{p}/sgid", b"x", 0o2750),
        tf.file(f"{p}/unreadable", b"x", 0o000),
        tf.directory(f"{p}/sticky", 0o1777),
        tf.directory(f"{p}/closed", 0o000),
        tf.file(f"{p}/closed/inside", b"x"),
    )
    root = extract(blob, sandbox[0]).root

    def mode(rel: str) -> int:
        return (root / rel).stat().st_mode & 0o7777

    assert mode("suid") == 0o755
    assert mode("sgid") == 0o750
    assert mode("unreadable") == 0o400  # the owner can always read
    assert mode("sticky") == 0o755  # and no one but the store's owner writes in the store
    assert mode("closed") == 0o700  # directories keep owner rwx
    assert (root / "closed/inside").read_bytes() == b"x"


def test_duplicate_file_is_refused(sandbox: tuple[Path, Path]) -> None:
    blob = hostile(tf.file(f"{tf.PREFIX}/x", b"first"), tf.file(f"{tf.PREFIX}/x", b"second"))
    refused(sandbox, blob, "duplicate of an earlier member")
    # the refused member never reaches the disk (nor, here, the checked one before it)
    assert all(p.read_bytes() == b"first" for p in sandbox[0].rglob("x"))


@pytest.mark.parametrize(
    "second",
    [
        tf.file(f"{tf.PREFIX}/x", b"over"),
        tf.directory(f"{tf.PREFIX}/x"),
        tf.symlink(f"{tf.PREFIX}/x", "/etc"),
        tf.hardlink(f"{tf.PREFIX}/x", f"{tf.PREFIX}/.spack/binary_distribution"),
    ],
)
def test_member_over_symlink_is_refused(sandbox: tuple[Path, Path], second: tf.Entry) -> None:
    blob = hostile(
        tf.file(f"{tf.PREFIX}/.spack/binary_distribution", tf.BUILDINFO),
        tf.symlink(f"{tf.PREFIX}/x", "/tmp"),
        second,
    )
    refused(sandbox, blob, "duplicate of an earlier member")


def test_scripts_are_the_executable_files_starting_with_a_shebang(
        sandbox: tuple[Path, Path]) -> None:
    """What sbang looks at: executable files whose first bytes are "#!", found as they
    stream past (hard links are their target's inode, so they are not listed again)."""
    result = extract(hostile(
        tf.file(f"{tf.PREFIX}/bin/tool", b"#!/bin/sh\necho\n", mode=0o755),
        tf.file(f"{tf.PREFIX}/bin/plain", b"#!/bin/sh\n", mode=0o644),
        tf.file(f"{tf.PREFIX}/bin/binary", b"\x7fELF", mode=0o755),
        tf.file(f"{tf.PREFIX}/bin/tiny", b"#", mode=0o755),
        tf.hardlink(f"{tf.PREFIX}/bin/again", f"{tf.PREFIX}/bin/tool"),
    ), sandbox[0])
    assert result.scripts == ["bin/tool"]


def test_zero_padding_past_what_tar_reads_extracts(sandbox: tuple[Path, Path]) -> None:
    """8 MiB of zeros after the end-of-archive blocks (allowed up to 16 MiB): GNU tar stops
    reading at the end blocks and exits, and the package is still extracted."""
    raw = tf.tar(tf.package(tf.file(f"{tf.PREFIX}/x", b"hi")))
    result = extract(tf.gz(raw + bytes(8 << 20)), sandbox[0])
    assert (result.root / "x").read_bytes() == b"hi"


def test_deep_nesting_extracts_up_to_the_limit(sandbox: tuple[Path, Path]) -> None:
    """248 directories below the prefix (256 names deep with the prefix and the file):
    extracted, and the file at the bottom reads back."""
    deep = "/".join(["d"] * 248)
    result = extract(hostile(tf.file(f"{tf.PREFIX}/{deep}/leaf", b"bottom")), sandbox[0])
    assert (result.root / deep / "leaf").read_bytes() == b"bottom"
    assert result.contents[f"{deep}/leaf"][0] == len(b"bottom")


def test_deeper_nesting_is_refused(sandbox: tuple[Path, Path]) -> None:
    """1,200 nested directories (2,400 bytes of name): refused before anything is written,
    not left to break every later walk of the tree."""
    deep = "/".join(["d"] * 1200)
    refused(sandbox, hostile(tf.file(f"{tf.PREFIX}/{deep}/leaf", b"x")),
            "is nested more than 256 directories deep")


def _gnu_header_with_prefix(name: str, prefix: str, data: bytes) -> bytes:
    """A member in the old GNU format whose bytes 345.. (atime and ctime there, the name's
    prefix in ustar) hold ``prefix``: Python's tarfile reads ``prefix/name``, GNU tar ``name``."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    block = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    block[345:345 + len(prefix)] = prefix.encode()
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block[:512])
    return bytes(block) + data.ljust(-(-len(data) // 512) * 512, b"\0")


def test_reading_unlike_gnu_tar_is_refused(sandbox: tuple[Path, Path]) -> None:
    """What tar made is compared with what was checked: a header the two read differently
    is refused, and nothing of it stays."""
    body = tf.tar(tf.package(tf.directory(f"{tf.PREFIX}/share")))
    end = len(body)
    while body[end - 512:end] == bytes(512):  # the end-of-archive blocks and padding
        end -= 512
    blob = tf.gz(body[:end] + _gnu_header_with_prefix("x", f"{tf.PREFIX}/share", b"hi")
                 + bytes(1024))
    refused(sandbox, blob, "GNU tar read the tarball differently from the checks")


def test_file_under_a_file_is_refused(sandbox: tuple[Path, Path]) -> None:
    blob = hostile(tf.file(f"{tf.PREFIX}/f", b"x"), tf.file(f"{tf.PREFIX}/f/g", b"y"))
    refused(sandbox, blob, "not a directory")


# --- limits --------------------------------------------------------------------------------


def test_decompression_bomb_is_refused_before_writing(sandbox: tuple[Path, Path]) -> None:
    blob = hostile(tf.file(f"{tf.PREFIX}/zeros", bytes(8 << 20)))
    assert len(blob) < 64 << 10
    refused(sandbox, blob, "beyond 1048576 bytes", limits=Limits(max_bytes=1 << 20))
    assert not any(p.name == "zeros" for p in sandbox[0].rglob("*"))


def test_too_many_members_is_refused(sandbox: tuple[Path, Path]) -> None:
    blob = LMHELLO_BLOB.read_bytes()
    refused(sandbox, blob, "more than 5 members", limits=Limits(max_members=5))


def test_oversized_extended_header_is_refused(sandbox: tuple[Path, Path]) -> None:
    info, data = tf.file(f"{tf.PREFIX}/x", b"x")
    info.pax_headers = {"comment": "c" * (2 << 20)}
    refused(sandbox, hostile((info, data)), "oversized")


# --- broken streams ------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0, 10, 1000, -4, -20])
def test_truncated_gzip_is_refused(sandbox: tuple[Path, Path], keep: int) -> None:
    blob = LMHELLO_BLOB.read_bytes()[:keep]
    refused(sandbox, blob, "truncated", FormatError)


@pytest.mark.parametrize("tail", [b"garbage", b"\0" * 16, b"\x1f"])
def test_trailing_garbage_after_gzip_is_refused(sandbox: tuple[Path, Path], tail: bytes) -> None:
    refused(sandbox, LMHELLO_BLOB.read_bytes() + tail, "trailing data")


def test_tar_data_after_end_of_archive_is_refused(sandbox: tuple[Path, Path]) -> None:
    raw_tar = gzip.decompress(LMHELLO_BLOB.read_bytes())
    refused(sandbox, tf.gz(raw_tar + raw_tar), "trailing data after the end of the tar archive")


def test_corrupt_gzip_is_refused(sandbox: tuple[Path, Path]) -> None:
    blob = bytearray(LMHELLO_BLOB.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    refused(sandbox, bytes(blob), "corrupt gzip stream|bad tar header", FormatError)


def test_corrupt_zstd_is_refused(sandbox: tuple[Path, Path]) -> None:
    blob = bytearray(tf.zst(gzip.decompress(LMHELLO_BLOB.read_bytes())))
    blob[len(blob) // 2] ^= 0xFF
    refused(sandbox, bytes(blob), "bad zstd stream", FormatError, compression="zstd")


def test_not_zstd_at_all_is_refused(sandbox: tuple[Path, Path]) -> None:
    refused(sandbox, b"this is not zstd", "bad zstd stream", FormatError, compression="zstd")


def test_truncated_zstd_is_refused(sandbox: tuple[Path, Path]) -> None:
    blob = tf.zst(gzip.decompress(LMHELLO_BLOB.read_bytes()))
    refused(sandbox, blob[: len(blob) // 2], "truncated", FormatError, compression="zstd")


def test_trailing_garbage_after_zstd_is_refused(sandbox: tuple[Path, Path]) -> None:
    blob = tf.zst(gzip.decompress(LMHELLO_BLOB.read_bytes())) + b"garbage!"
    refused(sandbox, blob, "trailing data", compression="zstd")


def test_bad_tar_header_is_refused(sandbox: tuple[Path, Path]) -> None:
    refused(sandbox, tf.gz(b"x" * 1024), "bad tar header", FormatError)


def test_unknown_compression_is_refused(sandbox: tuple[Path, Path]) -> None:
    refused(sandbox, b"", "unknown tarball compression 'bzip2'", FormatError, compression="bzip2")


# --- not a Spack package -------------------------------------------------------------------


def test_missing_binary_distribution_is_refused(sandbox: tuple[Path, Path]) -> None:
    blob = hostile(tf.file(f"{tf.PREFIX}/bin/x", b"x"), buildinfo=None)
    refused(sandbox, blob, "no .spack/binary_distribution", FormatError)


def test_top_level_binary_distribution_is_refused(sandbox: tuple[Path, Path]) -> None:
    blob = tf.gz(tf.tar([tf.directory(".spack"), tf.file(".spack/binary_distribution", b"{}")]))
    refused(sandbox, blob, "lacks the package prefix directory", FormatError)


def test_oversized_buildinfo_in_tarball_is_refused(sandbox: tuple[Path, Path]) -> None:
    blob = hostile(buildinfo=b"{" + b" " * (1 << 20) + b"}")
    refused(sandbox, blob, "binary_distribution is larger than 1048576 bytes", FormatError)


def test_bad_buildinfo_in_tarball_is_refused(sandbox: tuple[Path, Path]) -> None:
    blob = hostile(buildinfo=b"{buildpath: relative/root}")
    refused(sandbox, blob, "buildpath 'relative/root' is not an absolute path", FormatError)


def test_disk_full_becomes_store_error(tmpfs: Callable[[str], Path]) -> None:
    """A real full file system: tar's complaint becomes one StoreFull line."""
    staging = tmpfs("256k") / "staging"
    staging.mkdir()
    blob = hostile(tf.file(f"{tf.PREFIX}/big", os.urandom(1 << 20)))
    with pytest.raises(StoreFull, match="no space left on the store's file system"):
        extract_tarball(io.BytesIO(blob), "gzip", staging, what="lmhello")


# --- parse_buildinfo -----------------------------------------------------------------------


def test_parse_buildinfo_defaults_and_old_prefix_to_hash() -> None:
    info = parse_buildinfo(b"{buildpath: /opt/spack, prefix_to_hash: {/opt/spack/x-1-h: h}}", "x")
    assert info == BuildInfo(
        sbang_install_path=None,
        buildpath="/opt/spack",
        relative_prefix="",
        hash_to_prefix={"h": "/opt/spack/x-1-h"},
        relocate_binaries=(),
        relocate_links=(),
        relocate_textfiles=(),
        hardlinks_deduped=False,
    )


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (b"[1, 2]", "is not a mapping"),
        (b"just text", "is not a mapping"),
        (b"{buildpath: [", "not valid YAML"),
        (b"{relocate_links: []}", "buildpath None is not an absolute path"),
        (b"{buildpath: opt/spack}", "buildpath 'opt/spack' is not an absolute path"),
        (b"{buildpath: /opt/../etc}", "contains '..'"),
        (b"{buildpath: /o, relocate_textfiles: [bin/../../x]}", "relocate_textfiles .* leaves"),
        (b"{buildpath: /o, relocate_binaries: [/usr/bin/x]}", "not a relative path"),
        (b"{buildpath: /o, relocate_links: share/x}", "relocate_links is not a list"),
        (b"{buildpath: /o, relocate_links: [1]}", "not a relative path"),
        (b"{buildpath: /o, hash_to_prefix: [a]}", "hash_to_prefix is not a mapping"),
        (b"{buildpath: /o, hash_to_prefix: {h: rel}}", "prefix of h 'rel' is not an absolute"),
        (b"{buildpath: /o, sbang_install_path: sbang}", "sbang_install_path"),
        (b"{buildpath: /o, relative_prefix: ../x}", "relative_prefix"),
        (b"{buildpath: /o, hardlinks_deduped: maybe}", "hardlinks_deduped is not a boolean"),
        (b"{buildpath: /o, x: '" + b"a" * (1 << 20) + b"'}", "larger than"),
    ],
)
def test_bad_buildinfo_is_refused(text: bytes, reason: str) -> None:
    with pytest.raises(FormatError, match=reason) as info:
        parse_buildinfo(text, "pkg-1.0-abc")
    assert str(info.value).startswith("pkg-1.0-abc: ") and "\n" not in str(info.value)
