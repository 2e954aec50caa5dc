"""The upstream database (.spack-db/) is written after the mount is up, so a large catalog
does not delay the mount; lookups of it wait until it is written, and a database that cannot
be written is not served (the packages still are)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess

import pytest
from conftest import FIXTURE_CACHE, short_dir

from lazymount.buildcache.layout import DEFAULT_PROJECTION


def test_database_is_served_once_written(http_server, mount_cache):
    mount = mount_cache([http_server(FIXTURE_CACHE).url])
    # read at once: the lookup waits for the background write instead of failing
    doc = json.loads((mount.root / ".spack-db" / "index.json").read_bytes())
    assert doc["database"]["version"] == "8"
    assert sorted(os.listdir(mount.root / ".spack-db")) == ["index.json", "index_verifier"]


def test_database_that_cannot_be_written_is_not_served(http_server, mount_cache, tmp_path):
    root = short_dir()
    digest = hashlib.sha256(f"{root}\0{DEFAULT_PROJECTION}".encode()).hexdigest()[:10]
    blocker = tmp_path / "store" / "spackdb" / digest / "index.json"
    blocker.mkdir(parents=True)  # a directory where the index file must go
    mount = mount_cache([http_server(FIXTURE_CACHE).url], root=root)
    with pytest.raises(OSError) as info:
        (mount.root / ".spack-db" / "index.json").read_bytes()
    assert info.value.errno == errno.ENOENT
    assert "not as a Spack upstream" in mount.log_text()
    hello = subprocess.run([str(mount.prefix() / "bin" / "hello")], capture_output=True,
                           text=True, timeout=60)
    assert "Hello from lmgreet" in hello.stdout
