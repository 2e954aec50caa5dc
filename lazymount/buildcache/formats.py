"""Which build-cache layout a mirror has, and how each layout is read.

Two layouts exist (Spack 1.x ``url_buildcache.py``; Spack 0.23 ``binary_distribution.py``):

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
that was asked for is also the caller's. Everything here runs on the trio thread (parsing a
spec document hops to a worker thread).
"""

from __future__ import annotations

import json
import re
import weakref
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from lazymount.buildcache.fetch import fetch_bytes
from lazymount.buildcache.index import SpecRecord
from lazymount.buildcache.layout import (
    INDEX_MANIFEST,
    MEDIA_INDEX,
    MEDIA_SPEC,
    MEDIA_TARBALL,
    V2_INDEX,
    spec_manifest_path,
    v2_spec_file_path,
    v2_tarball_path,
)
from lazymount.buildcache.manifest import MAX_MANIFEST_BYTES, BlobRecord, parse_manifest, pick
from lazymount.errors import FormatError, IntegrityError, MirrorError, NotInMirror
from lazymount.mirror.transport import Mirror

MAX_INDEX_BYTES = 2 << 30
MAX_SPEC_BLOB = 64 << 20  # compressed spec JSON; real ones are a few KiB
MAX_SPEC_JSON = 64 << 20  # expanded spec JSON (v3 blob or v2 spec file); real ones: < 1 MiB
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
    root: Any  # the first node of the signed spec (a mapping if well formed); the caller
    # checks that it is the spec asked for
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
        if spec.compression not in ("gzip", "none"):
            raise FormatError(f"{label}: unsupported spec blob compression {spec.compression!r}")
        raw = await fetch_bytes(mirror, spec, label, MAX_SPEC_BLOB)
        doc = await trio.to_thread.run_sync(
            parse_spec_document, raw, spec.compression == "gzip", f"{label}: spec blob")
        return Entry(tarball, doc["spec"]["nodes"][0], "manifest")


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
        plaintext = await unsign(text, "spec file")
        doc = await trio.to_thread.run_sync(
            parse_spec_document, plaintext, False, f"{label}: spec file")
        root = doc["spec"]["nodes"][0]
        layout = doc.get("buildcache_layout_version")
        if layout not in V2_SPEC_LAYOUTS:
            raise FormatError(f"{label}: spec file of build cache layout {layout!r} is not "
                              "supported (only tarballs written by Spack 0.20 to 0.23)")
        return Entry(_v2_tarball(doc, root, record.dag_hash, label), root, "spec file")


def _v2_tarball(doc: dict[str, Any], root: Any, dag_hash: str, label: str) -> BlobRecord:
    """The tarball record a v2 spec file signs: sha256 only, at the path its spec gives."""
    checksum = doc.get("binary_cache_checksum")
    if not isinstance(checksum, dict):
        raise FormatError(f"{label}: spec file has no binary_cache_checksum")
    algorithm, digest = checksum.get("hash_algorithm"), checksum.get("hash")
    if algorithm != "sha256":
        raise FormatError(f"{label}: unsupported tarball checksum algorithm {algorithm!r}")
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        raise FormatError(f"{label}: tarball checksum {str(digest)[:80]!r} is not a sha256")
    if not isinstance(root, dict):
        raise FormatError(f"{label}: the spec file's root node is not a mapping")
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


def parse_spec_document(data: bytes, gzipped: bool, what: str) -> dict[str, Any]:
    """A spec document (``{"spec": {"nodes": [root, ...]}, ...}``, spec v2-v5; gzip'd if
    ``gzipped``) whose node list is not empty. ``what`` starts every message.

    Raises FormatError ("<what> is not a Spack spec (...)") for anything else, and
    IntegrityError past MAX_SPEC_JSON expanded bytes. Blocking: run it in a worker thread.
    """
    if gzipped:
        data = gunzip_bounded(data, MAX_SPEC_JSON, what)
    elif len(data) > MAX_SPEC_JSON:
        raise IntegrityError(f"{what} is larger than {MAX_SPEC_JSON} bytes")
    try:
        doc = json.loads(data)
        nodes = doc["spec"]["nodes"]
        if not isinstance(nodes, list) or not nodes:
            raise ValueError("it lists no nodes")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        # ValueError covers bad UTF-8; RecursionError JSON nested too deeply
        raise FormatError(f"{what} is not a Spack spec ({str(exc)[:200]})") from None
    return doc


def gunzip_bounded(data: bytes, limit: int, what: str) -> bytes:
    """Decompress gzip data (one or more members, as ``gzip.decompress`` accepts), refusing
    more than ``limit`` bytes of output before holding them (a bomb). Raises IntegrityError
    past the limit, FormatError ("<what> is not a Spack spec") for broken gzip."""
    out: list[bytes] = []
    size = 0
    while data:
        inflater = zlib.decompressobj(wbits=31)
        try:
            chunk = inflater.decompress(data, limit + 1 - size)
            while True:
                size += len(chunk)
                if size > limit:
                    raise IntegrityError(f"{what} expands past {limit} bytes")
                out.append(chunk)
                if inflater.eof or not inflater.unconsumed_tail:
                    break
                chunk = inflater.decompress(inflater.unconsumed_tail, limit + 1 - size)
        except zlib.error as exc:
            raise FormatError(f"{what} is not a Spack spec (bad gzip: {exc})") from None
        if not inflater.eof:
            raise FormatError(f"{what} is not a Spack spec (truncated gzip)")
        data = inflater.unused_data
    return b"".join(out)
