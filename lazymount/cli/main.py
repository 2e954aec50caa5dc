"""Command line: ``lazymount [options] MOUNTPOINT`` and its subcommands.

This module only dispatches: each subcommand's module is imported when that subcommand
runs, so ``lazymount status`` or ``--help`` never pay for the daemon's modules (trio,
pyfuse3, httpx, the catalog). Mounting is ``mountcmd``. Exit codes: 0 success, 1 failure,
2 bad usage.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

from lazymount.errors import LazymountError
from lazymount.system.printable import printable
from lazymount.system.redact import redact

# subcommand -> "module:function" that runs it with the rest of the command line
RUNNERS = {
    "umount": "lazymount.cli.umountcmd:run_umount",
    "demo": "lazymount.cli.demo:main",
    "keys": "lazymount.cli.subcommands:run_keys",
    "spack-config": "lazymount.cli.subcommands:run_spack_config",
    "status": "lazymount.cli.servicecmds:run_status",
    "refresh": "lazymount.cli.servicecmds:run_refresh",
    "preload": "lazymount.cli.storecmds:run_preload",
    "gc": "lazymount.cli.storecmds:run_gc",
    "fsck": "lazymount.cli.storecmds:run_fsck",
    "publish": "lazymount.cli.publishcmd:run_publish",
}
MOUNT = "lazymount.cli.mountcmd:run_mount"


def runner(argv: list[str]) -> tuple[Callable[[list[str]], int], list[str]]:
    """The function that runs this command line, and the arguments it gets."""
    if argv and argv[0] in RUNNERS:
        target, argv = RUNNERS[argv[0]], argv[1:]
    else:
        target = MOUNT
    module, _, function = target.partition(":")
    run: Callable[[list[str]], int] = getattr(importlib.import_module(module), function)
    return run, argv


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        run, rest = runner(argv)
        return run(rest)
    except LazymountError as exc:
        print(f"lazymount: {printable(redact(str(exc)))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
