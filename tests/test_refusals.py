"""A tampered or unusable package is refused with a clear reason; the rest keeps working.

Each test breaks one thing in a copy of the real Spack cache, mounts it, and checks what a
user sees (the errno of the file operation), what the log says, and that the store holds
no trace of the refused package.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    DATA,
    FIXTURE_CACHE,
    FIXTURE_SECRET_KEY,
    LMGREET,
    LMHELLO,
    expect_refusal,
)

HELLO_MANIFEST = f"v3/manifests/spec/lmhello/{LMHELLO}.spec.manifest.json"
GREET_MANIFEST = f"v3/manifests/spec/lmgreet/{LMGREET}.spec.manifest.json"
TARBALL = "blobs/sha256/ff/ffbd89d56eecaba88ffc49d210360e40b083fd45dbadde88109d48a4ede7988f"
OTHER_KEY = DATA / "keys" / "other.pub.asc"
OTHER_SECRET = DATA / "keys" / "other.secret.asc"


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    copy = tmp_path / "cache"
    shutil.copytree(FIXTURE_CACHE, copy)
    return copy


def clearsign(text: bytes, secret_key: Path, home: Path) -> bytes:
    """Sign with a throw-away key in a private GNUPGHOME (never the user's)."""
    home.mkdir(mode=0o700, exist_ok=True)
    env = dict(os.environ, GNUPGHOME=str(home))
    subprocess.run(["gpg", "--batch", "--import", str(secret_key)], env=env, check=True,
                   capture_output=True)
    result = subprocess.run(["gpg", "--batch", "--pinentry-mode", "loopback", "--passphrase", "",
                             "--clearsign", "--digest-algo", "SHA512"],
                            input=text, env=env, check=True, capture_output=True)
    subprocess.run(["gpgconf", "--kill", "all"], env=env, check=False)
    return result.stdout


def plaintext(manifest: Path) -> bytes:
    text = manifest.read_bytes()
    return text.split(b"\n\n", 1)[1].split(b"-----BEGIN PGP SIGNATURE-----")[0]


def expect_rest_works(mount) -> None:
    assert (mount.prefix(LMGREET) / "include" / "greet.h").read_text()


def test_blob_with_wrong_sha256(cache, mount_cache):
    blob = cache / TARBALL
    data = bytearray(blob.read_bytes())
    data[5000] ^= 0xFF  # same length, different bytes
    blob.write_bytes(bytes(data))
    mount = mount_cache([str(cache)])
    expect_refusal(mount, errno.EIO, "sha256 mismatch")
    expect_rest_works(mount)


def test_blob_with_wrong_length(cache, mount_cache):
    blob = cache / TARBALL
    blob.write_bytes(blob.read_bytes() + b"trailing garbage")
    mount = mount_cache([str(cache)])
    expect_refusal(mount, errno.EIO, "longer than")
    expect_rest_works(mount)


def test_manifest_altered_after_signing(cache, mount_cache):
    manifest = cache / HELLO_MANIFEST
    manifest.write_bytes(manifest.read_bytes().replace(b'"contentLength":9978',
                                                       b'"contentLength":9979'))
    mount = mount_cache([str(cache)])
    expect_refusal(mount, errno.EACCES, "BAD signature")
    expect_rest_works(mount)


def test_manifest_signed_by_unknown_key(cache, mount_cache, tmp_path):
    manifest = cache / HELLO_MANIFEST
    manifest.write_bytes(clearsign(plaintext(manifest), OTHER_SECRET, tmp_path / "gpg"))
    mount = mount_cache([str(cache)])
    expect_refusal(mount, errno.EACCES, "not trusted")
    expect_rest_works(mount)


def test_trusting_the_wrong_key_refuses_every_package(cache, mount_cache):
    mount = mount_cache([str(cache)], keys=(OTHER_KEY,))
    expect_refusal(mount, errno.EACCES, "not trusted")
    expect_refusal(mount, errno.EACCES, "not trusted", name=LMGREET)


def test_unsigned_manifest_on_a_signed_mirror(cache, mount_cache):
    manifest = cache / HELLO_MANIFEST
    manifest.write_bytes(plaintext(manifest))
    mount = mount_cache([str(cache)])
    expect_refusal(mount, errno.EACCES, "not signed")
    expect_rest_works(mount)


def test_manifest_of_another_package_is_a_root_hash_mismatch(cache, mount_cache):
    # validly signed by the trusted key, but it is lmgreet's manifest at lmhello's path
    shutil.copy(cache / GREET_MANIFEST, cache / HELLO_MANIFEST)
    mount = mount_cache([str(cache)])
    expect_refusal(mount, errno.EIO, "the signed manifest is for spec 2zsd6bn")
    expect_rest_works(mount)


def test_resigned_manifest_with_the_trusted_key_still_binds_content(cache, mount_cache, tmp_path):
    # the trusted key signs a manifest whose checksum is not the blob's: refused on content
    manifest = cache / HELLO_MANIFEST
    body = plaintext(manifest).replace(b"ffbd89d5", b"ffbd89d6")
    manifest.write_bytes(clearsign(body, FIXTURE_SECRET_KEY, tmp_path / "gpg"))
    mount = mount_cache([str(cache)])
    expect_refusal(mount, errno.EIO, "ffbd89d6")
    expect_rest_works(mount)


def test_mount_path_longer_than_the_build_root(mount_cache, tmp_path):
    root = Path("/tmp/lazymount-a-much-longer-root")
    root.mkdir(exist_ok=True)
    mount = mount_cache([str(FIXTURE_CACHE)], root=root)
    expect_refusal(mount, errno.ENAMETOOLONG,
                   f"the mount path {root} is {len(str(root)) - 17} characters longer than "
                   "the build root /tmp/lm/opt/spack; use a shorter mount path or a cache "
                   "built with padded_length")


def test_mirror_that_dies_after_mounting_gives_eio_in_bounded_time(http_server, mount_cache):
    server = http_server(FIXTURE_CACHE)
    mount = mount_cache([server.url])
    server.stop()
    started = time.monotonic()
    expect_refusal(mount, errno.EIO, server.url)
    assert time.monotonic() - started < 60
    # the tree itself is still answered from the index
    assert LMHELLO in os.listdir(mount.root / "linux-x86_64")
