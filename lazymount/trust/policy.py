"""The trust decision the pipeline asks: which signed documents of a mirror to believe.

A mount trusts the keys of lazymount's keyring and every ``--trust-key`` file (a
``Verifier``, or none when there are no keys); each mirror either requires signatures (the
default) or accepts unsigned packages (``--unsigned``). ``Trust.for_mirror`` gives the
per-mirror answer that ``buildcache.formats`` asks for each fetched document.

``Trust`` is made before trio runs and closed after; ``MirrorTrust.plaintext`` runs on the
trio thread and checks signatures (gpg) in worker threads.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import trio

from lazymount.buildcache.manifest import is_clearsigned
from lazymount.errors import FormatError, SignatureError, UsageError, about
from lazymount.trust.keyring import Keyring
from lazymount.trust.verify import PendingVerifier, Verifier, read_key_file

GPG_THREADS = 4  # signature checks at once


class Trust:
    """The pinned keys of one mount (``verifier``, None without keys)."""

    def __init__(self, verifier: Verifier | PendingVerifier | None):
        self.verifier = verifier
        self._gpg: trio.CapacityLimiter | None = None  # made on first use, inside trio

    @classmethod
    def load(cls, keyring: Path | None, key_files: Iterable[Path], signatures_required: bool
             ) -> Trust:
        """Trust the keys of ``keyring`` and every file of ``key_files``. Raises UsageError
        if there are no keys while some mirror requires signatures, or a key is unusable."""
        return cls.from_keys(cls.read_keys(keyring, key_files), signatures_required)

    @staticmethod
    def read_keys(keyring: Path | None, key_files: Iterable[Path]) -> list[tuple[str, bytes]]:
        """The armored keys of ``keyring`` and ``key_files`` (read before the daemon gives up
        root: an admin's key files may be readable by root alone)."""
        keys = Keyring(keyring).key_texts() if keyring is not None else []
        return keys + [read_key_file(path) for path in key_files]

    @classmethod
    def from_keys(cls, keys: list[tuple[str, bytes]], signatures_required: bool) -> Trust:
        """Trust ``keys`` (see ``load``)."""
        if not keys:
            if signatures_required:
                raise UsageError("no trusted keys: run `lazymount keys install --trust MIRROR` "
                                 "or give --trust-key FILE (the mirror's public key), or "
                                 "--unsigned to accept unsigned packages")
            return cls(None)
        return cls(PendingVerifier(keys))  # gpg starts with the first signature checked

    def for_mirror(self, require_signature: bool = True) -> MirrorTrust:
        return MirrorTrust(self, require_signature)

    async def verify(self, document: bytes, label: str) -> bytes:
        """The text a trusted signature of ``document`` covers; raises SignatureError."""
        assert self.verifier is not None
        if self._gpg is None:
            self._gpg = trio.CapacityLimiter(GPG_THREADS)
        async with self._gpg:
            return await trio.to_thread.run_sync(self.verifier.verify, document, label)

    def close(self) -> None:
        if self.verifier is not None:
            self.verifier.close()


class MirrorTrust:
    """What one mirror's documents must carry to be believed."""

    def __init__(self, trust: Trust, require_signature: bool):
        self.trust = trust
        self.require_signature = require_signature

    async def plaintext(self, document: bytes, noun: str, label: str) -> bytes:
        """The trusted plaintext of a fetched signed document (a v3 manifest or a v2 spec
        file, named by ``noun``): verified against the pinned keys when clearsigned; taken
        as is only when the mirror allows unsigned packages. Raises SignatureError (or
        FormatError for a broken clearsigned document of an unsigned mirror), naming
        ``label``."""
        with about(label):
            if is_clearsigned(document):
                if self.trust.verifier is None:
                    if self.require_signature:
                        raise SignatureError(f"{noun} is signed but no key is trusted "
                                             "(give --trust-key)")
                    return _strip_clearsign(document)
                return await self.trust.verify(document, label)
            if self.require_signature:
                raise SignatureError(f"{noun} is not signed, and this mirror requires "
                                     "signatures")
            return document


def _strip_clearsign(text: bytes) -> bytes:
    """The body of a clearsigned document, for mirrors configured as unsigned."""
    try:
        body = text.split(b"\n\n", 1)[1].split(b"-----BEGIN PGP SIGNATURE-----", 1)[0]
    except IndexError:
        raise FormatError("malformed clearsigned manifest") from None
    return body
