"""``lazymount [options] MOUNTPOINT``: parse what to mount, then mount it.

The command returns once the mount is ready: it forks a background daemon and waits on a
pipe for its first word ("ok" or the error), or with ``--foreground`` serves in this process.
Parsing the arguments (and ``--help``) imports none of the daemon: the daemon's modules are
imported once the configuration is known, before the fork, so the child has them already
(no second interpreter importing them again) and no thread or trio run exists yet.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import select
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from lazymount import __version__, configfile
from lazymount.buildcache.layout import DEFAULT_PROJECTION
from lazymount.config import MirrorConfig, MountConfig
from lazymount.errors import LazymountError, UsageError
from lazymount.install.limits import Limits
from lazymount.mirror.credentials import RegistryLogins
from lazymount.mirror.ociref import is_oci_url, registry_of
from lazymount.mirror.timeouts import Timeouts
from lazymount.system import sizes
from lazymount.system.places import STARTED_AS_ROOT
from lazymount.system.printable import EscapingFilter, printable
from lazymount.system.redact import RedactingFilter, redact

log = logging.getLogger("lazymount")

READY_TIMEOUT = 600.0  # seconds the command waits for a background mount to come up

DESCRIPTION = """\
Mount a Spack binary build cache read-only as an install tree. Every package of the
mirror's index appears at MOUNTPOINT/<platform>-<target>/<name>-<version>-<hash>; the
first access inside a package verifies its signed manifest, downloads and checks its
tarball, extracts and relocates it into the local store, and then serves it from there.
"""

EPILOG = """\
subcommands:
  lazymount umount MOUNTPOINT   unmount (same as fusermount3 -u MOUNTPOINT)
  lazymount demo                run the built-in demo (needs root or FUSE access)
  lazymount keys list [MIRROR]  the keyring's keys, or the keys MIRROR publishes
  lazymount keys install [--trust] MIRROR
                                import MIRROR's keys into the keyring (see keys --help)
  lazymount keys add FILE | remove FINGERPRINT
  lazymount spack-config MOUNTPOINT
                                print the upstreams.yaml that makes Spack use the mount
  lazymount status [MOUNTPOINT|PATH] [--json|--prometheus]
                                what running mounts are doing; a package's state and why
  lazymount refresh MOUNTPOINT  check the mirrors' indexes now (kill -HUP also reloads
                                the configuration file)
  lazymount preload MOUNTPOINT SPEC... | --from spack.lock
                                materialize packages and their link/run closure now
  lazymount gc MOUNTPOINT [--max-size SIZE]
                                evict packages not in use from the store
  lazymount fsck (MOUNTPOINT | --store DIR) [--repair]
                                check every stored package against its record
  lazymount publish MIRROR --signing-key FILE [--output DIR]
                                write a signed site catalog and tables of contents

examples:
  lazymount keys install --trust https://cache.example.org/spack
  lazymount --mirror https://cache.example.org/spack /opt/spack
  lazymount --unsigned --mirror oci://ghcr.io/org/buildcache /opt/spack   (OCI registry)
  /opt/spack/linux-x86_64/lmhello-1.0-<hash>/bin/hello -v
  lazymount spack-config /opt/spack > ~/.spack/upstreams.yaml
  lazymount umount /opt/spack
"""


def mount_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lazymount", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path,
                        help="existing directory to mount the install tree on; its path "
                             "becomes the install root packages are relocated to, so it must "
                             "be no longer than the cache's build root unless the cache was "
                             "built with padded_length")
    parser.add_argument("--config", metavar="FILE", type=Path, default=None,
                        help="configuration file (default: "
                             f"{configfile.default_config_file()}, if it exists); its "
                             "[mounts.\"MOUNTPOINT\"] table, over its [defaults], says what "
                             "to mount; the options below override it")
    configfile.add_options(parser)
    parser.add_argument("--foreground", "-f", action="store_true",
                        help="stay attached and log to stderr until unmounted (for systemd "
                             "and debugging); without it the command returns once the mount "
                             "is ready and a background process keeps serving it")
    parser.add_argument("--log-file", metavar="FILE", type=Path, default=None,
                        help="where the background process logs (default: "
                             "STORE/lazymount.log)")
    parser.add_argument("--max-package-size", metavar="BYTES", type=byte_size, default=None,
                        help="refuse a package whose files expand to more than this (a "
                             "decompression bomb); K, M, G, T suffixes (default: "
                             f"{sizes.option_size(Limits.max_bytes)})")
    parser.add_argument("--max-package-files", metavar="N", type=positive_int, default=None,
                        help="refuse a package whose tarball has more members than this "
                             f"(default: {Limits.max_members})")
    parser.add_argument("--verbose", "-v", action="store_true", help="log more")
    parser.add_argument("--version", action="version", version=f"lazymount {__version__}")
    return parser


def byte_size(text: str) -> int:
    """``"64G"`` -> 68719476736: a positive byte count with an optional binary-unit suffix."""
    try:
        return sizes.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def mirror_configs(values: dict[str, Any]) -> list[MirrorConfig]:
    """The mirrors first, then the binary mirrors of each Spack mirrors file; a URL
    given twice is kept at its first place. Prints a notice for each skipped mirror.
    OCI registries get their logins; one not mounted unsigned is refused (UsageError)."""
    from lazymount.spack.spackconfig import read_spack_mirrors

    signed = not values["unsigned"]
    mirrors = [MirrorConfig(url, require_signature=signed) for url in values["mirrors"]]
    for path in values["spack_mirrors"]:
        found, notices = read_spack_mirrors(path, require_signature=signed)
        for notice in notices:
            print(f"lazymount: {redact(notice)}", file=sys.stderr)
        mirrors += found
    unique: dict[str, MirrorConfig] = {}
    for mirror in mirrors:
        unique.setdefault(mirror.url, mirror)
    logins = RegistryLogins(values.get("registries") or {}, values.get("docker_config"))
    found = [oci_mirror(m, logins) if is_oci_url(m.url) else m for m in unique.values()]
    for notice in logins.notices:
        print(f"lazymount: {notice}", file=sys.stderr)
    return found


def oci_mirror(mirror: MirrorConfig, logins: RegistryLogins) -> MirrorConfig:
    """An OCI registry mirror with its login. OCI caches are never signed (Spack cannot sign
    them), so one that would require signatures is refused here, before anything mounts."""
    if mirror.require_signature:
        raise UsageError(
            f"mirror {mirror.url}: OCI registry build caches carry no signatures (Spack "
            "cannot sign them), so lazymount serves one only when told to trust it unsigned: "
            "give --unsigned, or signed: false for it in mirrors.yaml, or unsigned = true in "
            "the configuration file. Integrity then rests on TLS and the blobs' sha256 "
            "digests (docs/USAGE.md: OCI registries)")
    if mirror.credentials is not None:
        return mirror
    return dataclasses.replace(mirror, credentials=logins.find(registry_of(mirror.url)))


def build_config(args: argparse.Namespace) -> MountConfig:
    """The mount's configuration: the command line over the configuration file."""
    from lazymount.store.content import default_store_dir
    from lazymount.trust.keyring import default_keyring_dir

    config = configfile.load(args.config)
    values = configfile.settings(args, config, args.mountpoint)
    mirrors = mirror_configs(values)
    if not mirrors:
        where = (f"nor in a [mounts.\"{configfile.mount_key(args.mountpoint)}\"] table of "
                 f"{config.path}" if config.path is not None else
                 f"and there is no configuration file {configfile.default_config_file()}")
        raise UsageError("no mirror to mount: give --mirror URL (or --spack-mirrors FILE) "
                         f"on the command line, {where}")
    allow_other = values["allow_other"]
    if allow_other is None:
        allow_other = STARTED_AS_ROOT  # still after --user switched users
    timeout = values["timeout"]
    return MountConfig(
        mountpoint=args.mountpoint,
        mirrors=tuple(mirrors),
        trust_keys=tuple(path.resolve() for path in values["trust_keys"]),
        keyring=(values["keyring"] or default_keyring_dir()).resolve(),
        store=(values["store"] or default_store_dir()).resolve(),
        projection=values["projection"] or DEFAULT_PROJECTION,
        allow_other=allow_other,
        timeouts=Timeouts(read=timeout, connect=min(timeout, 10.0)),
        limits=Limits(max_bytes=args.max_package_size or Limits.max_bytes,
                      max_members=args.max_package_files or Limits.max_members),
        bind_ready=values["bind_ready"],
        store_quota=values["store_quota"],
        ca_certs=values["ca_certs"],
        config_file=config.path,
        host_target=values["host_target"],
        index_refresh=values["index_refresh"],
        metrics_listen=values["metrics_listen"],
        targets=values["targets"],
        proxies=values["proxies"],
        shared_store=values["shared_store"].resolve() if values["shared_store"] else None,
        host_view=values["host_view"],
        user=values["user"],
        tocs=tuple(values["toc"] or ()),
        fill=values["fill"],
    )


class _JournalFormatter(logging.Formatter):
    """One line per record, prefixed with its syslog priority (``<3>`` error, ``<4>``
    warning...) so that ``journalctl -p err`` finds the failures."""

    PRIORITIES = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6}

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).replace("\n", " | ")
        return f"<{self.PRIORITIES.get(record.levelno, 7)}>{text}"


def setup_logging(verbose: bool, log_file: Path | None = None) -> None:
    """Log to stderr, or to ``log_file`` (opened safely: no link followed, mode 0640).
    Passwords in URLs never reach either."""
    from lazymount.system.logfile import open_log

    handler: logging.Handler
    if log_file is not None:
        handler = logging.StreamHandler(os.fdopen(open_log(log_file), "a", buffering=1))
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    elif os.environ.get("JOURNAL_STREAM"):  # under systemd: journald reads the <N> priority
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_JournalFormatter("lazymount: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("lazymount: %(message)s"))
    handler.addFilter(RedactingFilter())
    handler.addFilter(EscapingFilter())  # after redaction, which reads the message
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    for noisy in ("httpx", "httpcore", "gnupg", "trio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_mount(argv: list[str]) -> int:
    args = mount_parser().parse_args(argv)
    config = build_config(args)
    if args.foreground:
        setup_logging(args.verbose)
        return serve_mount(config, args, None)
    return _serve_in_background(config, args)


def serve_mount(config: MountConfig, args: argparse.Namespace, ready_fd: int | None) -> int:
    """Serve ``config`` in this process until unmounted; the first word (ready or the error)
    goes to the log and, in the background daemon, down ``ready_fd``."""
    from lazymount.daemon import serve  # imports pyfuse3: only where a mount is made

    pipe = [ready_fd]

    def ready(error: str | None) -> None:
        if error is not None:
            log.error("%s", error)
        fd = pipe.pop() if pipe else None
        if fd is not None:
            os.write(fd, f"error: {error}\n".encode() if error else b"ok\n")
            os.close(fd)

    return serve(config, ready, lambda: build_config(args))


def _serve_in_background(config: MountConfig, args: argparse.Namespace) -> NoReturn:
    """Fork a detached daemon that serves the mount; end the command once it says it is
    ready, or why it is not."""
    from lazymount.store.content import create_store_dir
    from lazymount.system.logfile import open_log
    from lazymount.system.ownership import check_trusted_dir
    from lazymount.system.privileges import daemon_account

    owner, group = os.geteuid(), os.getegid()
    account = daemon_account(config.user) if owner == 0 else None
    if account is not None:  # the store and log are the daemon's user's
        owner, group = account.uid, account.gid
    create_store_dir(config.store, owner, group)
    check_trusted_dir(config.store, owner, "the store")  # before writing the log into it
    log_file = (args.log_file or config.store / "lazymount.log").absolute()
    log_fd = open_log(log_file, owner)
    import lazymount.daemon  # noqa: F401  # before the fork: the child has it imported

    read_fd, write_fd = os.pipe()
    pid = _fork_daemon(log_fd, lambda: _daemon_main(config, args, write_fd, log_file),
                       keep=write_fd)
    os.close(log_fd)
    os.close(write_fd)
    message = _wait_for_child(read_fd, pid)
    if message == "ok":
        print(f"lazymount: mounted at {config.mountpoint} (pid {pid}, log {log_file})")
        _exit_now(0)
    reason = redact(message) or f"the mount process ended without a word; see {log_file}"
    print(f"lazymount: {printable(reason)}", file=sys.stderr)
    _exit_now(1)


def _exit_now(status: int) -> NoReturn:
    """End the command once it has said what happened: it holds the daemon's modules, and
    the interpreter tearing them down at exit would keep the user waiting 50-150 ms more."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _fork_daemon(log_fd: int, body: Callable[[], int], keep: int) -> int:
    """Fork a child in a session of its own (stdin and stdout on /dev/null, stderr on
    ``log_fd``, no other descriptor than ``keep``) that runs ``body`` and exits with its
    status; the child's pid, in the parent."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    status: int = 1
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for target, source in ((0, null), (1, null), (2, log_fd)):
            os.dup2(source, target)
        # nothing the caller handed this command (pipes a caller waits on) outlives it
        os.closerange(3, keep)
        os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
        status = body()
    except LazymountError as exc:
        print(f"lazymount: {redact(str(exc))}", file=sys.stderr)
        status = exc.exit_code
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        logging.shutdown()
        sys.stderr.flush()
        os._exit(status)


def _daemon_main(config: MountConfig, args: argparse.Namespace, ready_fd: int,
                 log_file: Path) -> int:
    setup_logging(args.verbose, log_file)
    return serve_mount(config, args, ready_fd)


def _wait_for_child(read_fd: int, pid: int) -> str:
    """The child's first line, without its ``error: `` prefix; "" if it ended silently."""
    deadline = time.monotonic() + READY_TIMEOUT
    data = b""
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        while time.monotonic() < deadline:
            readable, _, _ = select.select([pipe], [], [], 1.0)
            if readable:
                chunk = pipe.read(4096)
                if not chunk:
                    break
                data += chunk
                if data.endswith(b"\n"):
                    break
            elif os.waitpid(pid, os.WNOHANG) != (0, 0):
                break
        else:
            os.kill(pid, 15)
            return f"the mount was not ready after {READY_TIMEOUT:.0f} s; stopped it"
    text = data.decode(errors="replace").strip()
    return text.removeprefix("error: ")
