"""The host module tree: one module per name and version, for the build this CPU runs best.

::

    modules/host/tcl/<name>/<version>        (Environment Modules)
    modules/host/tcl/<name>/.version         the newest version is the default
    modules/host/lmod/<name>/<version>.lua   (Lmod)
    modules/host/lmod/<name>/default -> <newest version>.lua

``module use <mount>/modules/host/tcl`` (or ``MODULEPATH=<mount>/modules/host/lmod``) lists
each name and version once, and ``module load <name>`` loads the newest version's best build
for the host, chosen by ``catalog.hosttarget`` as ``host/`` chooses it. A module is the chosen
build's own module file of the per-target trees (``modulefiles``), under its short name. A
dependency that is itself the host's choice for its name and version is autoloaded by its
host module (``lmisalib/1.0``); any other (a generic build's generic dependency, when the host
prefers an optimized build of it) is not autoloaded but its directories are set by the
module itself, so the paths are those of the build it was linked with. Externals are left
out of the host tree.

The per-target trees stay as they are: Spack's upstream ``module-index.yaml`` names them, and
a user who wants one exact build loads it from there by its hash.
"""

from __future__ import annotations

from lazymount.buildcache.layout import polite_filename
from lazymount.catalog.hosttarget import HostView
from lazymount.spack.modulefiles import (
    KINDS,
    LMOD,
    MODULES_DIR,
    RESERVED_VERSIONS,
    TCL,
    ModuleKind,
    ModuleTree,
    module_kind,
    module_word,
    tcl_quoted,
)

HOST_MODULES = f"{MODULES_DIR}/host"
DEFAULT_LINK = "default"
TCL_VERSION_FILE = ".version"  # Environment Modules' (and Lmod's) default-version file

Entries = dict[str, str | bytes | None]  # name -> link target, file content, None: directory


def entries(modules: ModuleTree, view: HostView, relative: str) -> Entries | None:
    """What the directory ``relative`` (``modules/host`` or below) holds; None if there is
    no such directory."""
    parts = relative.split("/")[2:]  # after modules/host
    if not parts:
        return dict.fromkeys(KINDS)
    kind = module_kind(parts[0])
    if kind is None or len(parts) > 2:
        return None
    if len(parts) == 1:
        return dict.fromkeys(name for name in view.names() if _versions(modules, view, kind, name))
    name = parts[1]
    versions = _versions(modules, view, kind, name)
    if not versions:
        return None
    found: Entries = {}
    for version in versions:
        found[_file_name(kind, version)] = _text(modules, view, kind, name, version)
    newest = _file_name(kind, versions[0])
    if kind == TCL:
        found[TCL_VERSION_FILE] = (f"#%Module1.0\nset ModulesVersion {tcl_quoted(versions[0])}\n"
                                   .encode())
    elif DEFAULT_LINK not in found:
        found[DEFAULT_LINK] = newest
    return found


def _versions(modules: ModuleTree, view: HostView, kind: ModuleKind, name: str) -> list[str]:
    """Versions of ``name`` whose host build has a module of ``kind``, newest first; only
    names and versions that are already polite file names (as module names are) and that
    a module system does not read as its own (``.modulerc``, ``.version``, an option, a
    variant, ``default``)."""
    if not _plain_name(name):
        return []
    return [version for version in view.versions(name)
            if _plain_name(version) and version.lower() not in RESERVED_VERSIONS
            and _chosen_module(modules, view, kind, name, version) is not None]


def _plain_name(name: str) -> bool:
    # the host tree is where a name of a module system's own would be evaluated
    return polite_filename(name) == name and module_word(name)


def _chosen_module(modules: ModuleTree, view: HostView, kind: ModuleKind, name: str,
                   version: str) -> str | None:
    build = view.chosen(name, version)
    if build is None or build.dag_hash not in modules.by_hash[kind]:
        return None
    return build.dag_hash


def _file_name(kind: ModuleKind, version: str) -> str:
    return f"{version}.lua" if kind == LMOD else version


def _text(modules: ModuleTree, view: HostView, kind: ModuleKind, name: str, version: str) -> bytes:
    dag_hash = _chosen_module(modules, view, kind, name, version)
    assert dag_hash is not None
    loads, inline = [], []
    for dep in modules.tree.catalog[dag_hash].runtime_deps:
        record = modules.tree.catalog.get(dep)
        if record is None or dep not in modules.by_hash[kind]:
            continue
        if (record.version in _versions(modules, view, kind, record.name)
                and _chosen_module(modules, view, kind, record.name, record.version) == dep):
            loads.append(f"{record.name}/{record.version}")
        elif dep in modules.tree.prefixes:  # not the host's choice: its own paths, here
            inline.append(dep)
    return modules.render(kind, dag_hash, f"{name}/{version}", loads, inline)
