"""Write layout-v3 Spack build caches exactly as Spack 1.1 does, for tests and benchmarks.

Independent of the ``lazymount`` package on purpose: it is the oracle the daemon is tested
against. The formats follow Spack 1.1 (``url_buildcache.py``, ``binary_distribution.py``,
``util/archive.py``, ``database.py``) and are checked byte for byte against the real cache in
``tests/data/v3-own-only`` by ``tests/test_spackcache.py``.

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
from collections.abc import Iterable, Iterator, Sequence
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

    def __post_init__(self) -> None:
        self.deps = [_as_dep(d) for d in self.deps]
        if self.parameters is None:
            self.parameters = dict(GENERIC_PARAMETERS)
        if self.package_hash is None:
            self.package_hash = default_package_hash(self.namespace, self.name, self.version)

    def edges(self) -> list[Dep]:
        """Dependency edges sorted as Spack serializes them (by name, then hash)."""
        return sorted(self.deps, key=lambda d: (d.pkg.name, d.pkg.dag_hash))

    def node_without_hash(self) -> dict[str, Any]:
        """The spec node dict in Spack's key order, without ``hash``."""
        platform, platform_os, target = self.arch
        node: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "arch": {"platform": platform, "platform_os": platform_os, "target": target},
            "namespace": self.namespace,
            "parameters": self.parameters,
        }
        if self.external is not None:
            node["external"] = self.external
        node["package_hash"] = self.package_hash
        if self.deps:
            node["dependencies"] = [_edge_dict(e) for e in self.edges()]
        node["annotations"] = self.annotations
        return node

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
        return {"spec": {"_meta": {"version": 5}, "nodes": [p.node() for p in self.traverse()]}}

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
    if given (``sign_time`` fixes the signature time), plain JSON otherwise.
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
    ) -> None:
        self.root = Path(root)
        self.unpadded_root = build_root.rstrip("/")
        self.build_root = padded_root(self.unpadded_root, padded_length)
        self.signer = signer
        self.spack_prefix = spack_prefix
        self.sign_time = sign_time
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
        if pkg.is_external:
            raise ValueError(f"{pkg.name} is external: externals have no tarball")
        with tempfile.TemporaryDirectory(prefix="lmstage-") as tmp:
            staged = Path(tmp) / "prefix"
            stage_files(pkg, staged)
            spec_json = staged / ".spack" / "spec.json"
            if not spec_json.exists() and not spec_json.is_symlink():
                spec_json.parent.mkdir(parents=True, exist_ok=True)
                spec_json.write_bytes(compact_json(pkg.spec_dict()).encode())
                spec_json.chmod(0o644)
            tarball, info_bytes = self.tarball_bytes(pkg, staged)
        tar_rec = self.write_blob(tarball, MEDIA_TARBALL, "gzip")
        spec_rec = self.write_blob(spec_blob_bytes(pkg), MEDIA_SPEC, "gzip")
        path = self.write_spec_manifest(pkg, [tar_rec, spec_rec], sign=sign, sign_time=sign_time)
        self.entries[pkg.dag_hash] = Entry(
            pkg, self.prefix_of(pkg), tar_rec, spec_rec, path, info_bytes
        )
        self.add_record(pkg, in_buildcache=True)
        return pkg.dag_hash

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
        """:func:`build_c_package` for this writer's build root."""
        return build_c_package(name, self.build_root, **kw)

    # -- index, keys, layout ----------------------------------------------------------------

    def index_records(self) -> dict[str, dict[str, Any]]:
        """Index records in Spack's order (post-order DFS as specs were added)."""
        refs: dict[str, int] = dict.fromkeys(self._records, 0)
        for pkg in self._records.values():
            for dep_hash in {e.pkg.dag_hash for e in pkg.deps}:
                if dep_hash in refs:
                    refs[dep_hash] += 1
        return {
            h: {"spec": p.node(), "ref_count": refs[h], "in_buildcache": h in self._in_buildcache}
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
    **pkg_kw: Any,
) -> Package:
    """Compile a tiny C package for its build prefix under ``build_root``.

    Files: ``lib/lib<name>.so`` (a C string with the prefix, RPATH to C deps' lib dirs),
    ``bin/<name>`` (linked to it with ``-Wl,--disable-new-dtags,-rpath,<prefix>/lib`` like
    Spack's wrapper; prints the message, its prefix, a data path and each C dep's prefix),
    ``include/<name>.h`` and ``share/<name>/data.txt`` (text mentioning the prefix).
    Link-time uses ``-L`` to a scratch dir, so only the RPATHs name build prefixes.
    """
    pkg = Package(name, version, deps=list(deps), **pkg_kw)
    prefix = install_prefix(build_root, pkg)
    sym, msg = c_symbol(name), message or f"Hello from {name}"
    cdeps = _c_deps(pkg)
    rpaths = [f"{prefix}/lib", *(f"{install_prefix(build_root, d)}/lib" for d in cdeps)]
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
    "CacheWriter",
    "Dep",
    "Dir",
    "Entry",
    "Hardlink",
    "Package",
    "Signer",
    "Symlink",
    "Verified",
    "b32_hash",
    "blob_record",
    "build_c_package",
    "external",
    "gzip_bytes",
    "index_bytes",
    "install_prefix",
    "manifest_text",
    "packages_from_nodes",
    "padded_root",
    "read_tree",
    "spec_blob_bytes",
    "verify_clearsigned",
]
