"""Which build-cache layout a mirror has, and how each layout is read.

Two layouts exist (SPACK-FORMAT §3 and §8):

* **v3** (Spack >= 1.0): an unsigned index manifest points at a DB v8 index blob; each spec has
  a signed manifest listing typed, checksummed blobs (the tarball and the spec JSON).
* **v2** (Spack <= 0.23): ``build_cache/index.json`` (DB v7); each spec has a signed spec file
  (``<arch>-<compiler>-<cver>-<name>-<ver>-<hash>.spec.json.sig``, ``.spec.json`` when unsigned)
  holding the spec *and* the tarball's sha256, and a ``.spack`` tarball at
  ``build_cache/<arch>/<compiler>-<cver>/<name>-<ver>/<same stem>.spack``. No length is signed.

A mirror migrated with ``spack buildcache migrate`` has both; v3 is used, as Spack does.

For the materializer, a layout answers one question: what do the signed documents of a spec say
— the tarball's blob record and the spec's root node (an ``Entry``). Checking a signature is
the caller's job (``Unsign``), so this module never runs gpg; binding the root node to the hash
that was asked for is also the caller's. Everything here runs on the trio thread.
"""

from __future__ import annotations

import json
import re
import weakref
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .errors import FormatError, IntegrityError, MirrorError, NotInMirror
from .fetch import fetch_bytes
from .index import SpecRecord
from .layout import (
    INDEX_MANIFEST,
    MEDIA_INDEX,
    MEDIA_SPEC,
    MEDIA_TARBALL,
    V2_INDEX,
    spec_manifest_path,
    v2_spec_file_path,
    v2_tarball_path,
)
from .manifest import MAX_MANIFEST_BYTES, BlobRecord, parse_manifest, pick
from .transport import Mirror

MAX_INDEX_BYTES = 2 << 30
MAX_SPEC_BLOB = 64 << 20  # compressed spec JSON; real ones are a few KiB
MAX_SPEC_JSON = 256 << 20  # expanded spec JSON (v3 blob or v2 spec file)
V2_SPEC_LAYOUTS = (1, 2)  # buildcache_layout_version of v2 spec files whose .spack we can read

_HEX64 = re.compile(r"[0-9a-f]{64}")

Unsign = Callable[[bytes, str], Awaitable[bytes]]
"""``unsign(document, noun)``: the plaintext of a fetched document that a trusted signature
covers (or the document itself where the mirror allows unsigned ones); raises SignatureError.
``noun`` says what it is ("manifest", "spec file") for messages."""


@dataclass(frozen=True)
class Entry:
    """What the signed documents of one spec say."""

    tarball: BlobRecord  # where the tarball is, its sha256 and (v3 only) its length
    root: dict[str, Any]  # the first node of the signed spec: must be the spec asked for
    signed: str  # what carried the signature, for messages: "manifest" or "spec file"


class CacheLayout:
    """One layout: how to find the index and a spec's entry. Stateless; shared by mirrors."""

    version: int = 0
    index_path: str = ""  # the file whose presence tells this layout

    async def read_index(self, mirror: Mirror) -> bytes:
        """The index document (Spack database JSON) of a mirror of this layout."""
        raise NotImplementedError

    async def read_entry(
        self, mirror: Mirror, record: SpecRecord, unsign: Unsign, label: str
    ) -> Entry:
        """The verified entry of ``record``. Raises NotInMirror, MirrorError, SignatureError,
        FormatError or IntegrityError naming ``label``."""
        raise NotImplementedError


class LayoutV3(CacheLayout):
    """Spack >= 1.0: manifests and content-addressed blobs."""

    version = 3
    index_path = INDEX_MANIFEST

    async def read_index(self, mirror: Mirror) -> bytes:
        what = f"index of {mirror.url}"
        text = await mirror.read(INDEX_MANIFEST, MAX_MANIFEST_BYTES)
        record = pick(parse_manifest(text, what), MEDIA_INDEX, what)
        if record.compression != "none":
            raise MirrorError(f"{what}: unsupported index compression {record.compression!r}")
        return await fetch_bytes(mirror, record, what, MAX_INDEX_BYTES)

    async def read_entry(
        self, mirror: Mirror, record: SpecRecord, unsign: Unsign, label: str
    ) -> Entry:
        path = spec_manifest_path(record.name, record.version, record.dag_hash)
        text = await mirror.read(path, MAX_MANIFEST_BYTES)
        blobs = parse_manifest(await unsign(text, "manifest"), label)
        tarball = pick(blobs, MEDIA_TARBALL, label)
        spec = pick(blobs, MEDIA_SPEC, label)
        raw = await fetch_bytes(mirror, spec, label, MAX_SPEC_BLOB)
        if spec.compression == "gzip":
            raw = gunzip_bounded(raw, MAX_SPEC_JSON, f"{label}: spec blob")
        elif spec.compression != "none":
            raise FormatError(f"{label}: unsupported spec blob compression {spec.compression!r}")
        return Entry(tarball, root_node(_json(raw, f"{label}: spec blob"), label), "manifest")


class LayoutV2(CacheLayout):
    """Spack <= 0.23: signed spec files carrying the tarball's checksum."""

    version = 2
    index_path = V2_INDEX

    async def read_index(self, mirror: Mirror) -> bytes:
        return await mirror.read(V2_INDEX, MAX_INDEX_BYTES)

    async def read_entry(
        self, mirror: Mirror, record: SpecRecord, unsign: Unsign, label: str
    ) -> Entry:
        # The path comes from the (unsigned) index node; the signature then binds the content.
        try:
            text = await mirror.read(v2_spec_file_path(record.node, record.dag_hash, True),
                                     MAX_SPEC_JSON)
        except NotInMirror:  # Spack prefers the signed file and falls back to the plain one
            text = await mirror.read(v2_spec_file_path(record.node, record.dag_hash, False),
                                     MAX_SPEC_JSON)
        doc = _json(await unsign(text, "spec file"), f"{label}: spec file")
        root = root_node(doc, label)
        layout = doc.get("buildcache_layout_version")
        if layout not in V2_SPEC_LAYOUTS:
            raise FormatError(f"{label}: spec file of build cache layout {layout!r} is not "
                              "supported (only tarballs written by Spack 0.20 to 0.23)")
        return Entry(_v2_tarball(doc, root, record.dag_hash, label), root, "spec file")


def _v2_tarball(doc: dict[str, Any], root: dict[str, Any], dag_hash: str, label: str
                ) -> BlobRecord:
    """The tarball record a v2 spec file signs: sha256 only, at the path its spec gives."""
    checksum = doc.get("binary_cache_checksum")
    if not isinstance(checksum, dict):
        raise FormatError(f"{label}: spec file has no binary_cache_checksum")
    algorithm, digest = checksum.get("hash_algorithm"), checksum.get("hash")
    if algorithm != "sha256":
        raise FormatError(f"{label}: unsupported tarball checksum algorithm {algorithm!r}")
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        raise FormatError(f"{label}: tarball checksum {str(digest)[:80]!r} is not a sha256")
    return BlobRecord(MEDIA_TARBALL, "gzip", digest, None, v2_tarball_path(root, dag_hash))


LAYOUTS: tuple[CacheLayout, ...] = (LayoutV3(), LayoutV2())  # preference order
_found: weakref.WeakKeyDictionary[Mirror, CacheLayout] = weakref.WeakKeyDictionary()


async def discover(mirror: Mirror) -> CacheLayout:
    """The layout of a mirror: v3 if its index manifest exists, else v2 if its
    ``build_cache/index.json`` does. Remembered per Mirror object, so the catalog's probe
    serves the materializer too. Raises MirrorError if neither exists or the mirror fails."""
    known = _found.get(mirror)
    if known is not None:
        return known
    for layout in LAYOUTS:
        if await _exists(mirror, layout.index_path):
            _found[mirror] = layout
            return layout
    looked = " or ".join(layout.index_path for layout in LAYOUTS)
    raise MirrorError(f"{mirror.url} is not a Spack build cache (it has no {looked})")


async def _exists(mirror: Mirror, path: str) -> bool:
    try:
        async with mirror.open(path, None):
            return True  # opened: there; nothing is read
    except NotInMirror:
        return False


def root_node(doc: Any, label: str) -> dict[str, Any]:
    """The first node of a spec document (``{"spec": {"nodes": [root, ...]}}``, spec v2-v5)."""
    try:
        root = doc["spec"]["nodes"][0]
    except (KeyError, IndexError, TypeError) as exc:
        raise FormatError(f"{label}: the signed document holds no Spack spec ({exc})") from None
    if not isinstance(root, dict):
        raise FormatError(f"{label}: the spec's root node is not a mapping")
    return root


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except ValueError as exc:  # UnicodeDecodeError is a ValueError too
        raise FormatError(f"{what} is not JSON ({exc})") from None
    except RecursionError:  # deep nesting: not a ValueError
        raise FormatError(f"{what} is not JSON (nested too deeply)") from None


def gunzip_bounded(data: bytes, limit: int, what: str) -> bytes:
    """Decompress a gzip member, refusing more than ``limit`` bytes of output (a bomb) or
    anything that is not exactly one well-formed member. Raises FormatError/IntegrityError."""
    inflater = zlib.decompressobj(wbits=31)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise FormatError(f"{what} is not valid gzip ({exc})") from None
    if len(out) > limit:
        raise IntegrityError(f"{what} expands past {limit} bytes")
    if not inflater.eof or inflater.unused_data:
        raise FormatError(f"{what} is truncated or has trailing data")
    return out
