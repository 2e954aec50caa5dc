"""``lazymount publish MIRROR --signing-key FILE``: what a site runs after ``spack buildcache
push`` (or against a cache it only consumes) so that its clients mount faster and fetch less.

It reads MIRROR through the same transports as a mount, checks every signed manifest it
describes against the trusted keys, and writes signed files under ``lazymount/v1/`` of the
mirror (or of ``--output``); see ``publish/`` for the parts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lazymount.errors import UsageError
from lazymount.system.sizes import parse_size

if TYPE_CHECKING:
    from lazymount.mirror.credentials import Credentials

DESCRIPTION = """\
Describe a Spack build cache for lazymount clients: a compact, signed site catalog of its
index, and a signed table of contents for every tarball of at least --min-size, so that a
client fetches only the files a job reads. Everything is written under lazymount/v1/ of the
mirror (a folder) or of --output; a file that exists and checks out is kept (publishing is
incremental). Every tarball is checked against its signed manifest before it is described.
An oci:// registry without --output gets the catalog and each table of contents pushed into
its repository, tagged lazymount-catalog and lazymount-toc-<tarball sha256>.
"""

EPILOG = """\
examples:
  lazymount publish /srv/spack-cache --signing-key site.secret.asc
  lazymount publish https://cache.example.org/spack --signing-key site.secret.asc \\
      --trust-key upstream.pub.asc --output /srv/lazymount-site
"""


def publish_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lazymount publish", description=DESCRIPTION,
                                     epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mirror", metavar="MIRROR",
                        help="the build cache: a folder, file://, http(s):// or oci:// URL")
    parser.add_argument("--signing-key", metavar="FILE", type=Path, required=True,
                        help="ASCII-armored secret key (no passphrase) that signs what is "
                             "written; clients trust its public key")
    parser.add_argument("--trust-key", metavar="FILE", type=Path, action="append", default=[],
                        help="public key the mirror's manifests must be signed with "
                             "(repeatable; with lazymount's keyring, if it exists)")
    parser.add_argument("--output", metavar="DIR", type=Path, default=None,
                        help="where to write (default: the mirror itself, when it is a "
                             "folder or a registry); serve it and name it to clients with "
                             "--toc URL")
    parser.add_argument("--min-size", metavar="SIZE", type=_size, default=8 << 20,
                        help="tarballs smaller than this get no table of contents "
                             "(K, M, G suffixes; default: 8M)")
    return parser


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run_publish(argv: list[str]) -> int:
    args = publish_parser().parse_args(argv)
    import trio

    return trio.run(_publish, args)


def _registry_login(url: str) -> Credentials | None:
    """The login ``docker login`` keeps for a registry (Docker's ``config.json``): pushing
    tables of contents into one needs it; None for other mirrors."""
    from lazymount.mirror.credentials import RegistryLogins
    from lazymount.mirror.ociref import is_oci_url, registry_of

    if not is_oci_url(url):
        return None
    logins = RegistryLogins({}, None)
    login = logins.find(registry_of(url))
    for notice in logins.notices:
        print(f"lazymount: {notice}", file=sys.stderr)
    return login


async def _publish(args: argparse.Namespace) -> int:
    from lazymount.buildcache.formats import discover
    from lazymount.mirror.transport import LocalMirror, open_mirror
    from lazymount.publish.context import Context, Options, Output
    from lazymount.publish.run import publish
    from lazymount.trust.keyring import default_keyring_dir
    from lazymount.trust.policy import Trust
    from lazymount.trust.sign import Signer

    mirror = open_mirror(args.mirror, credentials=_registry_login(args.mirror))
    output = args.output
    if output is None and mirror.kind != "oci":  # a registry keeps them in the repository
        if not isinstance(mirror, LocalMirror):
            raise UsageError(f"{args.mirror} is not a folder: give --output DIR")
        output = mirror.root
    keyring = default_keyring_dir()
    trust = Trust.load(keyring if keyring.is_dir() else None, args.trust_key,
                       signatures_required=mirror.kind != "oci")
    signer = Signer(args.signing_key)
    try:
        layout = await discover(mirror)
        # Spack signs nothing in a registry: its tarballs are named by their sha256 in the
        # image manifest, which a TOC repeats, and a client accepts such a cache only
        # when told to (--unsigned)
        trusted = trust.for_mirror(require_signature=mirror.kind != "oci")
        context = Context(args.mirror, mirror, layout, trusted, signer,
                          None if output is None else Output(output),
                          Options(args.min_size, sys.stderr.isatty()))
        reports = await publish(context)
    finally:
        signer.close()
        trust.close()
        await mirror.aclose()
    failures = 0
    for _name, report in reports:
        for line in report.lines:
            print(line)
        for failure in report.failures:
            print(f"lazymount publish: {failure}", file=sys.stderr)
        failures += len(report.failures)
    return 1 if failures else 0
