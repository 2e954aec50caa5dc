"""Proxy lists in CernVM-FS's syntax, and the health of each proxy.

``http://p1:3128|http://p2:3128;http://p3:3128;DIRECT`` is a chain of groups separated by
``;``; the members of a group (``|``) share the load, and the next group is used only when
every member of the groups before it has failed. ``DIRECT`` means no proxy.

Each node starts at the member of a group that its host name picks, so a rack of nodes
spreads over the group's proxies instead of all asking the first. A member that fails
(connection refused, timeout, a gateway error from the proxy) is put aside for a while
(``backoff``, doubling on each new failure up to ``max_backoff``) and tried again after that:
only the request that met the failure pays for it, the ones after go straight to a healthy
proxy. This module only keeps the order and the health; the HTTP transports send.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from lazymount.errors import UsageError
from lazymount.system.redact import redact_url

log = logging.getLogger(__name__)

DIRECT = "DIRECT"
BACKOFF = 30.0  # seconds a failed proxy is left aside, the first time
MAX_BACKOFF = 600.0
# answers a proxy gives when it, not the origin, is in trouble (squid: 502 cannot connect,
# 503 unavailable, 504 timed out talking upstream)
GATEWAY_ERRORS = frozenset({502, 503, 504})


@dataclass
class Proxy:
    """One member of a group: its URL (or DIRECT) and how it has been doing."""

    url: str
    failures: int = 0  # failures in a row
    down_until: float = 0.0  # clock time before which it is not asked first
    last_error: str = ""
    answered: int = 0  # requests it answered

    def up(self, now: float) -> bool:
        return now >= self.down_until

    @property
    def shown(self) -> str:
        """The URL without the user name and password it may carry, for logs and status."""
        return redact_url(self.url)


def parse_proxy_list(text: str) -> list[list[str]]:
    """The groups of a proxy list; raises UsageError naming what is wrong."""
    groups: list[list[str]] = []
    for group_text in text.split(";"):
        members = [member.strip() for member in group_text.split("|")]
        if not group_text.strip() or not all(members):
            raise UsageError(f"proxy list {text!r}: empty group or member (write "
                             "'http://p1:3128|http://p2:3128;DIRECT')")
        for member in members:
            _check_member(member, text)
        groups.append(members)
    return groups


def _check_member(member: str, text: str) -> None:
    if member == DIRECT:
        return
    parsed = urlparse(member)
    if parsed.scheme != "http" or not parsed.hostname:
        raise UsageError(f"proxy list {text!r}: {member!r} is not DIRECT nor an "
                         "http://HOST:PORT proxy")
    try:
        parsed.port  # noqa: B018 (a bad port raises here)
    except ValueError:
        raise UsageError(f"proxy list {text!r}: bad port in {member!r}") from None


def host_spread(host: str, group: int, size: int) -> int:
    """Which member of a group of ``size`` the node ``host`` asks first: stable for a node,
    spread evenly over a fleet's host names."""
    return zlib.crc32(f"{host}/{group}".encode()) % size


class ProxyChain:
    """The proxy groups of one daemon with their health; shared by all its mirrors."""

    def __init__(self, groups: list[list[str]], host: str | None = None,
                 backoff: float = BACKOFF, max_backoff: float = MAX_BACKOFF,
                 clock: Callable[[], float] = time.monotonic):
        host = host or socket.gethostname()
        self.groups: list[list[Proxy]] = []
        for number, urls in enumerate(groups):
            first = host_spread(host, number, len(urls))
            self.groups.append([Proxy(url) for url in urls[first:] + urls[:first]])
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.clock = clock

    @classmethod
    def parse(cls, text: str, **kwargs: Any) -> ProxyChain:
        return cls(parse_proxy_list(text), **kwargs)

    def order(self) -> list[Proxy]:
        """The proxies to try for one request, in order: the healthy members of each group
        (this node's first choice first), group after group; then those left aside, soonest
        back first, as a last resort (a request fails only when every proxy has)."""
        now = self.clock()
        members = [proxy for group in self.groups for proxy in group]
        healthy = [proxy for proxy in members if proxy.up(now)]
        resting = sorted((proxy for proxy in members if not proxy.up(now)),
                         key=lambda proxy: proxy.down_until)
        return healthy + resting

    def failed(self, proxy: Proxy, reason: str) -> None:
        """``proxy`` could not serve a request: leave it aside for a while."""
        proxy.failures += 1
        proxy.last_error = reason
        rest = min(self.max_backoff, self.backoff * 2 ** (proxy.failures - 1))
        proxy.down_until = self.clock() + rest
        log.warning("proxy %s failed (%s); not used for %.0f s", proxy.shown, reason, rest)

    def answered(self, proxy: Proxy) -> None:
        if proxy.failures:
            log.info("proxy %s answers again", proxy.shown)
        proxy.failures = 0
        proxy.down_until = 0.0
        proxy.answered += 1

    def status(self) -> list[dict[str, Any]]:
        """Each proxy's health, group by group (for ``lazymount status``)."""
        now = self.clock()
        return [{"proxy": proxy.shown, "group": number, "up": proxy.up(now),
                 "failures": proxy.failures, "answered": proxy.answered,
                 "last_error": proxy.last_error,
                 "retry_in": round(max(0.0, proxy.down_until - now), 1)}
                for number, group in enumerate(self.groups) for proxy in group]


def bypasses_proxies(url: str, no_proxy: str | None = None) -> bool:
    """True when ``NO_PROXY`` (or ``no_proxy``) names the host of ``url``: ``*``, the host
    itself, or a domain it is in (``example.org`` and ``.example.org`` both match
    ``cache.example.org``), optionally with the port."""
    if no_proxy is None:
        no_proxy = os.environ.get("NO_PROXY", os.environ.get("no_proxy", ""))
    parsed = urlparse(url)
    host = (parsed.hostname or "").lower()
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    for entry in (item.strip().lower() for item in no_proxy.split(",")):
        if entry == "*":
            return True
        name, _, entry_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if entry_port and entry_port != str(port):
            continue
        name = name.lstrip(".")
        if name and (host == name or host.endswith("." + name)):
            return True
    return False
