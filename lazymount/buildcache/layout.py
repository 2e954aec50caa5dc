"""Where things live: in a build cache (layout v3, and the old layout v2), and in the install
tree under the mount.

Pure functions of names and hashes; no I/O.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

from lazymount.errors import FormatError

# mediaTypes of the blobs a v3 manifest lists
MEDIA_TARBALL = "application/vnd.spack.install.v2.tar+gzip"
MEDIA_SPEC = "application/vnd.spack.spec.v5+json"
MEDIA_INDEX = "application/vnd.spack.db.v8+json"
MEDIA_KEY = "application/pgp-keys"
MEDIA_KEY_INDEX = "application/vnd.spack.keyindex.v1+json"

INDEX_MANIFEST = "v3/manifests/index/index.manifest.json"
KEY_INDEX_MANIFEST = "v3/manifests/key/keys.manifest.json"

# layout v2 (Spack <= 0.23): everything under build_cache/
V2_INDEX = "build_cache/index.json"
V2_INDEX_HASH = "build_cache/index.json.hash"
V2_KEY_INDEX = "build_cache/_pgp/index.json"

# Spack 1.x: a node's compiler is the dependency providing the first of these virtuals
COMPILER_LANGUAGES = ("c", "cxx", "fortran")
NO_COMPILER = "none"  # {compiler.name} of a node built without any compiler
NodeLookup = Callable[[str], "dict[str, Any] | None"]  # DAG hash -> spec node, if known

# Spack 1.x: install_tree:projections:all
DEFAULT_PROJECTION = "{architecture.platform}-{architecture.target}/{name}-{version}-{hash}"

_IMPOLITE = re.compile(r"[^A-Za-z0-9_+.-]")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_DAG_HASH = re.compile(r"[a-z2-7]{32}")


def polite_filename(name: str) -> str:
    """Spack's polite_filename: every character outside [A-Za-z0-9_+.-] becomes '_'."""
    return _IMPOLITE.sub("_", name)


def is_dag_hash(value: str) -> bool:
    """True for a 32-character lowercase base32 DAG hash."""
    return bool(_DAG_HASH.fullmatch(value))


def is_sha256(value: str) -> bool:
    """True for 64 lowercase hex digits (a sha256 digest as Spack writes it)."""
    return bool(_HEX64.fullmatch(value))


def spec_manifest_path(name: str, version: str, dag_hash: str) -> str:
    """Mirror-relative path of a spec's signed manifest."""
    n, v, h = polite_filename(name), polite_filename(version), polite_filename(dag_hash)
    return f"v3/manifests/spec/{n}/{n}-{v}-{h}.spec.manifest.json"


def key_manifest_path(fingerprint: str) -> str:
    return f"v3/manifests/key/{polite_filename(fingerprint)}.key.manifest.json"


def blob_path(checksum: str) -> str:
    """Mirror-relative path of a content-addressed blob; refuses anything but 64 hex digits."""
    if not is_sha256(checksum):
        raise FormatError(f"blob checksum {checksum[:80]!r} is not a sha256 hex digest")
    return f"blobs/sha256/{checksum[:2]}/{checksum}"


def node_compiler(node: dict[str, Any]) -> tuple[str, str]:
    """(name, version) of the compiler a spec node was built with, or ("", "").

    Spec v4 nodes (Spack <= 0.23) carry ``compiler: {name, version}``; Spack 1.x keeps that
    of an old spec as the annotation ``compiler: "gcc@=12.2.0"`` (migrated caches).
    """
    compiler = node.get("compiler")
    if isinstance(compiler, dict):
        return str(compiler.get("name", "")), str(compiler.get("version", ""))
    annotations = node.get("annotations")
    text = annotations.get("compiler") if isinstance(annotations, dict) else None
    if isinstance(text, str) and text:
        name, _, version = text.partition("@")
        return name, version.lstrip("=")
    return "", ""


def compiler_from_dependencies(node: dict[str, Any], lookup: NodeLookup) -> tuple[str, str]:
    """(name, version) of a spec-v5 node's compiler, or ("", "") if it has none.

    Spack 1.x has no compiler attribute: a node's compiler is its direct dependency that
    provides the ``c`` virtual, else ``cxx``, else ``fortran`` (``compiler_spec``). The
    dependency's own node (found with ``lookup`` by hash) gives the version; a dependency
    missing from the catalog gives its name only.
    """
    edges = [d for d in node.get("dependencies") or () if isinstance(d, dict)]
    for language in COMPILER_LANGUAGES:
        for edge in edges:
            if language in ((edge.get("parameters") or {}).get("virtuals") or ()):
                found = lookup(str(edge.get("hash", "")))
                if found is not None:
                    return str(found.get("name", "")), str(found.get("version", ""))
                return str(edge.get("name", "")), ""
    return "", ""


def _architecture(arch: dict[str, Any]) -> str:
    """Spack's ``{architecture}``: platform-os-target."""
    return "-".join([str(arch.get("platform", "")), str(arch.get("platform_os", "")),
                     _target_name(arch)])


def v2_spec_file_path(node: dict[str, Any], dag_hash: str, signed: bool) -> str:
    """Mirror-relative path of a layout-v2 spec file (``.spec.json.sig``, or ``.spec.json``
    when unsigned), from a spec node's arch, compiler, name and version, and its hash.
    Raises FormatError if the fields make an unusable file name."""
    return f"build_cache/{_v2_basename(node, dag_hash)}.spec.json" + (".sig" if signed else "")


def v2_tarball_path(node: dict[str, Any], dag_hash: str) -> str:
    """Mirror-relative path of a layout-v2 ``.spack`` tarball:
    ``build_cache/<arch>/<compiler>-<cver>/<name>-<ver>/<basename>.spack``."""
    compiler, cversion = node_compiler(node)
    parts = [_architecture(node.get("arch") or {}), f"{compiler}-{cversion}",
             f"{node.get('name', '')}-{node.get('version', '')}"]
    directory = "/".join(_v2_component(p) for p in parts)
    return f"build_cache/{directory}/{_v2_basename(node, dag_hash)}.spack"


def _v2_basename(node: dict[str, Any], dag_hash: str) -> str:
    """Spack <= 0.23's tarball_name stem: arch-compiler-cversion-name-version-hash."""
    compiler, cversion = node_compiler(node)
    arch = _architecture(node.get("arch") or {})
    return _v2_component(f"{arch}-{compiler}-{cversion}-{node.get('name', '')}-"
                         f"{node.get('version', '')}-{dag_hash}")


def _v2_component(text: str) -> str:
    """Spack's format_path: each component made polite (not lower-cased)."""
    polite = polite_filename(text)
    if polite in ("", ".", ".."):
        raise FormatError(f"spec fields give an unusable cache path component {text!r}")
    return polite


def _target_name(arch: dict[str, Any]) -> str:
    target = arch.get("target", "")
    if isinstance(target, dict):  # microarchitecture targets are dicts with a name
        target = target.get("name", "")
    return str(target)


def project(projection: str, node: dict[str, Any], lookup: NodeLookup | None = None) -> str:
    """Install-tree relative path of a spec node under a projection.

    Supports Spack's common tokens; each path component is lower-cased and made polite, as
    Spack's directory layout does. ``{compiler.name}`` and ``{compiler.version}`` come from
    the node (spec v4, migrated caches) or else from its c/cxx/fortran dependency, found
    with ``lookup`` (hash -> node); a node built without a compiler gets ``none`` so that
    its path stays usable. Raises FormatError for an unknown token.
    """
    arch = node.get("arch") or {}
    compiler = _compiler_once(node, lookup)
    parts = []
    for pieces in _template(projection):
        text = ""
        for piece in pieces:
            if isinstance(piece, str):
                text += piece
                continue
            token, length = piece
            text += _token_value(token, length, node, arch, compiler)
        parts.append(polite_filename(text.lower()))
    return "/".join(parts)


Projector = Callable[[str, str, str], str]  # (name, version, hash) -> relative path


def projector(projection: str, facts: dict[str, Any], lookup: NodeLookup | None = None
              ) -> Projector:
    """``project`` for every node whose fields other than name, version and hash are
    ``facts``: what those fields give is worked out once, so that placing 100,000 specs
    that share a few sets of them costs a string format each. Raises FormatError for an
    unknown token."""
    node = dict(facts)
    arch = node.get("arch") or {}
    compiler = _compiler_once(node, lookup)
    components: list[str | tuple[str]] = []  # a finished component, or (format,)
    for pieces in _template(projection):
        text, per_spec = "", False
        for piece in pieces:
            if isinstance(piece, str):
                text += _braced(piece)
                continue
            token, length = piece
            if token in _PER_SPEC:
                spec = "" if length is None else f":.{length}"
                text += f"{{{_PER_SPEC[token]}{spec}}}"
                per_spec = True
                continue
            text += _braced(_token_value(token, length, node, arch, compiler))
        components.append((text,) if per_spec else polite_filename(text.format().lower()))

    def project_one(name: str, version: str, dag_hash: str) -> str:
        return "/".join([part if isinstance(part, str)
                         else polite_filename(part[0].format(name, version, dag_hash).lower())
                         for part in components])

    return project_one


_PER_SPEC = {"name": 0, "version": 1, "hash": 2}  # the arguments of a Projector


def _braced(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _token_value(token: str, length: int | None, node: dict[str, Any], arch: dict[str, Any],
                 compiler: Callable[[], tuple[str, str]]) -> str:
    """What a token other than name, version and hash gives for ``node``, cut to ``length``
    characters; ``compiler`` is asked only for the compiler tokens."""
    if token in _COMPILER_TOKENS:
        value = str(compiler()[_COMPILER_TOKENS[token]])
    else:
        value = str(_FIELDS[token](node, arch))
    return value if length is None else value[:length]


def _compiler_once(node: dict[str, Any], lookup: NodeLookup | None
                   ) -> Callable[[], tuple[str, str]]:
    """``_compiler`` of ``node``, looked up on the first call only (and only if called)."""
    return functools.cache(functools.partial(_compiler, node, lookup))


def _compiler(node: dict[str, Any], lookup: NodeLookup | None) -> tuple[str, str]:
    name, version = node_compiler(node)
    if not name and lookup is not None:
        name, version = compiler_from_dependencies(node, lookup)
    if not name:
        name = version = NO_COMPILER
    return name, version


_FIELDS: dict[str, Callable[[dict[str, Any], dict[str, Any]], Any]] = {
    "name": lambda node, arch: node.get("name", ""),
    "version": lambda node, arch: node.get("version", ""),
    "hash": lambda node, arch: node.get("hash", ""),
    "namespace": lambda node, arch: node.get("namespace", ""),
    "architecture.platform": lambda node, arch: arch.get("platform", ""),
    "architecture.os": lambda node, arch: arch.get("platform_os", ""),
    "architecture.target": lambda node, arch: _target_name(arch),
    "architecture": lambda node, arch: _architecture(arch),
}
_COMPILER_TOKENS = {"compiler.name": 0, "compiler.version": 1}
_TOKEN = re.compile(r"\{([^}]*)\}")
_HASH_PREFIX = re.compile(r"hash:(\d+)")
Piece = str | tuple[str, int | None]  # literal text, or (token, length of a {hash:N})


@functools.lru_cache(maxsize=32)
def _template(projection: str) -> tuple[tuple[Piece, ...], ...]:
    """A projection parsed once (it is applied to every spec of the index): each path
    component as literals and tokens. Raises FormatError for an unknown token."""
    components = []
    for component in projection.split("/"):
        pieces: list[Piece] = []
        last = 0
        for match in _TOKEN.finditer(component):
            pieces.append(component[last:match.start()])
            token = match.group(1)
            prefix = _HASH_PREFIX.fullmatch(token)
            if prefix:
                pieces.append(("hash", int(prefix.group(1))))
            elif token in _FIELDS or token in _COMPILER_TOKENS:
                pieces.append((token, None))
            else:
                raise FormatError(f"unknown projection token {{{token}}}")
            last = match.end()
        pieces.append(component[last:])
        components.append(tuple(pieces))
    return tuple(components)
