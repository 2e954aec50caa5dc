"""Which build-cache layout a mirror has, and how each layout is read.

Two layouts exist (Spack 1.x ``url_buildcache.py``; Spack 0.23 ``binary_distribution.py``):

* **v3** (Spack >= 1.0): an unsigned index manifest points at a DB v8 index blob; each spec has
  a signed manifest listing typed, checksummed blobs (the tarball and the spec JSON).
* **v2** (Spack <= 0.23): ``build_cache/index.json`` (DB v7); each spec has a signed spec file
  (``<arch>-<compiler>-<cver>-<name>-<ver>-<hash>.spec.json.sig``, ``.spec.json`` when unsigned)
  holding the spec *and* the tarball's sha256, and a ``.spack`` tarball at
  ``build_cache/<arch>/<compiler>-<cver>/<name>-<ver>/<same stem>.spack``. No length is signed.

A mirror migrated with ``spack buildcache migrate`` has both; v3 is used, as Spack does.

A third envelope holds layout 3's tarballs and index in an **OCI registry** (``oci://``,
``LayoutOCI``): one image per spec, its config the spec, its last layer the tarball
(``ocimanifest.py``). It is told by the mirror's kind, not probed, and nothing in it is signed.

Every rule that differs between layouts lives here, behind ``CacheLayout``: where the index
is and how to tell whether it changed (``read_index``, ``index_identity``), what the signed
documents of a spec say — the tarball's blob record and the spec's root node, an ``Entry``
(``read_entry``) — and where a mirror publishes its keys (``mirror_keys``). A new envelope
is one more ``CacheLayout``, as the OCI one is. The pure path functions are in
``layout.py``; the index document, the same in every layout, is read by ``index.py``.

Checking a signature is the job of the ``DocumentTrust`` the caller gives, so this module
never runs gpg; binding the root node to the hash that was asked for is the caller's too.
Everything here runs on the trio thread (parsing a spec document hops to a worker thread).
"""

from __future__ import annotations

import json
import re
import weakref
import zlib
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from lazymount.buildcache.fetch import fetch_bytes
from lazymount.buildcache.index import SpecRecord
from lazymount.buildcache.layout import (
    INDEX_MANIFEST,
    KEY_INDEX_MANIFEST,
    MEDIA_INDEX,
    MEDIA_KEY,
    MEDIA_KEY_INDEX,
    MEDIA_SPEC,
    MEDIA_TARBALL,
    V2_INDEX,
    V2_INDEX_HASH,
    V2_KEY_INDEX,
    is_sha256,
    key_manifest_path,
    spec_manifest_path,
    v2_spec_file_path,
    v2_tarball_path,
)
from lazymount.buildcache.manifest import MAX_MANIFEST_BYTES, BlobRecord, parse_manifest, pick
from lazymount.buildcache.ocimanifest import (
    INDEX_TAG,
    check_config,
    index_record,
    manifest_location,
    parse_image_manifest,
    spec_tag,
    tarball_record,
)
from lazymount.errors import FormatError, IntegrityError, MirrorError, NotInMirror, about
from lazymount.mirror.transport import Mirror

MAX_INDEX_BYTES = 2 << 30
MAX_SPEC_BLOB = 64 << 20  # compressed spec JSON; real ones are a few KiB
MAX_SPEC_JSON = 64 << 20  # expanded spec JSON (v3 blob or v2 spec file); real ones: < 1 MiB
V2_SPEC_LAYOUTS = (1, 2)  # buildcache_layout_version of v2 spec files whose .spack we can read
MAX_KEY_BYTES = 1 << 20  # one published key file or key index

_FINGERPRINT = re.compile(r"[0-9A-F]{40}|[0-9A-F]{64}")

class DocumentTrust(Protocol):
    """What a layout asks before it believes a fetched signed document (``trust/policy.py``
    answers for a mirror)."""

    async def plaintext(self, document: bytes, noun: str, label: str) -> bytes:
        """The text of ``document`` that a trusted signature covers (or the document itself
        where the mirror allows unsigned ones); raises SignatureError. ``noun`` says what it
        is ("manifest", "spec file") and ``label`` which package, for messages."""
        ...


@dataclass(frozen=True)
class Entry:
    """What the signed documents of one spec say."""

    tarball: BlobRecord  # where the tarball is, its sha256 and (v3 only) its length
    root: Any  # the first node of the signed spec (a mapping if well formed); the caller
    # checks that it is the spec asked for
    signed: str  # what carried the spec, for messages: "signed manifest", "signed spec file"
    # or "OCI image config" (unsigned: only a mirror mounted unsigned gets that far)


@dataclass(frozen=True)
class Identity:
    """What the mirror says about its index, from the small document that names it."""

    unchanged: bool  # the server answered 304 to our ETag
    checksum: str | None  # sha256 of the index document, if the mirror names one
    etag: str | None
    named: BlobRecord | None = None  # the index blob the document names (v3, OCI)


@dataclass(frozen=True)
class MirrorKey:
    """A key file a mirror publishes, not yet inspected."""

    fingerprint: str  # as the mirror's key index names it
    source: str  # where it came from, for messages
    text: bytes


class CacheLayout:
    """One layout: how to find the index and a spec's entry. Stateless; shared by mirrors."""

    version: int = 0
    index_path: str = ""  # the file whose presence tells this layout

    async def read_index(self, mirror: Mirror, named: BlobRecord | None = None) -> bytes:
        """The index document (Spack database JSON) of a mirror of this layout; ``named``:
        the blob an ``index_identity`` just read names (not asked for again)."""
        raise NotImplementedError

    async def index_identity(self, mirror: Mirror, etag: str | None) -> Identity:
        """Which index the mirror has now: one small request (a 304 if ``etag`` holds).
        Raises NotInMirror if the document that names it is gone, another LazymountError
        if the mirror fails."""
        raise NotImplementedError

    async def read_entry(
        self, mirror: Mirror, record: SpecRecord, trust: DocumentTrust, label: str
    ) -> Entry:
        """The verified entry of ``record``. Raises NotInMirror, MirrorError, SignatureError,
        FormatError or IntegrityError naming ``label``."""
        raise NotImplementedError


class LayoutV3(CacheLayout):
    """Spack >= 1.0: manifests and content-addressed blobs."""

    version = 3
    index_path = INDEX_MANIFEST

    async def read_index(self, mirror: Mirror, named: BlobRecord | None = None) -> bytes:
        what = f"index of {mirror.url}"
        record = named
        if record is None:
            text = await mirror.read(INDEX_MANIFEST, MAX_MANIFEST_BYTES, revalidate=True)
            record = pick(parse_manifest(text, what), MEDIA_INDEX, what)
        if record.compression != "none":
            raise MirrorError(f"{what}: unsupported index compression {record.compression!r}")
        return await fetch_bytes(mirror, record, what, MAX_INDEX_BYTES)

    async def index_identity(self, mirror: Mirror, etag: str | None) -> Identity:
        what = f"index of {mirror.url}"
        text, new_etag = await mirror.read_if_changed(INDEX_MANIFEST, MAX_MANIFEST_BYTES, etag)
        if text is None:
            return Identity(True, None, etag)
        record = pick(parse_manifest(text, what), MEDIA_INDEX, what)
        return Identity(False, record.checksum, new_etag, record)

    async def read_entry(
        self, mirror: Mirror, record: SpecRecord, trust: DocumentTrust, label: str
    ) -> Entry:
        path = spec_manifest_path(record.name, record.version, record.dag_hash)
        text = await mirror.read(path, MAX_MANIFEST_BYTES)
        blobs = parse_manifest(await trust.plaintext(text, "manifest", label), label)
        tarball = pick(blobs, MEDIA_TARBALL, label)
        spec = pick(blobs, MEDIA_SPEC, label)
        if spec.compression not in ("gzip", "none"):
            raise FormatError(f"{label}: unsupported spec blob compression {spec.compression!r}")
        raw = await fetch_bytes(mirror, spec, label, MAX_SPEC_BLOB)
        doc = await trio.to_thread.run_sync(
            parse_spec_document, raw, spec.compression == "gzip", f"{label}: spec blob")
        return Entry(tarball, doc["spec"]["nodes"][0], "signed manifest")


class LayoutV2(CacheLayout):
    """Spack <= 0.23: signed spec files carrying the tarball's checksum."""

    version = 2
    index_path = V2_INDEX

    async def read_index(self, mirror: Mirror, named: BlobRecord | None = None) -> bytes:
        return await mirror.read(V2_INDEX, MAX_INDEX_BYTES, revalidate=True)

    async def index_identity(self, mirror: Mirror, etag: str | None) -> Identity:
        try:  # Spack publishes the index's sha256 beside it
            text, new_etag = await mirror.read_if_changed(V2_INDEX_HASH, 1024, etag)
        except NotInMirror:
            return Identity(False, None, None)
        if text is None:
            return Identity(True, None, etag)
        checksum = text.decode(errors="replace").strip()
        return Identity(False, checksum if is_sha256(checksum) else None, new_etag)

    async def read_entry(
        self, mirror: Mirror, record: SpecRecord, trust: DocumentTrust, label: str
    ) -> Entry:
        # The path comes from the (unsigned) index node; the signature then binds the content.
        # Its placing fields (``record.place``) are enough: the whole node of a stored
        # catalog would be read from disk, on the trio thread.
        try:
            text = await mirror.read(v2_spec_file_path(record.place, record.dag_hash, True),
                                     MAX_SPEC_JSON)
        except NotInMirror:  # Spack prefers the signed file and falls back to the plain one
            text = await mirror.read(v2_spec_file_path(record.place, record.dag_hash, False),
                                     MAX_SPEC_JSON)
        plaintext = await trust.plaintext(text, "spec file", label)
        doc = await trio.to_thread.run_sync(
            parse_spec_document, plaintext, False, f"{label}: spec file")
        root = doc["spec"]["nodes"][0]
        layout = doc.get("buildcache_layout_version")
        if layout not in V2_SPEC_LAYOUTS:
            raise FormatError(f"{label}: spec file of build cache layout {layout!r} is not "
                              "supported (only tarballs written by Spack 0.20 to 0.23)")
        with about(label):
            tarball = _v2_tarball(doc, root, record.dag_hash)
        return Entry(tarball, root, "signed spec file")


def _v2_tarball(doc: dict[str, Any], root: Any, dag_hash: str) -> BlobRecord:
    """The tarball record a v2 spec file signs: sha256 only, at the path its spec gives."""
    checksum = doc.get("binary_cache_checksum")
    if not isinstance(checksum, dict):
        raise FormatError("spec file has no binary_cache_checksum")
    algorithm, digest = checksum.get("hash_algorithm"), checksum.get("hash")
    if algorithm != "sha256":
        raise FormatError(f"unsupported tarball checksum algorithm {algorithm!r}")
    if not isinstance(digest, str) or not is_sha256(digest):
        raise FormatError(f"tarball checksum {str(digest)[:80]!r} is not a sha256")
    if not isinstance(root, dict):
        raise FormatError("the spec file's root node is not a mapping")
    return BlobRecord(MEDIA_TARBALL, "gzip", digest, None, v2_tarball_path(root, dag_hash))


class LayoutOCI(CacheLayout):
    """Spack's layout 3 in an OCI registry repository (``oci://``): the index is the
    ``index.spack`` image, each spec an image tagged ``<name>-<version>-<hash>.spack`` whose
    config carries the spec and whose last layer is the tarball (``ocimanifest.py``).
    Nothing is signed: the image manifest goes through the mirror's trust like any other
    document, which passes it only for a mirror mounted unsigned."""

    version = 3  # the configs say buildcache_layout_version 3; the envelope is the mirror's kind
    index_path = manifest_location(INDEX_TAG)

    async def read_index(self, mirror: Mirror, named: BlobRecord | None = None) -> bytes:
        what = f"index of {mirror.url}"
        record = named
        if record is None:
            text = await mirror.read(self.index_path, MAX_MANIFEST_BYTES, revalidate=True)
            record = index_record(parse_image_manifest(text, what))
        return await fetch_bytes(mirror, record, what, MAX_INDEX_BYTES)

    async def index_identity(self, mirror: Mirror, etag: str | None) -> Identity:
        what = f"index of {mirror.url}"
        text, new_etag = await mirror.read_if_changed(self.index_path, MAX_MANIFEST_BYTES, etag)
        if text is None:
            return Identity(True, None, etag)
        record = index_record(parse_image_manifest(text, what))
        return Identity(False, record.checksum, new_etag, record)

    async def read_entry(
        self, mirror: Mirror, record: SpecRecord, trust: DocumentTrust, label: str
    ) -> Entry:
        tag = spec_tag(record.name, record.version, record.dag_hash)
        text = await mirror.read(manifest_location(tag), MAX_MANIFEST_BYTES)
        manifest = parse_image_manifest(await trust.plaintext(text, "OCI image manifest", label),
                                        label)
        with about(label):
            tarball = tarball_record(manifest)
        raw = await fetch_bytes(mirror, manifest.config, label, MAX_SPEC_BLOB)
        doc = await trio.to_thread.run_sync(  # Spack reads a gzip'd config too
            parse_spec_document, raw, raw[:2] == b"\x1f\x8b", f"{label}: image config")
        with about(label):
            check_config(doc, tarball)
        return Entry(tarball, doc["spec"]["nodes"][0], "OCI image config")


LAYOUTS: tuple[CacheLayout, ...] = (LayoutV3(), LayoutV2())  # preference order
OCI_LAYOUT = LayoutOCI()
_found: weakref.WeakKeyDictionary[Mirror, CacheLayout] = weakref.WeakKeyDictionary()


LAYOUT_VERSIONS = frozenset(layout.version for layout in LAYOUTS)


def stored_layout(mirror: Mirror, version: int) -> CacheLayout:
    """The layout (one of LAYOUT_VERSIONS) a catalog stored at an earlier mount says
    ``mirror`` had. No request is made: ``index_identity`` then tells whether it holds."""
    if mirror.kind == "oci":
        return OCI_LAYOUT
    return next(layout for layout in LAYOUTS if layout.version == version)


async def discover(mirror: Mirror) -> CacheLayout:
    """The layout of a mirror: OCI for a registry; else v3 if its index manifest exists,
    else v2 if its ``build_cache/index.json`` does. Remembered per Mirror object, so the
    catalog's probe serves the materializer too. Raises MirrorError if neither exists or
    the mirror fails."""
    if mirror.kind == "oci":
        return OCI_LAYOUT  # a registry repository: its envelope is known from the URL
    known = _found.get(mirror)
    if known is not None:
        return known
    for layout in LAYOUTS:
        if await _exists(mirror, layout.index_path):
            _found[mirror] = layout
            return layout
    looked = " or ".join(layout.index_path for layout in LAYOUTS)
    raise MirrorError(f"{mirror.url} is not a Spack build cache (it has no {looked})")


def known_layout(mirror: Mirror) -> int | None:
    """The layout version ``discover`` found for ``mirror`` (3 or 2), None if not asked yet.
    A registry's is 3, in its OCI envelope."""
    if mirror.kind == "oci":
        return OCI_LAYOUT.version
    known = _found.get(mirror)
    return known.version if known is not None else None


async def _exists(mirror: Mirror, path: str) -> bool:
    try:
        async with mirror.open(path, None):
            return True  # opened: there; nothing is read
    except NotInMirror:
        return False


async def mirror_keys(mirror: Mirror) -> list[MirrorKey]:
    """The key files a mirror publishes, as ``spack buildcache keys`` reads them: layout v3
    if it has a key index, else layout v2. Fetching keys is not trusting them.

    Raises NotInMirror if it publishes no key index, or another LazymountError naming the
    file that is missing, malformed or fails its checksum.
    """
    try:
        manifest = await mirror.read(KEY_INDEX_MANIFEST, MAX_MANIFEST_BYTES, revalidate=True)
    except NotInMirror:
        pass
    else:
        return await _v3_keys(mirror, manifest)
    try:
        index = await mirror.read(V2_KEY_INDEX, MAX_KEY_BYTES, revalidate=True)
    except NotInMirror:
        raise NotInMirror(f"{mirror.url} publishes no keys (neither {KEY_INDEX_MANIFEST} "
                          f"nor {V2_KEY_INDEX})") from None
    return await _v2_keys(mirror, index)


async def _v3_keys(mirror: Mirror, index_manifest: bytes) -> list[MirrorKey]:
    """v3: key index manifest -> key index blob -> one key manifest per fingerprint -> the
    armored key blob, every blob checked against its manifest's length and sha256."""
    what = f"key index of {mirror.url}"
    record = pick(parse_manifest(index_manifest, what), MEDIA_KEY_INDEX, what)
    index = await fetch_bytes(mirror, record, what, MAX_KEY_BYTES)
    found = []
    for fingerprint in _fingerprints(index, what):
        path = key_manifest_path(fingerprint)
        where = f"{mirror.url}/{path}"
        manifest = parse_manifest(await mirror.read(path, MAX_MANIFEST_BYTES), where)
        blob = pick(manifest, MEDIA_KEY, where)
        if blob.compression != "none":
            raise FormatError(f"{where}: unsupported key compression {blob.compression!r}")
        data = await fetch_bytes(mirror, blob, where, MAX_KEY_BYTES)
        found.append(MirrorKey(fingerprint, where, data))
    return found


async def _v2_keys(mirror: Mirror, index: bytes) -> list[MirrorKey]:
    """v2: ``build_cache/_pgp/index.json`` and ``<FINGERPRINT>.pub``, no checksums."""
    what = f"{mirror.url}/{V2_KEY_INDEX}"
    found = []
    for fingerprint in _fingerprints(index, what):
        path = f"build_cache/_pgp/{fingerprint}.pub"
        data = await mirror.read(path, MAX_KEY_BYTES)
        found.append(MirrorKey(fingerprint, f"{mirror.url}/{path}", data))
    return found


def _fingerprints(data: bytes, what: str) -> list[str]:
    """Fingerprints of a key index ``{"keys": {FPR: {}}}``; refuses malformed names."""
    try:
        keys = json.loads(data)["keys"]
        names = [str(name) for name in keys]
    except (ValueError, KeyError, TypeError):
        raise FormatError(f"{what} is not a key index") from None
    for name in names:
        if not _FINGERPRINT.fullmatch(name.upper()):
            raise FormatError(f"{what} names {name[:80]!r}, which is not a fingerprint")
    return [name.upper() for name in names]


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
        doc: dict[str, Any] = json.loads(data)
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
