"""Build Spack-like (and hostile) install tarballs in memory for tests.

An entry is a ``(TarInfo, data)`` pair; ``package()`` wraps entries in the parent directories
and the trailing ``.spack/binary_distribution`` that a real Spack tarball has.
"""

from __future__ import annotations

import gzip
import io
import tarfile

import zstandard

ROOT = "tmp/lm/opt/spack"
PREFIX = f"{ROOT}/linux-x86_64/evil-1.0-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
BUILDINFO = (
    b"{sbang_install_path: /tmp/lm/opt/spack/bin/sbang, buildpath: /tmp/lm/opt/spack, "
    b"relative_prefix: linux-x86_64/evil-1.0-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa, "
    b"hardlinks_deduped: true, hash_to_prefix: {aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa: "
    b"/tmp/lm/opt/spack/linux-x86_64/evil-1.0-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa}, "
    b"relocate_binaries: [], relocate_links: [], relocate_textfiles: []}"
)

Entry = tuple[tarfile.TarInfo, bytes]


def _info(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    return info


def directory(name: str, mode: int = 0o755) -> Entry:
    return _info(name, tarfile.DIRTYPE, mode), b""


def file(name: str, data: bytes = b"", mode: int = 0o644) -> Entry:
    info = _info(name, tarfile.REGTYPE, mode)
    info.size = len(data)
    return info, data


def symlink(name: str, target: str) -> Entry:
    info = _info(name, tarfile.SYMTYPE, 0o755)
    info.linkname = target
    return info, b""


def hardlink(name: str, target: str) -> Entry:
    info = _info(name, tarfile.LNKTYPE, 0o644)
    info.linkname = target
    return info, b""


def special(name: str, kind: bytes) -> Entry:
    """A device node or FIFO member (``tarfile.CHRTYPE``, ``BLKTYPE``, ``FIFOTYPE``)."""
    info = _info(name, kind, 0o666)
    info.devmajor, info.devminor = 1, 3
    return info, b""


def parents(prefix: str = PREFIX) -> list[Entry]:
    """Directory entries for ``prefix`` and each of its parents, outermost first."""
    parts = prefix.split("/")
    return [directory("/".join(parts[:i])) for i in range(1, len(parts) + 1)]


def package(
    *entries: Entry, prefix: str = PREFIX, buildinfo: bytes | None = BUILDINFO
) -> list[Entry]:
    """A Spack-shaped member list: parents, ``prefix/.spack``, entries, binary_distribution."""
    members = [*parents(prefix), directory(f"{prefix}/.spack"), *entries]
    if buildinfo is not None:
        members.append(file(f"{prefix}/.spack/binary_distribution", buildinfo))
    return members


def tar(entries: list[Entry], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """An uncompressed tarball of ``entries``, written as given (no sanitizing)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as archive:
        for info, data in entries:
            archive.addfile(info, io.BytesIO(data) if data else None)
    return out.getvalue()


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def zst(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_checksum=True).compress(data)
