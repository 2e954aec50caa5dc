"""What ``lazymount publish`` adds to a mirror, and where a client looks for it.

Everything lives under one folder beside Spack's own (``v3/`` or ``build_cache/``), so a site
can serve it from the mirror itself or from any other URL (``--toc URL``):

    lazymount/v1/catalog.json.sig           the site catalog's envelope (one per mirror)
    lazymount/v1/toc/<tarball sha256>.json.sig
                                            a tarball's table of contents' envelope
    lazymount/v1/blobs/<sha256>             payloads an envelope names (content addressed)

An *envelope* is a small clearsigned JSON document: ``{"lazymount": KIND, "format": 1, ...}``.
Large or binary payloads are not signed themselves: the envelope names each one by sha256
and size, and a client checks the bytes it fetched against that.

gpg cuts clearsigned lines at 19,995 bytes, so an envelope is compact JSON broken into lines
where a container would be longer than ``LINE`` (a TOC: one line per member); a string that
long is refused (a body splits long texts into lists).
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from lazymount.errors import FormatError

ROOT = "lazymount/v1"
FORMAT = 1
MAX_ENVELOPE_BYTES = 16 << 20  # a TOC of a package with ~100,000 members fits
LINE = 16_000  # longest line of an envelope (gpg's clearsign limit is 19,995 bytes)

Kind = Literal["catalog", "toc"]

_SHA256 = re.compile(r"[0-9a-f]{64}")


def catalog_path() -> str:
    return f"{ROOT}/catalog.json.sig"


def toc_path(tarball_sha256: str) -> str:
    return f"{ROOT}/toc/{_checked_sha256(tarball_sha256)}.json.sig"


def blob_path(sha256: str) -> str:
    return f"{ROOT}/blobs/{_checked_sha256(sha256)}"


def make_envelope(kind: Kind, body: dict[str, Any]) -> bytes:
    """The plaintext of an envelope (sign it before writing): ``body`` plus kind and format."""
    document = {"lazymount": kind, "format": FORMAT, **body}
    text = _lines(document)
    if any(len(line) > LINE for line in text.splitlines()):
        raise FormatError(f"a {kind} document holds a value longer than {LINE} characters")
    return text.encode() + b"\n"


def _lines(value: Any) -> str:
    """Compact JSON (ASCII), with a line per item of every container longer than LINE."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    if len(text) <= LINE:
        return text
    if isinstance(value, list):
        return "[\n" + ",\n".join(_lines(item) for item in value) + "\n]"
    if isinstance(value, dict):
        return "{\n" + ",\n".join(json.dumps(key) + ":" + _lines(value[key])
                                    for key in sorted(value)) + "\n}"
    return text


def open_envelope(plaintext: bytes, kind: Kind, where: str) -> dict[str, Any]:
    """The body of a verified envelope's plaintext; FormatError if it is not a ``kind``
    envelope of a format this version reads."""
    try:
        document = json.loads(plaintext)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{where}: not a lazymount {kind} document ({exc})") from None
    if not isinstance(document, dict) or document.get("lazymount") != kind:
        raise FormatError(f"{where}: not a lazymount {kind} document")
    if document.get("format") != FORMAT:
        raise FormatError(f"{where}: format {document.get('format')!r} is not {FORMAT}")
    return document


def _checked_sha256(value: str) -> str:
    if not _SHA256.fullmatch(value):
        raise FormatError(f"not a sha256: {value[:80]!r}")
    return value
