"""Push a Spack build cache into an OCI registry exactly as ``spack buildcache push`` does.

Independent of the ``lazymount`` package on purpose (the oracle the daemon is tested against),
like ``spackcache.py``, whose layout-v3 caches (or a real one made by Spack) it reads. It
follows Spack 1.1's ``binary_distribution.py`` (``_oci_push``, ``_oci_put_manifest``,
``_oci_update_index``) and ``oci/oci.py`` (monolithic blob uploads: ``POST uploads/``, then
``PUT <Location>&digest=``), checked against the manifests Spack 1.1.0 wrote into a CNCF
distribution registry (``tests/data/oci-spack/``, by ``tests/test_oci.py``):

* one image per spec, tagged ``<name>-<version>-<hash>.spack``: a compact-JSON OCI manifest
  whose layers are the install tarballs of the spec's link/run closure, dependencies first,
  **the spec's own tarball last** (only tarballs the cache holds);
* its config: ``{"architecture", "os", "rootfs": {diff_ids}, "config": {"Env"}}`` followed by
  the spec document, ``buildcache_layout_version: 3``, ``binary_cache_checksum``,
  ``archive_size``, ``archive_timestamp`` and ``archive_compression``;
* ``index.spack``: an image whose config is ``{}`` and whose one layer is the Spack
  database JSON (plain, although typed as a gzip'd tar).

The pusher speaks anonymous HTTP only; tests push first and then restart the registry with
authentication on the same storage. Hooks for attack tests: ``put_blob``,
``put_manifest``, ``config_for`` (any spec document under any tag) and
``Registry.tamper_blob`` in ``ociregistry.py``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MEDIA_TARBALL = "application/vnd.spack.install.v2.tar+gzip"
MEDIA_SPEC = "application/vnd.spack.spec.v5+json"
MEDIA_INDEX = "application/vnd.spack.db.v8+json"
INDEX_TAG = "index.spack"
ARCH_NAMES = {"x86_64": "amd64", "aarch64": "arm64"}
TIMESTAMP = "2026-11-21T10:46:52.614921+00:00"  # archive_timestamp (Spack: the push's time)


def compact(doc: Any) -> bytes:
    """``json.dumps(..., separators=(",", ":"))``: how Spack writes manifests and configs."""
    return json.dumps(doc, separators=(",", ":")).encode()


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def spec_tag(name: str, version: str, dag_hash: str) -> str:
    """Spack's ``_oci_default_tag`` (``ensure_valid_tag``)."""
    tag = re.sub(r"[^\w.-]", "_", f"{name}-{version}-{dag_hash}.spack")
    return tag if len(tag) <= 128 else tag[:64] + tag[-64:]


def descriptor(media_type: str, data: bytes) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest_of(data), "size": len(data)}


def manifest_doc(config: dict[str, Any], layers: list[dict[str, Any]],
                 description: str | None, docker: bool = False) -> dict[str, Any]:
    """``_oci_put_manifest``'s manifest, keys in Spack's order."""
    doc: dict[str, Any] = {
        "mediaType": MEDIA_DOCKER_MANIFEST if docker else MEDIA_MANIFEST,
        "schemaVersion": 2,
        "config": config,
        "layers": layers,
    }
    if description is not None and not docker:
        doc["annotations"] = {"org.opencontainers.image.description": description}
    return doc


@dataclass
class CachedSpec:
    """One spec of a layout-v3 cache: its DAG, its tarball."""

    spec: dict[str, Any]  # the spec document ({"spec": {"_meta", "nodes"}})
    tarball: bytes

    @property
    def root(self) -> dict[str, Any]:
        return self.spec["spec"]["nodes"][0]

    @property
    def tag(self) -> str:
        return spec_tag(self.root["name"], str(self.root["version"]), self.root["hash"])


def read_v3_cache(root: Path) -> tuple[dict[str, CachedSpec], bytes]:
    """The specs of a layout-v3 cache (hash -> CachedSpec) and its index blob. Signatures
    are not checked here: this is the pushing side."""
    specs: dict[str, CachedSpec] = {}
    for path in sorted((root / "v3" / "manifests" / "spec").glob("*/*.spec.manifest.json")):
        records = json.loads(_unsign(path.read_bytes()))["data"]
        blobs = {r["mediaType"]: _blob(root, r["checksum"]) for r in records}
        spec = json.loads(gzip.decompress(blobs[MEDIA_SPEC]))
        spec = {"spec": spec["spec"]}
        entry = CachedSpec(spec, blobs[MEDIA_TARBALL])
        specs[entry.root["hash"]] = entry
    index_manifest = json.loads(
        (root / "v3" / "manifests" / "index" / "index.manifest.json").read_bytes())
    index = _blob(root, index_manifest["data"][0]["checksum"])
    return specs, index


def _blob(root: Path, checksum: str) -> bytes:
    return (root / "blobs" / "sha256" / checksum[:2] / checksum).read_bytes()


def _unsign(text: bytes) -> bytes:
    if not text.lstrip().startswith(b"-----BEGIN PGP SIGNED MESSAGE-----"):
        return text
    return text.split(b"\n\n", 1)[1].split(b"-----BEGIN PGP SIGNATURE-----", 1)[0]


def link_run_closure(spec: dict[str, Any]) -> list[str]:
    """Hashes of the root's link/run closure, no externals, dependencies first and the root
    last (Spack: topological order over link+run edges, reversed)."""
    nodes = {n["hash"]: n for n in spec["spec"]["nodes"]}
    order: list[str] = []
    seen: set[str] = set()

    def visit(h: str) -> None:
        if h in seen or h not in nodes:
            return
        seen.add(h)
        deps = sorted(nodes[h].get("dependencies", []), key=lambda d: d["name"])
        for dep in deps:
            if {"link", "run"} & set(dep["parameters"]["deptypes"]):
                visit(dep["hash"])
        if "external" not in nodes[h]:
            order.append(h)

    visit(spec["spec"]["nodes"][0]["hash"])
    return order


def description(root: dict[str, Any]) -> str:
    """``spec.format()`` of a generic package, as in the image annotation."""
    words = [f"{root['name']}@={root['version']}"]
    for key, value in sorted(root.get("parameters", {}).items()):
        if isinstance(value, list) or value is None:
            continue
        words.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    arch = root["arch"]
    target = arch["target"] if isinstance(arch["target"], str) else arch["target"]["name"]
    words += [f"platform={arch['platform']}", f"os={arch['platform_os']}", f"target={target}"]
    return " ".join(words)


def config_for(entry: CachedSpec, closure: list[CachedSpec],
               timestamp: str = TIMESTAMP) -> dict[str, Any]:
    """The image config ``_oci_put_manifest`` writes for ``entry`` (layers ``closure``)."""
    arch = entry.root["arch"]
    target = arch["target"] if isinstance(arch["target"], str) else arch["target"]["name"]
    prefixes = ":".join(f"/opt/{c.root['name']}/bin" for c in reversed(closure))
    config: dict[str, Any] = {
        "architecture": ARCH_NAMES.get(target, target),
        "os": "linux",
        "rootfs": {"type": "layers",
                   "diff_ids": [digest_of(gzip.decompress(c.tarball)) for c in closure]},
        "config": {"Env": [f"PATH={prefixes}:/bin:/usr/bin"]},
    }
    config.update(entry.spec)
    config["buildcache_layout_version"] = 3
    config["binary_cache_checksum"] = {"hash_algorithm": "sha256",
                                       "hash": hashlib.sha256(entry.tarball).hexdigest()}
    config["archive_size"] = len(entry.tarball)
    config["archive_timestamp"] = timestamp
    config["archive_compression"] = "gzip"
    return config


class OciPusher:
    """Pushes build caches into one repository of a registry over anonymous HTTP(S)."""

    def __init__(self, base: str, name: str, verify: Any = True):
        self.base = base.rstrip("/")  # http://127.0.0.1:PORT
        self.name = name
        self.client = httpx.Client(timeout=30, verify=verify)
        self.pushed: dict[str, dict[str, Any]] = {}  # tag -> manifest

    @property
    def api(self) -> str:
        return f"{self.base}/v2/{self.name}"

    def close(self) -> None:
        self.client.close()

    def put_blob(self, data: bytes) -> str:
        """Monolithic upload (skipped if the registry has it); returns the digest."""
        digest = digest_of(data)
        if self.client.head(f"{self.api}/blobs/{digest}").status_code == 200:
            return digest
        started = self.client.post(f"{self.api}/blobs/uploads/")
        assert started.status_code == 202, started.text
        location = httpx.URL(self.base).join(started.headers["location"])
        done = self.client.put(location.copy_merge_params({"digest": digest}), content=data,
                               headers={"Content-Type": "application/octet-stream"})
        assert done.status_code == 201, done.text
        return digest

    def put_manifest(self, tag: str, manifest: dict[str, Any]) -> str:
        data = compact(manifest)
        answer = self.client.put(f"{self.api}/manifests/{tag}", content=data,
                                 headers={"Content-Type": manifest["mediaType"]})
        assert answer.status_code == 201, answer.text
        self.pushed[tag] = manifest
        return digest_of(data)

    def push_spec(self, entry: CachedSpec, specs: dict[str, CachedSpec], *,
                  tag: str | None = None, config: dict[str, Any] | None = None,
                  docker: bool = False, base_layers: tuple[bytes, ...] = ()
                  ) -> dict[str, Any]:
        """Push one spec's image; ``tag`` and ``config`` override what Spack would write;
        ``base_layers`` come first, as a ``--base-image``'s layers do."""
        closure = [specs[h] for h in link_run_closure(entry.spec) if h in specs]
        layer_type = MEDIA_DOCKER_LAYER if docker else MEDIA_LAYER
        layers = []
        for data in base_layers:
            self.put_blob(data)
            layers.append(descriptor(layer_type, data))
        for item in closure:
            self.put_blob(item.tarball)
            layers.append(descriptor(layer_type, item.tarball))
        config_bytes = compact(config if config is not None else config_for(entry, closure))
        self.put_blob(config_bytes)
        config_type = MEDIA_DOCKER_CONFIG if docker else MEDIA_CONFIG
        manifest = manifest_doc(descriptor(config_type, config_bytes), layers,
                                description(entry.root), docker)
        self.put_manifest(tag or entry.tag, manifest)
        return manifest

    def push_index(self, index: bytes) -> dict[str, Any]:
        """``_oci_update_index``: the ``index.spack`` image."""
        empty = b"{}"
        self.put_blob(index)
        self.put_blob(empty)
        manifest = {"mediaType": MEDIA_MANIFEST, "schemaVersion": 2,
                    "config": descriptor(MEDIA_CONFIG, empty),
                    "layers": [descriptor(MEDIA_LAYER, index)]}
        self.put_manifest(INDEX_TAG, manifest)
        return manifest

    def push_cache(self, root: Path, *, docker: bool = False) -> dict[str, CachedSpec]:
        """Every spec of a layout-v3 cache, then its index (``push --update-index``)."""
        specs, index = read_v3_cache(root)
        for entry in specs.values():
            self.push_spec(entry, specs, docker=docker)
        self.push_index(index)
        return specs
