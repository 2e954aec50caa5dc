"""What one mount is told to do: frozen values built by the command line."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lazymount.buildcache.layout import DEFAULT_PROJECTION
from lazymount.install.limits import Limits
from lazymount.mirror.credentials import Credentials
from lazymount.mirror.timeouts import Timeouts


@dataclass(frozen=True)
class MirrorConfig:
    url: str
    require_signature: bool = True
    # the login to an OCI registry (its repr never shows the password)
    credentials: Credentials | None = field(default=None, compare=False)


@dataclass(frozen=True)
class MountConfig:
    mountpoint: Path
    mirrors: tuple[MirrorConfig, ...]
    trust_keys: tuple[Path, ...] = ()
    keyring: Path | None = None  # directory of trusted keys (lazymount keys ...)
    store: Path = Path("/var/cache/lazymount")
    projection: str = DEFAULT_PROJECTION
    allow_other: bool = False
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)  # bounds on one package's tarball
    store_quota: int | None = None  # bytes the store's packages may take on disk
    bind_ready: bool = False  # bind-mount ready packages on their prefixes (root only)
    ca_certs: Path | None = None  # CA bundle trusted for https mirrors, besides the default
    config_file: Path | None = None  # the file read (for reloads), if any
    index_refresh: float = 600.0  # seconds between index checks; 0: only when asked
    metrics_listen: tuple[str, int] | None = None  # (host, port) serving /metrics over HTTP
    host_target: str | None = None  # archspec name of the CPU to choose builds for; None: detect
    targets: str = "all"  # "host": hide the builds that CPU cannot run
    proxies: str | None = None  # proxy list (CernVM-FS syntax); None: the environment's
    user: str | None = None  # after mounting, run as this user (root only)
    shared_store: Path | None = None  # a store many nodes share (looked in first)
    host_view: bool = True  # serve host/
    tocs: tuple[str, ...] = ()  # where tables of contents are, besides each mirror
    fill: str = "read"  # "whole": an opened package is completed in the background
