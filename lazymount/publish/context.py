"""What every part of ``lazymount publish`` shares, and what each one reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import trio

from lazymount.buildcache.formats import CacheLayout
from lazymount.errors import UsageError
from lazymount.mirror.transport import Mirror
from lazymount.system.files import write_atomically
from lazymount.trust.policy import MirrorTrust
from lazymount.trust.sign import Signer


class Output:
    """A folder the published files are written to, by their mirror-relative path
    (``buildcache/published.py``): the mirror itself when it is a folder, or ``--output``."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, relative: str) -> Path:
        target = (self.root / relative).resolve()
        if not target.is_relative_to(self.root.resolve()):
            raise UsageError(f"{relative}: outside the output folder {self.root}")
        return target

    def read(self, relative: str, max_bytes: int) -> bytes | None:
        """The bytes written earlier at ``relative`` (None if absent or larger than
        ``max_bytes``: it is written again)."""
        try:
            with open(self.path(relative), "rb") as file:
                data = file.read(max_bytes + 1)
        except FileNotFoundError:
            return None
        return data if len(data) <= max_bytes else None

    def write(self, relative: str, data: bytes) -> None:
        """``data`` at ``relative``, all or nothing (a reader never sees half of it)."""
        target = self.path(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(target, data, mode=0o644)

    async def write_async(self, relative: str, data: bytes) -> None:
        await trio.to_thread.run_sync(self.write, relative, data)


@dataclass(frozen=True)
class Options:
    """What the command line asked for beyond the mirror and the keys."""

    min_size: int = 8 << 20  # tarballs smaller than this get no table of contents
    progress: bool = False  # show progress bars (on a tty)


@dataclass
class Context:
    """One publication: ``mirror`` (read as a mount reads it, with ``layout``), ``trust``
    (checks the mirror's signed manifests before anything is described), ``signer`` (signs
    what is written), ``output`` (None: the registry repository of an ``oci://`` mirror)."""

    url: str
    mirror: Mirror
    layout: CacheLayout
    trust: MirrorTrust
    signer: Signer
    output: Output | None
    options: Options = field(default_factory=Options)


@dataclass
class PartReport:
    """What one part did, for the command's summary: ``lines`` to print, ``failures`` (each
    a one-line reason) that make the command exit 1."""

    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
