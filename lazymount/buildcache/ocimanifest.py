"""The OCI envelope of a Spack build cache in a registry: tags, image manifests, configs.

Spack (``binary_distribution.py``: ``_oci_push``, ``_oci_update_index``) stores each pushed
spec as an image tagged ``<name>-<version>-<dag hash>.spack``:

* the manifest (OCI, or Docker v2 when pushed onto a Docker base image) lists a config blob
  and layers; the **last layer is the spec's own install tarball** (the same gzip'd tarball
  as a URL cache's), earlier layers are its link/run dependencies or a base image's;
* the config blob is an image config that also carries the spec document (``spec``,
  ``buildcache_layout_version``, ``binary_cache_checksum`` = the last layer's sha256, ...).

The index is an image tagged ``index.spack`` whose one layer is the Spack database JSON
(uncompressed, despite its layer mediaType). Nothing is signed; each blob is named by its
sha256, which the download checks.

Pure functions; no I/O.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from lazymount.buildcache.manifest import BlobRecord
from lazymount.errors import FormatError, IntegrityError

MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
LAYER_COMPRESSION = {
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
}
INDEX_TAG = "index.spack"
MAX_TAG = 128
SPEC_LAYOUT_VERSIONS = (2, 3)  # buildcache_layout_version of configs Spack 0.21-1.x push

_TAG_UNSAFE = re.compile(r"[^\w.-]")
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


def spec_tag(name: str, version: str, dag_hash: str) -> str:
    """The tag Spack gives a spec's image: ``<name>-<version>-<hash>.spack``, every character
    but word characters, ``.`` and ``-`` made ``_``, and a tag over 128 characters cut to its
    first and last 64 (which keeps ``-<hash>.spack``)."""
    tag = _TAG_UNSAFE.sub("_", f"{name}-{version}-{dag_hash}.spack")
    return tag if len(tag) <= MAX_TAG else tag[:64] + tag[-64:]


def manifest_location(tag: str) -> str:
    return f"manifests/{tag}"


@dataclass(frozen=True)
class ImageManifest:
    """An image manifest's config and layers, as blob records a download can check."""

    media_type: str
    config: BlobRecord
    layers: tuple[BlobRecord, ...]


def parse_image_manifest(data: bytes, what: str) -> ImageManifest:
    """An OCI or Docker v2 image manifest. Raises FormatError for anything else (an image
    index of several platforms included: Spack never pushes one)."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise FormatError(f"{what}: the image manifest is not JSON") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{what}: the image manifest is not a JSON object")
    media_type = doc.get("mediaType", MEDIA_OCI_MANIFEST)  # optional in OCI manifests
    if media_type in (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST) or "manifests" in doc:
        raise FormatError(f"{what}: the tag is an image index (several images), not a "
                          "Spack package image")
    if media_type not in (MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST):
        raise FormatError(f"{what}: unsupported manifest type {str(media_type)[:100]!r}")
    if doc.get("schemaVersion") != 2:
        raise FormatError(f"{what}: not a schema version 2 image manifest")
    layers = doc.get("layers")
    if not isinstance(layers, list) or not layers:
        raise FormatError(f"{what}: the image manifest lists no layers")
    return ImageManifest(
        media_type,
        descriptor(doc.get("config"), f"{what}: config"),
        tuple(descriptor(layer, f"{what}: layer {i}") for i, layer in enumerate(layers)),
    )


def descriptor(item: Any, what: str) -> BlobRecord:
    """A content descriptor (mediaType, ``sha256:`` digest, size) as a blob record whose
    path is the registry's blob address."""
    if not isinstance(item, dict):
        raise FormatError(f"{what} is not a descriptor")
    media_type, digest, size = item.get("mediaType"), item.get("digest"), item.get("size")
    if not isinstance(media_type, str):
        raise FormatError(f"{what} has no mediaType")
    match = _DIGEST.fullmatch(digest) if isinstance(digest, str) else None
    if match is None:
        raise FormatError(f"{what}: digest {str(digest)[:80]!r} is not a sha256 digest")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise FormatError(f"{what}: size {str(size)[:40]!r} is not a size")
    compression = LAYER_COMPRESSION.get(media_type, "none")
    return BlobRecord(media_type, compression, match.group(1), size, f"blobs/{digest}")


def index_record(manifest: ImageManifest) -> BlobRecord:
    """The index blob: the one layer of the ``index.spack`` image, plain JSON whatever its
    mediaType says."""
    layer = manifest.layers[0]
    return BlobRecord(layer.media_type, "none", layer.checksum, layer.length, layer.location)


def tarball_record(manifest: ImageManifest) -> BlobRecord:
    """The spec's own tarball: the last layer."""
    layer = manifest.layers[-1]
    if layer.media_type not in LAYER_COMPRESSION:
        raise FormatError(f"the last layer's type {layer.media_type[:100]!r} is not a "
                          "tarball layer")
    return layer


def check_config(doc: dict[str, Any], tarball: BlobRecord) -> None:
    """The config's own statements about the package must agree with the manifest: its
    layout version, and (when given) the tarball's sha256 and size."""
    layout = doc.get("buildcache_layout_version")
    if layout not in SPEC_LAYOUT_VERSIONS:
        raise FormatError(f"image config of build cache layout {layout!r} is not "
                          "supported")
    checksum = doc.get("binary_cache_checksum")
    if checksum is not None:
        if not isinstance(checksum, dict) or checksum.get("hash_algorithm") != "sha256":
            raise FormatError("the image config's binary_cache_checksum is not sha256")
        if checksum.get("hash") != tarball.checksum:
            raise IntegrityError(f"the image config's tarball checksum "
                                 f"{str(checksum.get('hash'))[:12]} is not the last layer's "
                                 f"{tarball.checksum[:12]}")
    size = doc.get("archive_size")
    if size is not None and size != tarball.length:
        raise IntegrityError(f"the image config says the tarball has {size!r} bytes, "
                             f"the manifest {tarball.length}")
