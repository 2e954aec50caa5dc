"""Reading the members of a decompressed tar stream, front to back, in bounded memory.

The headers are parsed here, not by ``tarfile.TarFile``, whose stream mode reads any extended
header whole into memory, however large it claims to be. Pax and GNU long-name headers are
applied to the member they describe; device nodes, FIFOs and sparse files are refused.
"""

from __future__ import annotations

import re
import struct
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from lazymount.errors import FormatError, StoreError, UnsafeArchiveError
from lazymount.install.decompress import CHUNK, Fault, Trailing
from lazymount.install.limits import Limits

BLOCK = tarfile.BLOCKSIZE
ZERO_BLOCK = bytes(BLOCK)
MAX_EXTENDED_HEADER = 1 << 20  # one pax / GNU long-name body; real ones are < 1 KiB
MAX_EXTENDED_RUN = 4  # local pax + global pax + GNU long name + long link before one member
MAX_TRAILING_ZEROS = 16 << 20  # tar pads to its record size (10 KiB for Python and GNU tar)

_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_PAX_TYPES = (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE)
_GNU_LONG_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_EXTENDED_TYPES = (*_PAX_TYPES, tarfile.XGLTYPE, *_GNU_LONG_TYPES)
_REFUSED_TYPES = {
    tarfile.CHRTYPE: "a character device node",
    tarfile.BLKTYPE: "a block device node",
    tarfile.FIFOTYPE: "a FIFO",
    tarfile.GNUTYPE_SPARSE: "a sparse file",
}


class Source:
    """The decompressed tar stream, read forward once. Raises only LazymountError.

    Every byte read is also kept until ``passed`` hands it on: extraction passes the bytes
    of a member to the writer only once the member has been checked. What is kept is one
    view per chunk (reads are consecutive), not one per read."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._chunk = memoryview(b"")
        self._pos = 0  # next byte of _chunk to read
        self._mark = 0  # first byte of _chunk not yet passed on
        self._kept: list[memoryview] = []  # read, not yet passed on, of earlier chunks
        self._kept_bytes = 0
        self._before = 0  # bytes of the chunks before this one

    @property
    def position(self) -> int:
        """Bytes read so far: the offset in the tar of the next byte ``read`` gives."""
        return self._before + self._pos

    @property
    def kept_bytes(self) -> int:
        """Bytes read and not yet passed on."""
        return self._kept_bytes + self._pos - self._mark

    def passed(self) -> list[memoryview]:
        """The bytes read since the last call, in order (and forgotten here)."""
        kept = self._kept
        if self._pos > self._mark:
            kept.append(self._chunk[self._mark:self._pos])
        self._kept, self._kept_bytes, self._mark = [], 0, self._pos
        return kept

    def _refill(self) -> bool:
        if self._pos > self._mark:
            self._kept.append(self._chunk[self._mark:self._pos])
            self._kept_bytes += self._pos - self._mark
        try:
            chunk = next(self._chunks, b"")
        except Trailing as fault:  # bytes outside what was checked: refuse, not ignore
            raise UnsafeArchiveError(f"{fault.reason}") from None
        except Fault as fault:
            raise FormatError(f"{fault.reason}") from None
        except OSError as exc:
            raise StoreError(f"cannot read the tarball ({exc})") from None
        self._before += len(self._chunk)
        self._chunk, self._pos, self._mark = memoryview(chunk), 0, 0
        return bool(chunk)

    def read(self, n: int) -> memoryview:
        """Up to ``n`` bytes (a view); empty only at the end."""
        if self._pos == len(self._chunk) and not self._refill():
            return self._chunk[:0]
        start = self._pos
        self._pos = min(start + n, len(self._chunk))
        return self._chunk[start:self._pos]

    def read_exact(self, n: int, inside: str) -> bytes:
        """Exactly ``n`` bytes, or FormatError saying the archive ends inside ``inside``."""
        parts = []
        while n:
            view = self.read(n)
            if not view:
                raise FormatError(f"tarball is truncated (ends inside {inside})")
            parts.append(view)
            n -= len(view)
        return b"".join(parts)

    def drain(self) -> None:
        """Read past the end-of-archive block: only zero padding may follow, then the end."""
        seen = 0
        while view := self.read(CHUNK):
            seen += len(view)
            if seen > MAX_TRAILING_ZEROS or view.tobytes().count(0) != len(view):
                raise UnsafeArchiveError(
                    "trailing data after the end of the tar archive"
                )


# ---------------------------------------------------------------------------------------------
# Tar headers


MemberKind = Literal["file", "dir", "symlink", "hardlink"]


@dataclass
class Member:
    name: str
    kind: MemberKind
    mode: int
    size: int
    linkname: str


def show(name: str) -> str:
    """A member name fit for a one-line message."""
    return repr(name if len(name) <= 160 else name[:160] + "...")


def unsafe(name: str, reason: str) -> UnsafeArchiveError:
    """A member refused for ``reason``."""
    return UnsafeArchiveError(f"tarball member {show(name)} {reason}; refused")


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _parse_pax(body: bytes) -> dict[str, str]:
    """The ``"<length> <key>=<value>\\n"`` records of a pax extended header."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(body) and body[pos] != 0:  # tolerate NUL padding at the end
        space = body.find(b" ", pos)
        digits = body[pos:space] if space > 0 else b""
        end = pos + int(digits) if digits.isdigit() else -1
        if end <= space + 1 or end > len(body) or body[end - 1] != 0x0A:
            raise FormatError("malformed pax extended header")
        key, equals, value = body[space + 1 : end - 1].partition(b"=")
        if not equals:
            raise FormatError("malformed pax extended header")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos = end
    return records


@dataclass
class Header:
    """The fields of one 512-byte tar header that extraction uses."""

    name: str
    linkname: str
    type: bytes
    mode: int
    size: int


# name, mode, uid, gid, size, mtime, chksum, typeflag, linkname, magic+version, uname, gname,
# devmajor, devminor, prefix (POSIX ustar, which GNU tar and Python's tarfile write)
_USTAR = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s12x")
_GNU_TYPES = (*_GNU_LONG_TYPES, tarfile.GNUTYPE_SPARSE)


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


# An octal field as tar writers fill it: optional blanks, digits, optional blanks, then NUL
# and anything (ignored). Blanks are what str.strip() removes from ASCII text.
_OCTAL = re.compile(rb"[ \t\n\x0b\x0c\r\x1c-\x1f]*([0-7]*)[ \t\n\x0b\x0c\r\x1c-\x1f]*(?:\0.*)?",
                    re.DOTALL)


# mode, uid, gid, size, mtime and checksum (bytes 100-156) and the device numbers (329-345) in
# the form GNU tar and Python's tarfile write them: the fast path of parse_header
_WRITTEN = re.compile(rb"[0-7]{7}\0[0-7]{7}\0[0-7]{7}\0[0-7]{11}\0[0-7]{11}\0[0-7]{6}\0 ")
_DEVICES = re.compile(rb"(?:[0-7]{7}\0|\0{8}){2}")


def _number(field: bytes) -> int:
    """An octal number, or GNU's base-256 for values that do not fit (first byte 0x80/0xff).
    HeaderError if it is neither."""
    head = field.split(b"\0", 1)[0]
    if head.isdigit():  # what tar writers write: octal digits, then NUL (8 or 9: below)
        try:
            return int(head, 8)
        except ValueError:
            pass
    usual = _OCTAL.fullmatch(field)
    if usual is not None:
        return int(usual[1] or b"0", 8)
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value - (256 ** (len(field) - 1)) if field[0] == 0xFF else value
    try:
        digits = field.split(b"\0", 1)[0].decode("ascii").strip()
        return int(digits or "0", 8)
    except ValueError:  # UnicodeDecodeError included
        raise tarfile.HeaderError("invalid header") from None


def parse_header(block: bytes) -> Header:
    """Parse one header block as ``tarfile.TarInfo.frombuf`` would, for the fields we use,
    at a fraction of its cost (it dominated extraction of packages with many small files).
    Raises ``tarfile.HeaderError`` for a block that is not a valid header."""
    (name, mode_field, uid, gid, size_field, mtime, chksum, kind, linkname, _magic, _uname,
     _gname, major, minor, prefix) = _USTAR.unpack(block)
    if _WRITTEN.match(block, 100) and _DEVICES.match(block, 329):
        # every number field as tar writers write them: read the three we use directly
        stored, mode, size = int(chksum[:6], 8), int(mode_field[:7], 8), int(size_field[:11], 8)
    else:
        stored, mode, size = _number(chksum), _number(mode_field), _number(size_field)
        for unused in (uid, gid, mtime, major, minor):  # tarfile refuses a header if one is bad
            _number(unused)
    unsigned = _byte_sum(block) - sum(block[148:156]) + 256
    if stored != unsigned and stored != _signed_checksum(block):
        raise tarfile.HeaderError("bad checksum")
    header = Header(_text(name), _text(linkname), kind, mode, size)
    if header.type == tarfile.AREGTYPE and header.name.endswith("/"):
        header.type = tarfile.DIRTYPE  # old V7 tar's directories
    if header.type == tarfile.DIRTYPE:
        header.name = header.name.rstrip("/")
    if prefix[:1] != b"\0" and header.type not in _GNU_TYPES:  # ustar's long names
        header.name = _text(prefix) + "/" + header.name
    return header


def _byte_sum(block: bytes) -> int:
    """sum(block) of a 512-byte block, in C: Adler-32's low half is 1 + the byte sum modulo
    65521, exact for each 256-byte half (at most 65,280)."""
    view = memoryview(block)
    return (zlib.adler32(view[:256]) & 0xFFFF) + (zlib.adler32(view[256:]) & 0xFFFF) - 2


def _signed_checksum(block: bytes) -> int:
    """The checksum some old tars wrote, summing the bytes as signed chars."""
    signed: tuple[int, ...] = struct.unpack_from("148b8x356b", block)
    return 256 + sum(signed)


def _member_kind(info: Header, name: str) -> MemberKind:
    if info.type in _FILE_TYPES:
        return "file"
    kinds: dict[bytes, MemberKind] = {
        tarfile.DIRTYPE: "dir",
        tarfile.SYMTYPE: "symlink",
        tarfile.LNKTYPE: "hardlink",
    }
    kind = kinds.get(info.type)
    if kind is None:
        reason = _REFUSED_TYPES.get(info.type, f"of unsupported type {info.type!r}")
        raise unsafe(name, f"is {reason}")
    return kind


class _Overrides:
    """Extended headers (pax, GNU long name/link) waiting for the member they describe."""

    def __init__(self) -> None:
        self.pax: dict[str, str] = {}
        self.longname: str | None = None
        self.longlink: str | None = None
        self.run = 0
        self.total = 0

    def take(self, info: Header, src: Source, limits: Limits) -> None:
        """Read the body of the extended header ``info`` and remember what it sets."""
        self.run += 1
        self.total += info.size
        if self.run > MAX_EXTENDED_RUN or info.size > MAX_EXTENDED_HEADER:
            raise UnsafeArchiveError("oversized or repeated tar extended headers")
        if self.total > limits.max_bytes:
            raise UnsafeArchiveError("tar extended headers exceed the size limit")
        body = src.read_exact(_padded(info.size), "a tar extended header")[: info.size]
        if info.type in _PAX_TYPES:
            self.pax.update(_parse_pax(body))
        elif info.type == tarfile.XGLTYPE:
            self._check_global(_parse_pax(body))
        else:  # GNU: the body is a NUL-terminated name
            text = body.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if info.type == tarfile.GNUTYPE_LONGNAME:
                self.longname = text
            else:
                self.longlink = text

    def _check_global(self, records: dict[str, str]) -> None:
        # a global path/size would apply to every later member: nobody writes that legitimately
        for key in ("path", "linkpath", "size"):
            if key in records:
                raise FormatError(f"a global pax header sets {key!r}; refused")

    def member(self, info: Header) -> Member:
        """The member ``info`` describes, with the pending overrides applied (then cleared)."""
        pax = self.pax
        name = pax.get("path", self.longname if self.longname is not None else info.name)
        linkname = pax.get(
            "linkpath", self.longlink if self.longlink is not None else info.linkname
        )
        if any(key.startswith("GNU.sparse.") for key in pax):
            raise unsafe(name, "is a sparse file")
        size = info.size
        if "size" in pax:
            if not (pax["size"].isascii() and pax["size"].isdigit()):
                raise FormatError(f"bad pax size for member {show(name)}")
            size = int(pax["size"])
        self.pax, self.longname, self.longlink, self.run = {}, None, None, 0
        kind = _member_kind(info, name)
        if kind == "dir" and name != "/":
            name = name.rstrip("/")
        if kind != "file" and size:
            raise FormatError(f"{kind} member {show(name)} carries data")
        return Member(name, kind, info.mode, size, linkname)


def members(src: Source, limits: Limits) -> Iterator[Member]:
    """Yield each member of the tar stream up to the end-of-archive block.

    The consumer must read a file member's ``size`` data bytes before asking for the next one.
    Raises FormatError for a malformed stream, UnsafeArchiveError past ``max_members``.
    """
    overrides = _Overrides()
    count = 0
    while True:
        header = src.read_exact(BLOCK, "a tar header")
        if header == ZERO_BLOCK:
            return
        try:
            info = parse_header(header)
        except tarfile.HeaderError as exc:
            raise FormatError(f"bad tar header ({exc})") from None
        if info.type in _EXTENDED_TYPES:
            overrides.take(info, src, limits)
            continue
        count += 1
        if count > limits.max_members:
            raise UnsafeArchiveError(f"tarball has more than {limits.max_members} members")
        member = overrides.member(info)
        yield member
        src.read_exact(_padded(member.size) - member.size, "a member's padding")
