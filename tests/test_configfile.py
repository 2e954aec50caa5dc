"""The TOML configuration file: what it accepts, what it refuses and how it is reported."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from lazymount import configfile
from lazymount.configfile import ConfigError


def load_text(tmp_path: Path, text: str) -> configfile.ConfigFile:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return configfile.load(path)


def parsed(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configfile.add_options(parser)
    return parser.parse_args(list(argv))


def test_mount_table_inherits_defaults_and_paths_start_at_the_file(tmp_path):
    config = load_text(tmp_path, """
        [defaults]
        trust_keys = ["keys/site.pub.asc"]
        timeout = 12

        [mounts."/opt/spack/"]
        mirrors = ["https://cache.example.org/spack", "mirror-dir"]
        ca_certs = "/etc/ssl/site-ca.pem"
        allow_other = false
    """)
    values = configfile.settings(parsed(), config, Path("/opt/spack"))
    assert values["mirrors"] == ["https://cache.example.org/spack", str(tmp_path / "mirror-dir")]
    assert values["trust_keys"] == [tmp_path / "keys" / "site.pub.asc"]
    assert values["timeout"] == 12.0
    assert values["ca_certs"] == Path("/etc/ssl/site-ca.pem")
    assert values["allow_other"] is False
    assert values["unsigned"] is False and values["store"] is None
    # another mount point gets the defaults only
    other = configfile.settings(parsed(), config, Path("/opt/other"))
    assert other["mirrors"] == [] and other["timeout"] == 12.0


def test_command_line_overrides_the_file(tmp_path):
    config = load_text(tmp_path, """
        [mounts."/opt/spack"]
        mirrors = ["https://a.example.org"]
        timeout = 12
        bind_ready = true
    """)
    args = parsed("--mirror", "https://b.example.org", "--timeout", "3", "--no-bind-ready")
    values = configfile.settings(args, config, Path("/opt/spack"))
    assert values["mirrors"] == ["https://b.example.org"]
    assert values["timeout"] == 3.0
    assert values["bind_ready"] is False


@pytest.mark.parametrize(("text", "message"), [
    ('[mounts."/opt/spack"]\nmirror = ["x"]\n',
     '[mounts."/opt/spack"] mirror: unknown key'),
    ('[defaults]\ntimeout = "soon"\n',
     "[defaults] timeout: 'soon' is not a duration"),
    ('[defaults]\ntimeout = 0\n', "[defaults] timeout: 0 must be more than zero"),
    ('[mounts."/opt/spack"]\nmirrors = "ftp://x"\n',
     '[mounts."/opt/spack"] mirrors: item 1: \'ftp://x\': unsupported scheme'),
    ('[mounts."/opt/spack"]\nallow_other = "yes"\n',
     '[mounts."/opt/spack"] allow_other: expected true or false, got a string'),
    ('[mounts."/opt/spack"]\ntrust_keys = [1]\n',
     '[mounts."/opt/spack"] trust_keys: item 1: expected a string, got an integer'),
    ('[mounts."/opt/spack"]\nstore_quota = "lots"\n',
     '[mounts."/opt/spack"] store_quota: \'lots\' is not a size'),
    ('[mounts."opt/spack"]\nmirrors = []\n', "the mount point must be an absolute path"),
    ('[mount."/opt/spack"]\nmirrors = []\n', "unknown table [mount]"),
    ('[defaults]\nmirrors = [\n', "not valid TOML"),
])
def test_bad_file_is_refused_naming_file_table_and_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as error:
        load_text(tmp_path, text)
    assert str(error.value).startswith(f"{tmp_path / 'config.toml'}: ")
    assert message in str(error.value)


def test_given_config_file_must_exist_default_one_may_be_absent(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="cannot read the configuration file"):
        configfile.load(tmp_path / "missing.toml")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    if configfile.default_config_file() == Path("/etc/lazymount/config.toml"):
        pytest.skip("run as root: the default file is the system one")
    assert configfile.load(None) == configfile.EMPTY


def test_durations():
    read = configfile.parse_refresh
    assert read("90s", Path()) == 90 and read("10m", Path()) == 600
    assert read("1h30m", Path()) == 5400 and read(45, Path()) == 45
    assert read("off", Path()) == 0 and read("0", Path()) == 0
    with pytest.raises(ValueError):
        read("0.5s", Path())
    with pytest.raises(ValueError):
        read("10 minutes", Path())
