"""GNU tar as the file writer of extraction: a child process fed only checked bytes.

Creating 30,000 files costs CPython about 15 µs of interpreter work each, on the thread that
also parses and hashes the stream; GNU tar does it in C, in its own process, on the other
core. ``extract`` stays the one reader of the archive: it parses every header, checks the
member, and only then passes the header and the member's data on to tar (``write``), so tar
never sees a member that was refused. What tar then made is compared with what was checked
(``extract``), and the tree is thrown away if they differ.

tar runs with a clean environment (``TAR_OPTIONS`` could add options), without restoring
owners, setuid bits, ACLs, SELinux labels or extended attributes, and as the daemon's own
user; GNU tar also refuses ``..`` members and defers symlinks that leave the tree.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from lazymount.errors import StoreError, StoreFull, general

PIPE_SIZE = 1 << 20
MAX_MESSAGE = 600  # characters of tar's complaint quoted in an error
_OPTIONS = (
    "--extract", "--file=-", "--no-same-owner", "--numeric-owner", "--no-same-permissions",
    "--no-acls", "--no-selinux", "--no-xattrs", "--warning=no-unknown-keyword",
    "--warning=no-timestamp",
)
_ENVIRONMENT = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}
_IOV = 512  # buffers per writev; Linux allows 1024


@functools.cache
def gnu_tar() -> str:
    """Path of GNU tar. StoreError if there is none (another tar reads options differently)."""
    path = shutil.which("tar", path=_ENVIRONMENT["PATH"])
    if path is not None:
        try:
            version = subprocess.run([path, "--version"], capture_output=True, timeout=30,
                                     env=_ENVIRONMENT, check=False).stdout
        except (OSError, subprocess.SubprocessError):
            version = b""
        if b"GNU tar" in version:
            return path
    raise general(StoreError("lazymount needs GNU tar (/usr/bin/tar) to extract packages; "
                             "install the distribution's tar package"))


class TarChild:
    """One ``tar --extract`` into ``directory``, reading its archive from a pipe.

    ``write`` blocks while tar is behind (the pipe is full); ``finish`` waits for it and
    raises StoreError (StoreFull for a full disk) if it failed; ``kill`` stops it. Use it as
    a context manager: leaving it without ``finish`` kills tar.
    """

    def __init__(self, directory: Path) -> None:
        self._errors = tempfile.TemporaryFile()  # a pipe could fill and stall tar
        self._process = subprocess.Popen(
            [gnu_tar(), *_OPTIONS, f"--directory={directory}"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._errors,
            env=_ENVIRONMENT, umask=0o022, close_fds=True)
        assert self._process.stdin is not None
        self._fd = self._process.stdin.fileno()
        self._ended = False  # tar exited well before reading all it was given
        try:  # fewer, larger hand-overs between the two processes
            fcntl.fcntl(self._fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # a smaller pipe only costs speed

    def __enter__(self) -> TarChild:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process.returncode is None:
            self.kill()
        self._errors.close()

    def write(self, buffers: Sequence[bytes | memoryview]) -> None:
        """Pass ``buffers`` on to tar, in order. StoreError if tar has stopped reading
        because it failed; once it has exited well (it reads no further than the archive's
        end blocks, and the padding after them is the extractor's to check), the rest is
        not passed on."""
        views = [memoryview(b) for b in buffers if len(b)]
        start = 0
        while start < len(views) and not self._ended:
            try:
                done = os.writev(self._fd, views[start:start + _IOV])
            except BrokenPipeError:
                if self._process.wait() != 0:
                    raise self._failure() from None
                self._ended = True
                return
            while done:  # skip what was written; keep the rest of a partly written buffer
                size = len(views[start])
                if done >= size:
                    done -= size
                    start += 1
                else:
                    views[start] = views[start][done:]
                    done = 0

    def finish(self) -> None:
        """Close tar's input and wait for it. StoreError (or StoreFull) if it failed."""
        assert self._process.stdin is not None
        try:
            self._process.stdin.close()
        except BrokenPipeError:
            pass
        if self._process.wait() != 0:
            raise self._failure()

    def kill(self) -> None:
        self._process.kill()
        try:
            assert self._process.stdin is not None
            self._process.stdin.close()
        except OSError:
            pass
        self._process.wait()

    def _failure(self) -> StoreError:
        """The error tar's exit means, with what it said."""
        self._process.wait()
        self._errors.seek(0)
        said = self._errors.read(64 << 10).decode("utf-8", "replace").strip()
        said = " ".join(said.splitlines())[:MAX_MESSAGE]
        if os.strerror(errno.ENOSPC) in said or os.strerror(errno.EDQUOT) in said:
            return StoreFull(f"no space left on the store's file system ({said})")
        return StoreError(f"tar could not write the package into the store "
                          f"(exit {self._process.returncode}: {said or 'no message'})")
