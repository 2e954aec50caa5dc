"""The ``keys`` and ``spack-config`` subcommands of the command line.

``lazymount keys list|install|add|remove`` manages lazymount's keyring (see keyring.py);
``lazymount spack-config MOUNTPOINT`` prints the ``upstreams.yaml`` that makes a Spack use
the mount as an upstream install tree. Both run in the calling process, print to stdout and
raise LazymountError for anything a user must fix (cli.py turns it into a message and an
exit status).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lazymount.buildcache.layout import DEFAULT_PROJECTION
from lazymount.errors import UsageError
from lazymount.mirror.ociref import is_oci_url
from lazymount.system import xattrs
from lazymount.system.mountinfo import FSTYPE, is_mounted
from lazymount.trust.keyring import (
    Keyring,
    default_keyring_dir,
    inspect_mirror_keys,
    read_key_files,
)
from lazymount.trust.verify import PublicKey

KEYS_DESCRIPTION = """\
Manage lazymount's own keyring: a directory of ASCII-armored public keys whose signatures
every mount trusts (with any --trust-key files). It is never ~/.gnupg and needs no agent.
Default: /etc/lazymount/keys for root, $XDG_CONFIG_HOME/lazymount/keys otherwise.

  list [MIRROR]           the keyring's keys, or the keys MIRROR publishes
  install [--trust] MIRROR  import MIRROR's keys; without --trust only shows them
  add FILE...             import armored public key files
  remove FINGERPRINT...   remove keys (the whole fingerprint, or its last 16+ digits)
"""


def _key_lines(key: PublicKey, note: str = "") -> list[str]:
    uids = list(key.uids) or ["(no user id)"]
    lines = [f"{key.fingerprint}  {uids[0]}{note}"]
    lines += [f"{'':{len(key.fingerprint)}}  {uid}" for uid in uids[1:]]
    return lines


def _print_keys(keys: list[PublicKey]) -> None:
    for key in keys:
        print("\n".join(_key_lines(key)))


def _fetch_mirror_keys(url: str, timeout: float, ca_certs: Path | None = None
                       ) -> list[PublicKey]:
    """The keys a mirror publishes, inspected (fingerprints checked against its index)."""
    import trio  # the transports: only a command that asks a mirror pays for them

    from lazymount.buildcache.formats import MirrorKey, mirror_keys
    from lazymount.mirror.transport import Timeouts, open_mirror

    async def fetch() -> list[MirrorKey]:
        mirror = open_mirror(url, Timeouts(read=timeout, connect=min(timeout, 10.0)), ca_certs)
        try:
            return await mirror_keys(mirror)
        finally:
            await mirror.aclose()

    return inspect_mirror_keys(trio.run(fetch))


def keys_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lazymount keys", description=KEYS_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--keyring", metavar="DIR", type=Path, default=None,
                        help=f"the keyring directory (default: {default_keyring_dir()})")
    common.add_argument("--timeout", metavar="SECONDS", type=float, default=30.0,
                        help="give up on a mirror that sends nothing for this long")
    common.add_argument("--ca-certs", metavar="FILE", type=Path, default=None,
                        help="CA bundle trusted for an https:// mirror, in addition to the "
                             "default ones (a site's private CA)")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", parents=[common],
                                 help="the keyring's keys, or the keys a mirror publishes")
    listing.add_argument("mirror", metavar="MIRROR", nargs="?",
                         help="a build cache (directory, file:// or http(s):// URL)")
    install = actions.add_parser("install", parents=[common],
                                 help="import the keys a mirror publishes")
    install.add_argument("--trust", action="store_true",
                         help="really import them (without it: only show what would be)")
    install.add_argument("mirror", metavar="MIRROR")
    add = actions.add_parser("add", parents=[common], help="import armored public key files")
    add.add_argument("files", metavar="FILE", nargs="+", type=Path)
    remove = actions.add_parser("remove", parents=[common], help="remove keys")
    remove.add_argument("fingerprints", metavar="FINGERPRINT", nargs="+")
    return parser


def run_keys(argv: list[str]) -> int:
    args = keys_parser().parse_args(argv)
    keyring = Keyring(args.keyring or default_keyring_dir())
    if args.action == "list":
        return _list(keyring, args.mirror, args.timeout, args.ca_certs)
    if args.action == "install":
        return _install(keyring, args.mirror, args.trust, args.timeout, args.ca_certs)
    if args.action == "add":
        return _add(keyring, read_key_files(args.files))
    for fingerprint in args.fingerprints:
        removed = keyring.remove(fingerprint)
        print("\n".join(_key_lines(removed.key, f"  (removed {removed.path.name})")))
    return 0


def _no_keys_of_oci(mirror: str) -> str:
    return (f"{mirror} is an OCI registry: OCI build caches carry no keys and no "
            "signatures (Spack cannot sign them); mount it with --unsigned")


def _list(keyring: Keyring, mirror: str | None, timeout: float,
          ca_certs: Path | None = None) -> int:
    if mirror is not None and is_oci_url(mirror):
        print(f"lazymount: {_no_keys_of_oci(mirror)}", file=sys.stderr)
        return 0
    if mirror is not None:
        _print_keys(_fetch_mirror_keys(mirror, timeout, ca_certs))
        return 0
    stored = keyring.keys()
    if not stored:
        print(f"lazymount: no keys in the keyring {keyring.directory}", file=sys.stderr)
    _print_keys([s.key for s in stored])
    return 0


def _install(keyring: Keyring, mirror: str, trust: bool, timeout: float,
             ca_certs: Path | None = None) -> int:
    if is_oci_url(mirror):
        raise UsageError(f"nothing to install: {_no_keys_of_oci(mirror)}")
    keys = _fetch_mirror_keys(mirror, timeout, ca_certs)
    if not trust:
        count = f"{len(keys)} key" + ("s" if len(keys) != 1 else "")
        print(f"{mirror} publishes {count}:")
        _print_keys(keys)
        print(f"nothing imported: check the fingerprints, then add --trust to trust "
              f"{'them' if len(keys) != 1 else 'it'} for every mount that uses the keyring "
              f"{keyring.directory}")
        return 0
    return _add(keyring, keys)


def _add(keyring: Keyring, keys: list[PublicKey]) -> int:
    for key, new in keyring.add(keys):
        note = "  (added)" if new else "  (already in the keyring)"
        print("\n".join(_key_lines(key, note)))
    print(f"keyring: {keyring.directory}")
    return 0


# ---- spack-config -------------------------------------------------------------------


def _mounted_projection(root: str) -> str | None:
    """The projection a live lazymount mount at ``root`` serves, or None if none is there."""
    try:
        if not is_mounted(root, FSTYPE):
            return None
        return os.getxattr(root, xattrs.PROJECTION).decode()
    except OSError:
        return None


def run_spack_config(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lazymount spack-config",
        description="Print the upstreams.yaml that makes Spack use a lazymount mount as an "
                    "upstream install tree (spack find/load see its packages, spack install "
                    "reuses them, spack module tcl/lmod loads names their module files).")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    parser.add_argument("--name", default="lazymount",
                        help="the upstream's name in upstreams.yaml (default: lazymount)")
    parser.add_argument("--projection", metavar="TEMPLATE", default=None,
                        help="the mount's projection (default: read from the live mount)")
    args = parser.parse_args(argv)
    from lazymount.spack.spackconfig import upstreams_yaml

    if not args.name:
        raise UsageError("--name must not be empty")
    root = os.path.realpath(args.mountpoint)
    projection = args.projection or _mounted_projection(root)
    if projection is None:
        print(f"lazymount: {root} is not a lazymount mount now; assuming the default "
              "projection (the mount must be up for Spack to read it)", file=sys.stderr)
        projection = DEFAULT_PROJECTION
    sys.stdout.write(upstreams_yaml(root, projection, args.name))
    return 0
