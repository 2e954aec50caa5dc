"""What a running mount says about itself: one dict, built by ``collect``.

``lazymount status --json`` prints it, ``lazymount status`` words it for a person
(``statustext.render``), ``--prometheus`` and ``metrics_listen`` turn it into metrics
(``service.metrics``). A feature that has something to report adds its field in
``collect`` and nowhere else; the three outputs follow. Mirror URLs are shown as their
transport names them: without credentials.
"""

from __future__ import annotations

import os
import time
from typing import Any

from lazymount import __version__
from lazymount.buildcache.formats import known_layout
from lazymount.mirror.transport import Mirror
from lazymount.service.live import LiveMount


async def collect(live: LiveMount) -> dict[str, Any]:
    """The status of ``live``, as ``lazymount status --json`` prints it."""
    now = time.time()
    generation = live.current
    status: dict[str, Any] = {
        "pid": os.getpid(),
        "mountpoint": live.root,
        "version": __version__,
        "started": _iso(live.started),
        "config_file": str(live.config.config_file) if live.config.config_file else None,
        "mirrors": [_mirror(mirror) for mirror in generation.mirrors],
        "index": {
            "packages": len(generation.shown.prefixes),
            "refreshed": _iso(live.refreshed),
            "age_s": round(now - live.refreshed, 1),
            "refresh_interval_s": live.config.index_refresh,
            "last_error": live.refresh_error,
        },
        "packages": packages(live),
        "host": {"target": generation.host.host.name,
                 "given": live.config.host_target is not None,
                 "targets": live.config.targets, "view": live.config.host_view},
        "store": store_usage(live),
        "fetched_bytes": sum(m.health.fetched_bytes for m in _all_mirrors(live)),
        "proxies": proxy_health(generation.mirrors),
        "shared_store": _shared_store(live),
    }
    return status


def proxy_health(mirrors: list[Mirror]) -> list[dict[str, Any]]:
    """Each configured proxy's health (``[]`` without a proxy list): the mirrors of a mount
    share one chain."""
    chains = {id(m.proxy_chain): m.proxy_chain for m in mirrors if m.proxy_chain is not None}
    return [entry for chain in chains.values() for entry in chain.status()]


def _shared_store(live: LiveMount) -> dict[str, Any] | None:
    shared = live.materializer.shared
    if shared is None:
        return None
    return {"path": str(shared.root), "writable": shared.writable}


def _mirror(mirror: Mirror) -> dict[str, Any]:
    health = mirror.health
    return {"url": mirror.url, "state": health.state, "last_error": health.last_error,
            "last_error_at": _iso(health.last_error_at), "layout": known_layout(mirror),
            "fetched_bytes": health.fetched_bytes,
            # a registry also says so, and how it is logged in to (a name, never a secret)
            **({"kind": "oci", "login": mirror.login} if mirror.kind == "oci" else {})}


def _all_mirrors(live: LiveMount) -> list[Mirror]:
    """Every mirror object this mount has used (replaced ones count for bytes fetched)."""
    seen: dict[int, Mirror] = {}
    for generation in [*live.retired, live.current]:
        for mirror in generation.mirrors:
            seen.setdefault(id(mirror), mirror)
    return list(seen.values())


def packages(live: LiveMount) -> dict[str, Any]:
    """Counts of ready and materializing packages, and each failure with its reason."""
    materializer = live.materializer
    ready = materializing = 0
    failed = []
    for dag_hash, state in materializer.states.items():
        if state.error is not None:
            record = materializer.tree.catalog.get(dag_hash)
            failed.append({"name": record.name if record else None, "hash": dag_hash,
                           "reason": str(state.error)})
        elif state.tree is not None:
            ready += 1
        else:
            materializing += 1
    opened = [{"label": o.label, "hash": materializer.hash_of(key), "files": len(o.sizes),
               "files_present": len(o.present), "bytes": sum(o.sizes.values()),
               "bytes_present": o.present_bytes}
              for key, o in materializer.opened.items() if o.replaced is None]
    return {"ready": ready, "materializing": materializing, "failed": failed,
            "opened": opened}


def store_usage(live: LiveMount) -> dict[str, Any]:
    """The store's path, the bytes its packages take on disk (all mounts sharing it; kept
    up to date as packages are published and evicted, so nothing is walked), the quota
    and the number of packages."""
    usage = live.materializer.usage
    return {"path": str(live.store.root), "bytes": usage.total(), "quota_bytes": usage.quota,
            "packages": len(usage.kept())}


async def package_at(live: LiveMount, relative: str) -> dict[str, Any]:
    """For a path under the mount: the package whose prefix holds it, its state and why,
    and what the host target makes of it (``host``). A path under ``host/`` is followed to
    the build it leads to; a build ``targets = "host"`` hides is named, with the reason."""
    generation = live.current
    if live.config.host_view:
        relative = await generation.host.resolve(relative) or relative
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    tree = generation.shown
    for depth in range(len(parts), 0, -1):
        dag_hash = tree.by_path.get("/".join(parts[:depth]))
        if dag_hash is not None:
            state = live.materializer.status(dag_hash)
            word, _, reason = state.partition(": ")
            return {"path": relative, "package": tree.label(dag_hash), "hash": dag_hash,
                    "prefix": f"{live.root.rstrip('/')}/{'/'.join(parts[:depth])}",
                    "state": word, "reason": reason or None,
                    "host": await generation.host.status_of(dag_hash)}
    hidden = generation.host.hidden_at(relative) if tree is not generation.tree else None
    if hidden is not None:
        host = await generation.host.status_of(hidden)
        return {"path": relative, "package": generation.tree.label(hidden), "hash": hidden,
                "prefix": generation.tree.prefix_of(hidden), "state": "hidden",
                "reason": f"targets = host hides it: {host['why_not']}", "host": host}
    return {"path": relative, "package": None, "state": None,
            "reason": "not inside a package prefix of this mount"}


def _iso(stamp: float | None) -> str | None:
    if stamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))
