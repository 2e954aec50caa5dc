"""lazymount's own keyring: a directory of ASCII-armored public keys, and the keys a mirror
publishes.

The keyring is a plain directory (never ``~/.gnupg``; no gpg-agent): every ``*.asc`` file in
it holds trusted public keys, and ``add`` writes one ``<FINGERPRINT>.asc`` per key. The daemon
trusts all of them (plus any ``--trust-key`` file). A keyring that others could write to
would let them add keys, so it is refused unless only its owner (root or the caller) can
write it.

The key files a mirror publishes are fetched by ``buildcache.formats.mirror_keys`` (where
each layout keeps them); here they are checked against the fingerprints their index names.
Fetching keys is not trusting them: the command line shows what it found and imports only
when told to (``--trust``).

Directory functions block (gpg runs).
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lazymount.errors import LazymountError, UsageError
from lazymount.system.files import write_atomically
from lazymount.system.places import default_dir
from lazymount.trust.verify import PublicKey, read_key_file, read_public_keys

if TYPE_CHECKING:  # the formats (httpx, trio) are not needed to read the keyring
    from lazymount.buildcache.formats import MirrorKey

KEY_SUFFIX = ".asc"


def default_keyring_dir() -> Path:
    """/etc/lazymount/keys for root, ``$XDG_CONFIG_HOME/lazymount/keys`` otherwise."""
    return default_dir("/etc/lazymount", "XDG_CONFIG_HOME", "~/.config") / "keys"


@dataclass(frozen=True)
class StoredKey:
    """A key of the keyring and the file that holds it."""

    key: PublicKey
    path: Path


class Keyring:
    """The trusted keys in one directory. Methods block (they run gpg)."""

    def __init__(self, directory: Path):
        self.directory = directory

    def files(self) -> list[Path]:
        """The key files, sorted; none if the directory does not exist.

        Raises UsageError if the directory or a file is writable by anyone but its owner,
        or owned by another user than root or us.
        """
        try:  # (a daemon that switched user may no longer reach it: an error, not a crash)
            if not self.directory.exists():
                return []
            _check_private(self.directory)
            files = sorted(p for p in self.directory.iterdir()
                           if p.name.endswith(KEY_SUFFIX) and p.is_file())
        except OSError as exc:
            raise UsageError(f"cannot read the keyring {self.directory}: {exc.strerror}") from None
        for path in files:
            _check_private(path)
        return files

    def key_texts(self) -> list[tuple[str, bytes]]:
        """(file, armored text) of every key file, for the Verifier."""
        return [read_key_file(path) for path in self.files()]

    def keys(self) -> list[StoredKey]:
        """Every key of the keyring with its file, by fingerprint."""
        stored: list[StoredKey] = []
        for path in self.files():
            source, text = read_key_file(path)
            stored.extend(StoredKey(key, path) for key in read_public_keys(source, text))
        return sorted(stored, key=lambda s: s.key.fingerprint)

    def add(self, keys: list[PublicKey]) -> list[tuple[PublicKey, bool]]:
        """Write each key to ``<FINGERPRINT>.asc``; returns (key, True if it was new).

        Raises UsageError if the directory cannot be written.
        """
        known = {s.key.fingerprint for s in self.keys()}
        try:
            self.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create the keyring {self.directory}: "
                             f"{exc.strerror}") from None
        done = []
        for key in keys:
            if key.fingerprint not in known:
                self._write(self.directory / f"{key.fingerprint}{KEY_SUFFIX}", key.armored)
                known.add(key.fingerprint)
                done.append((key, True))
            else:
                done.append((key, False))
        return done

    def _write(self, target: Path, data: bytes) -> None:
        try:
            write_atomically(target, data, mode=0o644, sync=True)
        except OSError as exc:
            raise UsageError(f"cannot write {target}: {exc.strerror}") from None

    def remove(self, wanted: str) -> StoredKey:
        """Delete the file of the key whose fingerprint is, or ends with, ``wanted``
        (at least 16 hex digits: a long key id).

        Raises UsageError for an unknown or ambiguous fingerprint, or a file that also
        holds other keys (it is left alone: edit it by hand).
        """
        wanted = wanted.upper().replace(" ", "").removeprefix("0X")
        if not re.fullmatch(r"[0-9A-F]{16,64}", wanted):
            raise UsageError(f"{wanted!r} is not a fingerprint (give at least 16 hex digits)")
        stored = self.keys()
        matches = [s for s in stored if s.key.fingerprint.endswith(wanted)]
        if not matches:
            raise UsageError(f"no key {wanted} in the keyring {self.directory}")
        if len({s.key.fingerprint for s in matches}) > 1:
            raise UsageError(f"{wanted} matches several keys; give the whole fingerprint")
        match = matches[0]
        others = [s.key.fingerprint for s in stored
                  if s.path == match.path and s.key.fingerprint != match.key.fingerprint]
        if others:
            raise UsageError(f"{match.path} also holds {', '.join(others)}; "
                             "remove or edit that file by hand")
        try:
            match.path.unlink()
        except OSError as exc:
            raise UsageError(f"cannot remove {match.path}: {exc.strerror}") from None
        return match


def _check_private(path: Path) -> None:
    """Refuse a keyring entry others could change: that would let them add trusted keys."""
    st = os.stat(path)
    if st.st_uid not in (0, os.geteuid()):
        raise UsageError(f"keyring {path} belongs to uid {st.st_uid}, not to root or to us; "
                         "its keys are not trusted")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UsageError(f"keyring {path} is writable by group or others "
                         f"(chmod go-w {path}); its keys are not trusted")


def read_key_files(paths: list[Path]) -> list[PublicKey]:
    """The keys of armored key files. Raises UsageError naming a bad file."""
    keys: list[PublicKey] = []
    for path in paths:
        source, text = read_key_file(path)
        keys.extend(read_public_keys(source, text))
    return keys


# ---- keys a mirror publishes ---------------------------------------------------------


def inspect_mirror_keys(found: list[MirrorKey]) -> list[PublicKey]:
    """The public keys of a mirror's key files, each checked to be the key its index
    names (a file that holds another key is refused: the index would be lying).

    Blocks (runs gpg). Raises LazymountError naming the file.
    """
    keys: list[PublicKey] = []
    for item in found:
        inside = read_public_keys(item.source, item.text)
        fingerprints = [k.fingerprint for k in inside]
        if fingerprints != [item.fingerprint]:
            raise LazymountError(f"{item.source}: the key index names {item.fingerprint}, "
                                 f"but the file holds {', '.join(fingerprints) or 'no key'}")
        keys.extend(inside)
    return keys
