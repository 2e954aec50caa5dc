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

* every node in the spec format of a version-8 database (spec v5). Spack 1.x reads a v8
  database with its v5 reader only, which refuses a per-node ``compiler``; old nodes (spec
  v3/v4, from layout-v2 caches) are written as Spack 1.x writes them itself (``v5_node``);

* a spec the mount serves: ``installed: true``, ``path`` = its prefix under the mount;
* an external: ``installed: true``, ``path`` = its own prefix (``/usr`` for a system glibc),
  checked by the index reader (absolute, no ``..``, no control character); its ``module``
  list is written as ``null``: Spack loads an external's modules through ``/bin/bash``
  (``module load <names>``, unquoted) when it builds against it, and the index is unsigned;
* a build-only or uncached dependency: ``installed: false``, ``path`` = where it would be;
* ``ref_count`` = how many records depend on it (any dependency type, as Spack counts it),
  recounted over the merged catalog of all mirrors; ``explicit`` for roots (ref_count 0).

Nothing here fetches a package: the database is written into the store when the mount starts
(kept from an earlier mount of the same tree) and served read-only from there. It is written
as a stream, one record at a time, so the nodes of 100,000 specs are never all in memory.
Blocking functions (file writes, node reads): call from a worker thread.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lazymount.catalog.installtree import InstallTree
from lazymount.errors import StoreError
from lazymount.system.files import write_atomically

DB_DIR = ".spack-db"
INDEX = "index.json"
VERIFIER = "index_verifier"
KEY = "tree.key"  # tree_key of what the files were written for (ours, not served)
DB_VERSION = "8"  # Spack 1.x; Spack 0.x (DB version 7) refuses newer databases
WRITER_REVISION = "3"  # bumped when the same tree gives other bytes (2: old nodes as spec v5,
# 3: no external modules)
WRITE_BUFFER = 1 << 20  # index.json comes in pieces of one record (KiBs): fewer writes


def ref_counts(nodes: dict[str, dict[str, Any]]) -> dict[str, int]:
    """How many of ``nodes`` (hash -> spec node) list each hash as a dependency, one per
    edge of any type."""
    counts = dict.fromkeys(nodes, 0)
    for node in nodes.values():
        _count_edges(node, counts)
    return counts


def catalog_ref_counts(tree: InstallTree) -> dict[str, int]:
    """``ref_counts`` over the tree's catalog, reading one node at a time (none is kept).
    Raises FormatError if a stored node is damaged."""
    counts = dict.fromkeys(tree.catalog, 0)
    for record in tree.catalog.values():
        _count_edges(record.node, counts)
    return counts


def _count_edges(node: dict[str, Any], counts: dict[str, int]) -> None:
    for dep in node.get("dependencies") or ():
        dep_hash = dep.get("hash") if isinstance(dep, dict) else None
        if dep_hash in counts:
            counts[dep_hash] += 1


def iter_install_records(tree: InstallTree, installation_time: float
                         ) -> Iterator[tuple[str, dict[str, Any]]]:
    """The ``installs`` entries of the upstream database, (DAG hash, record), in catalog
    order. Reads every node twice (once to count references, once to yield it) and holds
    one at a time, so 100,000 specs never sit in memory together. Raises FormatError if a
    stored node is damaged."""
    counts = catalog_ref_counts(tree)
    for dag_hash, record in tree.catalog.items():
        external = record.external_path
        if external is not None:
            path: str | None = external
            installed = True
        else:
            path = tree.prefix_of(dag_hash)
            installed = dag_hash in tree.prefixes  # served by the mount
        yield dag_hash, {
            "spec": v5_node(without_modules(record.node)),
            "ref_count": counts[dag_hash],
            "path": path,
            "installed": installed,
            "explicit": counts[dag_hash] == 0,
            "installation_time": installation_time,
            "deprecated_for": None,
        }


def without_modules(node: dict[str, Any]) -> dict[str, Any]:
    """``node`` with no external modules: the names would reach a shell in Spack."""
    external = node.get("external")
    if isinstance(external, dict) and external.get("module") is not None:
        return {**node, "external": {**external, "module": None}}
    return node


def v5_node(node: dict[str, Any]) -> dict[str, Any]:
    """``node`` as Spack 1.x re-serializes a spec node it read: unchanged for a spec-v5 node
    (it has ``annotations``). An older node (no ``annotations``) loses its ``compiler`` field,
    which becomes the annotation ``compiler: "<name>@=<version>"`` next to
    ``original_specfile_version``, and its spec-v3 dependency entries (``type``) get v5's
    ``parameters``. The DAG hash stays the one stored: Spack keeps it as read."""
    if "annotations" in node:
        return node
    compiler = node.get("compiler")
    upgraded = {key: value for key, value in node.items() if key not in ("compiler", "hash")}
    deps = node.get("dependencies")
    spec_version = 4
    if isinstance(deps, list) and any(isinstance(d, dict) and "type" in d for d in deps):
        spec_version = 3
        upgraded["dependencies"] = [_v5_edge(d) for d in deps]
    annotations: dict[str, Any] = {"original_specfile_version": spec_version}
    if isinstance(compiler, dict):
        annotations["compiler"] = f"{compiler.get('name', '')}@={compiler.get('version', '')}"
    upgraded["annotations"] = annotations
    if "hash" in node:
        upgraded["hash"] = node["hash"]
    return upgraded


def _v5_edge(edge: Any) -> Any:
    """A spec-v3 dependency entry (``{name, hash, type}``) in v5's form."""
    if not isinstance(edge, dict) or "type" not in edge:
        return edge
    rest = {key: value for key, value in edge.items() if key != "type"}
    deptypes = edge["type"]
    deptypes = [deptypes] if isinstance(deptypes, str) else list(deptypes or ())
    return {**rest, "parameters": {"deptypes": deptypes, "virtuals": []}}


def install_records(tree: InstallTree, installation_time: float) -> dict[str, dict[str, Any]]:
    """The whole ``installs`` mapping, keyed by DAG hash (for small catalogs and tests: the
    mount streams it with ``database_chunks``). Raises FormatError for a damaged node."""
    return dict(iter_install_records(tree, installation_time))


def database_chunks(tree: InstallTree, installation_time: float) -> Iterator[bytes]:
    """index.json piece by piece, one install record per piece: together byte for byte
    ``json.dumps(document, separators=(",", ":"))``, the compact form Spack writes, without
    the document ever existing whole. Raises FormatError for a damaged node."""
    yield b'{"database":{"version":' + _compact(DB_VERSION) + b',"installs":{'
    separator = b""
    for dag_hash, entry in iter_install_records(tree, installation_time):
        yield separator + _compact(dag_hash) + b":" + _compact(entry)
        separator = b","
    yield b"}}}"


def database_bytes(tree: InstallTree, installation_time: float) -> bytes:
    """index.json as one bytes object (for small catalogs and tests)."""
    return b"".join(database_chunks(tree, installation_time))


def _compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def verifier_text(index: bytes) -> str:
    """index_verifier: Spack writes a fresh uuid4 per write; ours is derived from the
    content, so it changes exactly when the database does."""
    return _verifier_of(hashlib.sha256(index).digest())


def _verifier_of(sha256: bytes) -> str:
    """The verifier of the index whose sha256 digest is ``sha256``."""
    return str(uuid.UUID(bytes=sha256[:16], version=4))


def tree_key(tree: InstallTree) -> str:
    """A digest of everything the database says apart from the nodes themselves: mount
    root, projection, and each hash's mirror, cached/external state and place. A DAG hash
    names its node, so equal keys mean an equal database (up to installation_time)."""
    head = f"{DB_VERSION}.{WRITER_REVISION}\0{tree.root}\0{tree.projection}\0"
    digest = hashlib.sha256(head.encode())
    for dag_hash, record in tree.catalog.items():
        line = (f"{dag_hash} {record.mirror} {int(record.in_buildcache)} "
                f"{record.external_path} {tree.prefixes.get(dag_hash)}\n")
        digest.update(line.encode())
    return digest.hexdigest()


def write_database(tree: InstallTree, directory: Path, installation_time: float
                   ) -> dict[str, Path]:
    """index.json and index_verifier in ``directory``; returns {file name: path}.

    A database written earlier for the same tree (same ``tree_key``) is kept as it is, so a
    remount reads no node. Otherwise both files are written, each atomically, the index
    first; the index is streamed record by record into a temporary file beside it, synced,
    then renamed over the old one. Raises StoreError if the disk refuses, FormatError for a
    damaged stored node (the old files are then left as they were).
    """
    paths = {INDEX: directory / INDEX, VERIFIER: directory / VERIFIER}
    key = tree_key(tree)
    try:
        if (directory / KEY).read_text() == key and all(p.is_file() for p in paths.values()):
            return paths
    except OSError:
        pass
    try:
        directory.mkdir(parents=True, exist_ok=True)
        verifier = _stream_atomically(paths[INDEX], database_chunks(tree, installation_time))
        write_atomically(paths[VERIFIER], verifier.encode(), mode=0o444)
        write_atomically(directory / KEY, key.encode(), mode=0o444)
    except OSError as exc:
        raise StoreError(f"cannot write the Spack database into {directory}: "
                         f"{exc.strerror}") from None
    return paths


def _stream_atomically(target: Path, chunks: Iterator[bytes]) -> str:
    """Write ``chunks`` to ``target`` through a synced temporary file; returns the verifier
    of what was written (a running sha256, so the content is never held whole)."""
    digest = hashlib.sha256()

    def digested() -> Iterator[bytes]:
        for chunk in chunks:
            digest.update(chunk)
            yield chunk

    write_atomically(target, digested(), mode=0o444, sync=True, buffering=WRITE_BUFFER)
    return _verifier_of(digest.digest())
