"""The systemd units in systemd/ are valid and hardened (systemd-analyze, offline)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = sorted((Path(__file__).parent.parent / "systemd").glob("*.service"))
MAX_EXPOSURE = 5.0

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze is not installed (apt-get install systemd)")


def test_there_are_units() -> None:
    assert UNITS, "no unit files in systemd/"


@pytest.mark.parametrize("unit", UNITS, ids=lambda path: path.name)
def test_unit_verifies_cleanly(unit: Path, tmp_path: Path) -> None:
    copy = tmp_path / unit.name  # verify reads the unit's directory: keep it to this one
    shutil.copy(unit, copy)
    result = subprocess.run(["systemd-analyze", "verify", str(copy)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


@pytest.mark.parametrize("unit", UNITS, ids=lambda path: path.name)
def test_unit_exposure_is_at_most_5(unit: Path, tmp_path: Path) -> None:
    copy = tmp_path / unit.name
    shutil.copy(unit, copy)
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", str(copy)],
                            capture_output=True, text=True, cwd=tmp_path)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


@pytest.mark.parametrize("unit", UNITS, ids=lambda path: path.name)
def test_unit_drops_root_and_keeps_the_mount_visible(unit: Path) -> None:
    """The daemon switches user after mounting, and no option gives the service a mount
    namespace of its own (its FUSE mount would then be invisible to the host)."""
    settings = [line.split("=", 1) for line in unit.read_text().splitlines()
                if "=" in line and not line.startswith("#")]
    keys = {key.strip(): value.strip() for key, value in settings}
    assert "--user lazymount" in keys["ExecStart"]
    hiding = {"ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts",
              "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
              "ProtectControlGroups", "ProtectProc", "ProcSubset", "ReadOnlyPaths",
              "InaccessiblePaths", "TemporaryFileSystem", "RootDirectory", "PrivateUsers"}
    assert not hiding & keys.keys()
