"""Which builds of the index this CPU can run, and the best build of each name and version.

Computed from the index alone. A build runs on this host when its target (as Spack records
it, an archspec microarchitecture name) is the host's own or one of its ancestors in
archspec's graph: a ``x86_64_v3`` build runs on ``zen3``, a ``x86_64_v4`` build does not run
on ``zen2``, an ``aarch64`` build never runs on an ``x86_64`` CPU. Among the builds of one
name and version that run, the best is chosen by ``rank`` (see its comment; docs/USAGE.md's
"Mixed clusters" section states the same rule).

archspec is imported on first use: a mount that never asks pays nothing for it.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from lazymount.catalog.installtree import InstallTree
from lazymount.errors import UsageError

TARGET_CHOICES = ("all", "host")  # --targets: every build, or only those this host runs
# versions Spack orders after every numbered one
INFINITY_VERSIONS = ("stable", "trunk", "head", "master", "main", "develop")


def _targets() -> Any:
    import archspec.cpu  # ~20 ms: only when a host target is needed

    return archspec.cpu.TARGETS


def microarchitecture(name: str | None) -> Any:
    """archspec's microarchitecture ``name``, or the host's (detected) when None.
    Raises UsageError for a name archspec does not know, listing close ones."""
    if name is None:
        import archspec.cpu

        return archspec.cpu.host()
    problem = unknown_target(name)
    if problem is not None:
        raise UsageError(problem)
    return _targets()[name]


def unknown_target(name: str) -> str | None:
    """What is wrong with ``name`` as a host target, listing close names; None if archspec
    knows it."""
    targets = _targets()
    if name in targets:
        return None
    close = difflib.get_close_matches(name, sorted(targets), n=6, cutoff=0.6)
    hint = f"; close names: {', '.join(close)}" if close else ""
    return (f"unknown host target {name!r}: not an archspec microarchitecture{hint} "
            "(`python -m archspec cpu` names this machine's)")


class HostTarget:
    """The CPU a mount chooses builds for: detected, or named by --host-target."""

    def __init__(self, name: str | None = None) -> None:
        self.override = name
        self._depths: dict[str, int] = {}

    @cached_property
    def micro(self) -> Any:
        return microarchitecture(self.override)

    @property
    def name(self) -> str:
        return str(self.micro.name)

    @cached_property
    def _runnable(self) -> frozenset[str]:
        return frozenset([self.name, *(a.name for a in self.micro.ancestors)])

    def runs(self, target: str) -> bool:
        """True if a build for ``target`` runs on this CPU."""
        return target in self._runnable

    def why_not(self, target: str) -> str | None:
        """Why a build for ``target`` does not run here, in words; None if it does."""
        if self.runs(target):
            return None
        known = _targets().get(target)
        if known is None:
            return (f"built for {target or 'no target'}, which archspec does not know; "
                    f"this CPU is {self.name}")
        if known.family.name != self.micro.family.name:
            return (f"built for {target} ({known.family.name}); this CPU is {self.name} "
                    f"({self.micro.family.name})")
        return f"built for {target}; this CPU is {self.name}"

    def specificity(self, target: str) -> int:
        """How far down archspec's graph ``target`` is: its number of ancestors. A target
        has more than each of its ancestors, so the deepest runnable one is the most
        specific."""
        depth = self._depths.get(target)
        if depth is None:  # archspec walks the graph on every .ancestors
            depth = self._depths[target] = len(_targets()[target].ancestors)
        return depth


@dataclass(frozen=True, slots=True)
class Build:
    """One build of the index: what the choice reads."""

    dag_hash: str
    name: str
    version: str
    target: str
    mirror: int = 0  # position of the mirror that lists it


@dataclass(frozen=True)
class Alternative:
    build: Build
    reason: str | None  # why it does not run here; None if it runs


def rank(host: HostTarget, build: Build) -> tuple[int, str, int, str]:
    """Sort key of the builds of one name and version that run here; the first is the best:
    the most specific target (most archspec ancestors), then the target's name, then the
    earliest mirror (in the order given), then the smallest DAG hash. Only the index and
    the host target decide, so every node of one target chooses the same build."""
    return (-host.specificity(build.target), build.target, build.mirror, build.dag_hash)


_VERSION_PART = re.compile(r"\d+|[a-zA-Z]+")


def version_key(version: str) -> tuple[Any, ...]:
    """Order of versions, as Spack orders the usual ones: numeric parts as numbers
    (1.10 > 1.9), a release after its pre-releases' letters (1.0 > 1.0rc1 is not modelled:
    letters sort before numbers), ``develop`` and friends after every number."""
    if version in INFINITY_VERSIONS:
        return (1, INFINITY_VERSIONS.index(version))
    parts = tuple((1, int(p), "") if p.isdigit() else (0, 0, p)
                  for p in _VERSION_PART.findall(version))
    return (0, parts, version)


@dataclass
class HostView:
    """name -> version -> the best build this host runs, from the index alone."""

    host: HostTarget
    best: dict[str, dict[str, Build]] = field(default_factory=dict)
    every: list[Build] = field(default_factory=list)  # for the alternatives
    _groups: dict[tuple[str, str], list[Build]] | None = None

    @classmethod
    def choose(cls, host: HostTarget, builds: Iterable[Build]) -> HostView:
        """One pass: each build this host runs replaces the one kept for its name and
        version if it ranks first."""
        view = cls(host)
        for build in builds:
            view.every.append(build)
            if not host.runs(build.target):
                continue
            versions = view.best.setdefault(build.name, {})
            kept = versions.get(build.version)
            if kept is None or rank(host, build) < rank(host, kept):
                versions[build.version] = build
        return view

    def _group(self, name: str, version: str) -> list[Build]:
        """Every build of ``name@version`` (grouped on first use: status, not listing)."""
        if self._groups is None:
            self._groups = {}
            for build in self.every:
                self._groups.setdefault((build.name, build.version), []).append(build)
        return self._groups.get((name, version), [])

    def names(self) -> list[str]:
        return sorted(self.best)

    def versions(self, name: str) -> list[str]:
        """Versions of ``name`` with a build for this host, newest first."""
        return sorted(self.best.get(name, {}), key=version_key, reverse=True)

    def newest(self, name: str) -> str | None:
        versions = self.versions(name)
        return versions[0] if versions else None

    def chosen(self, name: str, version: str) -> Build | None:
        return self.best.get(name, {}).get(version)

    def alternatives(self, name: str, version: str) -> list[Alternative]:
        """Every build of ``name@version``: those that run here best first, then the rest
        with the reason they do not."""
        group = self._group(name, version)
        runnable = sorted((b for b in group if self.host.runs(b.target)),
                          key=lambda b: rank(self.host, b))
        others = sorted((b for b in group if not self.host.runs(b.target)),
                        key=lambda b: (b.target, b.mirror, b.dag_hash))
        return ([Alternative(b, None) for b in runnable]
                + [Alternative(b, self.host.why_not(b.target)) for b in others])


def target_of(place: dict[str, Any]) -> str:
    """The target name of an index node's placing fields ('' if it has none)."""
    arch = place.get("arch")
    return str(arch.get("target", "")) if isinstance(arch, dict) else ""


def builds_of(tree: InstallTree) -> Iterable[Build]:
    """Every package the mount shows (cached, not external, placed), as a Build."""
    for dag_hash in tree.prefixes:
        record = tree.catalog[dag_hash]
        yield Build(dag_hash, record.name, record.version, target_of(record.place),
                    record.mirror)


def runnable_tree(tree: InstallTree, host: HostTarget) -> InstallTree:
    """The same tree without the builds ``host`` cannot run (``--targets host``), and without
    the directories left empty (a ``linux-x86_64_v4/`` folder on a ``zen2`` host). Prefixes
    keep their paths; the catalog is shared."""
    return tree.filtered(lambda record: host.runs(target_of(record.place)))
