"""The fast path of ``index.scan_index``: the index document decoded with msgspec.

A Spack database of 100,000 specs is about 120 MB of JSON, most of it fields lazymount never
reads (target features, variants, package hashes). The document is decoded twice over by
msgspec, both times in C: first ``installs`` as a mapping of raw entries (only the structure is
checked), then each entry with typed schemas that declare just the fields that place and fetch
a spec, so that every other field is skipped without building a Python object.

The schemas accept only what the json-module parser (``index.check_record``) accepts, and give
the same values: an entry they refuse (a field of an unexpected type) goes to that parser,
which keeps it or drops it with its own warning. A document msgspec refuses as a whole (not
JSON as msgspec reads it, or nested too deeply) is left to the json-module scanner: ``decode``
returns None for it.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
from msgspec import UNSET, Raw, Struct, UnsetType

# one member of a mapping after the previous value: its key (without escapes) and the colon
_MEMBER = re.compile(rb'[ \t\n\r]*,[ \t\n\r]*"([^"\\]*)"[ \t\n\r]*:[ \t\n\r]*')
_COLON = re.compile(rb'[ \t\n\r]*:[ \t\n\r]*')
_CLOSE = re.compile(rb'[ \t\n\r]*}')


class _Mapping(Struct, gc=False):
    """Any JSON object, whose members are skipped."""


class _Target(Struct, frozen=True, gc=False):
    name: str = ""


class _Arch(Struct, frozen=True, gc=False):  # hashable: records share placing fields
    platform: str = ""
    platform_os: str = ""
    target: str | _Target = ""


class _External(Struct, gc=False):
    path: Any = None


class _EdgeParameters(Struct, gc=False):
    deptypes: Any = None
    virtuals: Any = None


class _Edge(Struct, gc=False):
    name: Any = None
    hash: Any = None
    parameters: _EdgeParameters | None = None
    type: Any = None


class _Annotations(Struct, gc=False):
    compiler: Any = UNSET


class Node(Struct, gc=False):
    """The fields of a spec node that place and fetch it (others are skipped)."""

    name: Any = None
    version: Any = None
    hash: Any = UNSET
    namespace: str | UnsetType = UNSET
    arch: _Arch | None = None
    compiler: dict[str, Any] | None = None
    external: _External | None = None
    parameters: _Mapping | None = None
    dependencies: list[_Edge] | None = None
    annotations: _Annotations | None = None


class Entry(Struct, gc=False):
    """One value of ``installs``."""

    spec: Node
    ref_count: Any = 0
    in_buildcache: Any = False


class _Database(Struct, gc=False):
    version: Any = None
    installs: dict[str, Raw] | None = None


class _Document(Struct, gc=False):
    database: _Database | None = None


_document = msgspec.json.Decoder(_Document)
entry_decoder = msgspec.json.Decoder(Entry)

# one raw entry: its key, its text and the byte offsets of that text in the document
RawEntry = tuple[str, Raw, int, int]


def decode(blob: bytes) -> tuple[Any, list[RawEntry] | None] | None:
    """(database version, raw entries in document order, or None if the document has no
    installs), or None if msgspec cannot read the document or find its entries' offsets."""
    try:
        database = _document.decode(blob).database
    except (msgspec.DecodeError, RecursionError):
        return None
    if database is None or database.installs is None:
        return (database.version if database is not None else None), None
    entries = _located(blob, database.installs)
    return (database.version, entries) if entries is not None else None


def _located(blob: bytes, installs: dict[str, Raw]) -> list[RawEntry] | None:
    """The entries of ``installs`` with their byte offsets in ``blob``, or None if they
    cannot be told for sure (a key written with escapes, a key given twice).

    The walk goes member by member from the first key to the closing brace: each key must
    come right after the previous value and a comma, and the text found there must be the
    value decoded, so every span holds exactly the bytes of its entry."""
    entries: list[RawEntry] = []
    position = 0
    startswith = blob.startswith
    for key, raw in installs.items():
        encoded = key.encode()
        if startswith(b',"' + encoded + b'":', position):  # compact JSON, as Spack writes it
            start = position + len(encoded) + 4
        else:
            start = _key_end(blob, position, encoded, first=not entries)
            if start < 0:
                return None
        end = start + len(raw)
        if not startswith(raw, start):
            return None
        entries.append((key, raw, start, end))
        position = end
    return entries if _CLOSE.match(blob, position) else None


def _key_end(blob: bytes, position: int, key: bytes, first: bool) -> int:
    """Where the value of ``key`` starts: the next member at ``position`` (or, for the
    first, the key's first place in the document); -1 if it is not there."""
    if first:
        found = blob.find(b'"' + key + b'"')
        matched = _COLON.match(blob, found + len(key) + 2) if found >= 0 else None
    else:
        matched = _MEMBER.match(blob, position)
        if matched is not None and matched.group(1) != key:
            matched = None
    return matched.end() if matched is not None else -1
