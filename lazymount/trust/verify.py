"""Signature checks of clearsigned manifests against pinned keys.

Keys live in a private, throw-away GNUPGHOME made for this process: never the user's
``~/.gnupg``, no gpg-agent (verification needs none). A signature counts only when gpg
calls it good *and* the signing key's primary fingerprint is one we were told to trust.
Everything here blocks: call it from a worker thread.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lazymount.errors import LazymountError, SignatureError, UsageError, general
from lazymount.system.files import FileTooLarge, read_bounded

if TYPE_CHECKING:  # python-gnupg is imported when gpg is first started
    import gnupg

MAX_KEY_BYTES = 1 << 20


@dataclass(frozen=True)
class PublicKey:
    """One public key as gpg sees it: primary fingerprint, user ids, its armored export."""

    fingerprint: str
    uids: tuple[str, ...]
    armored: bytes


class Verifier:
    """Holds the trusted public keys; verifies clearsigned text and returns what it signs."""

    def __init__(self, key_texts: list[tuple[str, bytes]]):
        """``key_texts``: (where it came from, ASCII-armored public key) pairs.

        Raises UsageError if a key cannot be imported or gpg is missing.
        """
        import gnupg

        self.home = Path(tempfile.mkdtemp(prefix="lazymount-gpg-"))
        try:
            self.gpg = gnupg.GPG(gnupghome=str(self.home), options=["--no-autostart"])
        except (OSError, ValueError, RuntimeError) as exc:
            self.close()
            raise UsageError(f"cannot run gpg: {exc}") from None
        self.trusted: set[str] = set()
        try:
            for source, text in key_texts:
                self.trusted.update(self._import(source, text))
        except UsageError:
            self.close()
            raise

    def _import(self, source: str, text: bytes) -> list[str]:
        check_key_text(source, text)
        result = self.gpg.import_keys(text)
        fingerprints = [fpr for fpr in result.fingerprints if fpr]
        if not fingerprints:
            raise UsageError(f"{source}: gpg imported no key ({result.stderr.strip()[-200:]})")
        return fingerprints

    @property
    def fingerprints(self) -> list[str]:
        return sorted(self.trusted)

    def public_keys(self) -> list[PublicKey]:
        """Every imported key, each exported on its own (armored), by fingerprint."""
        keys = []
        for entry in self.gpg.list_keys():
            fingerprint = str(entry.get("fingerprint", "")).upper()
            armored = self.gpg.export_keys(fingerprint, armor=True)
            keys.append(PublicKey(fingerprint, tuple(entry.get("uids") or ()),
                                  str(armored).encode()))
        return sorted(keys, key=lambda k: k.fingerprint)

    def verify(self, text: bytes, what: str) -> bytes:
        """Plaintext of a clearsigned ``text`` signed by a trusted key.

        Raises SignatureError naming ``what`` (bad signature, unknown key, not signed).
        """
        result = self.gpg.decrypt(text)
        signer = (result.pubkey_fingerprint or result.fingerprint or "").upper()
        if not result.valid:
            raise SignatureError(f"{what}: {_reason(result, signer)}")
        if signer not in self.trusted:
            raise SignatureError(
                f"{what}: signed by {signer or 'an unknown key'}, which is not trusted"
            )
        return bytes(result.data)

    def close(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)


def check_key_text(source: str, text: bytes) -> None:
    """Refuse (UsageError) what cannot be a public key before gpg sees it."""
    if b"PRIVATE KEY" in text:
        raise UsageError(f"{source} holds a secret key; give the public key only")
    if b"-----BEGIN PGP PUBLIC KEY BLOCK-----" not in text:
        raise UsageError(f"{source} is not an ASCII-armored public key")


class PendingVerifier:
    """A ``Verifier`` made when the first signature is checked: a mount starts no gpg (and
    imports no python-gnupg) until a package is first opened. The keys' texts are checked
    at once; gpg's own refusal of a key comes with the first check. Thread: any."""

    def __init__(self, key_texts: list[tuple[str, bytes]]):
        for source, text in key_texts:
            check_key_text(source, text)
        self._key_texts = key_texts
        self._made: Verifier | None = None
        self._lock = threading.Lock()
        self._closed = False

    def _verifier(self) -> Verifier:
        with self._lock:
            if self._closed:
                raise general(SignatureError("the trusted keys were closed"))
            if self._made is None:
                try:
                    self._made = Verifier(self._key_texts)
                except LazymountError as exc:  # about the keys, not the document checked
                    general(exc)
                    raise
            return self._made

    def verify(self, text: bytes, what: str) -> bytes:
        """``Verifier.verify``, gpg started on the first call. Blocks."""
        return self._verifier().verify(text, what)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._made is not None:
                self._made.close()


def _reason(result: gnupg.Crypt, signer: str) -> str:
    status = (result.status or "").lower()
    key_id = getattr(result, "key_id", None) or signer
    if "no public key" in status:
        return f"signed by key {key_id}, which is not trusted (not in the keyring)"
    if "bad" in status:
        return "BAD signature: the manifest was altered after signing"
    if "no data" in status or "no valid openpgp data" in status:
        return "the signature block is unreadable"
    if "crc error" in (result.stderr or "").lower():
        return "the signature block is corrupt (armor checksum mismatch)"
    if "expired" in status or "revoked" in status:
        return f"signature by {key_id} not accepted ({status})"
    return f"signature not valid ({status or 'gpg gave no verdict'})"


def read_public_keys(source: str, text: bytes) -> list[PublicKey]:
    """The public keys an armored text holds, one PublicKey each.

    Raises UsageError (naming ``source``) for a secret key, a non-armored text or one gpg
    cannot import. Blocks (runs gpg).
    """
    inspector = Verifier([(source, text)])
    try:
        return inspector.public_keys()
    finally:
        inspector.close()


def read_key_file(path: Path) -> tuple[str, bytes]:
    """(path, contents) of a key file, refusing absurd sizes."""
    try:
        text = read_bounded(path, MAX_KEY_BYTES)
    except FileTooLarge:
        raise UsageError(f"key file {path} is larger than {MAX_KEY_BYTES} bytes") from None
    except OSError as exc:
        raise UsageError(f"cannot read key file {path}: {exc.strerror}") from None
    return str(path), text
