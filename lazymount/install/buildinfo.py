"""Parsing and checking ``.spack/binary_distribution``, the last member of a Spack tarball."""

from __future__ import annotations

import posixpath
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lazymount.errors import FormatError, about
from lazymount.system import yamlio

BUILDINFO = ".spack/binary_distribution"
MAX_BUILDINFO_BYTES = 1 << 20

_LISTS = ("relocate_binaries", "relocate_links", "relocate_textfiles")

# A value quoted in an error message: a few levels and items of it, never its whole repr
# (the value of a hostile build info can be huge; building its repr holds the GIL)
_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxdict = 2, 4, 4
_SHOWN.maxstring, _SHOWN.maxother = 200, 80


@dataclass(frozen=True)
class BuildInfo:
    """One package's ``.spack/binary_distribution``. Made by ``parse_buildinfo``, which checks
    every field once: the code that reads one trusts it."""

    buildpath: str  # the build's install root: absolute, no ".."
    sbang_install_path: str | None = None  # absolute, no ".."
    relative_prefix: str = ""  # the package's prefix under ``buildpath``; "" if not given
    # {dag hash: absolute build-time prefix}, the package's own and its dependencies'
    hash_to_prefix: Mapping[str, str] = field(default_factory=dict)
    # prefix-relative paths that stay inside the prefix
    relocate_binaries: tuple[str, ...] = ()
    relocate_links: tuple[str, ...] = ()
    relocate_textfiles: tuple[str, ...] = ()
    hardlinks_deduped: bool = False  # False: a hard-linked file may be listed under each name


def parse_buildinfo(text: bytes, what: str) -> BuildInfo:
    """Parse and validate ``.spack/binary_distribution`` (a one-line YAML flow mapping).

    ``hash_to_prefix`` comes from ``prefix_to_hash`` in old caches; missing optional keys are
    empty. Raises FormatError naming ``what``. Pure; any thread.
    """
    with about(what):
        return _parse(text)


def _parse(text: bytes) -> BuildInfo:
    if len(text) > MAX_BUILDINFO_BYTES:
        raise FormatError(f"{BUILDINFO} is larger than {MAX_BUILDINFO_BYTES} bytes")
    try:
        doc = yamlio.safe_load(text)
    except yamlio.YamlError as exc:
        reason = " ".join(str(exc).split())[:200]
        raise FormatError(f"{BUILDINFO} is not valid YAML ({reason})") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{BUILDINFO} is not a mapping")
    sbang = doc.get("sbang_install_path")
    relative_prefix = doc.get("relative_prefix") or ""
    deduped = doc.get("hardlinks_deduped")
    deduped = False if deduped is None else deduped
    if not isinstance(deduped, bool):
        raise FormatError(f"{BUILDINFO}: hardlinks_deduped is not a boolean")
    # checked in the order of the fields: the first bad one is the one an error names
    sbang = None if sbang is None else _abs(sbang, "sbang_install_path")
    buildpath = _abs(doc.get("buildpath"), "buildpath")
    relative_prefix = relative_prefix and _rel(relative_prefix, "relative_prefix")
    hash_to_prefix = _hash_to_prefix(doc)
    lists = {}
    for key in _LISTS:
        entries = doc.get(key) or []
        if not isinstance(entries, list):
            raise FormatError(f"{BUILDINFO}: {key} is not a list")
        lists[key] = tuple(_rel(entry, key) for entry in entries)
    return BuildInfo(buildpath, sbang, relative_prefix, hash_to_prefix,
                     lists["relocate_binaries"], lists["relocate_links"],
                     lists["relocate_textfiles"], deduped)


def check_build_prefix(info: BuildInfo, build_prefix: str, what: str) -> None:
    """Refuse a buildinfo whose install root cannot be the tarball's: relocation maps paths
    under ``buildpath`` and ``relative_prefix``, so they must describe where the members are.

    ``build_prefix``: the absolute prefix the tarball's members hold. Raises FormatError
    naming ``what``.
    """
    with about(what):
        _check_build_prefix(info, build_prefix)


def _check_build_prefix(info: BuildInfo, build_prefix: str) -> None:
    root = info.buildpath.rstrip("/")
    if not root:  # "/" would make every absolute path of the package a build path
        raise FormatError(f"{BUILDINFO}: buildpath '/' is not a usable install root")
    claimed = posixpath.normpath(posixpath.join(root, info.relative_prefix))
    if info.relative_prefix and claimed != posixpath.normpath(build_prefix):
        raise FormatError(f"{BUILDINFO} says the prefix is {claimed[:200]!r}, but the "
                          f"tarball holds {build_prefix[:200]!r}")


def _abs(value: object, key: str) -> str:
    """``value`` as an absolute, '..'-free path string, else FormatError."""
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise FormatError(f"{BUILDINFO}: {key} {_shown(value)} is not an absolute path")
    if ".." in value.split("/"):
        raise FormatError(f"{BUILDINFO}: {key} {_shown(value)} contains '..'")
    return value


def _rel(value: object, key: str) -> str:
    """``value`` as a relative path that stays inside the prefix, else FormatError."""
    if not isinstance(value, str) or not value or value.startswith("/") or "\0" in value:
        raise FormatError(f"{BUILDINFO}: {key} entry {_shown(value)} is not a "
                          f"relative path")
    if ".." in value.split("/"):
        raise FormatError(f"{BUILDINFO}: {key} entry {_shown(value)} leaves the prefix")
    return value


def _shown(value: object) -> str:
    return _SHOWN.repr(value)


def _hash_to_prefix(doc: dict[Any, Any]) -> dict[str, str]:
    """hash -> build-time prefix; inverts ``prefix_to_hash`` (Spack <= 0.19)."""
    if doc.get("hash_to_prefix") is not None:
        mapping, inverted = doc["hash_to_prefix"], False
    else:
        mapping, inverted = doc.get("prefix_to_hash") or {}, True
    if not isinstance(mapping, dict):
        raise FormatError(f"{BUILDINFO}: hash_to_prefix is not a mapping")
    result = {}
    for key, value in mapping.items():
        dag_hash, prefix = (value, key) if inverted else (key, value)
        if not isinstance(dag_hash, str) or not dag_hash:
            raise FormatError(f"{BUILDINFO}: hash {_shown(dag_hash)} is not a string")
        result[dag_hash] = _abs(prefix, f"prefix of {dag_hash}")
    return result
