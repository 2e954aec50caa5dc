"""Spack's configuration: mirrors.yaml into mirrors to mount, and the upstreams.yaml that
``lazymount spack-config`` prints."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import FIXTURE_CACHE, lazymount_command

from lazymount.buildcache.layout import DEFAULT_PROJECTION
from lazymount.config import MirrorConfig
from lazymount.errors import UsageError
from lazymount.spack.spackconfig import parse_mirrors, read_spack_mirrors, upstreams_yaml

BASE = Path("/etc/spack")


def parse(text: str, require_signature: bool = True):
    return parse_mirrors(yaml.safe_load(text), BASE, "mirrors.yaml", require_signature)


def test_name_url_form_keeps_the_order():
    mirrors, notices = parse("mirrors:\n  b: https://b.example/cache\n  a: /srv/a\n")
    assert mirrors == [MirrorConfig("https://b.example/cache"), MirrorConfig("/srv/a")]
    assert notices == []


def test_mapping_form_fetch_url_binary_and_signed():
    mirrors, notices = parse("""
mirrors:
  sources:
    url: https://mirror.spack.io
    binary: false
  site:
    url: https://push.example/cache
    fetch: https://fetch.example/cache
    push: s3://bucket/cache
  creds:
    url: https://ignored.example
    fetch:
      url: https://fetch2.example/cache
      access_pair: [id, secret]
  local:
    url: file:///srv/cache
    signed: false
    source: true
""")
    assert mirrors == [
        MirrorConfig("https://fetch.example/cache"),
        MirrorConfig("https://fetch2.example/cache"),
        MirrorConfig("file:///srv/cache", require_signature=False),
    ]
    assert notices == ["mirrors.yaml: mirror 'sources' is a source-only mirror "
                       "(binary: false); skipped"]


def test_fetch_mapping_without_url_falls_back_to_url():
    mirrors, _ = parse("mirrors:\n  m:\n    url: /srv/m\n    fetch: {profile: x}\n")
    assert mirrors == [MirrorConfig("/srv/m")]


def test_unsigned_lifts_every_signature_requirement():
    mirrors, _ = parse("mirrors:\n  a: /srv/a\n", require_signature=False)
    assert mirrors == [MirrorConfig("/srv/a", require_signature=False)]


def test_local_paths_are_expanded_and_made_absolute(monkeypatch):
    monkeypatch.setenv("CACHES", "/scratch/caches")
    mirrors, _ = parse("mirrors:\n  a: $CACHES/x\n  b: rel/cache\n  c: file://$CACHES/y\n")
    assert [m.url for m in mirrors] == ["/scratch/caches/x", "/etc/spack/rel/cache",
                                        "file:///scratch/caches/y"]


def test_override_key_and_environment_files_are_read():
    assert parse("mirrors::\n  a: /srv/a\n")[0] == [MirrorConfig("/srv/a")]
    assert parse("spack:\n  specs: [zlib]\n  mirrors:\n    a: /srv/a\n")[0] == [
        MirrorConfig("/srv/a")]
    assert parse("mirrors: {}\n") == ([], [])


def test_mirrors_of_schemes_the_mount_cannot_fetch_are_skipped_with_a_notice():
    mirrors, notices = parse("""
mirrors:
  bucket: s3://bucket/cache
  cloud:
    url: https://unused.example
    fetch: gs://bucket/cache
  site: https://cache.example/spack
""")
    assert mirrors == [MirrorConfig("https://cache.example/spack")]
    assert notices == [
        "mirrors.yaml: mirror 'bucket' (s3://bucket/cache): s3:// mirrors are not supported; "
        "skipped",
        "mirrors.yaml: mirror 'cloud' (gs://bucket/cache): gs:// mirrors are not supported; "
        "skipped"]


def test_a_mirror_without_url_is_skipped_with_a_notice():
    mirrors, notices = parse("mirrors:\n  m:\n    binary: true\n")
    assert mirrors == [] and notices == ["mirrors.yaml: mirror 'm' has no url; skipped"]


@pytest.mark.parametrize("text, message", [
    ("config:\n  x: 1\n", "has no 'mirrors:' section"),
    ("mirrors: [a, b]\n", "is not a mapping"),
    ("mirrors:\n  m: 3\n", "neither a URL nor a mapping"),
    ("mirrors:\n  m:\n    url: /x\n    binary: maybe\n", "binary must be true or false"),
    ("mirrors:\n  m:\n    url: [1]\n", "url must be a string"),
])
def test_malformed_configurations_are_refused(text, message):
    with pytest.raises(UsageError, match=message):
        parse(text)


def test_unreadable_or_invalid_files_are_refused(tmp_path):
    with pytest.raises(UsageError, match="cannot read"):
        read_spack_mirrors(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("mirrors: [\n")
    with pytest.raises(UsageError, match="is not valid YAML"):
        read_spack_mirrors(bad)


def test_upstreams_yaml_is_block_yaml_spack_can_read():
    text = upstreams_yaml("/opt/spack", DEFAULT_PROJECTION)
    assert "upstreams:\n  lazymount:\n    install_tree: /opt/spack\n" in text
    assert yaml.safe_load(text) == {"upstreams": {"lazymount": {
        "install_tree": "/opt/spack",
        "modules": {"tcl": "/opt/spack/modules/tcl", "lmod": "/opt/spack/modules/lmod"}}}}
    assert "projection" not in text
    other = upstreams_yaml("/opt/spack", "{name}/{hash}")
    assert "# The mount places packages with the projection {name}/{hash}" in other
    assert yaml.safe_load(other) == yaml.safe_load(text)


# ---- through the command line --------------------------------------------------------------


def test_spack_config_of_a_directory_that_is_not_mounted(tmp_path):
    result = subprocess.run(lazymount_command("spack-config", str(tmp_path)),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert yaml.safe_load(result.stdout)["upstreams"]["lazymount"]["install_tree"] == \
        str(tmp_path)
    assert "is not a lazymount mount now" in result.stderr


def test_mount_from_a_spack_mirrors_yaml(http_server, mount_cache, tmp_path):
    """A source-only mirror and an s3:// one are skipped with a notice; the binary mirror
    after them serves."""
    server = http_server(FIXTURE_CACHE)
    config = tmp_path / "mirrors.yaml"
    config.write_text(f"mirrors:\n  spack-public:\n    url: https://mirror.spack.io\n"
                      f"    binary: false\n  bucket: s3://bucket/cache\n"
                      f"  site:\n    url: {server.url}\n")
    mount = mount_cache([], extra=(f"--spack-mirrors={config}",))
    result = subprocess.run([str(mount.prefix() / "bin" / "hello"), "-v"],
                            capture_output=True, text=True, timeout=60)
    assert "Hello from lmgreet, world!" in result.stdout, mount.log_text()
    assert "mirror 'spack-public' is a source-only mirror (binary: false); skipped" in (
        mount.log_text())
    assert "mirror 'bucket' (s3://bucket/cache): s3:// mirrors are not supported; skipped" in (
        mount.log_text())
    assert server.url in mount.log_text()  # "mounted N packages from <url>"


def test_command_line_mirrors_come_before_the_spack_mirrors(http_server, mount_cache,
                                                            tmp_path):
    first, second = http_server(FIXTURE_CACHE), http_server(FIXTURE_CACHE)
    config = tmp_path / "mirrors.yaml"
    config.write_text(f"mirrors:\n  b: {second.url}\n  a: {first.url}\n")
    mount = mount_cache([first.url], extra=(f"--spack-mirrors={config}",))
    assert f"from {first.url}, {second.url} at" in mount.log_text()  # first.url once, first
    result = subprocess.run([str(mount.prefix() / "bin" / "hello")], capture_output=True,
                            text=True, timeout=60)
    assert "Hello from lmgreet" in result.stdout
    # a hash in several mirrors comes from the first
    assert any("manifests/spec" in r for r in first.requests)
    assert not any("manifests/spec" in r for r in second.requests)


def test_stackinator_sub_cache_per_mount_point(mount_cache, tmp_path):
    """A Stackinator cache root holds one cache per mount point; the sub-directory is the
    mirror (here named relative to the mirrors.yaml beside the cache root)."""
    root = tmp_path / "uenv-cache"
    shutil.copytree(FIXTURE_CACHE, root / "user-environment")
    config = tmp_path / "mirrors.yaml"
    config.write_text("mirrors:\n  uenv:\n    url: uenv-cache/user-environment\n")
    mount = mount_cache([], extra=(f"--spack-mirrors={config}",))
    result = subprocess.run([str(mount.prefix() / "bin" / "hello")], capture_output=True,
                            text=True, timeout=60)
    assert "Hello from lmgreet" in result.stdout, mount.log_text()
    assert str(root / "user-environment") in mount.log_text()


def test_help_lists_the_subcommands():
    result = subprocess.run(lazymount_command("--help"), capture_output=True, text=True,
                            timeout=60)
    for text in ("keys list", "keys install [--trust] MIRROR", "spack-config MOUNTPOINT",
                 "--spack-mirrors", "--keyring"):
        assert text in result.stdout
    keys_help = subprocess.run(lazymount_command("keys", "--help"), capture_output=True,
                               text=True, timeout=60)
    for action in ("list", "install", "add", "remove"):
        assert action in keys_help.stdout
