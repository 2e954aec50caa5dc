"""Registry credentials: a user name and a password (or access token) for one registry.

They come from the configuration (the config file, a Spack ``mirrors.yaml`` ``access_pair``)
or from a Docker ``config.json`` (``auths``: what ``docker login`` writes). A password is
never part of a ``repr``, a message or a log line; only the user name may be shown.
Credential helpers (``credsStore``, ``credHelpers``) are not run: lazymount runs no programs
named by a configuration file.

Pure functions apart from reading the Docker file.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lazymount.errors import UsageError

MAX_DOCKER_CONFIG = 1 << 20
# names Docker uses for its own registry in config.json; Spack's default domain is the first
DOCKER_HUB_NAMES = ("index.docker.io", "docker.io", "registry-1.docker.io")


@dataclass(frozen=True)
class Credentials:
    """A login for one registry. ``repr`` and ``str`` never show the password."""

    username: str
    password: str = field(repr=False)
    source: str = ""  # where they were found, for messages ("config.json", "mirrors.yaml")

    def basic(self) -> str:
        """The ``Authorization`` header value of HTTP Basic."""
        pair = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")


def default_docker_config() -> Path:
    """Where Docker keeps its client configuration: ``$DOCKER_CONFIG/config.json``, else
    ``~/.docker/config.json``."""
    folder = os.environ.get("DOCKER_CONFIG")
    return Path(folder) / "config.json" if folder else Path.home() / ".docker" / "config.json"


def read_docker_auths(path: Path) -> dict[str, Credentials]:
    """Registry host[:port] -> credentials, from a Docker ``config.json``'s ``auths``.

    A missing file gives no credentials. Raises UsageError for a file that cannot be read or
    parsed (the message never quotes its content).
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_DOCKER_CONFIG + 1)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_DOCKER_CONFIG:
        raise UsageError(f"{path} is larger than {MAX_DOCKER_CONFIG} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise UsageError(f"{path} is not JSON") from None
    auths = doc.get("auths") if isinstance(doc, dict) else None
    if auths is None:
        return {}
    if not isinstance(auths, dict):
        raise UsageError(f"{path}: 'auths' is not a mapping of registries")
    found: dict[str, Credentials] = {}
    for key, entry in auths.items():
        login = _docker_entry(entry, f"{path}: auths entry {str(key)[:100]!r}", str(path))
        if login is not None:
            for host in _registry_names(str(key)):
                found.setdefault(host, login)
    return found


def _docker_entry(entry: Any, what: str, source: str) -> Credentials | None:
    """The login of one ``auths`` entry: ``auth`` (base64 ``user:password``), else
    ``username`` + ``password``; None for an entry with neither (an identity token only)."""
    if not isinstance(entry, dict):
        raise UsageError(f"{what} is not a mapping")
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        try:
            text = base64.b64decode(encoded, validate=True).decode()
        except (binascii.Error, ValueError):
            raise UsageError(f"{what}: 'auth' is not base64 of user:password") from None
        username, colon, password = text.partition(":")
        if not colon or not username:
            raise UsageError(f"{what}: 'auth' is not base64 of user:password")
        return Credentials(username, password, source)
    user, secret = entry.get("username"), entry.get("password")
    if isinstance(user, str) and isinstance(secret, str) and user:
        return Credentials(user, secret, source)
    return None


def _registry_names(key: str) -> tuple[str, ...]:
    """The host[:port] names an ``auths`` key stands for: ``https://host/v1/`` -> ``host``;
    any Docker Hub name stands for all of them."""
    host = key.split("://", 1)[-1].split("/", 1)[0].lower()
    return DOCKER_HUB_NAMES if host in DOCKER_HUB_NAMES else (host,)


def from_environment(user_variable: str | None, user: str | None, password_variable: str,
                     what: str) -> Credentials:
    """Spack's ``access_pair`` form: the user name given or read from ``user_variable``, the
    password read from ``password_variable``. Raises UsageError naming an unset variable."""
    if user is None:
        if not user_variable or user_variable not in os.environ:
            raise UsageError(f"{what}: the user name variable {user_variable} is not set")
        user = os.environ[user_variable]
    password = os.environ.get(password_variable)
    if password is None:
        raise UsageError(f"{what}: the password variable {password_variable} is not set")
    return Credentials(user, password, what)


class RegistryLogins:
    """Finds the login of a registry: the configured ones first, then Docker's ``auths``
    (its file read once, when first needed). A Docker file given explicitly must be usable;
    a broken one at the default place only costs its logins (``notices`` says so), since a
    public registry needs none."""

    def __init__(self, configured: dict[str, Credentials], docker_config: Path | None):
        self.configured = {host.lower(): login for host, login in configured.items()}
        self.docker_config = docker_config
        self.notices: list[str] = []
        self._docker: dict[str, Credentials] | None = None

    def find(self, registry: str) -> Credentials | None:
        registry = registry.lower()
        if registry in self.configured:
            return self.configured[registry]
        if self._docker is None:
            self._docker = self._read_docker()
        return self._docker.get(registry)

    def _read_docker(self) -> dict[str, Credentials]:
        if self.docker_config is not None:
            return read_docker_auths(self.docker_config)
        try:
            return read_docker_auths(default_docker_config())
        except UsageError as exc:
            self.notices.append(f"{exc}; its registry logins are not used")
            return {}
