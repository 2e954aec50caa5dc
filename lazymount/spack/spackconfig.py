"""Spack's own configuration: the binary mirrors of a ``mirrors.yaml``, and the
``upstreams.yaml`` that makes a Spack use the mount (its install tree and module roots).

Spack writes a mirror either as ``name: url`` or as a mapping with ``url``, ``fetch`` and
``push`` (each a URL, or a mapping holding ``url`` and credentials), ``binary``, ``source``
and ``signed``. lazymount only fetches binaries, so a mirror becomes one MirrorConfig:

* its fetch URL (``fetch``, else ``url``); ``push`` is ignored;
* ``binary: false`` (a source-only mirror) is skipped with a notice;
* a URL whose scheme the mount cannot fetch from (``s3://``, ``gs://``...) is
  skipped with a notice naming the mirror: one such entry never fails the whole mount;
* ``signed: false`` means the mirror's packages need no signature (an ``oci://`` mirror
  needs it: OCI caches are never signed);
* an ``oci://`` mirror's ``access_pair`` is its registry login (the secret from the
  environment variable it names);
* the file's order is kept: Spack searches mirrors in that order, and so do we.

Local paths may use ``~`` and ``$VARIABLES`` and are taken relative to the file's directory.
The top-level key may be ``mirrors:`` or ``mirrors::`` (Spack's override form), also inside a
``spack:`` environment file. Pure functions apart from reading the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lazymount.buildcache.layout import DEFAULT_PROJECTION
from lazymount.config import MirrorConfig
from lazymount.errors import UsageError, about
from lazymount.mirror.credentials import Credentials, from_environment
from lazymount.mirror.ociref import is_oci_url
from lazymount.spack.modulefiles import upstream_modules
from lazymount.system import yamlio
from lazymount.system.files import FileTooLarge, read_bounded

MAX_CONFIG_BYTES = 1 << 20
# URL schemes of the mirrors the mount can fetch from ("" is a local path)
FETCHABLE_SCHEMES = ("", "file", "http", "https", "oci", "oci+http")


def read_spack_mirrors(path: Path, require_signature: bool = True
                       ) -> tuple[list[MirrorConfig], list[str]]:
    """The binary mirrors of a Spack ``mirrors.yaml`` (or environment ``spack.yaml``),
    in order, and notices about mirrors that were skipped.

    ``require_signature`` False (``--unsigned``) lifts the signature requirement for all.
    Raises UsageError for a file that cannot be read or is not a mirrors configuration.
    """
    try:
        text = read_bounded(path, MAX_CONFIG_BYTES)
    except FileTooLarge:
        raise UsageError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    try:
        doc = yamlio.safe_load(text)
    except yamlio.YamlError as exc:
        raise UsageError(f"{path} is not valid YAML ({_first_line(exc)})") from None
    return parse_mirrors(doc, path.resolve().parent, str(path), require_signature)


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _mirrors_section(doc: Any, source: str) -> dict[Any, Any]:
    if isinstance(doc, dict) and isinstance(doc.get("spack"), dict):
        doc = doc["spack"]  # an environment file
    if isinstance(doc, dict):
        for key in ("mirrors", "mirrors:"):  # "mirrors::" parses as key "mirrors:"
            if key in doc:
                section = doc[key] or {}
                if not isinstance(section, dict):
                    raise UsageError(f"{source}: 'mirrors' is not a mapping of names to mirrors")
                return section
    raise UsageError(f"{source} has no 'mirrors:' section")


def parse_mirrors(doc: Any, base: Path, source: str, require_signature: bool = True
                  ) -> tuple[list[MirrorConfig], list[str]]:
    """MirrorConfigs and notices from a parsed YAML document (see read_spack_mirrors)."""
    mirrors: list[MirrorConfig] = []
    notices: list[str] = []
    for name, entry in _mirrors_section(doc, source).items():
        what = f"{source}: mirror {name!r}"
        if isinstance(entry, str):
            url, binary, signed = entry, True, True
        elif isinstance(entry, dict):
            with about(what):
                url = _fetch_url(entry)
                binary = _flag(entry, "binary")
                signed = _flag(entry, "signed")
        else:
            raise UsageError(f"{what} is neither a URL nor a mapping")
        if not binary:
            notices.append(f"{what} is a source-only mirror (binary: false); skipped")
            continue
        if not url:
            notices.append(f"{what} has no url; skipped")
            continue
        scheme = urlparse(url).scheme
        if scheme not in FETCHABLE_SCHEMES:
            notices.append(f"{what} ({url}): {scheme}:// mirrors are not supported; skipped")
            continue
        login = _access_pair(entry, what) if is_oci_url(url) else None
        mirrors.append(MirrorConfig(_expand(url, base),
                                    require_signature=require_signature and signed,
                                    credentials=login))
    return mirrors, notices


def _flag(entry: dict[str, Any], key: str) -> bool:
    value = entry.get(key, True)
    if not isinstance(value, bool):
        raise UsageError(f"{key} must be true or false, not {value!r}")
    return value


def _access_pair(entry: Any, what: str) -> Credentials | None:
    """An OCI mirror's login, as ``spack mirror add --oci-username(-variable)
    --oci-password-variable`` writes it: ``access_pair: {id | id_variable, secret_variable}``
    (under the mirror or its ``fetch:``), the secret read from the environment; the old
    ``access_pair: [user, password]`` list is read too. None when there is none."""
    if not isinstance(entry, dict):
        return None
    fetch = entry.get("fetch")
    pair = fetch.get("access_pair") if isinstance(fetch, dict) else None
    if pair is None:
        pair = entry.get("access_pair")
    if pair is None:
        return None
    if isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair):
        return Credentials(pair[0], pair[1], what)
    if not isinstance(pair, dict) or not isinstance(pair.get("secret_variable"), str):
        raise UsageError(f"{what}: access_pair must name secret_variable (and id or "
                         "id_variable)")
    user, user_variable = pair.get("id"), pair.get("id_variable")
    if not isinstance(user, str | None) or not isinstance(user_variable, str | None):
        raise UsageError(f"{what}: access_pair id and id_variable must be strings")
    return from_environment(user_variable, user, pair["secret_variable"], what)


def _fetch_url(entry: dict[str, Any]) -> str:
    """The URL binaries are fetched from: ``fetch`` (a URL or a mapping with ``url``)
    if it names one, else ``url``."""
    fetch = entry.get("fetch")
    if isinstance(fetch, dict):
        fetch = fetch.get("url")
    url = fetch if fetch is not None else entry.get("url")
    if url is not None and not isinstance(url, str):
        raise UsageError(f"url must be a string, not {url!r}")
    return url or ""


def _expand(url: str, base: Path) -> str:
    """Local paths get ``~`` and ``$VARIABLES`` expanded and are made absolute against
    the configuration file's directory; URLs are kept as written."""
    scheme = urlparse(url).scheme
    if scheme == "file":
        return "file://" + os.path.expandvars(os.path.expanduser(url[len("file://"):]))
    if scheme:
        return url
    path = Path(os.path.expandvars(os.path.expanduser(url)))
    return str(path if path.is_absolute() else (base / path))


def upstreams_yaml(root: str, projection: str, name: str = "lazymount") -> str:
    """The upstreams.yaml text (block YAML, with comments) for a mount at ``root``."""
    lines = [
        f"# Spack upstreams.yaml for the lazymount mount at {root}: put it in",
        "# ~/.spack/upstreams.yaml or $SPACK_ROOT/etc/spack/upstreams.yaml",
    ]
    if projection != DEFAULT_PROJECTION:
        lines += [
            f"# The mount places packages with the projection {projection}",
            f"# (Spack's default is {DEFAULT_PROJECTION}).",
            "# Spack takes an upstream's prefixes from its database (.spack-db/index.json),",
            "# so your own install_tree:projections need not match.",
        ]
    lines.append("# modules: the mount's Tcl and Lmod module roots (spack module ... loads)")
    entry = {"install_tree": root, "modules": upstream_modules(root)}
    body = yamlio.safe_dump({"upstreams": {name: entry}}, default_flow_style=False)
    return "\n".join(lines) + "\n" + body
