"""One exception tree for the whole project.

Every error a user can meet is a ``LazymountError`` with a one-line message. At the FUSE
boundary its ``errno`` becomes the file operation's error; on the command line its
``exit_code`` becomes the process status. Library exceptions are translated once, in the
module that imports the library.
"""

from __future__ import annotations

import errno as _errno


class LazymountError(Exception):
    """Base class: a clear, one-line, user-facing reason."""

    errno: int = _errno.EIO
    exit_code: int = 1


class UsageError(LazymountError):
    """Bad command-line input or configuration."""

    errno = _errno.EINVAL
    exit_code = 2


class MirrorError(LazymountError):
    """A mirror could not be reached or answered with an error."""


class NotInMirror(MirrorError):
    """The mirror answered, but does not have the file (HTTP 404, missing file).

    Still EIO for a file operation: the index said the package is there."""


class FormatError(LazymountError):
    """A manifest, index, spec or buildinfo file is malformed or of an unknown version."""


class SignatureError(LazymountError):
    """A manifest's signature is bad, made by an untrusted key, or missing."""

    errno = _errno.EACCES


class IntegrityError(LazymountError):
    """Downloaded bytes do not match what the signed manifest says (length, sha256, root hash)."""


class UnsafeArchiveError(LazymountError):
    """A tarball member would escape the package prefix, or the archive breaks a limit."""


class RelocationError(LazymountError):
    """The package cannot be relocated to its path under the mount."""


class MountPathTooLong(RelocationError):
    """Binaries cannot grow: the mount root is longer than an unpadded build root."""

    errno = _errno.ENAMETOOLONG


class StoreError(LazymountError):
    """The local content store could not be written (disk full, permissions)."""


class Withdrawn(LazymountError):
    """The package was removed from the mirrors' index by a refresh and is not in the store."""

    errno = _errno.ENOENT


class UnsafePathError(StoreError):
    """A directory, or something in it, could be changed by a user other than its owner
    (or root): a store, its parents or its entries with the wrong owner, mode or a link."""


class StoreFull(StoreError):
    """The store has no room for a package: its file system is full, or the store quota
    cannot hold it even after evicting every package that is not in use."""

    errno = _errno.ENOSPC
