"""Tables of contents kept in the registry repository of an ``oci://`` build cache.

A registry holds images, not folders, so a TOC (``published.py``) is stored there as an OCI
artifact tagged ``lazymount-toc-<tarball sha256>`` (a client knows the tarball's digest from
the spec's image manifest; a tag works on every registry, the referrers API does not):

* an image manifest (``application/vnd.oci.image.manifest.v1+json``) with ``artifactType``
  ``application/vnd.lazymount.toc.v1`` and the empty config
  (``application/vnd.oci.empty.v1+json``, the two bytes ``{}``);
* its first layer the clearsigned envelope (``application/vnd.lazymount.toc.v1+json``), then
  one layer per window (``application/vnd.lazymount.window.v1``), so the registry keeps the
  windows as long as the tag.

A window's digest is its sha256, so it is read as ``blobs/sha256:<window sha256>``. The
registry is trusted for nothing: the envelope's signature and the sha256s it names are.

``RegistryTocs`` reads this as a ``--toc`` place is read (``published`` paths), so a client
finds and checks a TOC from a registry by the same code as from anywhere else.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager

from lazymount.buildcache import published
from lazymount.buildcache.fetch import fetch_bytes
from lazymount.buildcache.manifest import BlobRecord
from lazymount.buildcache.ocimanifest import (
    MEDIA_OCI_MANIFEST,
    manifest_location,
    parse_image_manifest,
)
from lazymount.errors import FormatError, NotInMirror
from lazymount.mirror.transport import Mirror

ARTIFACT_TYPE = "application/vnd.lazymount.toc.v1"
MEDIA_ENVELOPE = "application/vnd.lazymount.toc.v1+json"
MEDIA_WINDOW = "application/vnd.lazymount.window.v1"
MEDIA_EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY = b"{}"
EMPTY_DIGEST = "sha256:" + hashlib.sha256(EMPTY).hexdigest()
MAX_MANIFEST_BYTES = 4 << 20  # a layer descriptor per window: ~150 bytes each

_SHA256 = re.compile(r"[0-9a-f]{64}")
_TOC = re.compile(re.escape(published.ROOT) + r"/toc/([0-9a-f]{64})\.json\.sig")
_BLOB = re.compile(re.escape(published.ROOT) + r"/blobs/([0-9a-f]{64})")


def toc_tag(tarball_sha256: str) -> str:
    """The tag of a tarball's TOC artifact."""
    if not _SHA256.fullmatch(tarball_sha256):
        raise FormatError(f"not a sha256: {tarball_sha256[:80]!r}")
    return f"lazymount-toc-{tarball_sha256}"


def _descriptor(media_type: str, digest: str, size: int) -> dict[str, object]:
    return {"mediaType": media_type, "digest": digest, "size": size}


def toc_manifest(envelope: tuple[str, int], windows: list[tuple[str, int]]) -> bytes:
    """The artifact's manifest: the envelope's and the windows' (digest, size) as layers."""
    document = {
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": _descriptor(MEDIA_EMPTY, EMPTY_DIGEST, len(EMPTY)),
        "layers": [_descriptor(MEDIA_ENVELOPE, *envelope),
                   *(_descriptor(MEDIA_WINDOW, *window) for window in windows)],
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def read_artifact(manifest: bytes, where: str) -> tuple[BlobRecord, set[str]]:
    """The envelope layer of a TOC artifact's manifest, and the sha256s of its other layers
    (the windows); FormatError if it is not one."""
    image = parse_image_manifest(manifest, where)
    envelope = image.layers[0]
    if envelope.media_type != MEDIA_ENVELOPE:
        raise FormatError(f"{where}: not a table of contents artifact (its first layer is "
                          f"{envelope.media_type[:100]!r})")
    return envelope, {layer.checksum for layer in image.layers[1:]}


async def read_envelope(registry: Mirror, tarball_sha256: str, max_bytes: int
                        ) -> tuple[bytes, set[str]]:
    """The envelope stored under the TOC tag of ``tarball_sha256`` (its sha256 checked
    against the manifest), and the sha256s of the windows stored with it. Raises
    NotInMirror when there is no such tag, MirrorError, FormatError, IntegrityError."""
    location = manifest_location(toc_tag(tarball_sha256))
    where = registry.where(location)
    manifest = await registry.read(location, MAX_MANIFEST_BYTES)
    envelope, windows = read_artifact(manifest, where)
    return await fetch_bytes(registry, envelope, where, max_bytes), windows


class RegistryTocs(Mirror):
    """The TOCs of an ``oci://`` cache, in its own repository, read by the paths a folder or
    a ``--toc`` place has them at (``published.toc_path``, ``published.blob_path``)."""

    def __init__(self, registry: Mirror):
        self.registry = registry
        self.url = registry.url
        self.health = registry.health

    async def read(self, path: str, max_bytes: int, *, revalidate: bool = False) -> bytes:
        toc = _TOC.fullmatch(path)
        if toc is not None:
            return (await read_envelope(self.registry, toc.group(1), max_bytes))[0]
        blob = _BLOB.fullmatch(path)
        if blob is not None:
            return await self.registry.read(f"blobs/sha256:{blob.group(1)}", max_bytes)
        raise NotInMirror(f"{self.where(path)}: a registry holds no such file")

    def where(self, path: str) -> str:
        toc = _TOC.fullmatch(path)
        if toc is not None:
            return self.registry.where(manifest_location(toc_tag(toc.group(1))))
        return self.registry.where(path)

    def open(self, path: str, expected: int | None, revalidate: bool = False
             ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        raise NotInMirror(f"{self.where(path)}: a registry holds no such file")
