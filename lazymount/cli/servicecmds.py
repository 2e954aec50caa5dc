"""The ``status`` and ``refresh`` subcommands: they ask running mounts over their control
sockets (``service.control``) and print the answers."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from lazymount.errors import UsageError
from lazymount.serve.bindmount import is_dead_mount
from lazymount.service import control
from lazymount.service.metrics import exposition
from lazymount.service.statustext import render, render_package
from lazymount.system.mountinfo import lazymount_mounts
from lazymount.system.printable import printable


def _mount_of(path: Path) -> tuple[str, str] | None:
    """(mount point, path relative to it) of the lazymount mount that holds ``path``.
    Only the path's text is used: a stat inside a package would start materializing it."""
    target = os.path.normpath(os.path.abspath(path))
    best = None
    for point in lazymount_mounts():
        if target == point or target.startswith(point.rstrip("/") + "/"):
            if best is None or len(point) > len(best):
                best = point
    if best is None:
        return None
    return best, os.path.relpath(target, best) if target != best else ""


def run_status(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lazymount status",
        description="Ask running mounts what they are doing: mirrors and their last "
                    "errors, index age, packages ready, materializing and failed (with the "
                    "reason), store size, bytes fetched. With a path inside a mount: the "
                    "state of the package that holds it, and why.")
    parser.add_argument("target", metavar="MOUNTPOINT|PATH", type=Path, nargs="?",
                        help="a mount point, or a path inside a mount (default: every mount "
                             "this user can ask)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the status as JSON")
    output.add_argument("--prometheus", action="store_true",
                        help="print the status as Prometheus metrics (text exposition)")
    args = parser.parse_args(argv)
    if args.target is None:
        answers = _every_mount()
    else:
        held = _mount_of(args.target)
        if held is None:
            raise UsageError(f"{args.target} is not on a lazymount mount")
        mountpoint, relative = held
        if is_dead_mount(mountpoint):
            raise UsageError(f"the daemon of {mountpoint} is gone; mount it again with the "
                             "same command (it clears the dead mount)")
        if relative:
            answer = control.checked(control.ask_mount(mountpoint, {"command": "package",
                                                             "path": relative}))
            print(json.dumps(answer, indent=1) if args.json else render_package(answer),
                  end="\n" if args.json else "")
            return 0
        answers = [control.checked(control.ask_mount(mountpoint, {"command": "status"}))]
    if args.json:
        print(json.dumps(answers[0] if args.target is not None else answers, indent=1))
    elif args.prometheus:
        sys.stdout.write(exposition(*answers))
    else:
        sys.stdout.write("\n".join(render(answer) for answer in answers))
    return 0


def _every_mount() -> list[dict[str, Any]]:
    answers = []
    for path in control.known_sockets():
        try:
            answers.append(control.checked(control.ask(path, {"command": "status"})))
        except OSError:
            continue  # a socket left by a daemon that is gone
        except UsageError as exc:  # one confused daemon must not hide the others
            print(f"lazymount: {printable(str(exc))}", file=sys.stderr)
    if not answers:
        places = dict.fromkeys([control.runtime_dir(), control.SYSTEM_DIR])
        raise UsageError(f"no running lazymount answers (looked in "
                         f"{' and '.join(str(place) for place in places)})")
    return answers


def run_refresh(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lazymount refresh",
        description="Make a running mount check its mirrors' indexes now (one small request "
                    "each) and show new packages; removed ones leave the listings, but "
                    "what is open or running keeps working. SIGHUP does the same after "
                    "reading the configuration file again.")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    args = parser.parse_args(argv)
    answer = control.checked(control.ask_mount(str(args.mountpoint), {"command": "refresh"}))
    if answer.get("changed"):
        print(f"lazymount: {args.mountpoint}: the index changed: {answer['packages']} packages "
              f"({answer['added']} new, {answer['removed']} removed)")
    else:
        print(f"lazymount: {args.mountpoint}: the index is unchanged "
              f"({answer['packages']} packages)")
    return 0
