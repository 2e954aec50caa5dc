"""Where an ELF file keeps the paths that relocation edits in place: RPATH/RUNPATH and PT_INTERP.

The only module that imports pyelftools. It reads, never writes: ``relocate`` does the writing,
so this module stays a pure parser. A file this parser cannot make sense of is "not an ELF
file we edit" (``None``), as in Spack's ``util/elf.py``, which skips ELF files it cannot parse.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

from elftools.common.exceptions import ELFError
from elftools.construct.core import ConstructError
from elftools.elf.elffile import ELFFile

MAGIC = b"\x7fELF"

# a dynamic string longer than this is treated as malformed (no NUL found)
_MAX_CSTRING = 1 << 20


class _Unusable(Exception):
    """The file is ELF but not one whose paths can be edited (Spack: ElfParsingError)."""


_PARSE_ERRORS = (ELFError, ConstructError, struct.error, ValueError, EOFError, IndexError,
                 KeyError, AssertionError, _Unusable)


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
    """Locate RPATH/RUNPATH and PT_INTERP in an executable or shared library.

    Input: a file opened for binary reading, positioned anywhere (the ELF magic should already
    have been checked by the caller, so non-ELF files never reach pyelftools).
    Output: the strings with their file offsets, or ``None`` when the file is not an ET_EXEC or
    ET_DYN ELF file this parser can read, or its dynamic section is ambiguous (several
    RPATH/RUNPATH entries, not exactly one DT_STRTAB) — such files are left alone, as Spack does.
    Errors: ``OSError`` from reading only. Thread: any; uses only ``f``.
    """
    try:
        return _read(f)
    except _PARSE_ERRORS:
        return None


def _read(f: BinaryIO) -> ElfPaths | None:
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


def _rpath(f: BinaryIO, elf: ELFFile, dynamic) -> CString | None:
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
    table = next(elf.address_offsets(strtabs[0]), None)
    if table is None:
        raise _Unusable("DT_STRTAB is not in a loaded segment")
    room = _MAX_CSTRING if strsz is None else strsz - rpaths[0]
    if room <= 0:
        raise _Unusable("RPATH offset is past the string table")
    return _cstring(f, table + rpaths[0], room)


def _cstring(f: BinaryIO, offset: int, room: int) -> CString:
    """The C string at ``offset``, which must end within ``room`` bytes."""
    f.seek(offset)
    data = f.read(min(room, _MAX_CSTRING))
    end = data.find(b"\0")
    if end < 0:
        raise _Unusable("C string is not NUL-terminated")
    return CString(offset=offset, value=data[:end])
