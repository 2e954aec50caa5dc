"""``lazymount keys``: the keyring, the keys a mirror publishes, and a mount that trusts only
the keyring."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import DATA, FIXTURE_CACHE, FIXTURE_KEY, lazymount_command

FIXTURE_FPR = "1556299A23063ADC6D944541DF5162CFF05DB8B3"
FIXTURE_UID = "lazymount fixture signing key"
OTHER_KEY = DATA / "keys" / "other.pub.asc"
OTHER_FPR = "148C32459CC60AA49BBB975FF76174A186608F4A"
KEY_BLOB = "blobs/sha256/8d/8d03eae5fcfe5215d37599a6d07f525a6b667603f8c171fbd503f2422e615269"


def keys(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(lazymount_command("keys", *args), capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def keyring(tmp_path: Path) -> Path:
    return tmp_path / "keyring"


def v2_cache(directory: Path, *key_files: Path) -> Path:
    """A layout-v2 key directory as Spack 0.23 pushes it: build_cache/_pgp/."""
    pgp = directory / "build_cache" / "_pgp"
    pgp.mkdir(parents=True)
    index = {}
    for key_file, fingerprint in key_files:
        shutil.copy(key_file, pgp / f"{fingerprint}.pub")
        index[fingerprint] = {}
    (pgp / "index.json").write_text(json.dumps({"keys": index}))
    return directory


# ---- the keyring ---------------------------------------------------------------------------


def test_list_of_an_empty_keyring_says_so(keyring):
    result = keys("list", f"--keyring={keyring}")
    assert result.returncode == 0
    assert result.stdout == ""
    assert f"no keys in the keyring {keyring}" in result.stderr


def test_add_list_and_remove(keyring):
    added = keys("add", f"--keyring={keyring}", str(FIXTURE_KEY), str(OTHER_KEY))
    assert added.returncode == 0, added.stderr
    assert f"{FIXTURE_FPR}  {FIXTURE_UID}" in added.stdout and "(added)" in added.stdout
    assert sorted(p.name for p in keyring.iterdir()) == [f"{OTHER_FPR}.asc",
                                                         f"{FIXTURE_FPR}.asc"]
    again = keys("add", f"--keyring={keyring}", str(FIXTURE_KEY))
    assert "(already in the keyring)" in again.stdout
    listed = keys("list", f"--keyring={keyring}")
    lines = listed.stdout.splitlines()
    assert [line.split()[0] for line in lines] == sorted([FIXTURE_FPR, OTHER_FPR])
    assert "lazymount test other key" in listed.stdout
    # by its long key id (the last 16 digits), in lower case
    removed = keys("remove", f"--keyring={keyring}", OTHER_FPR[-16:].lower())
    assert removed.returncode == 0, removed.stderr
    assert OTHER_FPR in removed.stdout and "removed" in removed.stdout
    assert [p.name for p in keyring.iterdir()] == [f"{FIXTURE_FPR}.asc"]


def test_remove_of_an_unknown_fingerprint_is_refused(keyring):
    keys("add", f"--keyring={keyring}", str(FIXTURE_KEY))
    result = keys("remove", f"--keyring={keyring}", OTHER_FPR)
    assert result.returncode == 2
    assert f"no key {OTHER_FPR} in the keyring" in result.stderr
    short = keys("remove", f"--keyring={keyring}", "F05DB8B3")
    assert short.returncode == 2 and "at least 16 hex digits" in short.stderr
    assert (keyring / f"{FIXTURE_FPR}.asc").exists()


@pytest.mark.parametrize("bad, message", [
    (DATA / "keys" / "other.secret.asc", "holds a secret key"),
    (FIXTURE_CACHE / "v3" / "layout.json", "is not an ASCII-armored public key"),
    (DATA / "no-such-file.asc", "cannot read key file"),
])
def test_add_refuses_bad_files_and_imports_nothing(keyring, bad, message):
    result = keys("add", f"--keyring={keyring}", str(FIXTURE_KEY), str(bad))
    assert result.returncode == 2
    assert message in result.stderr and str(bad) in result.stderr
    assert not keyring.exists()  # all or nothing: the good key was not imported either


def test_a_keyring_others_can_write_is_refused(keyring):
    keys("add", f"--keyring={keyring}", str(FIXTURE_KEY))
    keyring.chmod(0o777)
    result = keys("list", f"--keyring={keyring}")
    assert result.returncode == 2
    assert "writable by group or others" in result.stderr


# ---- the keys a mirror publishes -----------------------------------------------------------


def test_list_mirror_keys_of_a_v3_cache_over_http(http_server):
    server = http_server(FIXTURE_CACHE)
    result = keys("list", server.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{FIXTURE_FPR}  lazymount fixture signing key (lazymount test fixtures, not for "
        "production) <lazymount-fixtures@example.invalid>"]
    # the key index manifest -> key index blob -> key manifest -> key blob
    assert server.requests == [
        "/v3/manifests/key/keys.manifest.json",
        "/blobs/sha256/1b/1bfa9b457d206285234d79a6f4e3d4b5bdaf506a1d43bd7ae80cfcd330e90c62",
        f"/v3/manifests/key/{FIXTURE_FPR}.key.manifest.json",
        f"/{KEY_BLOB}",
    ]


def test_list_mirror_keys_of_a_v2_cache_directory(tmp_path):
    cache = v2_cache(tmp_path / "v2", (FIXTURE_KEY, FIXTURE_FPR), (OTHER_KEY, OTHER_FPR))
    result = keys("list", str(cache))
    assert result.returncode == 0, result.stderr
    assert sorted(line.split()[0] for line in result.stdout.splitlines()) == sorted(
        [FIXTURE_FPR, OTHER_FPR])


def test_a_mirror_key_that_fails_its_checksum_is_refused(tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(FIXTURE_CACHE, cache)
    blob = cache / KEY_BLOB
    blob.write_bytes(blob.read_bytes().replace(b"\n\n", b"\n\n\n", 1)[:-1])  # same length
    result = keys("list", str(cache))
    assert result.returncode == 1
    assert "sha256 mismatch" in result.stderr


def test_a_mirror_key_file_holding_another_key_is_refused(tmp_path):
    cache = v2_cache(tmp_path / "v2", (OTHER_KEY, FIXTURE_FPR))  # index names the wrong key
    result = keys("install", "--trust", f"--keyring={tmp_path / 'keyring'}", str(cache))
    assert result.returncode == 1
    assert f"names {FIXTURE_FPR}, but the file holds {OTHER_FPR}" in result.stderr
    assert not (tmp_path / "keyring").exists()


def test_a_mirror_without_keys_says_so(tmp_path):
    result = keys("list", str(tmp_path))
    assert result.returncode == 1
    assert "publishes no keys" in result.stderr


def test_install_without_trust_only_shows_the_keys(http_server, keyring):
    server = http_server(FIXTURE_CACHE)
    result = keys("install", f"--keyring={keyring}", server.url)
    assert result.returncode == 0, result.stderr
    assert f"{server.url} publishes 1 key:" in result.stdout
    assert FIXTURE_FPR in result.stdout
    assert "add --trust" in result.stdout
    assert not keyring.exists()


def test_install_with_trust_imports_the_keys(http_server, keyring):
    server = http_server(FIXTURE_CACHE)
    result = keys("install", "--trust", f"--keyring={keyring}", server.url)
    assert result.returncode == 0, result.stderr
    assert f"{FIXTURE_FPR}  {FIXTURE_UID}" in result.stdout and "(added)" in result.stdout
    stored = keyring / f"{FIXTURE_FPR}.asc"
    assert stored.read_bytes().startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK-----")
    assert stored.stat().st_mode & 0o777 == 0o644
    listed = keys("list", f"--keyring={keyring}")
    assert listed.stdout.split()[0] == FIXTURE_FPR


# ---- mounts --------------------------------------------------------------------------------


def test_mount_trusting_only_the_keyring_runs_the_package(http_server, mount_cache, keyring):
    server = http_server(FIXTURE_CACHE)
    assert keys("install", "--trust", f"--keyring={keyring}", server.url).returncode == 0
    mount = mount_cache([server.url], keys=(), extra=(f"--keyring={keyring}",))
    result = subprocess.run([str(mount.prefix() / "bin" / "hello"), "-v"],
                            capture_output=True, text=True, timeout=60)
    assert "Hello from lmgreet, world!" in result.stdout, mount.log_text()


def test_mount_with_an_empty_keyring_and_no_key_is_refused(http_server, tmp_path, keyring):
    server = http_server(FIXTURE_CACHE)
    root = tmp_path / "mnt"
    root.mkdir()
    result = subprocess.run(
        lazymount_command(f"--mirror={server.url}", f"--keyring={keyring}",
                          f"--store={tmp_path / 'store'}", "--foreground", str(root)),
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no trusted keys: run `lazymount keys install --trust MIRROR`" in result.stderr
    assert not os.path.ismount(root)


def test_mount_refuses_a_keyring_others_can_write(http_server, tmp_path, keyring):
    keys("add", f"--keyring={keyring}", str(FIXTURE_KEY))
    (keyring / f"{FIXTURE_FPR}.asc").chmod(0o666)
    root = tmp_path / "mnt"
    root.mkdir()
    result = subprocess.run(
        lazymount_command(f"--mirror={http_server(FIXTURE_CACHE).url}", f"--keyring={keyring}",
                          f"--store={tmp_path / 'store'}", "--foreground", str(root)),
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "writable by group or others" in result.stderr
    assert not os.path.ismount(root)

