"""Layout-v3 manifests: the list of typed, checksummed blobs a cache entry is made of."""

from __future__ import annotations

import json
from dataclasses import dataclass

from lazymount.buildcache.layout import blob_path
from lazymount.errors import FormatError

MANIFEST_VERSION = 3
MAX_MANIFEST_BYTES = 1 << 20  # a real manifest is a few hundred bytes
CLEARSIGN_MAGIC = b"-----BEGIN PGP SIGNED MESSAGE-----"


@dataclass(frozen=True)
class BlobRecord:
    """What a signed document promises about one stored blob."""

    media_type: str
    compression: str
    checksum: str  # sha256 hex of the stored (compressed) bytes
    length: int | None  # None: unknown (layout v2 signs only the checksum)
    location: str | None = None  # mirror-relative path; None: the content-addressed blob

    @property
    def path(self) -> str:
        return self.location if self.location is not None else blob_path(self.checksum)


def is_clearsigned(text: bytes) -> bool:
    return text.lstrip().startswith(CLEARSIGN_MAGIC)


def parse_manifest(plaintext: bytes, what: str) -> list[BlobRecord]:
    """Parse manifest JSON into blob records. ``what`` names the manifest in messages.

    Raises FormatError unless it is a version-3 manifest whose every record is well formed.
    """
    try:
        doc = json.loads(plaintext)
    except ValueError as exc:
        raise FormatError(f"{what}: manifest is not JSON ({exc})") from None
    except RecursionError:  # not a ValueError: json gives up on deep nesting with this
        raise FormatError(f"{what}: manifest is not JSON (nested too deeply)") from None
    if not isinstance(doc, dict) or doc.get("version") != MANIFEST_VERSION:
        raise FormatError(f"{what}: not a version {MANIFEST_VERSION} manifest")
    data = doc.get("data")
    if not isinstance(data, list) or not data:
        raise FormatError(f"{what}: manifest lists no blobs")
    records = []
    for item in data:
        try:
            algorithm = item["checksumAlgorithm"]
            record = BlobRecord(
                media_type=str(item["mediaType"]),
                compression=str(item["compression"]),
                checksum=str(item["checksum"]),
                length=item["contentLength"],
            )
        except (KeyError, TypeError):
            raise FormatError(f"{what}: a manifest record lacks a field") from None
        if algorithm != "sha256":
            raise FormatError(f"{what}: unsupported checksum algorithm {algorithm!r}")
        length = record.length
        if not isinstance(length, int) or isinstance(length, bool) or length < 0:
            raise FormatError(f"{what}: contentLength {record.length!r} is not a size")
        try:
            record.path  # noqa: B018  (validates the checksum's form)
        except FormatError as exc:
            raise FormatError(f"{what}: {exc}") from None
        records.append(record)
    return records


def pick(records: list[BlobRecord], media_type: str, what: str) -> BlobRecord:
    """The one record of a mediaType. Two of the same type are ambiguous and refused."""
    found = [r for r in records if r.media_type == media_type]
    if not found:
        raise FormatError(f"{what}: manifest has no {media_type} blob")
    if len(found) > 1:
        raise FormatError(f"{what}: manifest lists {media_type} more than once")
    return found[0]
