"""``<mount>/host/``: for each package name, a link per version to the best build this CPU runs.

::

    host/<name>/<version> -> <mount>/<platform>-<target>/<name>-<version>-<hash>
    host/<name>/default   -> <newest version>

The choice (``catalog.hosttarget``) is made from the index alone, the first time ``host/``
is looked at, in a worker thread: mounting pays nothing for it and listing ``host/`` fetches
and materializes nothing. The links point at the builds' real prefixes, so RPATHs and
Spack's database stay as they are.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from lazymount.catalog.hosttarget import HostTarget, HostView, builds_of, target_of
from lazymount.catalog.installtree import InstallTree
from lazymount.spack import hostmodules
from lazymount.spack.hostmodules import HOST_MODULES
from lazymount.spack.modulefiles import ModuleTree

log = logging.getLogger(__name__)

HOST_DIR = "host"
DEFAULT_LINK = "default"


class HostDirs:
    """The entries of ``host/`` and its subdirectories, computed on first use."""

    def __init__(self, tree: InstallTree, host: HostTarget,
                 modules: ModuleTree | None = None) -> None:
        """``modules``: the per-target module trees, whose files ``modules/host/`` serves
        under short names (see ``spack.hostmodules``)."""
        self.tree = tree
        self.host = host
        self.modules = modules
        self._view: HostView | None = None
        self._lock = trio.Lock()
        self._warned: set[str] = set()
        self._entries: dict[str, hostmodules.Entries | None] = {}  # made once per directory

    async def view(self) -> HostView:
        async with self._lock:
            if self._view is None:
                self._view = await trio.to_thread.run_sync(self._choose)
        return self._view

    def _choose(self) -> HostView:
        view = HostView.choose(self.host, builds_of(self.tree))
        log.info("host/: the best of %d builds for this CPU (%s): %d names",
                 len(self.tree.prefixes), self.host.name, len(view.best))
        return view

    async def children(self, relative: str) -> hostmodules.Entries | None:
        """The entries of directory ``relative`` (``host``, ``host/<name>``, or
        ``modules/host`` and below): name -> link target, file content, or None for a
        subdirectory. None if there is no such directory."""
        if relative not in self._entries:
            view = await self.view()
            if self.modules is not None and (
                    relative == HOST_MODULES or relative.startswith(HOST_MODULES + "/")):
                await trio.to_thread.run_sync(self.modules.lay_out)
            self._entries[relative] = self._make_entries(view, relative)
        return self._entries[relative]

    def _make_entries(self, view: HostView, relative: str) -> hostmodules.Entries | None:
        if relative == HOST_MODULES or relative.startswith(HOST_MODULES + "/"):
            if self.modules is None:
                return None
            return hostmodules.entries(self.modules, view, relative)
        if relative == HOST_DIR:
            return dict.fromkeys(view.names())
        name = relative.removeprefix(HOST_DIR + "/")
        versions = view.versions(name)
        if not versions or "/" in name:
            return None
        entries: hostmodules.Entries = {}
        for version in versions:
            build = view.chosen(name, version)
            assert build is not None
            entries[version] = self.tree.prefix_of(build.dag_hash)
        if DEFAULT_LINK not in entries:  # a version named "default" keeps its name
            entries[DEFAULT_LINK] = versions[0]
        return entries

    async def describe(self, relative: str) -> str | None:
        """For ``host/<name>``: the choice for each version and its alternatives."""
        if relative == HOST_DIR or not relative.startswith(HOST_DIR + "/"):
            return None
        view = await self.view()
        name = relative.removeprefix(HOST_DIR + "/")
        lines = []
        for version in view.versions(name):
            for rank, alternative in enumerate(view.alternatives(name, version)):
                build = alternative.build
                what = ("chosen" if rank == 0 else
                        "runs here" if alternative.reason is None else alternative.reason)
                lines.append(f"{name}@{version} {build.target} {build.dag_hash}: {what}")
        return "\n".join(lines) + "\n"

    async def status_of(self, dag_hash: str) -> dict[str, Any]:
        """What ``lazymount status PATH`` says of a build about this CPU: its target, whether
        it runs here (and why not), and every build of its name and version, best first."""
        record = self.tree.catalog[dag_hash]
        target = target_of(record.place)
        reason = self.host.why_not(target)
        view = await self.view()
        alternatives = [
            {"package": self.tree.label(a.build.dag_hash), "hash": a.build.dag_hash,
             "target": a.build.target, "prefix": self.tree.prefix_of(a.build.dag_hash),
             "runs_here": a.reason is None, "why_not": a.reason}
            for a in view.alternatives(record.name, record.version)]
        chosen = view.chosen(record.name, record.version)
        return {"target": target, "host_target": self.host.name, "runs_here": reason is None,
                "why_not": reason,
                "chosen_for_host": chosen is not None and chosen.dag_hash == dag_hash,
                "alternatives": alternatives}

    async def resolve(self, relative: str) -> str | None:
        """A path under ``host/<name>/<version or default>/...`` as the path under the
        mount it leads to (the chosen build's prefix, then the rest); None for any other
        path, or one ``host/`` does not hold."""
        parts = [p for p in relative.split("/") if p not in ("", ".")]
        if len(parts) < 3 or parts[0] != HOST_DIR:
            return None
        view = await self.view()
        name, version = parts[1], parts[2]
        if version == DEFAULT_LINK and view.chosen(name, version) is None:
            version = view.newest(name) or version
        build = view.chosen(name, version)
        if build is None:
            return None
        return "/".join([self.tree.prefixes[build.dag_hash], *parts[3:]])

    def hidden_at(self, relative: str) -> str | None:
        """The build whose prefix holds ``relative`` in the whole tree, for a path that
        ``--targets host`` hides from the mount; None if no prefix holds it."""
        parts = [p for p in relative.split("/") if p not in ("", ".")]
        for depth in range(len(parts), 0, -1):
            dag_hash = self.tree.by_path.get("/".join(parts[:depth]))
            if dag_hash is not None:
                return dag_hash
        return None

    def target_status(self, dag_hash: str) -> str:
        """A build's target and whether this CPU runs it."""
        target = target_of(self.tree.catalog[dag_hash].place)
        reason = self.host.why_not(target)
        if reason is None:
            return f"{target}: runs on this CPU ({self.host.name})"
        return f"{target}: does not run here: {reason}"

    def warn_foreign(self, dag_hash: str) -> None:
        """Log, once per build, that a build this CPU cannot run is being materialized."""
        if dag_hash in self._warned:
            return
        reason = self.host.why_not(target_of(self.tree.catalog[dag_hash].place))
        if reason is not None:
            self._warned.add(dag_hash)
            log.warning("%s: %s: materializing it anyway; its programs may stop with "
                        "'Illegal instruction' here", self.tree.label(dag_hash), reason)
