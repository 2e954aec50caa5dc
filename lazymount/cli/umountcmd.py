"""``lazymount umount MOUNTPOINT``: unmount, never hang on a stopped daemon (``--abort``)."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from lazymount.errors import UsageError
from lazymount.serve.bindmount import clear_dead_mount, unmount_below
from lazymount.system.mountinfo import fuse_device

log = logging.getLogger("lazymount")


def run_umount(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lazymount umount",
                                     description="Unmount a lazymount mount point; its "
                                                 "background process then exits.")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    parser.add_argument("--abort", action="store_true",
                        help="for a mount whose daemon hangs or is stopped: abort its FUSE "
                             "connection (every waiting and later request fails with "
                             "ENOTCONN instead of hanging), then detach it; root only")
    args = parser.parse_args(argv)
    if args.abort:
        return _abort(args.mountpoint)
    return _bounded_unmount(args.mountpoint)


UMOUNT_WAIT = 5.0  # seconds `lazymount umount` waits for a daemon that may hang


def _bounded_unmount(mountpoint: Path) -> int:
    """Unmount in a worker thread; if a stopped or hung daemon keeps it waiting more than
    UMOUNT_WAIT seconds, give up and name --abort (the command never hangs with no hint)."""
    outcome: dict[str, Any] = {}
    tools: list[subprocess.Popen[bytes]] = []

    def work() -> None:
        try:
            outcome["status"] = _unmount(mountpoint, tools)
        except BaseException as exc:  # handed to the main thread
            outcome["error"] = exc

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(UMOUNT_WAIT)
    if worker.is_alive():
        for tool in tools:
            tool.kill()
        print(f"lazymount: {mountpoint}: its daemon does not answer (stopped or hung); the "
              f"unmount did not finish in {UMOUNT_WAIT:.0f} s. `lazymount umount --abort "
              f"{mountpoint}` (root) aborts its FUSE connection and detaches it",
              file=sys.stderr)
        return 1
    if "error" in outcome:
        raise outcome["error"]
    return int(outcome["status"])


def _unmount(mountpoint: Path, tools: list[subprocess.Popen[bytes]]) -> int:
    if clear_dead_mount(os.path.abspath(mountpoint)):
        print(f"lazymount: {mountpoint}: its daemon was gone; detached the dead mount")
        return 0
    if fuse_device(os.path.abspath(mountpoint)) is None and not os.path.ismount(mountpoint):
        raise UsageError(f"{mountpoint} is not mounted")
    if os.geteuid() == 0:  # packages bind-mounted by --bind-ready go first
        for busy in unmount_below(str(mountpoint)):
            log.warning("%s is busy", busy)
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    command = [tool, "-u", str(mountpoint)] if tool else ["umount", str(mountpoint)]
    tools.append(subprocess.Popen(command))
    return tools[-1].wait()


FUSECTL = Path("/sys/fs/fuse/connections")


def _abort(mountpoint: Path) -> int:
    """Abort the FUSE connection of ``mountpoint`` and detach the mount lazily."""
    device = fuse_device(os.path.abspath(mountpoint))
    if device is None:
        raise UsageError(f"{mountpoint} is not a FUSE mount")
    if os.geteuid() != 0:
        raise UsageError("aborting a FUSE connection needs root")
    if not os.path.ismount(FUSECTL):
        subprocess.call(["mount", "-t", "fusectl", "fusectl", str(FUSECTL)])
    abort = FUSECTL / device.split(":")[1] / "abort"
    try:
        abort.write_text("1")
    except OSError as exc:
        raise UsageError(f"cannot abort the connection of {mountpoint}: {exc.strerror}") from None
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    command = [tool, "-u", "-z", str(mountpoint)] if tool else ["umount", "-l", str(mountpoint)]
    return subprocess.call(command)

