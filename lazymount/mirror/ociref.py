"""Where an OCI build cache lives: ``oci://HOST[:PORT]/NAME`` and ``oci+http://…`` mirror URLs.

A registry repository holds one build cache; its packages are tags of that repository. The
repository is named as Docker names images, and Spack applies the same rules (so the same
mirror URL means the same repository to both):

* ``NAME`` alone is a Docker Hub official image: ``index.docker.io``, ``library/NAME``;
* a first component without ``.`` or ``:`` that is not ``localhost`` (and is lower-case) is
  a Docker Hub user, not a host: ``user/image`` is ``index.docker.io``, ``user/image``;
* the repository name is lower-cased (``ghcr.io/Org/Name`` is ``org/name``);
* a ``:TAG`` is ignored (each request names its own tag); a ``@DIGEST`` is refused.

Pure functions; no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lazymount.errors import UsageError

SCHEMES = {"oci://": "https", "oci+http://": "http"}
DOCKER_HUB = "index.docker.io"

_ALNUM = r"[a-zA-Z0-9]+"
_SEPARATOR = r"(?:[._]|__|-+)"
_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_HOST_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = rf"(?:{_HOST_PART}(?:\.{_HOST_PART})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
_REFERENCE = re.compile(
    rf"(?:(?P<domain>{_HOST})/)?(?P<name>{_COMPONENT}(?:/{_COMPONENT})*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?(?P<digest>@.*)?"
)


@dataclass(frozen=True)
class OciReference:
    """One registry repository: the scheme requests use, the registry, the repository."""

    scheme: str  # "https" (oci://) or "http" (oci+http://)
    domain: str  # host[:port] as requests address it
    name: str  # repository, lower-case, e.g. "org/buildcache"

    @property
    def url(self) -> str:
        """The mirror URL in its normal form (what messages and the stored catalog use)."""
        prefix = "oci://" if self.scheme == "https" else "oci+http://"
        return f"{prefix}{self.domain}/{self.name}"

    @property
    def api(self) -> str:
        """Base of the repository's distribution API: ``…/v2/NAME``."""
        return f"{self.scheme}://{self.domain}/v2/{self.name}"


def is_oci_url(url: str) -> bool:
    return any(url.startswith(prefix) for prefix in SCHEMES)


def parse_oci_url(url: str) -> OciReference:
    """The repository an ``oci://`` or ``oci+http://`` URL names. Raises UsageError."""
    prefix = next((p for p in SCHEMES if url.startswith(p)), None)
    if prefix is None:
        raise UsageError(f"{url} is not an oci:// or oci+http:// URL")
    scheme, rest = SCHEMES[prefix], url[len(prefix):].rstrip("/")
    match = _REFERENCE.fullmatch(rest)
    if match is None:
        raise UsageError(f"mirror {url}: not a registry repository (expected "
                         f"{prefix}HOST[:PORT]/NAME, NAME made of [a-z0-9._-] parts)")
    if match["digest"]:
        raise UsageError(f"mirror {url}: a build cache is a repository, not one image; "
                         "remove the @digest")
    domain, name = match["domain"], match["name"]
    if not domain:
        domain, name = DOCKER_HUB, f"library/{name}"
    elif "." not in domain and ":" not in domain and domain != "localhost" \
            and domain == domain.lower():
        domain, name = DOCKER_HUB, f"{domain}/{name}"
    return OciReference(scheme, domain, name.lower())


def registry_of(url: str) -> str:
    """The registry (host[:port]) an OCI mirror URL talks to."""
    return parse_oci_url(url).domain
