"""Proxy lists and caching through a real squid: several daemons, one origin, dead proxies."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FIXTURE_CACHE, LMGREET, LMHELLO, lazymount_command
from squid import (
    Squid,
    refused_proxy,
    start_overloaded_proxy,
    start_silent_proxy,
    start_squid,
)

from lazymount import configfile
from lazymount.errors import UsageError
from lazymount.mirror.proxies import (
    BACKOFF,
    DIRECT,
    ProxyChain,
    bypasses_proxies,
    parse_proxy_list,
)

INDEX_MANIFEST = "v3/manifests/index/index.manifest.json"


@pytest.fixture
def squid() -> Iterator[Squid]:
    proxy = start_squid()
    yield proxy
    proxy.stop()


def run(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(path), *args], capture_output=True, text=True, timeout=120)


def counted(requests: list[str], marker: str) -> Counter[str]:
    return Counter(r for r in requests if marker in r)


def rests_since(started: float) -> int:
    """How many times a failed proxy may have been asked since ``started``: once, and once
    more per rest period that passed (a slow machine can take longer than one)."""
    return 1 + int((time.monotonic() - started) // BACKOFF)


# --- the proxy list: syntax and the order requests take ---------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_proxy_list_syntax_is_cvmfs_and_refuses_what_it_cannot_use():
    assert parse_proxy_list("http://p1:3128|http://p2:3128;DIRECT") == [
        ["http://p1:3128", "http://p2:3128"], [DIRECT]]
    for bad in ("", "http://p1:3128;", "http://p1:3128||http://p2:3128", "p1:3128",
                "https://p1:3128", "http://p1:port", "direct"):
        with pytest.raises(UsageError, match="proxy list"):
            parse_proxy_list(bad)


def test_a_group_is_spread_over_hosts_and_failures_move_to_the_next_group():
    group = [f"http://p{i}:3128" for i in range(4)]
    firsts = {ProxyChain([group, [DIRECT]], host=f"node{n:04d}").order()[0].url
              for n in range(64)}
    assert firsts == set(group)  # 64 nodes start at every member of the group
    clock = Clock()
    chain = ProxyChain([["http://a:1", "http://b:1"], [DIRECT]], host="node1", clock=clock)
    first, second, direct = chain.order()
    assert direct.url == DIRECT and {first.url, second.url} == {"http://a:1", "http://b:1"}
    chain.failed(first, "connection refused")
    assert [p.url for p in chain.order()] == [second.url, DIRECT, first.url]
    chain.failed(second, "HTTP 503")
    assert [p.url for p in chain.order()] == [DIRECT, first.url, second.url]
    clock.now += 31  # the first one's rest (30 s) is over: it is asked first again
    assert chain.order()[0] is first
    chain.failed(first, "timed out")  # a second failure in a row rests twice as long
    clock.now += 31
    assert chain.order()[0] is second and chain.order()[1] is direct
    clock.now += 30
    assert chain.order()[0] is first
    chain.answered(first)
    health = {entry["proxy"]: entry for entry in chain.status()}
    assert health[first.url]["up"] and health[first.url]["failures"] == 0
    assert health[first.url]["answered"] == 1
    assert health[second.url]["up"] and health[second.url]["failures"] == 1
    assert health[second.url]["last_error"] == "HTTP 503" and health[DIRECT]["group"] == 1


def test_proxies_key_in_the_configuration_file_and_its_errors(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[defaults]\nproxies = "http://p1:3128|http://p2:3128;DIRECT"\n')
    parser = argparse.ArgumentParser()
    configfile.add_options(parser)
    values = configfile.settings(parser.parse_args([]), configfile.load(path), Path("/opt/x"))
    assert values["proxies"] == "http://p1:3128|http://p2:3128;DIRECT"
    path.write_text('[defaults]\nproxies = "http://p1:3128;;DIRECT"\n')
    with pytest.raises(configfile.ConfigError, match="proxies.*empty group"):
        configfile.load(path)


def test_no_proxy_names_hosts_domains_and_ports():
    assert bypasses_proxies("http://127.0.0.1:8080/x", "localhost,127.0.0.1")
    assert bypasses_proxies("https://cache.example.org/spack", ".example.org")
    assert bypasses_proxies("https://cache.example.org/spack", "example.org:443")
    assert not bypasses_proxies("https://cache.example.org/spack", "example.org:8443")
    assert not bypasses_proxies("http://badexample.org/", "example.org")
    assert bypasses_proxies("http://anything/", "*")
    assert not bypasses_proxies("http://anything/", "")


# --- real daemons, a real squid ----------------------------------------------------------

def test_three_daemons_behind_a_dead_proxy_and_squid_fetch_each_blob_once(
        http_server, mount_cache, squid, tmp_path):
    origin = http_server(FIXTURE_CACHE)
    chain = f"{refused_proxy()};{squid.url}"
    started = time.monotonic()
    mounts = [mount_cache([origin.url], extra=(f"--proxy={chain}",),
                          store=tmp_path / f"store{n}") for n in range(3)]
    results: list[subprocess.CompletedProcess[str]] = []

    def start(mount) -> None:
        results.append(run(mount.prefix() / "bin" / "hello", "-v"))

    threads = [threading.Thread(target=start, args=(mount,)) for mount in mounts]
    for thread in threads:  # the same tool, started on every node at once
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.returncode for r in results] == [0, 0, 0], [r.stderr for r in results]
    assert all("Hello from lmgreet" in r.stdout for r in results)
    blobs = counted(origin.requests, "/blobs/")
    specs = counted(origin.requests, ".spec.manifest.json")
    # the index blob, two spec blobs and two tarballs; the two packages' manifests
    assert len(blobs) == 5 and len(specs) == 2
    assert set(blobs.values()) == {1} and set(specs.values()) == {1}, origin.requests
    # every node asked squid for every blob (some waiting for another node's fetch of it)
    asked = [line for line in squid.access_log() if f"{origin.url}/blobs/" in line]
    assert len(asked) == 3 * len(blobs), "\n".join(squid.access_log())
    for mount in mounts:
        # the dead proxy cost one failed connection, not one per request
        failures = mount.log_text().count("failed (connection refused)")
        assert 1 <= failures <= rests_since(started), mount.log_text()


def test_a_hung_first_proxy_costs_one_wait_not_one_per_request(
        http_server, mount_cache, squid):
    origin = http_server(FIXTURE_CACHE)
    silent = start_silent_proxy()
    try:
        started = time.monotonic()
        mount = mount_cache([origin.url], extra=(f"--proxy={silent.url};{squid.url}",
                                                 "--timeout=3"))
        result = run(mount.prefix() / "bin" / "hello", "-v")
        assert result.returncode == 0, result.stderr + mount.log_text()
        assert (mount.prefix(LMGREET) / "lib").is_dir()
        through_squid = [line for line in squid.access_log() if origin.url in line]
        # 8 requests (index manifest and blob, 2 spec manifests, 2 spec blobs, 2 tarballs)
        # went through squid; the hung proxy was asked once, by the first of them
        assert len(through_squid) >= 8, squid.access_log()
        assert 1 <= len(silent.accepted) <= rests_since(started)
        assert f"proxy {silent.url} failed (no answer in 3 s" in mount.log_text()
        # status shows each proxy's health
        status = subprocess.run(lazymount_command("status", "--json", str(mount.root)),
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        health = {p["proxy"]: p for p in json.loads(status.stdout)["proxies"]}
        assert health[silent.url]["failures"] >= 1
        assert "no answer" in health[silent.url]["last_error"]
        assert health[squid.url]["up"] and health[squid.url]["answered"] >= 8
        assert health[squid.url]["group"] == 1 and health[silent.url]["group"] == 0
        words = subprocess.run(lazymount_command("status", str(mount.root)),
                               capture_output=True, text=True, timeout=60).stdout
        assert f"up       {squid.url} (group 2" in words
        if time.monotonic() - started < BACKOFF:  # still resting (a slow machine may not be)
            assert not health[silent.url]["up"]
            assert f"resting  {silent.url} (group 1" in words
    finally:
        silent.stop()


def test_a_proxy_answering_503_is_left_aside_for_the_next_group(
        http_server, mount_cache, squid):
    origin = http_server(FIXTURE_CACHE)
    broken, server = start_overloaded_proxy()
    try:
        started = time.monotonic()
        mount = mount_cache([origin.url], extra=(f"--proxy={broken};{squid.url}",))
        result = run(mount.prefix() / "bin" / "hello", "-v")
        assert result.returncode == 0, result.stderr + mount.log_text()
        # asked once (the first request), then rested: the rest went to squid
        assert 1 <= server.answered <= rests_since(started)  # type: ignore[attr-defined]
        assert f"proxy {broken} failed (HTTP 503)" in mount.log_text()
        assert len([line for line in squid.access_log() if origin.url in line]) >= 8
    finally:
        server.shutdown()
        server.server_close()


def test_environment_proxy_without_a_list_and_no_proxy_with_one(
        http_server, mount_cache, squid, monkeypatch, tmp_path):
    origin = http_server(FIXTURE_CACHE)
    monkeypatch.setenv("http_proxy", squid.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    mount = mount_cache([origin.url], store=tmp_path / "env")
    assert LMHELLO in os.listdir(mount.root / "linux-x86_64")
    assert any(INDEX_MANIFEST in line for line in squid.access_log())
    seen = len(squid.access_log())
    # a list given, but NO_PROXY names the mirror's host: reached directly
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    before = len(origin.requests)
    direct = mount_cache([origin.url], extra=(f"--proxy={squid.url}",),
                         store=tmp_path / "direct")
    assert LMHELLO in os.listdir(direct.root / "linux-x86_64")
    assert len(origin.requests) > before and len(squid.access_log()) == seen


def _serve_changing_index(tmp_path: Path) -> tuple[Path, bytes]:
    """A copy of the fixture cache whose index lists lmgreet only, with an old date (so a
    cache would keep it for days), and the bytes of the full index manifest."""
    root = tmp_path / "origin"
    shutil.copytree(FIXTURE_CACHE, root)
    manifest_path = root / INDEX_MANIFEST
    full = manifest_path.read_bytes()
    record = json.loads(full)["data"][0]
    index = json.loads((root / "blobs/sha256" / record["checksum"][:2] /
                        record["checksum"]).read_bytes())
    installs = index["database"]["installs"]
    del installs[LMHELLO.rsplit("-", 1)[1]]
    blob = json.dumps(index).encode()
    digest = hashlib.sha256(blob).hexdigest()
    (root / "blobs/sha256" / digest[:2]).mkdir(exist_ok=True)
    (root / "blobs/sha256" / digest[:2] / digest).write_bytes(blob)
    manifest_path.write_text(json.dumps({"version": 3, "data": [
        dict(record, contentLength=len(blob), checksum=digest)]}))
    ten_days_ago = time.time() - 10 * 86400
    os.utime(manifest_path, (ten_days_ago, ten_days_ago))
    return root, full


def test_an_index_change_reaches_a_daemon_through_squid(
        http_server, mount_cache, squid, tmp_path):
    root, full_manifest = _serve_changing_index(tmp_path)
    origin = http_server(root)
    mount = mount_cache([origin.url], extra=(f"--proxy={squid.url}",))
    assert os.listdir(mount.root / "linux-x86_64") == [LMGREET]
    # the mirror publishes a new index; squid holds the old manifest, fresh by its rules
    (root / INDEX_MANIFEST).write_bytes(full_manifest)
    refresh = subprocess.run(lazymount_command("refresh", str(mount.root)),
                             capture_output=True, text=True, timeout=120)
    assert refresh.returncode == 0, refresh.stderr
    assert "the index changed" in refresh.stdout
    assert sorted(os.listdir(mount.root / "linux-x86_64")) == [LMGREET, LMHELLO]
    # and a remount (through the same squid) sees it too
    subprocess.run(["fusermount3", "-u", str(mount.root)], check=True)
    mount.process.wait(30)  # type: ignore[union-attr]
    again = mount_cache([origin.url], extra=(f"--proxy={squid.url}",), root=mount.root,
                        store=tmp_path / "another-store")
    assert sorted(os.listdir(again.root / "linux-x86_64")) == [LMGREET, LMHELLO]
