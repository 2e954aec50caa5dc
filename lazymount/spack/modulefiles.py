"""Environment module files for the packages of the mount, generated from the index alone.

The mount serves two module roots under ``<mount>/modules/``, laid out and named as Spack
1.1 writes them with its default ``modules.yaml`` (``lib/spack/spack/modules/``):

* ``tcl/`` (Environment Modules): ``<platform>-<os>-<target>/<name>/<version>-<compiler
  name>-<compiler version>-<hash:7>``, a ``#%Module1.0`` file;
* ``lmod/`` (Lmod): ``<platform>-<os>-<target family>/Core/<name>/<version>-<hash:7>.lua``.
  Every compiler counts as a core compiler (the compilers a cache was built with are
  rarely modules of the site), so everything is under ``Core``;

and in each root a ``module-index.yaml`` (``module_index: {<dag hash>: {path, use_name}}``)
through which a downstream Spack whose ``upstreams.yaml`` names the roots finds them.

A module file does what Spack's default one does: it autoloads the modules of its direct
link and run dependencies (``autoload: direct``; a dependency without a module is left
out), and prepends each directory of Spack's default ``prefix_inspections`` to its
variable (``bin`` -> ``PATH``, ``man``/``share/man`` -> ``MANPATH``, ... ``.`` ->
``CMAKE_PREFIX_PATH``). Spack prepends only the directories that exist; the index does not
list files, so these modules prepend them all (a missing directory on a search path is
harmless), and looking for one never materializes anything until something is run.
Package-specific ``setup_run_environment`` code cannot run here: a module file never sets
what only a package's recipe knows.

Which packages get a module: by default every one the mount installs (its packages and the
externals they name); a ``Selector`` can narrow that (for example to one build per name and
version). Names come from the index, which is unsigned: the index refuses names a module
system reads as its own (a leading '.' or '-') and control characters; everything written
into a module file is made of polite file-name characters or checked against ``_SAFE``
first, and every value is quoted for Tcl or Lua besides, so an index cannot smuggle Tcl or
Lua code into a module a user loads.

Pure and cheap: the layout is computed once (no I/O); a file's text is made when it is read.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from lazymount.buildcache.index import SpecRecord
from lazymount.buildcache.layout import (
    NO_COMPILER,
    compiler_from_dependencies,
    node_compiler,
    polite_filename,
)
from lazymount.catalog.hosttarget import microarchitecture, unknown_target
from lazymount.catalog.installtree import InstallTree

log = logging.getLogger(__name__)

MODULES_DIR = "modules"  # under the mount root
ModuleKind = Literal["tcl", "lmod"]  # Environment Modules' Tcl files, Lmod's Lua files
TCL: ModuleKind = "tcl"
LMOD: ModuleKind = "lmod"
KINDS: tuple[ModuleKind, ...] = (TCL, LMOD)
INDEX_FILE = "module-index.yaml"
CORE = "Core"  # Lmod's directory of modules built with a core compiler
HASH_LENGTH = 7  # modules:<set>:<kind>:hash_length
NAME_MAX = 255  # characters of a file name (polite: one byte each)

# Spack 1.1's default modules:prefix_inspections, in its order: prefix-relative directory,
# variables it is prepended to
PREFIX_INSPECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("bin", ("PATH",)),
    ("man", ("MANPATH",)),
    ("share/man", ("MANPATH",)),
    ("share/aclocal", ("ACLOCAL_PATH",)),
    ("lib/pkgconfig", ("PKG_CONFIG_PATH",)),
    ("lib64/pkgconfig", ("PKG_CONFIG_PATH",)),
    ("share/pkgconfig", ("PKG_CONFIG_PATH",)),
    (".", ("CMAKE_PREFIX_PATH",)),
)
# Spack never points a variable at these (spack.util.environment.SYSTEM_DIRS)
_SYSTEM_ROOTS = ("/", "/usr", "/usr/local")
SYSTEM_DIRS = frozenset(
    [os.path.join(r, s) for s in ("bin", "bin64", "include", "lib", "lib64")
     for r in _SYSTEM_ROOTS] + list(_SYSTEM_ROOTS))
# what a path written into a module file may hold: no quote, brace, bracket, dollar,
# backslash, space or control character of Tcl or Lua, and no ':' (it would split a search
# path in two)
_SAFE = re.compile(r"/[A-Za-z0-9_+.,@%=/-]*")

# versions Environment Modules 5 gives a meaning of its own (symbolic versions)
RESERVED_VERSIONS = frozenset({"default", "latest", "loaded"})

# which DAG hashes of the tree get module files (default: every installed one). The hook for
# a host-aware choice, e.g. only the best build of each name and version for this CPU; a
# dependency left out is then not autoloaded (RPATHs still find its libraries).
Selector = Callable[[InstallTree], Iterable[str]]


def installed_hashes(tree: InstallTree) -> list[str]:
    """Every hash the mount's Spack database says is installed: the packages it serves and
    the externals of the index."""
    return [h for h, record in tree.catalog.items()
            if h in tree.prefixes or record.external_path is not None]


@dataclass(frozen=True)
class ModuleFile:
    """One module file: what it is for and where it lives."""

    kind: ModuleKind
    dag_hash: str
    use_name: str  # what `module load` takes
    relative: str  # path under the mount


@dataclass
class ModuleTree:
    """The module roots of a mount: their files, directories and index files."""

    tree: InstallTree
    select: Selector = installed_hashes  # which packages get modules
    laid_out: bool = False  # files, by_hash and dirs below the roots are made (lay_out)
    files: dict[str, ModuleFile] = field(default_factory=dict)  # relative path -> file
    by_hash: dict[str, dict[str, ModuleFile]] = field(default_factory=dict)  # kind -> hash ->
    dirs: dict[str, set[str]] = field(default_factory=dict)  # relative dir -> child names
    _indexes: dict[str, bytes] = field(default_factory=dict)  # kind -> module-index.yaml
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def build(cls, tree: InstallTree, select: Selector = installed_hashes) -> ModuleTree:
        """The module roots of ``select(tree)``. Their files are laid out by ``lay_out``,
        on the first look below ``modules/``: 200,000 module files of a 100,000-spec index
        take seconds, which no mount should wait for."""
        modules = cls(tree, select, by_hash={kind: {} for kind in KINDS})
        for kind in KINDS:
            modules._add_dir(f"{MODULES_DIR}/{kind}")
            modules._add_dir(f"{MODULES_DIR}/{kind}/{INDEX_FILE}")
        return modules

    def lay_out(self) -> ModuleTree:
        """Make every module file's name and directory (no I/O; blocking: a worker thread).
        Idempotent, any thread; what the queries below answer needs it first."""
        with self._lock:
            if not self.laid_out:
                for dag_hash in self.select(self.tree):
                    record = self.tree.catalog.get(dag_hash)
                    if record is not None:
                        for kind in KINDS:
                            self._place(kind, record)
                self.laid_out = True
        return self

    def _add_dir(self, relative: str) -> None:
        """Enter ``relative`` in its directory, and that directory in its own, up to the
        mount root (stopping at the first one already known)."""
        while relative:
            parent, _, name = relative.rpartition("/")
            known = parent in self.dirs
            self.dirs.setdefault(parent, set()).add(name)
            if known:
                return
            relative = parent

    def _place(self, kind: ModuleKind, record: SpecRecord) -> None:
        if not (module_word(polite_filename(record.name))
                and module_word(polite_filename(record.version))):
            if kind == KINDS[0]:  # one line for both kinds
                log.warning("%s: no module: a module system would read its name or "
                            "version as its own ('+', a '.lua' ending)",
                            self.tree.label(record.dag_hash))
            return
        names = _names(kind, record, self.tree)
        if names is None:
            log.warning("%s: no %s module: its architecture is incomplete",
                        self.tree.label(record.dag_hash), kind)
            return
        folder, use_name, extension = names
        relative = f"{MODULES_DIR}/{kind}/{folder}/{use_name}{extension}"
        if max(map(len, relative.split("/"))) > NAME_MAX:  # a listing would fail whole
            log.warning("%s: no %s module: a part of its name is over %d characters",
                        self.tree.label(record.dag_hash), kind, NAME_MAX)
            return
        if relative in self.files:
            log.warning("%s: no %s module: %s is taken by %s", self.tree.label(record.dag_hash),
                        kind, use_name, self.tree.label(self.files[relative].dag_hash))
            return
        module = ModuleFile(kind, record.dag_hash, use_name, relative)
        self.files[relative] = module
        self.by_hash[kind][record.dag_hash] = module
        self._add_dir(relative)

    # ---- what the filesystem asks -----------------------------------------------------

    def root(self, kind: ModuleKind) -> str:
        """Absolute path of a module root (what upstreams.yaml's ``modules:`` names)."""
        return f"{self.tree.root.rstrip('/')}/{MODULES_DIR}/{kind}"

    def is_file(self, relative: str) -> bool:
        return relative in self.files or _index_kind(relative) is not None

    def is_dir(self, relative: str) -> bool:
        return relative in self.dirs

    def text(self, relative: str) -> bytes:
        """The content of a module file or index file. Raises KeyError for other paths."""
        kind = _index_kind(relative)
        if kind is not None:
            return self._index_text(kind)
        module = self.files[relative]
        render = _tcl_text if module.kind == TCL else _lua_text
        return render(self._content(module)).encode()

    def _index_text(self, kind: ModuleKind) -> bytes:
        """module-index.yaml: every module of the root by DAG hash (quoted scalars only, so
        no name reads as a number or a YAML construct). Made once, on first read."""
        if kind not in self._indexes:
            self._indexes[kind] = self._make_index(kind)
        return self._indexes[kind]

    def _make_index(self, kind: ModuleKind) -> bytes:
        lines = ["module_index:"]
        for dag_hash, module in self.by_hash[kind].items():
            path = f"{self.tree.root.rstrip('/')}/{module.relative}"
            lines += [f"  {_quote(dag_hash)}:", f"    path: {_quote(path)}",
                      f"    use_name: {_quote(module.use_name)}"]
        return ("\n".join(lines) + "\n").encode() if len(lines) > 1 else b"module_index: {}\n"

    def render(self, kind: ModuleKind, dag_hash: str, use_name: str, loads: list[str],
               inline: list[str]) -> bytes:
        """The module file of ``dag_hash`` known as ``use_name``, autoloading ``loads``
        (polite ``name/version`` names) and setting the prefix inspections of the
        ``inline`` hashes before its own: the host tree's modules (``hostmodules``)."""
        record = self.tree.catalog[dag_hash]
        changes = [change for dep in inline if dep in self.tree.catalog
                   for change in _prefix_changes(self.tree.catalog[dep], self.tree)]
        changes += _prefix_changes(record, self.tree)
        content = _Content(record, use_name, loads, changes)
        return (_tcl_text if kind == TCL else _lua_text)(content).encode()

    def _content(self, module: ModuleFile) -> _Content:
        record = self.tree.catalog[module.dag_hash]
        loads = [self.by_hash[module.kind][dep].use_name for dep in record.runtime_deps
                 if dep in self.by_hash[module.kind]]
        return _Content(record, module.use_name, loads, _prefix_changes(record, self.tree))


# ---- names ------------------------------------------------------------------------------


def _names(kind: ModuleKind, record: SpecRecord, tree: InstallTree) -> tuple[str, str, str] | None:
    """(architecture folder, use name, file extension) of a record's module, as Spack's
    TclFileLayout / LmodFileLayout make them (every part a polite file name, so it is safe
    in Tcl and Lua too); None if the architecture is incomplete. The index refuses empty
    names and versions, and ``.`` or ``..``."""
    arch = record.place.get("arch") or {}
    folder = _folder(kind, str(arch.get("platform", "")), str(arch.get("platform_os", "")),
                     str(arch.get("target", "")))
    if folder is None:
        return None
    name, version = polite_filename(record.name), polite_filename(record.version)
    short = record.dag_hash[:HASH_LENGTH]
    if kind == TCL:
        compiler, compiler_version = _compiler(record, tree)
        return folder, f"{name}/{version}-{compiler}-{compiler_version}-{short}", ""
    return folder, f"{name}/{version}-{short}", ".lua"


def module_word(polite: str) -> bool:
    """True if a polite name or version can be part of a module's name: Environment
    Modules reads '+' as a variant (``module load foo/+x`` never returns), Lmod cannot load
    a name that ends in ``.lua``, and both read a leading '.' or '-' as their own file or an
    option (the index refuses those already)."""
    return "+" not in polite and not polite.startswith((".", "-")) \
        and not polite.endswith(".lua")


@functools.lru_cache(maxsize=256)
def _folder(kind: ModuleKind, platform: str, os_name: str, target: str) -> str | None:
    """The architecture folder of a module root: ``platform-os-target`` (Tcl), or
    ``platform-os-family/Core`` (Lmod); None if a part is missing."""
    if not (platform and os_name and target):
        return None
    if kind == TCL:
        return polite_filename(f"{platform}-{os_name}-{target}")
    return f"{polite_filename(f'{platform}-{os_name}-{target_family(target)}')}/{CORE}"


def _compiler(record: SpecRecord, tree: InstallTree) -> tuple[str, str]:
    """Spack's ``{compiler.name}``/``{compiler.version}`` of a module name: ``none`` for a
    node built without a compiler."""
    name, version = node_compiler(record.place)
    if not name:
        name, version = compiler_from_dependencies(record.place, tree.node_of)
    if not name:
        return NO_COMPILER, NO_COMPILER
    return polite_filename(name), polite_filename(version or NO_COMPILER)


@functools.lru_cache(maxsize=64)
def target_family(target: str) -> str:
    """archspec's family of a target (``x86_64`` for ``skylake``), which names Lmod's
    architecture folder; the target itself if archspec does not know it."""
    if unknown_target(target) is not None:
        return target
    return str(microarchitecture(target).family.name)


def module_kind(name: str) -> ModuleKind | None:
    """``name`` (a folder of ``modules/``) as a module kind, if it is one."""
    return next((kind for kind in KINDS if kind == name), None)


def _index_kind(relative: str) -> ModuleKind | None:
    for kind in KINDS:
        if relative == f"{MODULES_DIR}/{kind}/{INDEX_FILE}":
            return kind
    return None


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# ---- contents ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Content:
    record: SpecRecord
    use_name: str
    loads: list[str]  # use names of the modules it autoloads
    changes: list[tuple[str, str]]  # (variable, directory) to prepend, in order

    @property
    def name(self) -> str:
        return polite_filename(self.record.name)

    @property
    def version(self) -> str:
        return polite_filename(self.record.version)

    @property
    def target(self) -> str:
        return polite_filename(str((self.record.place.get("arch") or {}).get("target", "")))

    @property
    def manpath(self) -> bool:
        return any(variable == "MANPATH" for variable, _ in self.changes)


def _prefix_changes(record: SpecRecord, tree: InstallTree) -> list[tuple[str, str]]:
    """(variable, directory) pairs of the default prefix inspections. A package of the
    mount gets all of them; an external (a real directory of this host) only those that
    exist and are not system directories, as Spack does."""
    external = record.external_path
    prefix = external if external is not None else tree.prefix_of(record.dag_hash)
    if prefix is None or not _SAFE.fullmatch(prefix):
        return []
    changes = []
    for relative, variables in PREFIX_INSPECTIONS:
        directory = os.path.join(prefix, os.path.normpath(relative))
        if external is not None and (os.path.normpath(directory) in SYSTEM_DIRS
                                     or not os.path.isdir(directory)):
            continue
        changes += [(variable, directory) for variable in variables]
    return changes


def _tcl_text(c: _Content) -> str:
    lines = [
        "#%Module1.0",
        "## Module file generated by lazymount from a Spack build cache index",
        "##",
        f"## {_comment(f'{c.name}@{c.version}/{c.record.dag_hash[:HASH_LENGTH]}')}",
        "##",
        "",
        f"module-whatis {tcl_string(f'{c.name} @{c.version}')}",
        "",
        "proc ModulesHelp { } {",
        f"    puts stderr {tcl_string(f'Name   : {c.name}')}",
        f"    puts stderr {tcl_string(f'Version: {c.version}')}",
        f"    puts stderr {tcl_string(f'Target : {c.target}')}",
        "}",
        "",
    ]
    if c.loads:  # Lmod reads Tcl modules too: there, depends-on
        lines.append("if {![info exists ::env(LMOD_VERSION_MAJOR)]} {")
        lines += [f"    module load {tcl_word(name)}" for name in c.loads]
        lines.append("} else {")
        lines += [f"    depends-on {tcl_word(name)}" for name in c.loads]
        lines += ["}", ""]
    lines += [f"prepend-path {tcl_word(variable)} {tcl_string(path)}"
              for variable, path in c.changes]
    if c.manpath:  # keep the system's man pages: a trailing ':'
        lines.append("append-path MANPATH {}")
    return "\n".join(lines) + "\n"


def _lua_text(c: _Content) -> str:
    lines = [
        "-- -*- lua -*-",
        "-- Module file generated by lazymount from a Spack build cache index",
        "--",
        f"-- {_comment(f'{c.name}@{c.version}/{c.record.dag_hash[:HASH_LENGTH]}')}",
        "--",
        "",
        f"whatis({lua_string(f'Name : {c.name}')})",
        f"whatis({lua_string(f'Version : {c.version}')})",
        f"whatis({lua_string(f'Target : {c.target}')})",
        "",
        f"help({lua_string(f'Name   : {c.name}')})",
        f"help({lua_string(f'Version: {c.version}')})",
        f"help({lua_string(f'Target : {c.target}')})",
        "",
    ]
    lines += [f"depends_on({lua_string(name)})" for name in c.loads]
    if c.loads:
        lines.append("")
    lines += [f'prepend_path({lua_string(variable)}, {lua_string(path)}, ":")'
              for variable, path in c.changes]
    if c.manpath:
        lines.append('append_path("MANPATH", "", ":")')
    return "\n".join(lines) + "\n"


# ---- quoting: every value of a module file, whatever the checks before let through -------

_TCL_BARE = re.compile(r"[A-Za-z0-9_+./@%=,:][A-Za-z0-9_+./@%=,:-]*")
_TCL_BRACED = re.compile(r"[^{}\\\x00-\x1f\x7f]*")
_TCL_SPECIAL = re.compile(r'[\\"$\[\]{};\x00-\x1f\x7f]')
_LUA_SPECIAL = re.compile(r'[\\"\x00-\x1f\x7f]')
_COMMENT_SPECIAL = re.compile(r"[\x00-\x1f\x7f]")


def tcl_string(value: str) -> str:
    """A Tcl word that is ``value`` as it is: braced (no substitution inside), or, for a
    value with a brace, backslash or control character, quoted with each escaped."""
    return "{" + value + "}" if _TCL_BRACED.fullmatch(value) else tcl_quoted(value)


def tcl_quoted(value: str) -> str:
    """A Tcl word in double quotes that is ``value`` as it is (each character Tcl would
    substitute written as an escape)."""
    return '"' + _TCL_SPECIAL.sub(lambda m: f"\\u{ord(m.group()):04x}", value) + '"'


def tcl_word(value: str) -> str:
    """``value`` bare when it is a plain word (a module name), else ``tcl_string``."""
    return value if _TCL_BARE.fullmatch(value) else tcl_string(value)


def lua_string(value: str) -> str:
    """A Lua string literal of ``value``."""
    return '"' + _LUA_SPECIAL.sub(lambda m: f"\\{ord(m.group()):03d}", value) + '"'


def _comment(value: str) -> str:
    """``value`` on one line of a comment."""
    return _COMMENT_SPECIAL.sub("?", value)


def upstream_modules(root: str) -> dict[str, Any]:
    """The ``modules:`` entry of an upstreams.yaml for a mount at ``root``."""
    return {kind: f"{root.rstrip('/')}/{MODULES_DIR}/{kind}" for kind in KINDS}
