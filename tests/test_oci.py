"""OCI registries as build caches: a real CNCF distribution registry (Debian's
``docker-registry``) on loopback, the real Spack cache pushed into it the way
``spack buildcache push`` does (``ocicache.py``), mounted through ``oci+http://`` and
``oci://`` with real FUSE; anonymous, Basic and token logins; refusals of an unsigned opt-in
that is missing, of a tag that names another spec, and of a corrupted layer.
"""

from __future__ import annotations

import base64
import errno
import gzip
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    DATA,
    FIXTURE_CACHE,
    FIXTURE_KEY,
    FIXTURE_SECRET_KEY,
    LMGREET,
    LMHELLO,
    expect_refusal,
    lazymount_command,
    short_dir,
    unmount,
)
from hostile import RSS_LIMIT_KIB, bomb, peak_rss_kib
from hypothesis import given, settings
from hypothesis import strategies as st
from ocicache import (
    MEDIA_CONFIG,
    OciPusher,
    compact,
    config_for,
    description,
    descriptor,
    digest_of,
    manifest_doc,
    read_v3_cache,
)
from ociregistry import Registry, RegistryCA, RegistryFront, TokenServer
from spackcache import CacheWriter, Package

from lazymount.buildcache.ocimanifest import parse_image_manifest, spec_tag
from lazymount.errors import FormatError, UsageError
from lazymount.mirror.credentials import Credentials, RegistryLogins, read_docker_auths
from lazymount.mirror.oci import parse_challenges
from lazymount.mirror.ociref import parse_oci_url

NAME = "lazymount/buildcache"
HELLO_HASH = "3vgakfze5q7cw5gke5wbrfotzhh2tstq"
GREET_HASH = "2zsd6bn2ih6gpzltutvgh5zkxjjtlqml"
HELLO_TARBALL = "sha256:ffbd89d56eecaba88ffc49d210360e40b083fd45dbadde88109d48a4ede7988f"
GREET_TARBALL = "sha256:2dc5ac5054b7b63d66540ec8560cbd775f7c753810e48bb32574e8e4ca634ead"
SPACK_DATA = DATA / "oci-spack"
PASSWORD = "s3cret-Pa55"


# ---- pure rules ---------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "scheme", "domain", "name"), [
    ("oci://ghcr.io/Org/Name", "https", "ghcr.io", "org/name"),
    ("oci://user/image", "https", "index.docker.io", "user/image"),
    ("oci://image", "https", "index.docker.io", "library/image"),
    ("oci://myhost/x", "https", "index.docker.io", "myhost/x"),
    ("oci://myhost:5000/x", "https", "myhost:5000", "x"),
    ("oci://localhost/x/y", "https", "localhost", "x/y"),
    ("oci+http://[::1]:5000/a", "http", "[::1]:5000", "a"),
    ("oci+http://127.0.0.1:5000/lazymount/buildcache", "http", "127.0.0.1:5000",
     "lazymount/buildcache"),
    ("oci://ghcr.io/org/cache:latest", "https", "ghcr.io", "org/cache"),  # tag ignored
    ("oci://ghcr.io/org/cache/", "https", "ghcr.io", "org/cache"),
])
def test_mirror_urls_name_repositories_as_docker_and_spack_do(url, scheme, domain, name):
    ref = parse_oci_url(url)
    assert (ref.scheme, ref.domain, ref.name) == (scheme, domain, name)
    assert ref.api == f"{scheme}://{domain}/v2/{name}"


@pytest.mark.parametrize("url", ["oci://ghcr.io/org/cache@sha256:" + "a" * 64,
                                 "oci://", "oci://ghcr.io/a b", "https://ghcr.io/x"])
def test_unusable_mirror_urls_are_refused(url):
    with pytest.raises(UsageError):
        parse_oci_url(url)


def test_spec_tags_follow_spack():
    assert spec_tag("lmhello", "1.0", HELLO_HASH) == f"lmhello-1.0-{HELLO_HASH}.spack"
    assert spec_tag("py-foo", "1.2.3+local", "h" * 32) == f"py-foo-1.2.3_local-{'h' * 32}.spack"
    assert spec_tag("x", "git.abcdef=1.0", "h" * 32) == f"x-git.abcdef_1.0-{'h' * 32}.spack"
    long = spec_tag("n" * 200, "1.0", "h" * 32)
    assert len(long) == 128 and long.endswith(f"-{'h' * 32}.spack") and long.startswith("n" * 64)


def test_challenges_are_parsed():
    header = ('Bearer realm="https://auth.example/token",service="registry.example",'
              'scope="repository:org/cache:pull", Basic realm="x"')
    assert parse_challenges(header) == [
        ("bearer", {"realm": "https://auth.example/token", "service": "registry.example",
                    "scope": "repository:org/cache:pull"}),
        ("basic", {"realm": "x"})]
    assert parse_challenges('Basic realm="lazymount \\"basic\\" realm"') == [
        ("basic", {"realm": 'lazymount "basic" realm'})]


def test_docker_config_auths_are_read(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:pw1").decode()},
        "ghcr.io": {"username": "gh", "password": "pw2"},
        "127.0.0.1:5000": {"auth": base64.b64encode(b"u:p:with:colons").decode()},
        "tokenonly.example": {"identitytoken": "x"}},
        "credsStore": "desktop"}))
    auths = read_docker_auths(path)
    assert auths["index.docker.io"].username == "hub" and auths["docker.io"].password == "pw1"
    assert (auths["ghcr.io"].username, auths["ghcr.io"].password) == ("gh", "pw2")
    assert auths["127.0.0.1:5000"].password == "p:with:colons"
    assert "tokenonly.example" not in auths
    assert read_docker_auths(tmp_path / "missing.json") == {}
    path.write_text('{"auths": {"h": {"auth": "not base64!"}}}')
    with pytest.raises(UsageError, match="not base64"):
        read_docker_auths(path)


def test_a_broken_docker_config_costs_only_its_logins_unless_it_was_asked_for(tmp_path,
                                                                             monkeypatch):
    (tmp_path / "config.json").write_text("{not json")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    default = RegistryLogins({}, None)
    assert default.find("ghcr.io") is None
    assert default.notices and "is not JSON" in default.notices[0]
    with pytest.raises(UsageError, match="is not JSON"):
        RegistryLogins({}, tmp_path / "config.json").find("ghcr.io")
    configured = Credentials("me", PASSWORD)
    assert RegistryLogins({"GHCR.io": configured}, None).find("ghcr.io") is configured


def test_a_password_never_shows_in_repr():
    login = Credentials("lmuser", PASSWORD, "test")
    assert PASSWORD not in repr(login) and PASSWORD not in str(login)
    assert login.basic() == "Basic " + base64.b64encode(f"lmuser:{PASSWORD}".encode()).decode()


@pytest.mark.parametrize(("doc", "message"), [
    ({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
      "manifests": []}, "image index"),
    ({"schemaVersion": 2, "config": {"mediaType": "x", "digest": "sha256:" + "a" * 64,
                                     "size": 2}, "layers": []}, "lists no layers"),
    ({"schemaVersion": 2, "config": {"mediaType": "x", "digest": "md5:abc", "size": 2},
      "layers": [{"mediaType": "x", "digest": "sha256:" + "a" * 64, "size": 1}]},
     "not a sha256 digest"),
    ({"schemaVersion": 1, "layers": []}, "schema version 2"),
    ([], "not a JSON object"),
])
def test_malformed_image_manifests_are_refused(doc, message):
    with pytest.raises(FormatError, match=message):
        parse_image_manifest(json.dumps(doc).encode(), "lmhello")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=20)
DESCRIPTOR = st.fixed_dictionaries({
    "mediaType": st.sampled_from(["application/vnd.oci.image.layer.v1.tar+gzip", "x", 3]),
    "digest": st.sampled_from(["sha256:" + "a" * 64, "sha256:" + "A" * 64, "md5:1", None]),
    "size": st.sampled_from([0, 9978, -1, True, "12", None])})
PROPERTIES = settings(max_examples=200, deadline=None, database=None)


@PROPERTIES
@given(st.one_of(JSON_VALUES, st.fixed_dictionaries({
    "schemaVersion": st.sampled_from([2, 1, "2"]),
    "mediaType": st.sampled_from(["application/vnd.oci.image.manifest.v1+json",
                                  "application/vnd.docker.distribution.manifest.v2+json",
                                  "application/vnd.oci.image.index.v1+json", None]),
    "config": DESCRIPTOR | JSON_VALUES,
    "layers": st.lists(DESCRIPTOR, max_size=3) | JSON_VALUES})))
def test_any_manifest_is_parsed_or_refused_with_a_format_error(doc):
    """Whatever a registry sends, the parser answers an ImageManifest whose every blob has a
    sha256 and a size, or a FormatError; never another exception."""
    try:
        manifest = parse_image_manifest(json.dumps(doc).encode(), "pkg")
    except FormatError:
        return
    for blob in (manifest.config, *manifest.layers):
        assert len(blob.checksum) == 64 and isinstance(blob.length, int) and blob.length >= 0
        assert blob.path == f"blobs/sha256:{blob.checksum}"


@PROPERTIES
@given(st.text(max_size=200))
def test_any_challenge_header_is_parsed_without_error(header):
    for scheme, params in parse_challenges(header):
        assert scheme == scheme.lower() and all(k == k.lower() for k in params)


def test_the_writer_writes_what_spack_wrote():
    """Spack 1.1.0's lmhello manifest, byte for byte, from the same inputs; and its index
    manifest's shape (its index blob holds the same records in another order)."""
    stored = (SPACK_DATA / "lmhello.manifest.json").read_bytes()
    assert digest_of(stored) == ("sha256:e7f7ae87386ea6dcc6d30f9d22acab02"
                                 "43796b4974b11d242a891f9aa610d1be")
    spack = json.loads(stored)
    specs, index = read_v3_cache(FIXTURE_CACHE)
    hello = specs[HELLO_HASH]
    layers = [spack["layers"][0]] + [descriptor(spack["layers"][1]["mediaType"], t)
                                     for t in (specs[GREET_HASH].tarball, hello.tarball)]

    ours = manifest_doc(spack["config"], layers, description(hello.root))
    assert compact(ours) == stored
    closure = [specs[GREET_HASH], hello]
    config = config_for(hello, closure)
    assert config["spec"] == hello.spec["spec"]
    assert config["binary_cache_checksum"]["hash"] == HELLO_TARBALL.removeprefix("sha256:")
    assert list(config)[:4] == ["architecture", "os", "rootfs", "config"]
    index_manifest = json.loads((SPACK_DATA / "index.manifest.json").read_bytes())
    assert index_manifest["config"] == descriptor(MEDIA_CONFIG, b"{}")
    spack_records = json.loads(index)["database"]["installs"]
    assert set(spack_records) >= {HELLO_HASH, GREET_HASH}


# ---- a real registry --------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> RegistryCA:
    return RegistryCA.make(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def registry(tmp_path):
    """A registry holding the real Spack cache, pushed as Spack pushes."""
    running = Registry(tmp_path / "registry").start()
    pusher = OciPusher(running.base, NAME)
    running.specs = pusher.push_cache(FIXTURE_CACHE)
    running.pusher = pusher
    yield running
    pusher.close()
    running.stop()


def registry_gets(registry: Registry) -> list[str]:
    return [r for r in registry.requests() if r.startswith("GET ")]


def run_hello(mount) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(mount.prefix() / "bin" / "hello"), "-v"], capture_output=True,
                          text=True, timeout=60)


def assert_hello_runs(mount) -> None:
    result = run_hello(mount)
    assert result.returncode == 0, (result.stderr, mount.log_text())
    assert "Hello from lmgreet, world!" in result.stdout
    # the binary's paths now name the mount (C strings keep their length: padded with "/")
    paths = [w.lstrip("/") for w in result.stdout.split() if w.startswith("/")]
    assert paths and all(p.startswith(str(mount.root).lstrip("/")) for p in paths), result.stdout


def mount_oci(mount_cache, url: str, *extra: str, **kw):
    return mount_cache([url], keys=(), extra=("--unsigned", *extra), **kw)


def test_lmhello_runs_through_an_oci_http_mount(registry, mount_cache):
    mount = mount_oci(mount_cache, registry.mirror(NAME))
    assert sorted(os.listdir(mount.root / "linux-x86_64")) == [LMGREET, LMHELLO]
    before = registry_gets(registry)
    # the tree comes from the index alone: its manifest and its one layer
    assert not any(".spack " in r for r in before if "index.spack" not in r), before
    assert sum("/blobs/" in r for r in before) == 1
    assert_hello_runs(mount)
    after = registry_gets(registry)[len(before):]
    # per package: its tag's manifest, its config, its own (last) layer, each once
    for name, tarball in ((f"lmhello-1.0-{HELLO_HASH}", HELLO_TARBALL),
                          (f"lmgreet-1.0-{GREET_HASH}", GREET_TARBALL)):
        assert after.count(f"GET /v2/{NAME}/manifests/{name}.spack 200") == 1, after
        assert after.count(f"GET /v2/{NAME}/blobs/{tarball} 200") == 1, after
    assert len(after) == 6, after
    # the Spack upstream database lists it as for a URL mirror
    db = json.loads((mount.root / ".spack-db" / "index.json").read_text())
    assert db["database"]["installs"][HELLO_HASH]["installed"] is True
    assert os.getxattr(mount.prefix(), "user.lazymount.status") == b"ready"
    receipt = next((mount.store / "pkgs").glob(f"{HELLO_HASH}.*/receipt.json"))
    assert json.loads(receipt.read_text())["mirror"] == registry.mirror(NAME)


def test_a_remount_asks_the_registry_once_whether_the_index_changed(registry, mount_cache,
                                                                      tmp_path):
    store = tmp_path / "shared-store"
    first = mount_oci(mount_cache, registry.mirror(NAME), store=store)
    subprocess.run(["fusermount3", "-u", str(first.root)], check=True)
    first.process.wait(20)
    seen = len(registry.requests())
    second = mount_oci(mount_cache, registry.mirror(NAME), store=store)
    assert sorted(os.listdir(second.root / "linux-x86_64")) == [LMGREET, LMHELLO]
    # the question is asked once the mount is up, in the background
    deadline = time.monotonic() + 30
    while "the check after mounting" not in second.log_text():
        assert time.monotonic() < deadline, second.log_text()
        time.sleep(0.05)
    assert registry.requests()[seen:] == [f"GET /v2/{NAME}/manifests/index.spack 304"]


def test_docker_media_types_are_read_too(tmp_path, mount_cache):
    registry = Registry(tmp_path / "registry").start()
    try:
        pusher = OciPusher(registry.base, NAME)
        pusher.push_cache(FIXTURE_CACHE, docker=True)
        pusher.close()
        mount = mount_oci(mount_cache, registry.mirror(NAME))
        assert_hello_runs(mount)
    finally:
        registry.stop()


def test_only_the_last_layer_is_fetched_under_a_base_image(registry, mount_cache):
    """Pushed onto a base image (``--base-image``), a spec's image starts with the base's
    layers; the package is still its last layer, and nothing else is downloaded."""
    specs = registry.specs
    base = gzip.compress(b"not a Spack tarball: a base image layer")
    registry.pusher.push_spec(specs[HELLO_HASH], specs, base_layers=(base,))
    mount = mount_oci(mount_cache, registry.mirror(NAME))
    assert_hello_runs(mount)
    assert not any(digest_of(base) in r for r in registry.requests() if r.startswith("GET"))


@pytest.mark.parametrize("oci_first", [True, False])
def test_a_mirrors_yaml_entry_mixed_with_a_url_mirror(registry, mount_cache, tmp_path,
                                                      oci_first):
    writer = CacheWriter(tmp_path / "url-cache")
    writer.add(Package("lmextra", files={"bin/lmextra": "#!/bin/sh\necho extra\n"}),
               sign=False)
    writer.finish()
    entries = [("site", {"url": str(writer.root), "signed": False}),
               ("lmoci", {"url": registry.mirror(NAME), "signed": False})]
    if oci_first:
        entries.reverse()
    mirrors = tmp_path / "mirrors.yaml"
    mirrors.write_text(json.dumps({"mirrors": dict(entries)}))  # JSON is YAML
    mount = mount_cache([], keys=(), extra=(f"--spack-mirrors={mirrors}",))
    names = sorted(n.split("-")[0] for n in os.listdir(mount.root / "linux-x86_64"))
    assert names == ["lmextra", "lmgreet", "lmhello"]
    assert_hello_runs(mount)
    extra = next((mount.root / "linux-x86_64").glob("lmextra-*"))
    assert subprocess.run([str(extra / "bin" / "lmextra")], capture_output=True,
                          text=True).stdout == "extra\n"


def refused_mount(tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a mount that must fail (with a store of its own: no stored catalog to fall back
    on); it must not have mounted anything."""
    root = short_dir()
    try:
        return subprocess.run(
            lazymount_command(*args, f"--store={tmp_path / 'refused-store'}",
                              f"--keyring={tmp_path / 'no-keys'}", "--foreground", str(root)),
            capture_output=True, text=True, timeout=120)
    finally:
        mounted = os.path.ismount(root)
        unmount(root)
        os.rmdir(root)
        assert not mounted


def test_without_the_unsigned_opt_in_nothing_is_served(registry, tmp_path):
    seen = len(registry.requests())
    result = refused_mount(tmp_path, f"--mirror={registry.mirror(NAME)}")
    assert result.returncode == 2
    assert "OCI registry build caches carry no signatures" in result.stderr
    assert "--unsigned" in result.stderr and "signed: false" in result.stderr
    mirrors = tmp_path / "mirrors.yaml"
    mirrors.write_text(f"mirrors:\n  lmoci: {registry.mirror(NAME)}\n")
    result = refused_mount(tmp_path, f"--spack-mirrors={mirrors}")
    assert result.returncode == 2 and "OCI" in result.stderr
    assert registry.requests()[seen:] == []  # not one request
    listing = subprocess.run(lazymount_command("keys", "list", registry.mirror(NAME)),
                             capture_output=True, text=True)
    assert listing.returncode == 0 and "OCI build caches carry no keys" in listing.stderr
    install = subprocess.run(lazymount_command("keys", "install", "--trust",
                                               registry.mirror(NAME)),
                             capture_output=True, text=True)
    assert install.returncode == 2 and "no keys" in install.stderr


def test_a_tag_whose_config_names_another_spec_is_refused(registry, mount_cache):
    specs = registry.specs
    registry.pusher.push_spec(specs[GREET_HASH], specs, tag=specs[HELLO_HASH].tag)
    mount = mount_oci(mount_cache, registry.mirror(NAME))
    expect_refusal(mount, errno.EIO, f"the OCI image config is for spec {GREET_HASH}, "
                                     f"not {HELLO_HASH}")
    assert os.listdir(mount.prefix(LMGREET))  # the rest keeps working
    assert not list((mount.store / "pkgs").glob(f"{HELLO_HASH}.*"))


def test_a_layer_the_cdn_sends_encoded_is_refused_undecoded(registry, mount_cache):
    # object storage behind a registry's redirect sends a stacked gzip of 512 MiB of zeros
    front = RegistryFront(registry, redirect_blobs=True)
    front.cdn_encoded[HELLO_TARBALL] = ("gzip, gzip", bomb("gzip, gzip"))
    try:
        mount = mount_oci(mount_cache, front.mirror(NAME))
        expect_refusal(mount, errno.EIO, "refusing Content-Encoding gzip, gzip")
        assert peak_rss_kib(mount.process.pid) < RSS_LIMIT_KIB
        assert os.listdir(mount.prefix(LMGREET))  # the rest keeps working
    finally:
        front.stop()


def test_a_corrupted_layer_is_refused(registry, mount_cache):
    registry.tamper_blob(HELLO_TARBALL)
    mount = mount_oci(mount_cache, registry.mirror(NAME))
    expect_refusal(mount, errno.EIO, "sha256 mismatch for blob ffbd89d56eec")
    assert not list((mount.store / "pkgs").glob(f"{HELLO_HASH}.*"))


def test_a_config_whose_checksum_is_not_the_last_layer_is_refused(registry, mount_cache):
    specs = registry.specs
    hello = specs[HELLO_HASH]
    config = config_for(hello, [hello])
    config["binary_cache_checksum"]["hash"] = GREET_TARBALL.removeprefix("sha256:")
    registry.pusher.push_spec(hello, specs, config=config)
    mount = mount_oci(mount_cache, registry.mirror(NAME))
    expect_refusal(mount, errno.EIO, "tarball checksum 2dc5ac5054b7 is not the last layer's")


def test_refresh_and_status_of_an_oci_mount(tmp_path, mount_cache):
    """A package pushed later (with a new index.spack) appears on `lazymount refresh`; an
    unchanged index costs one conditional request; status names the registry and its login."""
    registry = Registry(tmp_path / "registry").start()
    pusher = OciPusher(registry.base, NAME)
    try:
        specs, index = read_v3_cache(FIXTURE_CACHE)
        pusher.push_spec(specs[GREET_HASH], specs)
        partial = json.loads(index)
        partial["database"]["installs"][HELLO_HASH]["in_buildcache"] = False
        pusher.push_index(compact(partial))
        mount = mount_oci(mount_cache, registry.mirror(NAME), "--index-refresh=off")
        assert os.listdir(mount.root / "linux-x86_64") == [LMGREET]

        pusher.push_spec(specs[HELLO_HASH], specs)
        pusher.push_index(index)
        result = subprocess.run(lazymount_command("refresh", str(mount.root)),
                                capture_output=True, text=True, timeout=120)
        assert "the index changed: 2 packages (1 new, 0 removed)" in result.stdout, result
        assert sorted(os.listdir(mount.root / "linux-x86_64")) == [LMGREET, LMHELLO]
        assert_hello_runs(mount)
        seen = len(registry.requests())
        result = subprocess.run(lazymount_command("refresh", str(mount.root)),
                                capture_output=True, text=True, timeout=120)
        assert "the index is unchanged (2 packages)" in result.stdout, result
        assert registry.requests()[seen:] == [f"GET /v2/{NAME}/manifests/index.spack 304"]

        status = json.loads(subprocess.run(
            lazymount_command("status", str(mount.root), "--json"), capture_output=True,
            text=True, timeout=60).stdout)
        (mirror,) = status["mirrors"]
        assert (mirror["url"], mirror["kind"], mirror["layout"], mirror["login"]) == \
            (registry.mirror(NAME), "oci", 3, "anonymous")
        shown = subprocess.run(lazymount_command("status", str(mount.root)),
                               capture_output=True, text=True, timeout=60).stdout
        assert f"{registry.mirror(NAME)} (v3, OCI registry, login anonymous)" in shown
    finally:
        pusher.close()
        registry.stop()


# ---- logins -----------------------------------------------------------------------------


def docker_config(tmp_path: Path, host: str, user: str, password: str) -> Path:
    path = tmp_path / "docker" / "config.json"
    path.parent.mkdir(exist_ok=True)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return path


def test_basic_auth_over_tls_with_a_docker_config(registry, mount_cache, tmp_path, ca):
    registry.start(tls=ca, htpasswd={"lmuser": PASSWORD}, port=registry.port)
    url = registry.mirror(NAME)
    assert url.startswith("oci://")
    login = docker_config(tmp_path, registry.host, "lmuser", PASSWORD)
    mount = mount_oci(mount_cache, url, f"--ca-certs={ca.ca_cert}", f"--docker-config={login}")
    assert_hello_runs(mount)
    statuses = [r.rsplit(" ", 1)[1] for r in registry.requests()]
    assert "401" in statuses and statuses.count("200") >= 7
    assert PASSWORD not in mount.log_text()
    # a wrong password: the mount is refused, naming the user, never the password
    wrong = docker_config(tmp_path, registry.host, "lmuser", "not-it")
    result = refused_mount(tmp_path, f"--mirror={url}", "--unsigned",
                           f"--ca-certs={ca.ca_cert}", f"--docker-config={wrong}")
    assert result.returncode == 1
    assert "refused the login of user 'lmuser' (HTTP 401)" in result.stderr
    assert "not-it" not in result.stderr


def test_basic_auth_from_the_configuration_file(registry, mount_cache, tmp_path, ca):
    registry.start(tls=ca, htpasswd={"lmuser": PASSWORD}, port=registry.port)
    secret = tmp_path / "registry-password"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    root = short_dir()
    config = tmp_path / "config.toml"
    config.write_text(
        f'[mounts."{root}"]\nmirrors = ["{registry.mirror(NAME)}"]\nunsigned = true\n'
        f'ca_certs = "{ca.ca_cert}"\n'
        f'[mounts."{root}".registries."{registry.host}"]\n'
        f'username = "lmuser"\npassword_file = "{secret}"\n')
    mount = mount_cache([], keys=(), extra=(f"--config={config}",), root=root)
    assert_hello_runs(mount)
    assert PASSWORD not in mount.log_text()


def test_credentials_are_never_sent_over_plain_http(registry, tmp_path):
    registry.start(htpasswd={"lmuser": PASSWORD}, port=registry.port)
    login = docker_config(tmp_path, registry.host, "lmuser", PASSWORD)
    result = refused_mount(tmp_path, f"--mirror={registry.mirror(NAME)}", "--unsigned",
                           f"--docker-config={login}")
    assert result.returncode == 1
    assert "refusing to send the credentials for" in result.stderr
    assert registry.requests() and not any(r.endswith(" 200") for r in registry.requests())


def test_anonymous_tokens_are_kept_and_renewed_when_refused(registry, mount_cache, ca):
    tokens = TokenServer(ca).start()
    try:
        registry.start(token=tokens, port=registry.port)
        mount = mount_oci(mount_cache, registry.mirror(NAME), f"--ca-certs={ca.ca_cert}")
        assert os.listdir(mount.prefix(LMGREET))
        # one token for the index and all of lmgreet's requests, asked for anonymously
        assert len(tokens.requests) == 1
        assert tokens.requests[0]["authorization"] is None
        assert tokens.requests[0]["query"]["scope"] == f"repository:{NAME}:pull"
        # the registry stops accepting it (another signing key): the next request gets 401,
        # a new token is fetched and the request repeated
        tokens.signer = "signer2"
        registry.start(token=tokens, port=registry.port)
        assert_hello_runs(mount)
        assert len(tokens.requests) == 2
    finally:
        tokens.stop()


def test_a_token_server_that_wants_credentials(registry, mount_cache, tmp_path, ca):
    tokens = TokenServer(ca, users={"lmuser": PASSWORD}, anonymous=False).start()
    try:
        registry.start(token=tokens, port=registry.port)
        login = docker_config(tmp_path, registry.host, "lmuser", PASSWORD)
        mount = mount_oci(mount_cache, registry.mirror(NAME), f"--ca-certs={ca.ca_cert}",
                          f"--docker-config={login}")
        assert_hello_runs(mount)
        assert tokens.requests and all(r["authorization"].startswith("Basic ")
                                       for r in tokens.requests)
        shown = subprocess.run(lazymount_command("status", str(mount.root), "--json"),
                               capture_output=True, text=True, timeout=60).stdout
        assert json.loads(shown)["mirrors"][0]["login"] == "bearer as lmuser"
        assert PASSWORD not in shown and PASSWORD not in mount.log_text()
        wrong = docker_config(tmp_path, registry.host, "lmuser", "not-it")
        result = refused_mount(tmp_path, f"--mirror={registry.mirror(NAME)}", "--unsigned",
                               f"--ca-certs={ca.ca_cert}", f"--docker-config={wrong}")
        assert result.returncode == 1
        assert "token server" in result.stderr and "user 'lmuser'" in result.stderr
    finally:
        tokens.stop()


def test_publish_pushes_into_a_registry_with_a_token_login(registry, mount_cache, tmp_path,
                                                            ca):
    """lazymount publish logs in as `docker login` did, is given a push token, and writes
    the catalog and the tables of contents into the repository; a mount opens lmhello
    through its table of contents there."""
    tokens = TokenServer(ca, users={"lmuser": PASSWORD}, anonymous=True).start()
    try:
        registry.start(token=tokens, port=registry.port)
        command = lazymount_command("publish", registry.mirror(NAME), "--min-size=1",
                                    f"--signing-key={FIXTURE_SECRET_KEY}")
        # anonymous: pull only, and the publisher says what is missing
        nobody = tmp_path / "nobody"
        nobody.mkdir()
        result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                                env=dict(os.environ, DOCKER_CONFIG=str(nobody),
                                         SSL_CERT_FILE=str(ca.ca_cert)))
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"writing needs a login allowed to push (`docker login {registry.host}`)" in \
            result.stderr, result.stderr
        login = docker_config(tmp_path, registry.host, "lmuser", PASSWORD)
        asked = len(tokens.requests)
        result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                                env=dict(os.environ, DOCKER_CONFIG=str(login.parent),
                                         SSL_CERT_FILE=str(ca.ca_cert)))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "catalog: 6 specs" in result.stdout, result.stdout
        assert "tables of contents: 2 written" in result.stdout, result.stdout
        scopes = [r["query"]["scope"] for r in tokens.requests[asked:]
                  if (r["authorization"] or "").startswith("Basic ")]
        assert any(scope.startswith(f"repository:{NAME}:") and "push" in scope.split(":")[2]
                   for scope in scopes), scopes  # the registry names them in either order
        mount = mount_cache([registry.mirror(NAME)], keys=(FIXTURE_KEY,),
                            extra=("--unsigned", f"--ca-certs={ca.ca_cert}"))
        assert_hello_runs(mount)
        assert "from the site catalog" in mount.log_text()
        assert "opened through its table of contents" in mount.log_text()
    finally:
        tokens.stop()


@pytest.mark.parametrize("status", [429, 503])
def test_blob_redirects_drop_the_login_and_busy_answers_are_retried(registry, mount_cache,
                                                                     ca, status):
    tokens = TokenServer(ca).start()
    front = RegistryFront(registry, tokens=tokens, redirect_blobs=True, throttle=1,
                          status=status)
    try:
        mount = mount_oci(mount_cache, front.mirror(NAME), f"--ca-certs={ca.ca_cert}")
        assert_hello_runs(mount)
        cdn = [r for r in front.requests if r[0] == "cdn"]
        assert len(cdn) >= 5  # the index, 2 configs, 2 tarballs
        assert all(authorization is None for _, _, _, authorization in cdn)
        to_front = [r for r in front.requests if r[0] == "front" and "/blobs/" in r[2]]
        assert any(a and a.startswith("Bearer ") for _, _, _, a in to_front)
        # every path was answered `status` once, then served
        paths = {r[2] for r in front.requests if r[0] == "front"}
        assert all(sum(r[2] == p for r in front.requests) >= 2 for p in paths)
    finally:
        front.stop()
        tokens.stop()


# ---- the real Spack pushes, lazymount mounts ----------------------------------------------

OCI_REPO = SPACK_DATA / "repo" / "spack_repo" / "lmoci"


def test_a_cache_the_real_spack_pushed_runs_through_the_mount(spack, mount_cache, tmp_path):
    """`spack buildcache push --unsigned oci+http://…` into a real registry, then mounted:
    Spack's own manifest and config have the shape ocicache.py writes, and the package runs
    relocated under the mount."""
    spack.add_repo(OCI_REPO)
    spack("install", "lmocidemo")
    registry = Registry(tmp_path / "registry").start()
    try:
        spack("buildcache", "push", "--unsigned", "--update-index", registry.mirror(NAME),
              "lmocidemo")
        reader = OciPusher(registry.base, NAME)
        tags = reader.client.get(f"{reader.api}/tags/list").json()["tags"]
        (tag,) = [t for t in tags if t.startswith("lmocidemo-1.0-")]
        assert sorted(tags) == ["index.spack", tag]
        manifest = reader.client.get(f"{reader.api}/manifests/{tag}", headers={
            "Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
        config = reader.client.get(f"{reader.api}/blobs/{manifest['config']['digest']}").json()
        reader.close()
        ours = manifest_doc(manifest["config"], manifest["layers"], "x")
        assert list(manifest) == list(ours)
        assert list(config)[:4] == ["architecture", "os", "rootfs", "config"]
        assert list(config)[4:] == ["spec", "buildcache_layout_version", "binary_cache_checksum",
                                    "archive_size", "archive_timestamp", "archive_compression"]
        assert config["binary_cache_checksum"]["hash"] == \
            manifest["layers"][-1]["digest"].removeprefix("sha256:")
        assert tag == spec_tag("lmocidemo", "1.0", config["spec"]["nodes"][0]["hash"])

        mount = mount_oci(mount_cache, registry.mirror(NAME))
        (prefix,) = mount.root.glob("linux-*/lmocidemo-1.0-*")
        result = subprocess.run([str(prefix / "bin" / "lmocidemo")], capture_output=True,
                                text=True, timeout=60)
        assert result.stdout == f"installed at {prefix}\n", (result.stderr, mount.log_text())
    finally:
        registry.stop()
