"""Clearsigning with a site's secret key, for what ``lazymount publish`` writes.

The key is imported into a private, throw-away GNUPGHOME, as verification does; the user's
``~/.gnupg`` and any agent are never touched. Everything here blocks: call it from a thread.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import gnupg

from lazymount.errors import UsageError
from lazymount.trust.verify import read_key_file


class Signer:
    """Signs with the one secret key of ``key_file`` (ASCII-armored, without a passphrase)."""

    def __init__(self, key_file: Path):
        _, text = read_key_file(key_file)
        if b"-----BEGIN PGP PRIVATE KEY BLOCK-----" not in text:
            raise UsageError(f"{key_file} is not an ASCII-armored secret key "
                             "(gpg --armor --export-secret-keys KEY)")
        self.home = Path(tempfile.mkdtemp(prefix="lazymount-sign-"))
        try:
            self.gpg = gnupg.GPG(gnupghome=str(self.home))
            result = self.gpg.import_keys(text)
            secret = self.gpg.list_keys(secret=True)
            if not secret:
                raise UsageError(f"{key_file}: gpg imported no secret key "
                                 f"({result.stderr.strip()[-200:]})")
            if len(secret) > 1:
                raise UsageError(f"{key_file} holds {len(secret)} secret keys; give one")
        except (OSError, ValueError, RuntimeError) as exc:
            self.close()
            raise UsageError(f"cannot run gpg: {exc}") from None
        except UsageError:
            self.close()
            raise
        self.fingerprint = str(secret[0]["fingerprint"]).upper()

    def clearsign(self, text: bytes) -> bytes:
        """``text`` clearsigned; UsageError if gpg fails (a passphrase-protected key)."""
        signed = self.gpg.sign(text, keyid=self.fingerprint, clearsign=True,
                               extra_args=["--batch", "--pinentry-mode", "error"])
        data = bytes(signed.data or b"")
        if not data:
            raise UsageError(f"gpg could not sign with {self.fingerprint} "
                             f"({signed.stderr.strip()[-200:]}); the key must have no "
                             "passphrase")
        return data

    def signed(self, document: bytes) -> bytes | None:
        """What ``document`` says if this key clearsigned it (a file written before is kept
        when it still checks out), else None."""
        result = self.gpg.decrypt(document)
        signer = (result.pubkey_fingerprint or result.fingerprint or "").upper()
        return bytes(result.data) if result.valid and signer == self.fingerprint else None

    def close(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)
