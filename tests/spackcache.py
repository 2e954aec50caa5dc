"""Write Spack build caches exactly as Spack writes them, for tests and benchmarks.

Independent of the ``lazymount`` package on purpose: it is the oracle the daemon is tested
against. :class:`CacheWriter` writes layout v3 as Spack 1.1 does (``url_buildcache.py``,
``binary_distribution.py``, ``util/archive.py``, ``database.py``), checked byte for byte against
the real cache in ``tests/data/v3-own-only`` by ``tests/test_spackcache.py``.
:class:`V2CacheWriter` writes the old layout v2 as Spack 0.23 did (``build_cache/``, signed
``.spec.json.sig`` files with spec v4 nodes, ``.spack`` tarballs, DB v7 index) and
``V2CacheWriter.migrate`` adds what ``spack buildcache migrate`` writes next to it; those follow
Spack 0.23's ``binary_distribution.py`` and 1.x's ``buildcache_migrate.py`` (no real v2 cache
is available to compare with). ``padded_length`` pads the build root like
``config:install_tree:padded_length``; overlong shebangs are rewritten at "build" time by
Spack's sbang hook (``#!/bin/sh <unpadded root>/bin/sbang``), as a real build would have done
before the push.

Typical use::

    signer = Signer(KEYS / "lazymount-fixtures.secret.asc")
    w = CacheWriter(tmp_path / "cache", signer=signer)
    lib = Package("libfoo", files={"lib/libfoo.so": b"\\x7fELF..."})
    app = Package("app", deps=[lib], files={"bin/app": b"#!/bin/sh\\necho hi\\n"})
    w.add(lib)
    w.add(app)
    w.finish()

Hooks for attack tests: ``tamper_blob``, ``write_blob``, ``write_spec_manifest`` (custom
records, unsigned or signed by another ``Signer``), ``write_index`` (custom records) and
``Signer.generate`` (a second, untrusted key).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

MEDIA_TARBALL = "application/vnd.spack.install.v2.tar+gzip"
MEDIA_SPEC = "application/vnd.spack.spec.v5+json"
MEDIA_INDEX = "application/vnd.spack.db.v8+json"
MEDIA_KEY = "application/pgp-keys"
MEDIA_KEY_INDEX = "application/vnd.spack.keyindex.v1+json"

DEFAULT_ARCH = ("linux", "debian12", "x86_64")
DEFAULT_BUILD_ROOT = "/tmp/lmt/opt/spack"
DEFAULT_COMPILER = ("gcc", "12.2.0")  # spec v4 nodes (Spack <= 0.23) name their compiler
SHEBANG_LIMIT = 127  # Spack's system_shebang_limit on Linux
SHEBANG_READ_LIMIT = 4096  # Spack's spack_shebang_limit
DEPTYPE_ORDER = ("build", "link", "run", "test")
PADDING_CHARS = "__spack_path_placeholder__"
GENERIC_PARAMETERS: dict[str, Any] = {
    "build_system": "generic",
    "cflags": [],
    "cppflags": [],
    "cxxflags": [],
    "fflags": [],
    "ldflags": [],
    "ldlibs": [],
}

_IMPOLITE = re.compile(r"[^A-Za-z0-9_+.-]")
_BINARY_MAGIC = (
    b"\x7fELF",
    b"\xfe\xed\xfa\xce",
    b"\xfe\xed\xfa\xcf",
    b"\xce\xfa\xed\xfe",
    b"\xcf\xfa\xed\xfe",
)
_CONTROL = re.compile(rb"[\x00-\x08\x0e-\x1f\x7f-\x9f]")


# ---------------------------------------------------------------------------------------------
# Package model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Symlink:
    """A symbolic link in a package prefix; ``target`` is kept verbatim."""

    target: str


@dataclass(frozen=True)
class Hardlink:
    """A hard link to another regular file of the same prefix (``target`` is its relpath)."""

    target: str


@dataclass(frozen=True)
class Dir:
    """An (empty) directory in a package prefix."""


FileValue = bytes | str | Symlink | Hardlink | Dir


@dataclass(eq=False)
class Dep:
    """A dependency edge: the dependency and the edge's deptypes and virtuals."""

    pkg: Package
    deptypes: tuple[str, ...] = ("build", "link")
    virtuals: tuple[str, ...] = ()


def _as_dep(item: Package | Dep | tuple | list) -> Dep:
    """Normalize ``pkg``, ``(pkg, deptypes)`` or ``(pkg, deptypes, virtuals)`` to a Dep.

    Deptypes are put in Spack's canonical order (build, link, run, test).
    """
    if isinstance(item, Package):
        item = Dep(item)
    elif not isinstance(item, Dep):
        pkg, deptypes, *rest = item
        deptypes = (deptypes,) if isinstance(deptypes, str) else tuple(deptypes)
        item = Dep(pkg, deptypes, tuple(rest[0]) if rest else ())
    order = sorted(set(item.deptypes), key=DEPTYPE_ORDER.index)
    return Dep(item.pkg, tuple(order), tuple(item.virtuals))


def default_package_hash(namespace: str, name: str, version: str) -> str:
    """A stand-in for Spack's package_hash (base32 sha256 of the recipe): 56 chars with '='."""
    digest = hashlib.sha256(f"{namespace}.{name}@{version}".encode()).digest()
    return base64.b32encode(digest).decode().lower()


def b32_hash(text: str) -> str:
    """Spack's ``util.hash.b32_hash``: base32 of sha1, lowercased, 32 characters."""
    digest = hashlib.sha1(text.encode("utf-8")).digest()
    return base64.b32encode(digest).decode().lower()[:32]


def compact_json(obj: Any) -> str:
    """Spack's ``sjson.dump`` text: no indent, ``(",", ":")`` separators, insertion order."""
    return json.dumps(obj, separators=(",", ":"))


@dataclass(eq=False)
class Package:
    """One concrete spec node plus the files of its install prefix.

    ``deps`` items may be a Package (deptypes build+link), ``(pkg, deptypes)``,
    ``(pkg, deptypes, virtuals)`` or a :class:`Dep`. ``executable`` lists relpaths stored as
    mode 0755; ``None`` means: ELF files and files starting with ``#!``. ``hash_override``
    replaces the computed DAG hash (Spack's external hashes are not reproducible from the
    node dict; also handy for mismatch tests). The DAG hash is cached on first use: don't
    change the spec fields afterwards (``files`` may change, they are not hashed).

    ``compiler`` = ``(name, version)`` makes it a spec-v4 node as Spack <= 0.23 wrote them
    (per-node ``compiler``, no ``annotations``; for :class:`V2CacheWriter`).
    """

    name: str
    version: str = "1.0"
    files: dict[str, FileValue] = field(default_factory=dict)
    deps: list[Any] = field(default_factory=list)
    executable: set[str] | None = None
    namespace: str = "builtin"
    arch: tuple[str, str, str | dict] = DEFAULT_ARCH
    parameters: dict[str, Any] | None = None
    package_hash: str | None = None
    external: dict[str, Any] | None = None
    annotations: dict[str, Any] = field(default_factory=lambda: {"original_specfile_version": 5})
    hash_override: str | None = None
    compiler: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        self.deps = [_as_dep(d) for d in self.deps]
        if self.parameters is None:
            self.parameters = dict(GENERIC_PARAMETERS)
        if self.package_hash is None:
            self.package_hash = default_package_hash(self.namespace, self.name, self.version)

    def edges(self) -> list[Dep]:
        """Dependency edges sorted as Spack serializes them (by name, then hash)."""
        return sorted(self.deps, key=lambda d: (d.pkg.name, d.pkg.dag_hash))

    @property
    def specfile_version(self) -> int:
        """5 (Spack 1.x), or 4 for a node with a ``compiler`` (Spack 0.20-0.23)."""
        return 4 if self.compiler is not None else 5

    def node_without_hash(self) -> dict[str, Any]:
        """The spec node dict in Spack's key order, without ``hash`` (spec v5, or v4 with
        ``compiler`` after ``arch`` and no ``annotations``, as ``Spec.to_node_dict`` wrote)."""
        platform, platform_os, target = self.arch
        node: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "arch": {"platform": platform, "platform_os": platform_os, "target": target},
        }
        if self.compiler is not None:
            node["compiler"] = {"name": self.compiler[0], "version": self.compiler[1]}
        node["namespace"] = self.namespace
        node["parameters"] = self.parameters
        if self.external is not None:
            node["external"] = self.external
        node["package_hash"] = self.package_hash
        if self.deps:
            node["dependencies"] = [_edge_dict(e) for e in self.edges()]
        if self.compiler is None:
            node["annotations"] = self.annotations
        return node

    def upgraded_node(self) -> dict[str, Any]:
        """The node as Spack 1.x re-serializes an old (v4) one, e.g. in the index of a migrated
        cache: no ``compiler`` key, ``annotations`` keep it, the stored hash is kept."""
        if self.compiler is None:
            return self.node()
        node = {k: v for k, v in self.node_without_hash().items() if k != "compiler"}
        name, version = self.compiler
        node["annotations"] = {"original_specfile_version": 4, "compiler": f"{name}@={version}"}
        return {**node, "hash": self.dag_hash}

    @cached_property
    def dag_hash(self) -> str:
        """Spack's DAG hash of this node (or ``hash_override``)."""
        return self.hash_override or b32_hash(compact_json(self.node_without_hash()))

    def node(self) -> dict[str, Any]:
        """The node dict as in spec blobs and index records (with ``hash``)."""
        return {**self.node_without_hash(), "hash": self.dag_hash}

    def traverse(self) -> Iterator[Package]:
        """Pre-order DFS over all deptypes, deps by name, each node once (``Spec.to_dict``)."""
        seen: set[str] = set()
        stack: list[Package] = [self]
        while stack:
            pkg = stack.pop()
            if pkg.dag_hash in seen:
                continue
            seen.add(pkg.dag_hash)
            yield pkg
            stack.extend(reversed([e.pkg for e in pkg.edges()]))

    def spec_dict(self) -> dict[str, Any]:
        """``Spec.to_dict()``: the whole DAG, root first."""
        meta = {"version": self.specfile_version}
        return {"spec": {"_meta": meta, "nodes": [p.node() for p in self.traverse()]}}

    @property
    def is_external(self) -> bool:
        return self.external is not None


def _edge_dict(edge: Dep) -> dict[str, Any]:
    """One entry of a node's ``dependencies`` list."""
    return {
        "name": edge.pkg.name,
        "hash": edge.pkg.dag_hash,
        "parameters": {"deptypes": list(edge.deptypes), "virtuals": list(edge.virtuals)},
    }


def external(name: str, version: str, path: str, **kw: Any) -> Package:
    """An external package node (``spec.external.path``); never has a tarball."""
    ext = {"path": path, "module": None, "extra_attributes": kw.pop("extra_attributes", {})}
    return Package(name, version, external=ext, **kw)


def packages_from_nodes(nodes: Sequence[dict[str, Any]]) -> dict[str, Package]:
    """Rebuild Packages (no files) from spec-blob nodes, keyed by stored hash.

    Only externals keep their stored hash as ``hash_override``; all others are recomputed.
    """
    by_hash = {n["hash"]: n for n in nodes}
    built: dict[str, Package] = {}

    def build(h: str) -> Package:
        if h not in built:
            n = by_hash[h]
            deps = [
                Dep(
                    build(d["hash"]),
                    tuple(d["parameters"]["deptypes"]),
                    tuple(d["parameters"]["virtuals"]),
                )
                for d in n.get("dependencies", [])
            ]
            a = n["arch"]
            compiler = n.get("compiler")
            built[h] = Package(
                n["name"],
                n["version"],
                deps=deps,
                namespace=n["namespace"],
                arch=(a["platform"], a["platform_os"], a["target"]),
                parameters=n["parameters"],
                package_hash=n["package_hash"],
                external=n.get("external"),
                annotations=n.get("annotations", {}),
                hash_override=h if "external" in n else None,
                compiler=(compiler["name"], compiler["version"]) if compiler else None,
            )
        return built[h]

    for h in by_hash:
        build(h)
    return built


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------


def polite_filename(text: str) -> str:
    """Spack's polite_filename: characters outside ``[A-Za-z0-9_+.-]`` become ``_``."""
    return _IMPOLITE.sub("_", text)


def padded_root(root: str, length: int | None) -> str:
    """Spack's ``add_padding``: append placeholder dirs until ``len(root) == length``."""
    if not length or length - len(root) <= 1:
        return root
    size = length - len(root) - 1
    reps, extra = divmod(size, len(PADDING_CHARS) + 1)
    parts = [PADDING_CHARS] * reps + [PADDING_CHARS[:extra]]
    return (root + "/" + "/".join(parts)).rstrip("/")


def projection(pkg: Package) -> str:
    """Spack 1.x default projection ``{platform}-{target}/{name}-{version}-{hash}``."""
    platform, _, target = pkg.arch
    tname = target["name"] if isinstance(target, dict) else target
    parts = [f"{platform}-{tname}", f"{pkg.name}-{pkg.version}-{pkg.dag_hash}"]
    return "/".join(polite_filename(p.lower()) for p in parts)


def install_prefix(build_root: str, pkg: Package) -> str:
    """Build-time install prefix of ``pkg`` under ``build_root``."""
    return f"{build_root.rstrip('/')}/{projection(pkg)}"


def architecture(pkg: Package) -> str:
    """Spack's ``{architecture}``: ``platform-os-target``."""
    platform, platform_os, target = pkg.arch
    return f"{platform}-{platform_os}-{target['name'] if isinstance(target, dict) else target}"


def _v2_compiler(pkg: Package) -> tuple[str, str]:
    if pkg.compiler is None:
        raise ValueError(f"{pkg.name}: a layout-v2 package needs a compiler (spec v4)")
    return pkg.compiler


def v2_projection(pkg: Package) -> str:
    """Spack 0.23's default projection
    ``{architecture}/{compiler.name}-{compiler.version}/{name}-{version}-{hash}``."""
    cname, cversion = _v2_compiler(pkg)
    parts = [architecture(pkg), f"{cname}-{cversion}", f"{pkg.name}-{pkg.version}-{pkg.dag_hash}"]
    return "/".join(polite_filename(p) for p in parts)


def v2_tarball_name(pkg: Package, ext: str) -> str:
    """Spack 0.23's ``tarball_name``: ``<arch>-<compiler>-<cver>-<name>-<ver>-<hash><ext>``."""
    cname, cversion = _v2_compiler(pkg)
    stem = f"{architecture(pkg)}-{cname}-{cversion}-{pkg.name}-{pkg.version}-{pkg.dag_hash}"
    return polite_filename(stem) + ext


def v2_specfile_relpath(pkg: Package, signed: bool = True) -> str:
    """Cache-relative path of a layout-v2 spec file."""
    return "build_cache/" + v2_tarball_name(pkg, ".spec.json.sig" if signed else ".spec.json")


def v2_tarball_relpath(pkg: Package) -> str:
    """Cache-relative path of a layout-v2 ``.spack`` tarball (Spack 0.23's
    ``tarball_path_name``: ``<arch>/<compiler>-<cver>/<name>-<ver>/<tarball_name>``)."""
    cname, cversion = _v2_compiler(pkg)
    parts = [architecture(pkg), f"{cname}-{cversion}", f"{pkg.name}-{pkg.version}"]
    directory = "/".join(polite_filename(p) for p in parts)
    return f"build_cache/{directory}/{v2_tarball_name(pkg, '.spack')}"


def manifest_relpath(pkg: Package) -> str:
    """Cache-relative path of a spec manifest."""
    n, v = polite_filename(pkg.name), polite_filename(pkg.version)
    return f"v3/manifests/spec/{n}/{n}-{v}-{polite_filename(pkg.dag_hash)}.spec.manifest.json"


def blob_relpath(checksum: str) -> str:
    """Cache-relative path of a content-addressed blob."""
    return f"blobs/sha256/{checksum[:2]}/{checksum}"


def specs_to_relocate(pkg: Package) -> list[Package]:
    """Root, transitive link deps (breadth-first, by name), direct run deps; no externals."""
    order: list[Package] = []
    seen: set[str] = set()
    queue = [pkg]
    while queue:
        cur = queue.pop(0)
        if cur.dag_hash in seen:
            continue
        seen.add(cur.dag_hash)
        order.append(cur)
        queue.extend(e.pkg for e in cur.edges() if "link" in e.deptypes)
    order += [e.pkg for e in pkg.edges() if "run" in e.deptypes and e.pkg.dag_hash not in seen]
    return [p for p in _dedupe(order) if not p.is_external]


def _dedupe(pkgs: Iterable[Package]) -> list[Package]:
    """Drop repeated DAG hashes, keeping the first occurrence."""
    seen: set[str] = set()
    out = []
    for p in pkgs:
        if p.dag_hash not in seen:
            seen.add(p.dag_hash)
            out.append(p)
    return out


# ---------------------------------------------------------------------------------------------
# Serialization
# ---------------------------------------------------------------------------------------------


def gzip_bytes(data: bytes, *, sync_flush: bool = False) -> bytes:
    """gzip like Spack: level 6, mtime 0, no file name.

    Spack's spec blob goes through a TextIOWrapper that flushes the GzipFile once before
    closing (an extra empty sync block); ``sync_flush=True`` reproduces that.
    """
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", compresslevel=6, mtime=0, fileobj=buf) as gz:
        gz.write(data)
        if sync_flush:
            gz.flush()
    return buf.getvalue()


def spec_blob_bytes(pkg: Package) -> bytes:
    """The stored spec blob: gzip of compact JSON with ``buildcache_layout_version: 2``."""
    doc = {**pkg.spec_dict(), "buildcache_layout_version": 2}
    return gzip_bytes(compact_json(doc).encode(), sync_flush=True)


def manifest_text(records: Sequence[dict[str, Any]]) -> bytes:
    """A BuildcacheManifest as Spack writes it (``indent=0``, compact separators)."""
    doc = {"version": 3, "data": list(records)}
    return json.dumps(doc, indent=0, separators=(",", ":")).encode()


def blob_record(data: bytes, media_type: str, compression: str) -> dict[str, Any]:
    """Manifest record of a stored blob (size and sha256 of the stored bytes)."""
    return {
        "contentLength": len(data),
        "mediaType": media_type,
        "compression": compression,
        "checksumAlgorithm": "sha256",
        "checksum": hashlib.sha256(data).hexdigest(),
    }


def index_bytes(records: dict[str, dict[str, Any]]) -> bytes:
    """The DB v8 index blob; ``records`` maps hash -> {spec, ref_count, in_buildcache}."""
    return compact_json({"database": {"version": "8", "installs": records}}).encode()


def buildinfo_bytes(info: dict[str, Any]) -> bytes:
    """``.spack/binary_distribution``: one-line YAML flow mapping plus newline."""
    return yaml.safe_dump(
        info, default_flow_style=True, sort_keys=False, width=float("inf")
    ).encode()


# ---------------------------------------------------------------------------------------------
# Prefix staging and the tarball
# ---------------------------------------------------------------------------------------------


def _is_executable(rel: str, value: FileValue, executable: set[str] | None) -> bool:
    if executable is not None:
        return rel in executable
    data = value.encode() if isinstance(value, str) else value
    return isinstance(data, bytes) and (data.startswith(b"#!") or data[:4] == b"\x7fELF")


def stage_files(pkg: Package, dest: Path) -> None:
    """Materialize ``pkg.files`` under ``dest``: files, then symlinks, then hardlinks."""
    dest.mkdir(parents=True, exist_ok=True)
    items = sorted(pkg.files.items())
    for rel, value in items:
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(value, Dir):
            path.mkdir(exist_ok=True)
        elif isinstance(value, bytes | str):
            path.write_bytes(value.encode() if isinstance(value, str) else value)
            path.chmod(0o755 if _is_executable(rel, value, pkg.executable) else 0o644)
    for rel, value in items:
        if isinstance(value, Symlink | Hardlink):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(value, Symlink):
            os.symlink(value.target, dest / rel)
    for rel, value in items:
        if isinstance(value, Hardlink):
            os.link(dest / value.target, dest / rel)


def sbang_line(sbang_path: str) -> bytes:
    """Spack's ``sbang_shebang_line()`` plus newline."""
    return f"#!/bin/sh {sbang_path}\n".encode()


def filter_shebangs(staged: Path, sbang_path: str) -> list[str]:
    """Spack's sbang post-install hook, as a build runs it before the push.

    Every executable regular file (symlinks skipped) whose first line, newline included, is
    longer than 127 bytes (and has its newline within 4096 bytes) gets ``#!/bin/sh
    <sbang_path>`` prepended; the old line stays as line 2 (``--!`` for lua, ``//!`` for
    node, ``<?php #!... ?>`` for php). Returns the changed relpaths, sorted.
    """
    new_line = sbang_line(sbang_path)
    changed = []
    for root, _dirs, names in os.walk(staged):
        for name in names:
            path = Path(root) / name
            st = path.lstat()
            if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111:
                continue
            data = path.read_bytes()
            first = data[: data.find(b"\n", 0, SHEBANG_READ_LIMIT) + 1]
            if not first.startswith(b"#!") or len(first) <= SHEBANG_LIMIT or first == new_line:
                continue  # also: no newline within the limit (first is then empty)
            if re.match(rb"#!(/[^/\n]*)*lua\b", first):
                first_out = b"--!" + first[2:]
            elif re.match(rb"#!(/[^/\n]*)*node\b", first):
                first_out = b"//!" + first[2:]
            elif re.match(rb"#!(/[^/\n]*)*php\b", first):
                first_out = b"<?php " + first + b" ?>"
            else:
                first_out = first
            path.write_bytes(new_line + first_out + data[len(first):])
            os.chmod(path, stat.S_IMODE(st.st_mode))
            changed.append(path.relative_to(staged).as_posix())
    return sorted(changed)


def read_tree(directory: Path) -> tuple[dict[str, FileValue], set[str]]:
    """Files dict and executable set of a real directory (hardlinks kept as Hardlink)."""
    files: dict[str, FileValue] = {}
    execs: set[str] = set()
    inodes: dict[tuple[int, int], str] = {}
    for root, dirs, names in os.walk(directory):
        base = Path(root)
        for d in dirs:
            if (base / d).is_symlink():
                files[(base / d).relative_to(directory).as_posix()] = Symlink(os.readlink(base / d))
            elif not any((base / d).iterdir()):
                files[(base / d).relative_to(directory).as_posix()] = Dir()
        for n in sorted(names):
            path = base / n
            rel = path.relative_to(directory).as_posix()
            st = path.lstat()
            if path.is_symlink():
                files[rel] = Symlink(os.readlink(path))
            elif not stat.S_ISREG(st.st_mode):
                continue  # devices, fifos, sockets: Spack skips them too
            elif (st.st_dev, st.st_ino) in inodes:
                files[rel] = Hardlink(inodes[(st.st_dev, st.st_ino)])
            else:
                inodes[(st.st_dev, st.st_ino)] = rel
                files[rel] = path.read_bytes()
                if st.st_mode & 0o100:
                    execs.add(rel)
    return files, execs


def prefix_regex(prefixes: Iterable[str]) -> re.Pattern[bytes]:
    """Spack's ``utf8_paths_to_single_binary_regex`` (path-component boundary)."""
    alts = b"|".join(re.escape(p.encode()) for p in prefixes)
    return re.compile(rb"(?<![\w\-_/])([\w\-_]*?)(%s)([\w\-_/]*)" % alts)


def _is_text(data: bytes) -> bool:
    """UTF-8, or ISO-8859-1 without control characters."""
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return not _CONTROL.search(data)


@dataclass
class _Relocations:
    binaries: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    textfiles: list[str] = field(default_factory=list)


def _classify_file(rel: str, data: bytes, regex: re.Pattern[bytes], out: _Relocations) -> None:
    if rel.split("/", 1)[0] == ".spack":
        return
    if data[:4] in _BINARY_MAGIC:
        out.binaries.append(rel)
    elif _is_text(data) and regex.search(data):
        out.textfiles.append(rel)


def _dir_info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info


def write_prefix_tar(
    tar: tarfile.TarFile, staged: Path, build_prefix: str, regex: re.Pattern[bytes]
) -> _Relocations:
    """Port of Spack's ``tarfile_of_spec_prefix`` for a prefix staged at ``staged``.

    Member names use ``build_prefix`` (minus leading '/'); parent dirs first, then a
    depth-first pre-order walk, entries sorted by name, files before subdirs.
    """
    out = _Relocations()
    base = build_prefix.lstrip("/")
    for parent in reversed(PurePosixPath(build_prefix).parents[:-1]):
        tar.addfile(_dir_info(str(parent).lstrip("/")))
    hardlinks: dict[tuple[int, int], str] = {}
    skip = staged / ".spack" / "binary_distribution"
    stack = [staged]
    while stack:
        cur = stack.pop()
        rel_dir = cur.relative_to(staged).as_posix()
        tar.addfile(_dir_info(base if rel_dir == "." else f"{base}/{rel_dir}"))
        with os.scandir(cur) as it:
            entries = sorted(it, key=lambda e: e.name)
        subdirs = []
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(Path(entry.path))
            elif Path(entry.path) != skip:
                rel = Path(entry.path).relative_to(staged).as_posix()
                _add_entry(tar, entry, rel, f"{base}/{rel}", hardlinks, regex, out)
        stack.extend(reversed(subdirs))
    return out


def _add_entry(
    tar: tarfile.TarFile,
    entry: os.DirEntry,
    rel: str,
    name: str,
    hardlinks: dict[tuple[int, int], str],
    regex: re.Pattern[bytes],
    out: _Relocations,
) -> None:
    """Add one non-directory entry the way ``reproducible_tarfile_from_prefix`` does."""
    info = tarfile.TarInfo(name)
    if entry.is_symlink():
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, os.readlink(entry.path), 0o755
        if (
            rel.split("/", 1)[0] != ".spack"
            and os.path.isabs(info.linkname)
            and regex.match(info.linkname.encode())
        ):
            out.links.append(rel)
        tar.addfile(info)
        return
    if not entry.is_file(follow_symlinks=False):
        return  # devices, fifos, sockets are skipped
    st = os.lstat(entry.path)
    info.mode = 0o755 if st.st_mode & 0o100 else 0o644
    if st.st_nlink > 1:
        ident = (st.st_dev, st.st_ino)
        if ident in hardlinks:
            info.type, info.linkname = tarfile.LNKTYPE, hardlinks[ident]
            tar.addfile(info)
            return
        hardlinks[ident] = name
    data = Path(entry.path).read_bytes()
    info.size = len(data)
    _classify_file(rel, data, regex, out)
    tar.addfile(info, io.BytesIO(data))


# ---------------------------------------------------------------------------------------------
# GPG
# ---------------------------------------------------------------------------------------------


def _gpg_env(home: str) -> dict[str, str]:
    return {**os.environ, "GNUPGHOME": home, "LC_ALL": "C"}


def _gpg(home: str, *args: str, data: bytes | None = None, check: bool = True):
    """Run gpg in ``home`` (never the user's ~/.gnupg) and return the CompletedProcess."""
    cmd = ["gpg", "--homedir", home, "--batch", "--no-tty", "--pinentry-mode", "loopback"]
    cmd += ["--no-autostart", *args]
    return subprocess.run(
        cmd, input=data, capture_output=True, env=_gpg_env(home), check=check, timeout=120
    )


def _kill_agent(home: str) -> None:
    """Stop the gpg-agent of ``home`` (only that one) and delete the home."""
    subprocess.run(
        ["gpgconf", "--homedir", home, "--kill", "gpg-agent"],
        env=_gpg_env(home),
        capture_output=True,
        check=False,
        timeout=60,
    )
    shutil.rmtree(home, ignore_errors=True)


def _new_home() -> str:
    """A private, short GNUPGHOME (agent sockets need short paths)."""
    return tempfile.mkdtemp(prefix="lmgpg-")


class Signer:
    """A secret key in a private GNUPGHOME with its own gpg-agent; clearsigns like Spack.

    Use as a context manager or call :meth:`close`; the agent is also stopped when the
    object is garbage collected.
    """

    def __init__(self, secret_key: Path | None = None, *, passphrase: str = "") -> None:
        self.home = _new_home()
        self.passphrase = passphrase
        self._finalizer = weakref.finalize(self, _kill_agent, self.home)
        subprocess.run(
            ["gpgconf", "--homedir", self.home, "--launch", "gpg-agent"],
            env=_gpg_env(self.home),
            capture_output=True,
            check=True,
            timeout=60,
        )
        if secret_key is not None:
            _gpg(self.home, "--import", str(secret_key))

    @classmethod
    def generate(cls, uid: str = "lazymount other key <other@example.invalid>") -> Signer:
        """A fresh throw-away signing key (ed25519), e.g. to sign with an untrusted key."""
        signer = cls()
        _gpg(signer.home, "--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign", "never")
        return signer

    @cached_property
    def fingerprint(self) -> str:
        """Fingerprint of the (first) secret key."""
        out = _gpg(self.home, "--with-colons", "--list-secret-keys").stdout.decode()
        return next(ln.split(":")[9] for ln in out.splitlines() if ln.startswith("fpr:"))

    @cached_property
    def public_key_armor(self) -> bytes:
        """``gpg --armor --export FPR`` (what Spack pushes as the key blob)."""
        return _gpg(self.home, "--armor", "--export", self.fingerprint).stdout

    def clearsign(self, data: bytes, timestamp: int | None = None) -> bytes:
        """``gpg --clearsign --armor --local-user FPR`` (SHA512); ``timestamp`` fakes the
        signature time, which makes the output reproducible (RSA signatures are
        deterministic)."""
        args = ["--passphrase", self.passphrase, "--digest-algo", "SHA512"]
        if timestamp is not None:
            args += ["--faked-system-time", f"{timestamp}!"]
        args += ["--clearsign", "--armor", "--local-user", self.fingerprint, "--output", "-"]
        return _gpg(self.home, *args, data=data).stdout

    def close(self) -> None:
        """Stop the agent and delete the private home."""
        self._finalizer()

    def __enter__(self) -> Signer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Verified:
    """Result of :func:`verify_clearsigned`."""

    plaintext: bytes
    fingerprint: str
    timestamp: int


def verify_clearsigned(data: bytes, public_key: bytes) -> Verified:
    """``gpg --verify`` ``data`` in a fresh keyring holding only ``public_key``.

    Raises ``subprocess.CalledProcessError`` on a bad signature or unknown key.
    """
    home = _new_home()
    try:
        _gpg(home, "--import", data=public_key)
        status = _gpg(home, "--status-fd", "1", "--verify", data=data).stdout.decode()
        valid = next(ln.split() for ln in status.splitlines() if " VALIDSIG " in ln)
        plain = _gpg(home, "--output", "-", "--decrypt", data=data).stdout
        return Verified(plain, valid[2], int(valid[4]))
    finally:
        shutil.rmtree(home, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The writer
# ---------------------------------------------------------------------------------------------


@dataclass
class Entry:
    """What :meth:`CacheWriter.add` wrote for one package."""

    pkg: Package
    prefix: str
    tarball: dict[str, Any]
    spec: dict[str, Any]
    manifest: Path
    buildinfo: bytes


class CacheWriter:
    """Writes a layout-v3 build cache under ``root``.

    ``build_root`` is the build-time install root (``padded_length`` pads it like Spack's
    ``config:install_tree:padded_length``). Spec manifests are clearsigned with ``signer``
    if given (``sign_time`` fixes the signature time), plain JSON otherwise. ``build_sbang``
    applies Spack's sbang hook to each prefix before it is packed (as the build did);
    turn it off to push overlong shebangs unchanged.
    """

    def __init__(
        self,
        root: Path,
        build_root: str = DEFAULT_BUILD_ROOT,
        signer: Signer | None = None,
        *,
        padded_length: int | None = None,
        spack_prefix: str = "/tmp/spack",
        sign_time: int | None = None,
        build_sbang: bool = True,
    ) -> None:
        self.root = Path(root)
        self.unpadded_root = build_root.rstrip("/")
        self.build_root = padded_root(self.unpadded_root, padded_length)
        self.signer = signer
        self.spack_prefix = spack_prefix
        self.sign_time = sign_time
        self.build_sbang = build_sbang
        self.entries: dict[str, Entry] = {}
        self._records: dict[str, Package] = {}
        self._in_buildcache: set[str] = set()
        self.root.mkdir(parents=True, exist_ok=True)

    # -- paths ------------------------------------------------------------------------------

    @property
    def sbang_install_path(self) -> str:
        """``<unpadded root>/bin/sbang``."""
        return f"{self.unpadded_root}/bin/sbang"

    def prefix_of(self, pkg: Package) -> str:
        """Build-time install prefix of ``pkg``."""
        return install_prefix(self.build_root, pkg)

    def manifest_path(self, pkg: Package) -> Path:
        return self.root / manifest_relpath(pkg)

    def blob_path(self, checksum: str) -> Path:
        return self.root / blob_relpath(checksum)

    # -- blobs and manifests ----------------------------------------------------------------

    def write_blob(self, data: bytes, media_type: str, compression: str) -> dict[str, Any]:
        """Store ``data`` content-addressed; return its manifest record."""
        rec = blob_record(data, media_type, compression)
        path = self.blob_path(rec["checksum"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return rec

    def tamper_blob(self, checksum: str, data: bytes | None = None) -> Path:
        """Overwrite a stored blob (default: flip one byte in the middle), keeping its name."""
        path = self.blob_path(checksum)
        if data is None:
            old = bytearray(path.read_bytes())
            old[len(old) // 2] ^= 0xFF
            data = bytes(old)
        path.write_bytes(data)
        return path

    def _resolve_signer(self, sign: bool | Signer) -> Signer | None:
        if isinstance(sign, Signer):
            return sign
        return self.signer if sign else None

    def write_manifest(
        self,
        relpath: str,
        records: Sequence[dict[str, Any]],
        *,
        sign: bool | Signer = False,
        sign_time: int | None = None,
    ) -> Path:
        """Write a manifest at ``relpath``; clearsigned if ``sign`` resolves to a Signer."""
        text = manifest_text(records)
        signer = self._resolve_signer(sign)
        if signer is not None:
            text = signer.clearsign(text, sign_time if sign_time is not None else self.sign_time)
        path = self.root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text)
        return path

    def write_spec_manifest(
        self,
        pkg: Package,
        records: Sequence[dict[str, Any]],
        *,
        sign: bool | Signer = True,
        sign_time: int | None = None,
    ) -> Path:
        """(Re)write ``pkg``'s spec manifest with arbitrary ``records``."""
        return self.write_manifest(manifest_relpath(pkg), records, sign=sign, sign_time=sign_time)

    # -- packages ---------------------------------------------------------------------------

    def buildinfo(self, pkg: Package, rel: _Relocations) -> dict[str, Any]:
        """The ``.spack/binary_distribution`` mapping, in Spack's key order."""
        prefix = self.prefix_of(pkg)
        return {
            "sbang_install_path": self.sbang_install_path,
            "buildpath": self.build_root,
            "spackprefix": self.spack_prefix,
            "relative_prefix": os.path.relpath(prefix, self.build_root),
            "hardlinks_deduped": True,
            "hash_to_prefix": {p.dag_hash: self.prefix_of(p) for p in specs_to_relocate(pkg)},
            "relocate_binaries": rel.binaries,
            "relocate_links": rel.links,
            "relocate_textfiles": rel.textfiles,
        }

    def _search_prefixes(self, pkg: Package) -> list[str]:
        """Prefixes whose mention makes a file relocatable (Spack: all of these)."""
        deps = [self.prefix_of(p) for p in specs_to_relocate(pkg)]
        return [*deps, self.sbang_install_path, self.build_root]

    def tarball_bytes(self, pkg: Package, staged: Path) -> tuple[bytes, bytes]:
        """(gzip'd tarball, buildinfo bytes) of a prefix staged at ``staged``."""
        prefix = self.prefix_of(pkg)
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", compresslevel=6, mtime=0, fileobj=buf) as gz:
            with tarfile.TarFile(name="", mode="w", fileobj=gz) as tar:
                regex = prefix_regex(self._search_prefixes(pkg))
                rel = write_prefix_tar(tar, staged, prefix, regex)
                info_bytes = buildinfo_bytes(self.buildinfo(pkg, rel))
                info = tarfile.TarInfo(f"{prefix.lstrip('/')}/.spack/binary_distribution")
                info.size, info.mode = len(info_bytes), 0o644
                tar.addfile(info, io.BytesIO(info_bytes))
        return buf.getvalue(), info_bytes

    def add(self, pkg: Package, *, sign: bool | Signer = True, sign_time: int | None = None) -> str:
        """Push ``pkg``: tarball blob, spec blob, spec manifest; record its DAG in the index.

        ``.spack/spec.json`` is added to the prefix unless ``pkg.files`` has one. ``sign``:
        True = the writer's signer (if any), False = plain JSON, or another Signer.
        Returns the DAG hash.
        """
        tarball, info_bytes = self.pack(pkg)
        tar_rec = self.write_blob(tarball, MEDIA_TARBALL, "gzip")
        spec_rec = self.write_blob(spec_blob_bytes(pkg), MEDIA_SPEC, "gzip")
        path = self.write_spec_manifest(pkg, [tar_rec, spec_rec], sign=sign, sign_time=sign_time)
        self.entries[pkg.dag_hash] = Entry(
            pkg, self.prefix_of(pkg), tar_rec, spec_rec, path, info_bytes
        )
        self.add_record(pkg, in_buildcache=True)
        return pkg.dag_hash

    def pack(self, pkg: Package) -> tuple[bytes, bytes]:
        """(gzip'd tarball, buildinfo bytes) of ``pkg`` as a build leaves its prefix: files
        staged, sbang hook applied, ``.spack/spec.json`` added unless ``pkg.files`` has one."""
        if pkg.is_external:
            raise ValueError(f"{pkg.name} is external: externals have no tarball")
        with tempfile.TemporaryDirectory(prefix="lmstage-") as tmp:
            staged = Path(tmp) / "prefix"
            stage_files(pkg, staged)
            if self.build_sbang:
                filter_shebangs(staged, self.sbang_install_path)
            spec_json = staged / ".spack" / "spec.json"
            if not spec_json.exists() and not spec_json.is_symlink():
                spec_json.parent.mkdir(parents=True, exist_ok=True)
                spec_json.write_bytes(compact_json(pkg.spec_dict()).encode())
                spec_json.chmod(0o644)
            return self.tarball_bytes(pkg, staged)

    def add_prefix_dir(self, pkg: Package, directory: Path, **kw: Any) -> str:
        """Push ``pkg`` with the contents of a real directory (built for ``prefix_of(pkg)``).

        Modes (owner exec bit), symlinks, hardlinks and empty dirs are kept.
        """
        pkg.files, pkg.executable = read_tree(Path(directory))
        return self.add(pkg, **kw)

    def add_record(self, pkg: Package, *, in_buildcache: bool = False) -> str:
        """List ``pkg``'s whole DAG in the index without pushing a tarball for it."""
        for node in _post_order(pkg):
            self._records.setdefault(node.dag_hash, node)
        if in_buildcache:
            self._in_buildcache.add(pkg.dag_hash)
        return pkg.dag_hash

    def add_external(self, name: str, version: str, path: str, **kw: Any) -> Package:
        """An external package listed in the index (``in_buildcache: false``)."""
        pkg = external(name, version, path, **kw)
        self.add_record(pkg)
        return pkg

    def build_c_package(self, name: str, **kw: Any) -> Package:
        """:func:`build_c_package` for this writer's build root and prefixes."""
        return build_c_package(name, self.build_root, prefix_of=self.prefix_of, **kw)

    # -- index, keys, layout ----------------------------------------------------------------

    def index_records(self, upgraded: bool = False) -> dict[str, dict[str, Any]]:
        """Index records in Spack's order (post-order DFS as specs were added).

        ``upgraded``: nodes as Spack 1.x re-serializes old (v4) ones (a migrated index)."""
        refs: dict[str, int] = dict.fromkeys(self._records, 0)
        for pkg in self._records.values():
            for dep_hash in {e.pkg.dag_hash for e in pkg.deps}:
                if dep_hash in refs:
                    refs[dep_hash] += 1
        return {
            h: {
                "spec": p.upgraded_node() if upgraded else p.node(),
                "ref_count": refs[h],
                "in_buildcache": h in self._in_buildcache,
            }
            for h, p in self._records.items()
        }

    def write_index(self, records: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        """Write the index blob and its (unsigned) manifest; return the blob record."""
        data = index_bytes(self.index_records() if records is None else records)
        rec = self.write_blob(data, MEDIA_INDEX, "none")
        self.write_manifest("v3/manifests/index/index.manifest.json", [rec])
        return rec

    def write_keys(self, signers: Iterable[Signer] | None = None) -> None:
        """Key blobs, ``<FPR>.key.manifest.json`` and the key index (+ its manifest).

        Default: the writer's own signer only (a key used via ``sign=other`` is not published
        unless passed here).
        """
        if signers is None:
            signers = [self.signer] if self.signer is not None else []
        chosen = list(signers)
        if not chosen:
            return
        for s in chosen:
            rec = self.write_blob(s.public_key_armor, MEDIA_KEY, "none")
            self.write_manifest(f"v3/manifests/key/{s.fingerprint}.key.manifest.json", [rec])
        keys: dict[str, Any] = {"keys": {fpr: {} for fpr in sorted(s.fingerprint for s in chosen)}}
        rec = self.write_blob(compact_json(keys).encode(), MEDIA_KEY_INDEX, "none")
        self.write_manifest("v3/manifests/key/keys.manifest.json", [rec])

    def write_layout(self) -> None:
        """``v3/layout.json`` (written by signed and unsigned pushes alike)."""
        path = self.root / "v3" / "layout.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(json.dumps({"signing": "gpg"}).encode())

    def finish(self, records: dict[str, dict[str, Any]] | None = None) -> Path:
        """Write index, keys (if anything was signed) and layout.json; return ``root``."""
        self.write_index(records)
        self.write_keys()
        self.write_layout()
        return self.root


@dataclass
class V2Entry:
    """What :meth:`V2CacheWriter.add` wrote for one package."""

    pkg: Package
    prefix: str
    tarball: Path  # the .spack file
    checksum: str  # its sha256, as the spec file says
    specfile: Path  # .spec.json.sig (or .spec.json when unsigned)
    spec_text: bytes  # the spec file's JSON (what is signed)
    buildinfo: bytes


class V2CacheWriter(CacheWriter):
    """Writes an old layout-v2 build cache under ``root`` as Spack 0.20-0.23 did.

    Packages need a ``compiler`` (spec v4 nodes; :data:`DEFAULT_COMPILER` is a good one) and
    live at 0.23's projection (:func:`v2_projection`) under the build root. Per package: the
    ``.spack`` tarball at :func:`v2_tarball_relpath`, and the spec file at
    :func:`v2_specfile_relpath` (clearsigned ``.spec.json.sig``; ``.spec.json`` unsigned)
    holding ``spec.to_dict()`` + layout version 2 + the ``.spack``'s sha256, written with
    ``json.dump(indent=0, separators=(",", ":"))``.
    :meth:`finish` writes ``build_cache/index.json`` (DB v7), ``index.json.hash`` and the
    ``_pgp/`` keys; :meth:`migrate` then adds what ``spack buildcache migrate`` writes.
    """

    def __init__(self, root: Path, build_root: str = DEFAULT_BUILD_ROOT,
                 signer: Signer | None = None, **kw: Any) -> None:
        super().__init__(root, build_root, signer, **kw)
        self.v2_entries: dict[str, V2Entry] = {}

    def prefix_of(self, pkg: Package) -> str:
        return f"{self.build_root.rstrip('/')}/{v2_projection(pkg)}"

    def buildinfo(self, pkg: Package, rel: _Relocations) -> dict[str, Any]:
        """``get_buildinfo_dict`` of Spack 0.23 (its key order differs from 1.x)."""
        info = super().buildinfo(pkg, rel)
        order = ("sbang_install_path", "buildpath", "spackprefix", "relative_prefix",
                 "relocate_textfiles", "relocate_binaries", "relocate_links",
                 "hardlinks_deduped", "hash_to_prefix")
        return {key: info[key] for key in order}

    def specfile_path(self, pkg: Package, signed: bool = True) -> Path:
        return self.root / v2_specfile_relpath(pkg, signed)

    def tarball_path(self, pkg: Package) -> Path:
        return self.root / v2_tarball_relpath(pkg)

    def add(self, pkg: Package, *, sign: bool | Signer = True, sign_time: int | None = None) -> str:
        """Push ``pkg``: its ``.spack`` tarball and its spec file; record its DAG in the index.
        ``sign`` as for :meth:`CacheWriter.add`. Returns the DAG hash."""
        _v2_compiler(pkg)
        tarball, info_bytes = self.pack(pkg)
        spack_file = self.tarball_path(pkg)
        spack_file.parent.mkdir(parents=True, exist_ok=True)
        spack_file.write_bytes(tarball)
        checksum = hashlib.sha256(tarball).hexdigest()
        doc = {**pkg.spec_dict(), "buildcache_layout_version": 2,
               "binary_cache_checksum": {"hash_algorithm": "sha256", "hash": checksum}}
        text = json.dumps(doc, indent=0, separators=(",", ":")).encode()
        specfile = self.write_spec_file(pkg, text, sign=sign, sign_time=sign_time)
        self.v2_entries[pkg.dag_hash] = V2Entry(
            pkg, self.prefix_of(pkg), spack_file, checksum, specfile, text, info_bytes)
        self.add_record(pkg, in_buildcache=True)
        return pkg.dag_hash

    def write_spec_file(self, pkg: Package, text: bytes, *, sign: bool | Signer = True,
                        sign_time: int | None = None) -> Path:
        """(Re)write ``pkg``'s spec file with ``text``: clearsigned as ``.spec.json.sig`` if
        ``sign`` resolves to a Signer, else plain as ``.spec.json``. The other form is removed
        (Spack's push deletes both before writing one)."""
        signer = self._resolve_signer(sign)
        for signed in (True, False):
            self.specfile_path(pkg, signed).unlink(missing_ok=True)
        path = self.specfile_path(pkg, signer is not None)
        if signer is not None:
            text = signer.clearsign(text, sign_time if sign_time is not None else self.sign_time)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text)
        return path

    def write_v2_index(self, records: dict[str, dict[str, Any]] | None = None) -> bytes:
        """``build_cache/index.json`` (DB v7, compact) and ``index.json.hash`` (its sha256)."""
        installs = self.index_records() if records is None else records
        data = compact_json({"database": {"version": "7", "installs": installs}}).encode()
        (self.root / "build_cache").mkdir(parents=True, exist_ok=True)
        (self.root / "build_cache" / "index.json").write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        (self.root / "build_cache" / "index.json.hash").write_bytes(digest.encode())
        return data

    def write_v2_keys(self, signers: Iterable[Signer] | None = None) -> None:
        """``build_cache/_pgp/<FPR>.pub`` (``gpg --armor --export``) and ``_pgp/index.json``."""
        if signers is None:
            signers = [self.signer] if self.signer is not None else []
        chosen = list(signers)
        if not chosen:
            return
        keys = self.root / "build_cache" / "_pgp"
        keys.mkdir(parents=True, exist_ok=True)
        for s in chosen:
            (keys / f"{s.fingerprint}.pub").write_bytes(s.public_key_armor)
        index = {"keys": {fpr: {} for fpr in sorted({s.fingerprint for s in chosen})}}
        (keys / "index.json").write_bytes(compact_json(index).encode())

    def finish(self, records: dict[str, dict[str, Any]] | None = None) -> Path:
        """Write the v2 index, its hash and the keys (no ``v3/`` at all); return ``root``."""
        self.write_v2_index(records)
        self.write_v2_keys()
        return self.root

    def migrate(self, *, sign: bool | Signer = True, sign_time: int | None = None,
                delete_existing: bool = False) -> Path:
        """What ``spack buildcache migrate`` adds next to the untouched ``build_cache/``.

        Per package: the ``.spack`` bytes as the tarball blob; the spec file's JSON minus
        ``binary_cache_checksum``, plus ``archive_size``, gzip'd as the spec blob (still spec
        v4, under the spec.v5 mediaType); a (signed) manifest. Then a DB v8 index whose nodes
        carry ``annotations: {original_specfile_version: 4, compiler: "gcc@=12.2.0"}``, the
        key manifests and ``v3/layout.json``. ``delete_existing`` removes ``build_cache/``.
        """
        for entry in self.v2_entries.values():
            tarball = entry.tarball.read_bytes()
            tar_rec = self.write_blob(tarball, MEDIA_TARBALL, "gzip")
            doc = {**entry.pkg.spec_dict(), "buildcache_layout_version": 2,
                   "archive_size": len(tarball)}
            spec_blob = gzip_bytes(compact_json(doc).encode(), sync_flush=True)
            spec_rec = self.write_blob(spec_blob, MEDIA_SPEC, "gzip")
            path = self.write_spec_manifest(entry.pkg, [tar_rec, spec_rec], sign=sign,
                                            sign_time=sign_time)
            self.entries[entry.pkg.dag_hash] = Entry(
                entry.pkg, entry.prefix, tar_rec, spec_rec, path, entry.buildinfo)
        self.write_index(self.index_records(upgraded=True))
        signer = self._resolve_signer(sign)
        self.write_keys([signer] if signer is not None else [])
        self.write_layout()
        if delete_existing:
            shutil.rmtree(self.root / "build_cache")
        return self.root


def _post_order(pkg: Package) -> list[Package]:
    """Post-order DFS over all deptypes, deps by name (the order ``Database.add`` inserts)."""
    out: list[Package] = []
    seen: set[str] = set()

    def visit(p: Package) -> None:
        if p.dag_hash in seen:
            return
        seen.add(p.dag_hash)
        for e in p.edges():
            visit(e.pkg)
        out.append(p)

    visit(pkg)
    return out


# ---------------------------------------------------------------------------------------------
# Compiled test packages
# ---------------------------------------------------------------------------------------------


def c_symbol(name: str) -> str:
    """C identifier derived from a package name."""
    return re.sub(r"\W", "_", name)


def _c_str(text: str) -> str:
    """A C string literal (JSON escapes are valid C for these strings)."""
    return json.dumps(text)


def _lib_source(sym: str, prefix: str, message: str, deps: Sequence[Package]) -> str:
    calls = "".join(f"extern const char *{c_symbol(d.name)}_prefix(void);\n" for d in deps)
    return (
        f"{calls}"
        f"static const char prefix_str[] = {_c_str(prefix)};\n"
        f"const char *{sym}_prefix(void) {{ return prefix_str; }}\n"
        f"const char *{sym}_message(void) {{ return {_c_str(message)}; }}\n"
    )


def _main_source(name: str, prefix: str, deps: Sequence[Package]) -> str:
    sym = c_symbol(name)
    decls = "".join(f"extern const char *{c_symbol(p.name)}_prefix(void);\n" for p in deps)
    dep_lines = "".join(
        f'  printf("dep {p.name}: %s\\n", {c_symbol(p.name)}_prefix());\n' for p in deps
    )
    return (
        "#include <stdio.h>\n"
        f"extern const char *{sym}_prefix(void);\n"
        f"extern const char *{sym}_message(void);\n"
        f"{decls}"
        f"static const char data_path[] = {_c_str(f'{prefix}/share/{name}/data.txt')};\n"
        "int main(void) {\n"
        f'  printf("%s\\n", {sym}_message());\n'
        f'  printf("prefix: %s\\n", {sym}_prefix());\n'
        '  printf("data: %s\\n", data_path);\n'
        f"{dep_lines}"
        "  return 0;\n}\n"
    )


def _c_deps(pkg: Package) -> list[Package]:
    """Direct link deps that were made by :func:`build_c_package`."""
    return [
        e.pkg
        for e in pkg.edges()
        if "link" in e.deptypes and f"lib/lib{e.pkg.name}.so" in e.pkg.files
    ]


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr}")


def build_c_package(
    name: str,
    build_root: str = DEFAULT_BUILD_ROOT,
    *,
    version: str = "1.0",
    deps: Sequence[Any] = (),
    message: str | None = None,
    cc: str = "gcc",
    prefix_of: Callable[[Package], str] | None = None,
    **pkg_kw: Any,
) -> Package:
    """Compile a tiny C package for its build prefix under ``build_root``.

    Files: ``lib/lib<name>.so`` (a C string with the prefix, RPATH to C deps' lib dirs),
    ``bin/<name>`` (linked to it with ``-Wl,--disable-new-dtags,-rpath,<prefix>/lib`` like
    Spack's wrapper; prints the message, its prefix, a data path and each C dep's prefix),
    ``include/<name>.h`` and ``share/<name>/data.txt`` (text mentioning the prefix).
    Link-time uses ``-L`` to a scratch dir, so only the RPATHs name build prefixes.
    ``prefix_of`` gives build prefixes (default: Spack 1.x's projection under ``build_root``).
    """
    pkg = Package(name, version, deps=list(deps), **pkg_kw)
    where = prefix_of or (lambda p: install_prefix(build_root, p))
    prefix = where(pkg)
    sym, msg = c_symbol(name), message or f"Hello from {name}"
    cdeps = _c_deps(pkg)
    rpaths = [f"{prefix}/lib", *(f"{where(d)}/lib" for d in cdeps)]
    rflags = ["-Wl,--disable-new-dtags," + ",".join(f"-rpath,{r}" for r in rpaths)]
    with tempfile.TemporaryDirectory(prefix="lmcc-") as tmp:
        work = Path(tmp)
        for d in cdeps:
            (work / f"lib{d.name}.so").write_bytes(_file_bytes(d.files[f"lib/lib{d.name}.so"]))
        (work / "lib.c").write_text(_lib_source(sym, prefix, msg, cdeps))
        (work / "main.c").write_text(_main_source(name, prefix, cdeps))
        dlibs = [f"-l{d.name}" for d in cdeps]
        common = ["-L.", f"-Wl,-rpath-link,{work}", *rflags]
        _run([cc, "-shared", "-fPIC", "-o", f"lib{name}.so", "lib.c", *common, *dlibs], work)
        _run([cc, "-o", name, "main.c", *common, f"-l{name}", *dlibs], work)
        pkg.files.update(
            {
                f"bin/{name}": (work / name).read_bytes(),
                f"lib/lib{name}.so": (work / f"lib{name}.so").read_bytes(),
            }
        )
    pkg.files[f"include/{name}.h"] = f"const char *{sym}_prefix(void);\n"
    pkg.files[f"share/{name}/data.txt"] = f"{prefix}/share/{name}/data.txt\n"
    return pkg


def _file_bytes(value: FileValue) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytes):
        return value
    raise TypeError(f"not a regular file: {value!r}")


__all__ = [
    "DEFAULT_COMPILER",
    "CacheWriter",
    "Dep",
    "Dir",
    "Entry",
    "Hardlink",
    "Package",
    "Signer",
    "Symlink",
    "V2CacheWriter",
    "V2Entry",
    "Verified",
    "b32_hash",
    "blob_record",
    "build_c_package",
    "external",
    "filter_shebangs",
    "gzip_bytes",
    "index_bytes",
    "install_prefix",
    "manifest_text",
    "packages_from_nodes",
    "padded_root",
    "read_tree",
    "spec_blob_bytes",
    "v2_projection",
    "v2_specfile_relpath",
    "v2_tarball_relpath",
    "verify_clearsigned",
]
