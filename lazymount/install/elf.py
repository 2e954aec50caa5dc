"""Where an ELF file keeps the paths that relocation edits in place: RPATH/RUNPATH and PT_INTERP.

The only module that imports pyelftools. It reads, never writes: ``relocate`` does the writing,
so this module stays a pure parser. A file this parser cannot make sense of is "not an ELF
file we edit" (``None``), as in Spack's ``util/elf.py``, which skips ELF files it cannot parse.

64-bit little-endian files (x86_64, aarch64, ppc64le: every Linux target Spack builds for in
practice) are read with ``struct`` from the three tables that matter (header, program headers,
dynamic array): building a pyelftools ``ELFFile`` and its segments costs ~1.5 ms a file, which
was most of the relocation time of a package with hundreds of libraries. Other ELF files go
through pyelftools; the tests check that both readers agree.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    from elftools.elf.elffile import ELFFile

MAGIC = b"\x7fELF"

# a dynamic string longer than this is treated as malformed (no NUL found)
_MAX_CSTRING = 1 << 20


class _Unusable(Exception):
    """The file is ELF but not one whose paths can be edited (Spack: ElfParsingError)."""


# OverflowError: an offset too large to seek to (found by the damaged-header tests); with
# pyelftools' own ELFError and ConstructError, added where it is imported
_PARSE_ERRORS = (struct.error, ValueError, EOFError, IndexError, KeyError, AssertionError,
                 OverflowError, _Unusable)


@dataclass(frozen=True)
class CString:
    """A NUL-terminated string in the file: where its first byte is, and its bytes without NUL."""

    offset: int
    value: bytes


@dataclass(frozen=True)
class ElfPaths:
    """The editable path strings of one ELF file; ``None`` where the file has none."""

    rpath: CString | None  # the one DT_RPATH or DT_RUNPATH string
    interp: CString | None  # PT_INTERP


def read_elf_paths(f: BinaryIO) -> ElfPaths | None:
    """Like ``read_elf_paths_pyelftools``, quickly for 64-bit little-endian files."""
    f.seek(0)
    ident = f.read(6)
    if ident[:4] == MAGIC and ident[4:6] == b"\x02\x01":  # ELFCLASS64, ELFDATA2LSB
        try:
            return _read64le(f)
        except (_Unusable, struct.error, OverflowError):
            return None
    return read_elf_paths_pyelftools(f)


def read_elf_paths_pyelftools(f: BinaryIO) -> ElfPaths | None:
    """Locate RPATH/RUNPATH and PT_INTERP in an executable or shared library.

    Input: a file opened for binary reading, positioned anywhere (the ELF magic should already
    have been checked by the caller, so non-ELF files never reach pyelftools).
    Output: the strings with their file offsets, or ``None`` when the file is not an ET_EXEC or
    ET_DYN ELF file this parser can read, or its dynamic section is ambiguous (several
    RPATH/RUNPATH entries, not exactly one DT_STRTAB) — such files are left alone, as Spack does.
    Errors: ``OSError`` from reading only. Thread: any; uses only ``f``.
    """
    # pyelftools is imported on first use: most packages never need it (see above), and a
    # daemon that never reads such a file neither waits for the import nor holds its modules
    from elftools.common.exceptions import ELFError
    from elftools.construct.core import ConstructError

    try:
        return _read(f)
    except (ELFError, ConstructError, *_PARSE_ERRORS):
        return None


def _read(f: BinaryIO) -> ElfPaths | None:
    from elftools.elf.elffile import ELFFile

    f.seek(0)
    elf = ELFFile(f)
    if elf["e_type"] not in ("ET_EXEC", "ET_DYN"):
        return None
    interp = dynamic = None
    has_load = False
    for seg in elf.iter_segments():
        if seg["p_filesz"] == 0:  # an empty segment counts as absent, as in Spack
            continue
        kind = seg["p_type"]
        if kind == "PT_LOAD":
            has_load = True
        elif kind == "PT_INTERP":
            interp = seg
        elif kind == "PT_DYNAMIC":
            dynamic = seg
    interp_str = None
    if interp is not None:
        interp_str = _cstring(f, interp["p_offset"], interp["p_filesz"])
    rpath = _rpath(f, elf, dynamic) if dynamic is not None and has_load else None
    return ElfPaths(rpath=rpath, interp=interp_str)


def _rpath(f: BinaryIO, elf: ELFFile, dynamic: Any) -> CString | None:
    """The RPATH/RUNPATH string; raises _Unusable when the dynamic array is ambiguous."""
    limit = dynamic["p_filesz"] // elf.structs.Elf_Dyn.sizeof()  # never read past the segment
    rpaths: list[int] = []
    strtabs: list[int] = []
    strsz = None
    for _, tag in zip(range(limit), dynamic.iter_tags(), strict=False):
        name = tag.entry.d_tag
        if name in ("DT_RPATH", "DT_RUNPATH"):
            rpaths.append(tag.entry.d_val)
        elif name == "DT_STRTAB":
            strtabs.append(tag.entry.d_ptr)
        elif name == "DT_STRSZ":
            strsz = tag.entry.d_val
    if len(rpaths) > 1 or len(strtabs) != 1:
        raise _Unusable("no unique RPATH/RUNPATH or DT_STRTAB")
    if not rpaths:
        return None
    return _rpath_at(f, next(elf.address_offsets(strtabs[0]), None), rpaths[0], strsz)


_EHDR64 = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR64 = struct.Struct("<IIQQQQQQ")
_DYN64 = struct.Struct("<qQ")
_ET_EXEC, _ET_DYN = 2, 3
_PT_LOAD, _PT_DYNAMIC, _PT_INTERP = 1, 2, 3
_DT_NULL, _DT_STRTAB, _DT_STRSZ, _DT_RPATH, _DT_RUNPATH = 0, 5, 10, 15, 29
_MAX_PHDRS = 1 << 16


def _exact(f: BinaryIO, offset: int, size: int) -> bytes:
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise _Unusable("table runs past the end of the file")
    return data


def _read64le(f: BinaryIO) -> ElfPaths | None:
    """The struct reader: same answers as pyelftools' for the same file."""
    header = _EHDR64.unpack(_exact(f, 0, _EHDR64.size))
    e_type, phoff, phentsize, phnum = header[1], header[5], header[9], header[10]
    if e_type not in (_ET_EXEC, _ET_DYN):
        return None
    if phnum and (phentsize < _PHDR64.size or phnum > _MAX_PHDRS):
        raise _Unusable("unexpected program header size")
    table = _exact(f, phoff, phentsize * phnum)
    loads: list[tuple[int, int, int]] = []  # (vaddr, filesz, offset) of every PT_LOAD
    interp = dynamic = None
    has_load = False
    for i in range(phnum):
        kind, _, offset, vaddr, _, filesz, _, _ = _PHDR64.unpack_from(table, i * phentsize)
        if kind == _PT_LOAD:
            loads.append((vaddr, filesz, offset))
        if filesz == 0:  # an empty segment counts as absent, as in Spack
            continue
        if kind == _PT_LOAD:
            has_load = True
        elif kind == _PT_INTERP:
            interp = (offset, filesz)
        elif kind == _PT_DYNAMIC:
            dynamic = (offset, filesz)
    interp_str = _cstring(f, *interp) if interp is not None else None
    rpath = _rpath64le(f, dynamic, loads) if dynamic is not None and has_load else None
    return ElfPaths(rpath=rpath, interp=interp_str)


def _rpath64le(f: BinaryIO, dynamic: tuple[int, int],
               loads: list[tuple[int, int, int]]) -> CString | None:
    offset, filesz = dynamic
    rpaths: list[int] = []
    strtabs: list[int] = []
    strsz = None
    for i in range(filesz // _DYN64.size):  # never past the segment; stops after DT_NULL
        tag, value = _DYN64.unpack(_exact(f, offset + i * _DYN64.size, _DYN64.size))
        if tag in (_DT_RPATH, _DT_RUNPATH):
            rpaths.append(value)
        elif tag == _DT_STRTAB:
            strtabs.append(value)
        elif tag == _DT_STRSZ:
            strsz = value
        elif tag == _DT_NULL:
            break
    if len(rpaths) > 1 or len(strtabs) != 1:
        raise _Unusable("no unique RPATH/RUNPATH or DT_STRTAB")
    if not rpaths:
        return None
    address = strtabs[0]
    table = next((address - vaddr + seg_offset for vaddr, size, seg_offset in loads
                  if vaddr <= address and address + 1 <= vaddr + size), None)
    return _rpath_at(f, table, rpaths[0], strsz)


def _rpath_at(f: BinaryIO, table: int | None, offset: int, strsz: int | None) -> CString:
    """The RPATH string at ``offset`` in the string table at file offset ``table`` (None:
    the table is in no loaded segment) of ``strsz`` bytes (None: unknown)."""
    if table is None:
        raise _Unusable("DT_STRTAB is not in a loaded segment")
    room = _MAX_CSTRING if strsz is None else strsz - offset
    if room <= 0:
        raise _Unusable("RPATH offset is past the string table")
    return _cstring(f, table + offset, room)


def _cstring(f: BinaryIO, offset: int, room: int) -> CString:
    """The C string at ``offset``, which must end within ``room`` bytes."""
    f.seek(offset)
    data = f.read(min(room, _MAX_CSTRING))
    end = data.find(b"\0")
    if end < 0:
        raise _Unusable("C string is not NUL-terminated")
    return CString(offset=offset, value=data[:end])
