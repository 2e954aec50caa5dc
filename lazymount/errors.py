"""One exception tree for the whole project.

Every error a user can meet is a ``LazymountError`` with a one-line message. At the FUSE
boundary its ``errno`` becomes the file operation's error; on the command line its
``exit_code`` becomes the process status. Library exceptions are translated once, in the
module that imports the library. What a message is about (a package, a file of the store)
is said once, where it is known: inner code raises the bare reason and a boundary's
``with about(subject):`` prefixes it.
"""

from __future__ import annotations

import errno as _errno
from contextlib import AbstractContextManager
from types import TracebackType
from typing import TypeVar


class LazymountError(Exception):
    """Base class: a clear, one-line, user-facing reason."""

    errno: int = _errno.EIO
    exit_code: int = 1
    # what the message is about (a package's label, a config entry), set once by ``about``;
    # "" for an error about nothing in particular (``general``)
    subject: str | None = None


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


# ---------------------------------------------------------------------------------------------
# What an error is about


def about(subject: str) -> AbstractContextManager[None]:
    """Name what the errors raised inside are about: a ``LazymountError`` that leaves the
    block with no subject gets ``subject`` and its message the prefix ``"{subject}: "``.
    One that has a subject (an inner ``about`` named it, or ``general`` said it needs none)
    leaves unchanged, as does a message that already starts with the prefix. Code inside
    raises its message without naming the package, the file or the entry it is about; the
    boundary that knows (the materializer's attempt, a public entry point) says it once.
    """
    return _About(subject)


E = TypeVar("E", bound=LazymountError)


def general(error: E) -> E:
    """``error``, marked as about nothing one ``about`` names (a tool missing from the
    system, a verifier already closed): no boundary prefixes its message."""
    error.subject = ""
    return error


class _About(AbstractContextManager[None]):
    # a class, not a generator: it is entered for every package extracted and relocated
    __slots__ = ("subject",)

    def __init__(self, subject: str) -> None:
        self.subject = subject

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if isinstance(error, LazymountError) and error.subject is None:
            error.subject = self.subject
            message = str(error.args[0]) if error.args else ""
            prefix = f"{self.subject}: "
            if not message.startswith(prefix):
                error.args = (prefix + message, *error.args[1:])
        # returning None re-raises the error, its type and traceback kept
