"""The mount as a Spack upstream: a synthesized install database, ``.spack-db/index.json``.

A downstream Spack (``upstreams.yaml``: ``install_tree: <mount>``) reads exactly two files of
an upstream: ``<root>/.spack-db/index_verifier`` (re-read the index only if it changed) and
``<root>/.spack-db/index.json``, a database of version 8 as Spack 1.x writes it for an install
tree::

    {"database": {"version": "8", "installs": {<dag hash>: {
        "spec": <the node dict, as in the cache index>, "ref_count": n, "path": "<prefix>",
        "installed": bool, "explicit": bool, "installation_time": float,
        "deprecated_for": null}}}}

It is a field-wise transform of the mirrors' index (same node dicts, ``in_buildcache``
replaced by the install-record fields):

* a spec the mount serves: ``installed: true``, ``path`` = its prefix under the mount;
* an external: ``installed: true``, ``path`` = its own prefix (``/usr`` for a system glibc);
* a build-only or uncached dependency: ``installed: false``, ``path`` = where it would be;
* ``ref_count`` = how many records depend on it (any dependency type, as Spack counts it),
  recounted over the merged catalog of all mirrors; ``explicit`` for roots (ref_count 0).

Nothing here fetches a package: the database is written into the store when the mount starts
and served read-only from there. Blocking functions (file writes): call from a worker thread.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

from .errors import StoreError
from .tree import InstallTree

DB_DIR = ".spack-db"
INDEX = "index.json"
VERIFIER = "index_verifier"
DB_VERSION = "8"  # Spack 1.x; Spack 0.x (DB version 7) refuses newer databases


def ref_counts(tree: InstallTree) -> dict[str, int]:
    """How many records of the catalog list each hash as a dependency (one per edge)."""
    counts = dict.fromkeys(tree.catalog, 0)
    for record in tree.catalog.values():
        for dep in record.node.get("dependencies") or ():
            dep_hash = dep.get("hash") if isinstance(dep, dict) else None
            if dep_hash in counts:
                counts[dep_hash] += 1
    return counts


def install_records(tree: InstallTree, installation_time: float) -> dict[str, dict[str, Any]]:
    """The ``installs`` mapping of the upstream database, keyed by DAG hash."""
    counts = ref_counts(tree)
    installs: dict[str, dict[str, Any]] = {}
    for dag_hash, record in tree.catalog.items():
        external = record.external_path
        if external is not None:
            path: str | None = external
            installed = True
        else:
            path = tree.prefix_of(dag_hash)
            installed = dag_hash in tree.prefixes  # served by the mount
        installs[dag_hash] = {
            "spec": record.node,
            "ref_count": counts[dag_hash],
            "path": path,
            "installed": installed,
            "explicit": counts[dag_hash] == 0,
            "installation_time": installation_time,
            "deprecated_for": None,
        }
    return installs


def database_bytes(tree: InstallTree, installation_time: float) -> bytes:
    """index.json, serialized compactly as Spack writes it."""
    doc = {"database": {"version": DB_VERSION,
                        "installs": install_records(tree, installation_time)}}
    return json.dumps(doc, separators=(",", ":")).encode()


def verifier_text(index: bytes) -> str:
    """index_verifier: Spack writes a fresh uuid4 per write; ours is derived from the
    content, so it changes exactly when the database does."""
    return str(uuid.UUID(bytes=hashlib.sha256(index).digest()[:16], version=4))


def write_database(tree: InstallTree, directory: Path, installation_time: float
                   ) -> dict[str, Path]:
    """Write index.json and index_verifier into ``directory`` (each atomically, the index
    first); returns {file name: path}. Raises StoreError if the disk refuses."""
    index = database_bytes(tree, installation_time)
    paths = {INDEX: directory / INDEX, VERIFIER: directory / VERIFIER}
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomically(paths[INDEX], index)
        _write_atomically(paths[VERIFIER], verifier_text(index).encode())
    except OSError as exc:
        raise StoreError(f"cannot write the Spack database into {directory}: "
                         f"{exc.strerror}") from None
    return paths


def _write_atomically(target: Path, data: bytes) -> None:
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(temporary, 0o444)
        os.replace(temporary, target)
    except BaseException:
        os.unlink(temporary)
        raise
