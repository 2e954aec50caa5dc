"""The TOML configuration file: one table per mount point, inheriting from ``[defaults]``.

::

    [defaults]
    trust_keys = ["/etc/lazymount/site.pub.asc"]

    [mounts."/opt/spack"]
    mirrors = ["https://cache.example.org/spack"]

Every key is declared once, in ``KEYS``: its TOML type and parser, and the command-line
option that overrides it. A feature adds its key there and nowhere else; the command line
and the file then accept it alike. Keys in ``NOT_YET`` are names a later version will use:
they are refused with that reason instead of being taken as working.

The whole file is checked before anything is mounted; an error names the file, the table
and the key. Paths in the file are relative to the file's directory.
"""

from __future__ import annotations

import argparse
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lazymount.errors import UsageError
from lazymount.mirror.credentials import Credentials
from lazymount.mirror.ociref import is_oci_url, parse_oci_url
from lazymount.mirror.proxies import parse_proxy_list
from lazymount.system import sizes
from lazymount.system.files import FileTooLarge, read_bounded
from lazymount.system.places import default_dir
from lazymount.system.redact import redact

DEFAULTS_TABLE = "defaults"
MOUNTS_TABLE = "mounts"
MAX_CONFIG_BYTES = 1 << 20


class ConfigError(UsageError):
    """The configuration file cannot be used; the message names file, table and key."""


def default_config_file() -> Path:
    """/etc/lazymount/config.toml for root, the XDG config directory otherwise."""
    return default_dir("/etc/lazymount", "XDG_CONFIG_HOME", "~/.config") / "config.toml"


# ---- value parsers: a TOML value (or a command-line string) -> the value, or ValueError ----

Parse = Callable[[Any, Path], Any]  # (value, directory relative paths start from) -> value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_kind(value)}")
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def parse_path(value: Any, base: Path) -> Path:
    """A path; ``~`` is expanded, a relative one starts from ``base``."""
    return (base / Path(_text(value)).expanduser()).absolute()


def parse_url(value: Any, base: Path) -> str:
    """A mirror: a directory (relative to ``base``), ``file://``, ``http(s)://``, ``oci://``
    or ``oci+http://`` URL."""
    text = _text(value).strip()
    scheme = urlparse(text).scheme
    if scheme in ("http", "https", "file"):
        return text
    if is_oci_url(text):
        try:
            parse_oci_url(text)
        except UsageError as exc:
            raise ValueError(str(exc)) from None
        return text
    if scheme == "":
        return str(parse_path(text, base))
    raise ValueError(f"{text!r}: unsupported scheme {scheme!r} (use a path, file://, "
                     "http(s)://, oci:// or oci+http://)")


def parse_registries(value: Any, base: Path) -> dict[str, Credentials]:
    """Logins for OCI registries: ``{"HOST[:PORT]": {username, password_file | password}}``.
    A password file holds the password (or token) on its first line; it is read here, once."""
    if not isinstance(value, dict):
        raise ValueError(f"expected a table of registries, got {_kind(value)}")
    return {host.lower(): _registry_login(table, f"registry {host!r}", base)
            for host, table in value.items()}


def _registry_login(table: Any, where: str, base: Path) -> Credentials:
    if not isinstance(table, dict):
        raise ValueError(f"{where}: expected a table with username and password_file")
    unknown = set(table) - {"username", "password", "password_file"}
    if unknown:
        raise ValueError(f"{where}: unknown key {sorted(unknown)[0]!r} (known: username, "
                         "password, password_file)")
    username = table.get("username")
    if not isinstance(username, str) or not username:
        raise ValueError(f"{where}: username must be a non-empty string")
    if ("password" in table) == ("password_file" in table):
        raise ValueError(f"{where}: give one of password_file and password")
    if "password" in table:
        secret = table["password"]
        if not isinstance(secret, str) or not secret:
            raise ValueError(f"{where}: password must be a non-empty string")
        return Credentials(username, secret, "the configuration file")
    path = parse_path(table["password_file"], base)
    try:
        lines = read_bounded(path, MAX_CONFIG_BYTES).decode().splitlines()
    except (OSError, UnicodeDecodeError) as exc:  # FileTooLarge is an OSError
        raise ValueError(f"{where}: cannot read password_file {path}: "
                         f"{getattr(exc, 'strerror', None) or exc}") from None
    if not lines or not lines[0]:
        raise ValueError(f"{where}: password_file {path} is empty")
    return Credentials(username, lines[0], "the configuration file")


def parse_text(value: Any, base: Path) -> str:
    return _text(value)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any, base: Path) -> float:
    """Seconds, from a number (seconds) or a string like ``"90s"``, ``"10m"``, ``"1h30m"``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like \"10m\", got {_kind(value)}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = _text(value).strip().lower()
        if re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = float(text)
        else:
            parts = _DURATION.findall(text)
            if not parts or _DURATION.sub("", text).strip():
                raise ValueError(f"{value!r} is not a duration (like 30s, 10m, 1h30m)")
            seconds = sum(float(number) * _SECONDS[unit] for number, unit in parts)
    if seconds < 0:
        raise ValueError(f"{value!r} is negative")
    return seconds


def parse_positive_duration(value: Any, base: Path) -> float:
    seconds = parse_duration(value, base)
    if seconds <= 0:
        raise ValueError(f"{value!r} must be more than zero")
    return seconds


def parse_refresh(value: Any, base: Path) -> float:
    """``index_refresh``: a duration, or ``"off"`` / 0 for never (only on request)."""
    if isinstance(value, str) and value.strip().lower() in ("off", "never"):
        return 0.0
    seconds = parse_duration(value, base)
    if 0 < seconds < 1:
        raise ValueError(f"{value!r} is too often (at least 1s, or \"off\")")
    return seconds


def parse_size(value: Any, base: Path) -> int:
    """A positive byte count: an integer, or a string with a binary-unit suffix (``"64G"``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"{value} must be more than zero")
        return value
    return sizes.parse_size(_text(value))


def parse_listen(value: Any, base: Path) -> tuple[str, int]:
    """``"127.0.0.1:9100"`` or ``"[::1]:9100"`` -> (host, port)."""
    text = _text(value).strip()
    match = re.fullmatch(r"(?:\[([0-9A-Fa-f:.]+)\]|([^:\[\]]+)):(\d{1,5})", text)
    if not match or not 0 < int(match.group(3)) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT (like 127.0.0.1:9101)")
    return (match.group(1) or match.group(2), int(match.group(3)))


def parse_host_target(value: Any, base: Path) -> str:
    """An archspec microarchitecture name (``zen2``, ``x86_64_v3``, ``neoverse_v1``...)."""
    from lazymount.catalog.hosttarget import unknown_target  # archspec: only when given

    name = _text(value).strip()
    problem = unknown_target(name)
    if problem is not None:
        raise ValueError(problem)
    return name


def parse_targets(value: Any, base: Path) -> str:
    from lazymount.catalog.hosttarget import TARGET_CHOICES

    text = _text(value).strip()
    if text not in TARGET_CHOICES:
        raise ValueError(f"{text!r} is not one of {', '.join(TARGET_CHOICES)}")
    return text


def parse_fill(value: Any, base: Path) -> str:
    text = _text(value).strip()
    if text not in ("read", "whole"):
        raise ValueError(f"{text!r} is not read or whole")
    return text


def parse_proxies(value: Any, base: Path) -> str:
    """A proxy list in CernVM-FS syntax (``"http://p1:3128|http://p2:3128;DIRECT"``)."""
    text = _text(value).strip()
    try:
        parse_proxy_list(text)
    except UsageError as exc:
        raise ValueError(str(exc)) from None
    return text


def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "a list", dict: "a table"}
    return names.get(type(value), type(value).__name__)


# ---- the schema ------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """One setting: its name in the file (also the attribute on the parsed command line),
    how its value is read, and the command-line option that overrides it.

    ``shape``: ``"value"`` (one value), ``"list"`` (a TOML list; the option is repeated) or
    ``"flag"`` (a boolean; ``--x`` / ``--no-x``)."""

    name: str
    parse: Parse | None  # None for flags
    help: str
    flag: str | None = None  # "--mirror"; None: settable in the file only
    shape: str = "value"
    metavar: str | None = None
    default: Any = None  # when neither the file nor the command line says

    def read(self, value: Any, base: Path) -> Any:
        """The file's ``value`` checked and converted; ValueError says what is wrong."""
        if self.shape == "flag":
            if not isinstance(value, bool):
                raise ValueError(f"expected true or false, got {_kind(value)}")
            return value
        assert self.parse is not None
        if self.shape == "list":
            if isinstance(value, str):  # one item needs no brackets
                value = [value]
            if not isinstance(value, list):
                raise ValueError(f"expected a list, got {_kind(value)}")
            items = []
            for position, item in enumerate(value):
                try:
                    items.append(self.parse(item, base))
                except ValueError as exc:
                    raise ValueError(f"item {position + 1}: {exc}") from None
            return items
        return self.parse(value, base)


KEYS: dict[str, Key] = {key.name: key for key in (
    Key("mirrors", parse_url, shape="list", flag="--mirror", metavar="URL",
        help="build cache to mount: a directory, file://, http(s)://, oci://HOST/NAME or "
             "oci+http://HOST/NAME (an OCI registry repository) URL. Repeat to "
             "search several mirrors in the order given; a package is taken from the first "
             "mirror that has it"),
    Key("spack_mirrors", parse_path, shape="list", flag="--spack-mirrors", metavar="FILE",
        help="Spack mirrors.yaml whose binary mirrors to mount, in its order, after any "
             "--mirror (source-only mirrors are skipped; signed: false lifts the signature "
             "check for that mirror)"),
    Key("trust_keys", parse_path, shape="list", flag="--trust-key", metavar="FILE",
        help="ASCII-armored public key whose signatures are trusted (repeat for several "
             "keys). Only manifests signed by these keys are used"),
    Key("keyring", parse_path, flag="--keyring", metavar="DIR",
        help="directory of trusted public keys, managed with `lazymount keys`; its keys are "
             "trusted in addition to any --trust-key (default: /etc/lazymount/keys for root, "
             "$XDG_CONFIG_HOME/lazymount/keys otherwise)"),
    Key("unsigned", None, shape="flag", flag="--unsigned", default=False,
        help="accept packages whose manifests are not signed (for mirrors you control end "
             "to end); signed manifests are still verified. OCI registry caches (oci://) "
             "are never signed and need this"),
    Key("store", parse_path, flag="--store", metavar="DIR",
        help="local content store of materialized packages; a remount reuses what it holds "
             "(default: /var/cache/lazymount for root, $XDG_CACHE_HOME/lazymount otherwise)"),
    Key("store_quota", parse_size, flag="--store-quota", metavar="SIZE",
        help="most the store's packages may take on disk (K, M, G, T: binary units); "
             "when a new package would pass it, whole packages not in use are evicted, "
             "least recently used first, down to 90%% of it (default: no limit)"),
    Key("projection", parse_text, flag="--projection", metavar="TEMPLATE",
        help="install tree projection (default: Spack 1.x's, "
             "{architecture.platform}-{architecture.target}/{name}-{version}-{hash})"),
    Key("timeout", parse_positive_duration, flag="--timeout", metavar="SECONDS", default=30.0,
        help="give up on a mirror that sends nothing for this long, or whose download is "
             "still below 256 KiB/s on average after it (default: 30)"),
    Key("ca_certs", parse_path, flag="--ca-certs", metavar="FILE",
        help="CA bundle (PEM file or directory) trusted for https:// mirrors, in addition "
             "to the default ones (and SSL_CERT_FILE); for a site's private CA"),
    Key("proxies", parse_proxies, flag="--proxy", metavar="LIST",
        help="HTTP proxies in CernVM-FS syntax, e.g. \"http://p1:3128|http://p2:3128;DIRECT\": "
             "'|' shares the load within a group (each host starts at its own member), ';' "
             "fails over to the next group; a failing proxy is skipped for a while. Hosts in "
             "NO_PROXY are reached directly. Default: the http_proxy/https_proxy environment"),
    Key("shared_store", parse_path, flag="--shared-store", metavar="DIR",
        help="a store on a shared file system that many nodes use at once: packages "
             "published there by any node are used, and this node materializes into it "
             "(publishing with one rename, no locks); where it is read-only, the packages it "
             "lacks go to the local --store"),
    Key("index_refresh", parse_refresh, flag="--index-refresh", metavar="DURATION",
        default=600.0,
        help="check the mirrors' index for new packages this often, with one conditional "
             "request each (e.g. 90s, 10m, 1h; \"off\": only on `lazymount refresh`; "
             "default: 10m)"),
    Key("docker_config", parse_path, flag="--docker-config", metavar="FILE",
        help="Docker client configuration whose 'auths' (what docker login writes) log in to "
             "oci:// registries (default: $DOCKER_CONFIG/config.json, else "
             "~/.docker/config.json, if present); credential helpers are not run"),
    Key("registries", parse_registries,
        help="logins for oci:// registries, one table per HOST[:PORT] with username and "
             "password_file (or password); they win over the Docker configuration"),
    Key("user", parse_text, flag="--user", metavar="NAME",
        help="when started as root: mount, then run as this user for good (it must own the "
             "store; docs/SERVICE.md's install step creates the system user lazymount), keeping "
             "only CAP_SYS_ADMIN; nothing from a mirror is read as root"),
    Key("allow_other", None, shape="flag", flag="--allow-other",
        help="let other users see the mount (default: on when run as root)"),
    Key("bind_ready", None, shape="flag", flag="--bind-ready", default=False,
        help="once a package is materialized, bind-mount its store tree read-only on its "
             "prefix, so the kernel serves it at local-disk speed without FUSE (needs root; "
             "unmount with lazymount umount)"),
    Key("host_target", parse_host_target, flag="--host-target", metavar="NAME",
        help="the CPU host/ chooses builds for, as an archspec microarchitecture name (zen2, "
             "x86_64_v3, neoverse_v1...); default: this machine's, detected by archspec. "
             "To serve another partition's view"),
    Key("host_view", None, shape="flag", flag="--host-view", default=True,
        help="serve <mount>/host/<name>/<version>, a link to the best build of each version "
             "for the host target, and its modules in <mount>/modules/host/ (default: on)"),
    Key("targets", parse_targets, flag="--targets", metavar="all|host", default="all",
        help="which builds to show under <platform>-<target>/: all (default), or host: only "
             "those the host target can run (Spack's upstream database still lists all)"),
    Key("toc", parse_url, shape="list", flag="--toc", metavar="URL",
        help="where tables of contents (`lazymount publish`) are, besides each mirror "
             "itself: a package whose tarball has one signed by a trusted key is opened "
             "file by file, fetching only what is read (repeat for several places)"),
    Key("fill", parse_fill, flag="--fill", metavar="read|whole", default="read",
        help="what an opened package fetches: read (default: only the files read), or "
             "whole: the rest of it too, in the background"),
    Key("metrics_listen", parse_listen, flag="--metrics-listen", metavar="HOST:PORT",
        help="also serve the Prometheus metrics over HTTP at http://HOST:PORT/metrics"),
)}

# names a later version gives meaning to: refused rather than silently ignored
NOT_YET: dict[str, str] = {
}


def add_options(parser: argparse.ArgumentParser) -> None:
    """Add the command-line option of every key that has one. Their defaults are None
    (not given): ``settings`` then takes the file's value, else the key's default."""
    for key in KEYS.values():
        if key.flag is None:
            continue
        if key.shape == "flag":
            parser.add_argument(key.flag, dest=key.name, default=None,
                                action=argparse.BooleanOptionalAction, help=key.help)
            continue
        parser.add_argument(key.flag, dest=key.name, default=None, metavar=key.metavar,
                            type=_option_type(key), help=key.help,
                            action="append" if key.shape == "list" else "store")


def _option_type(key: Key) -> Callable[[str], Any]:
    parse = key.parse
    assert parse is not None

    def convert(text: str) -> Any:
        _refuse_secret(key, text)
        try:
            return parse(text, Path.cwd())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = key.name
    return convert


def _refuse_secret(key: Key, text: str) -> None:
    """A command line is readable by every user of the host (``ps``, /proc/PID/cmdline, and
    the background daemon's too): a URL with a user name, password or token in it is
    refused there, naming the configuration file, where it stays private."""
    if redact(text) != text:
        raise argparse.ArgumentTypeError(
            f"{redact(text)}: a user name, password or token in a URL is not taken from the "
            "command line, where every user can read it (ps); give it in the configuration "
            f"file instead ({key.name} = ... in its [mounts.\"MOUNTPOINT\"] table; "
            "docs/SECURITY.md)")


# ---- the file ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigFile:
    """A checked configuration file: every table's values, already converted."""

    path: Path | None  # None: no file
    defaults: dict[str, Any]
    mounts: dict[str, dict[str, Any]]  # normalized absolute mount point -> its own values

    def for_mount(self, mountpoint: Path) -> dict[str, Any]:
        """The file's values for ``mountpoint``: its table over ``[defaults]``."""
        return {**self.defaults, **self.mounts.get(mount_key(mountpoint), {})}

    def has_mount(self, mountpoint: Path) -> bool:
        return mount_key(mountpoint) in self.mounts


def mount_key(mountpoint: Path | str) -> str:
    return os.path.normpath(os.path.abspath(mountpoint))


EMPTY = ConfigFile(None, {}, {})


def load(path: Path | None) -> ConfigFile:
    """Read and check ``path`` (``--config``: must exist), or the default file if there is
    one. Raises ConfigError naming the file, table and key of the first problem."""
    if path is None:
        path = default_config_file()
        if not path.exists():
            return EMPTY
    try:
        data = read_bounded(path, MAX_CONFIG_BYTES)
    except FileTooLarge:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes") from None
    except OSError as exc:
        raise ConfigError(f"cannot read the configuration file {path}: {exc.strerror}") from None
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_document(document, path)


def parse_document(document: dict[str, Any], path: Path) -> ConfigFile:
    base = path.absolute().parent
    for name in document:
        if name not in (DEFAULTS_TABLE, MOUNTS_TABLE):
            raise ConfigError(f"{path}: unknown table [{name}] (expected [{DEFAULTS_TABLE}] "
                              f"and [{MOUNTS_TABLE}.\"/mount/point\"] tables)")
    defaults = _table(document.get(DEFAULTS_TABLE, {}), f"[{DEFAULTS_TABLE}]", path, base)
    mounts_table = document.get(MOUNTS_TABLE, {})
    if not isinstance(mounts_table, dict):
        raise ConfigError(f"{path}: {MOUNTS_TABLE} must be tables like "
                          f"[{MOUNTS_TABLE}.\"/opt/spack\"]")
    mounts: dict[str, dict[str, Any]] = {}
    for mountpoint, table in mounts_table.items():
        where = f"[{MOUNTS_TABLE}.\"{mountpoint}\"]"
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {MOUNTS_TABLE}.\"{mountpoint}\" must be a table "
                              f"({where}), not {_kind(table)}")
        if not mountpoint.startswith("/"):
            raise ConfigError(f"{path}: {where}: the mount point must be an absolute path")
        key = mount_key(mountpoint)
        if key in mounts:
            raise ConfigError(f"{path}: {where}: {key} has two tables")
        mounts[key] = _table(table, where, path, base)
    return ConfigFile(path, defaults, mounts)


def _table(table: Any, where: str, path: Path, base: Path) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: {where} must be a table, not {_kind(table)}")
    values: dict[str, Any] = {}
    for name, value in table.items():
        key = KEYS.get(name)
        if key is None:
            if name in NOT_YET:
                raise ConfigError(f"{path}: {where} {name}: not supported yet ({NOT_YET[name]} "
                                  "is not built in this version of lazymount)")
            raise ConfigError(f"{path}: {where} {name}: unknown key (known: "
                              f"{', '.join(sorted(KEYS))})")
        try:
            values[name] = key.read(value, base)
        except ValueError as exc:
            raise ConfigError(f"{path}: {where} {name}: {exc}") from None
    return values


def settings(args: argparse.Namespace, config: ConfigFile, mountpoint: Path) -> dict[str, Any]:
    """Every key's value for one mount: the command line's if given, else the file's (the
    mount's table, then ``[defaults]``), else the key's default. A list given on the
    command line replaces the file's list."""
    from_file = config.for_mount(mountpoint)
    values: dict[str, Any] = {}
    for name, key in KEYS.items():
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
        elif name in from_file:
            values[name] = from_file[name]
        else:
            values[name] = list(key.default or []) if key.shape == "list" else key.default
    return values
