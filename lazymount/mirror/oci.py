"""Getting bytes from an OCI registry (the distribution API) for an ``oci://`` build cache.

Paths are relative to the repository's API base ``…/v2/NAME``: ``manifests/<tag>`` and
``blobs/sha256:<hex>``. Everything else (deadlines, the rate check, retries of 5xx and 429,
bounded reads) is the HTTP transport's; this module adds what registries need:

* ``Accept`` for manifests: the OCI and the Docker image manifest types (a registry answers
  404 for an OCI manifest unless its type is accepted, 400 for a Docker one);
* logins (``RegistryAuth``): on 401, the ``WWW-Authenticate`` challenge says how. Bearer: a
  token from the challenge's realm (service, scope; anonymous, or with Basic credentials),
  kept until it expires and fetched again when the registry answers 401. Basic: the
  configured credentials. Credentials are never sent over plain HTTP;
* redirects (registries send blob downloads to object storage) are followed here, and the
  ``Authorization`` header is sent only to the registry itself, never to another origin;
* a few writes, for ``lazymount publish``: a blob (a monolithic upload: ``POST uploads/``,
  then ``PUT <Location>&digest=``) and a manifest under a tag. Bodies are small (held in
  memory), sent to the registry's own origin only, and not retried.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path
from urllib.parse import urlencode, urljoin, urlsplit

import httpx
import trio

from lazymount.errors import MirrorError
from lazymount.mirror.credentials import Credentials
from lazymount.mirror.ociref import OciReference
from lazymount.mirror.proxies import ProxyChain
from lazymount.mirror.transport import (
    HttpMirror,
    Timeouts,
    describe,
    redact,
    refuse_encoded,
)

log = logging.getLogger(__name__)

MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_ACCEPT = f"{MEDIA_OCI_MANIFEST}, {MEDIA_DOCKER_MANIFEST}"
MAX_REDIRECTS = 5
MAX_TOKEN_BYTES = 1 << 16
DEFAULT_TOKEN_LIFETIME = 60  # seconds; the token specification's default for expires_in
_REDIRECTS = frozenset({301, 302, 303, 307, 308})

# RFC 7235 challenges: a scheme, then name=value or name="quoted" parameters
_CHALLENGE_SCHEME = re.compile(r"\s*,?\s*([A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]*)\s*")
_PARAM = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


def parse_challenges(header: str) -> list[tuple[str, dict[str, str]]]:
    """``WWW-Authenticate`` -> [(scheme lower-cased, {param: value})], in the order given."""
    challenges: list[tuple[str, dict[str, str]]] = []
    position = 0
    while position < len(header):
        scheme = _CHALLENGE_SCHEME.match(header, position)
        if scheme is None or scheme.end() == position:
            break
        position = scheme.end()
        params: dict[str, str] = {}
        while True:
            param = _PARAM.match(header, position)
            if param is None:
                break
            quoted, plain = param.group(2), param.group(3)
            value = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else plain
            params[param.group(1).lower()] = value
            position = param.end()
        challenges.append((scheme.group(1).lower(), params))
    return challenges


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc.lower()


class RegistryAuth:
    """The login of one repository: the ``Authorization`` value to send, and how to get a
    new one when the registry answers 401. One login at a time (concurrent 401s share it)."""

    def __init__(self, ref: OciReference, credentials: Credentials | None):
        self.ref = ref
        self.credentials = credentials
        self.header: str | None = None
        self.expires = float("inf")  # time.monotonic() past which the header is not sent
        self.kind = "anonymous"  # what the status shows: anonymous, basic, bearer
        self._lock = trio.Lock()

    def current(self) -> str | None:
        if self.header is not None and time.monotonic() >= self.expires:
            self.header = None  # expired: the next request is anonymous, then a new login
        return self.header

    async def login(self, challenge: str, sent: str | None, client: httpx.AsyncClient,
                    url: str) -> str:
        """A new ``Authorization`` value after the registry answered 401 with ``challenge``
        to a request that carried ``sent``. Raises MirrorError when no login is possible."""
        async with self._lock:
            if self.current() is not None and self.header != sent:
                return self.header  # type: ignore[return-value]  # another request logged in
            challenges = dict(parse_challenges(challenge))
            if "bearer" in challenges and challenges["bearer"].get("realm"):
                header, lifetime = await self._token(challenges["bearer"], client, url)
                self.kind = "bearer"
            elif "basic" in challenges:
                header, lifetime = self._basic(url), None
                self.kind = "basic"
            else:
                shown = ", ".join(challenges) or "none"
                raise MirrorError(f"{url}: the registry asks for a login this client does not "
                                  f"speak (WWW-Authenticate schemes: {shown})")
            if header == sent:
                raise MirrorError(f"{url}: the registry {self.ref.domain} refused the login"
                                  f"{self.as_user()} (HTTP 401)")
            self.header = header
            self.expires = float("inf") if lifetime is None else time.monotonic() + lifetime
            return header

    def as_user(self) -> str:
        return f" of user {self.credentials.username!r}" if self.credentials else ""

    def _basic(self, url: str) -> str:
        if self.credentials is None:
            raise MirrorError(f"{url}: the registry {self.ref.domain} asks for a login and no "
                              "credentials are configured for it (config file, mirrors.yaml "
                              "access_pair or Docker config.json)")
        self._refuse_plain_http(url)
        return self.credentials.basic()

    def _refuse_plain_http(self, url: str) -> None:
        if urlsplit(url).scheme != "https":
            raise MirrorError(f"{url}: refusing to send the credentials for "
                              f"{self.ref.domain} over plain HTTP; use oci:// (HTTPS)")

    async def _token(self, params: dict[str, str], client: httpx.AsyncClient, url: str
                     ) -> tuple[str, float]:
        """``Bearer <token>`` from the challenge's realm, and how long to use it."""
        realm = params["realm"]
        if urlsplit(realm).scheme not in ("https", "http"):
            raise MirrorError(f"{url}: the registry's token realm {redact(realm[:200])!r} is "
                              "not an HTTP(S) URL")
        query = {"service": params.get("service", ""),
                 "scope": params.get("scope") or f"repository:{self.ref.name}:pull",
                 "client_id": "lazymount"}
        headers = {}
        if self.credentials is not None:
            self._refuse_plain_http(realm)
            headers["Authorization"] = self.credentials.basic()
        request = client.build_request("GET", realm, params=query, headers=headers)
        try:
            response = await client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise MirrorError(f"{url}: the token server {redact(realm[:200])} cannot be reached: "
                              f"{describe(exc)}") from None
        try:
            if response.status_code in (401, 403):
                raise MirrorError(f"{url}: the token server {urlsplit(realm).netloc} refused "
                                  f"the login{self.as_user()} (HTTP {response.status_code})")
            if response.status_code != 200:
                raise MirrorError(f"{url}: the token server {urlsplit(realm).netloc} answered "
                                  f"HTTP {response.status_code}")
            refuse_encoded(response, redact(realm[:200]))
            body = b""
            async for piece in response.aiter_raw():
                body += piece
                if len(body) > MAX_TOKEN_BYTES:
                    raise MirrorError(f"{url}: the token server's answer is larger than "
                                      f"{MAX_TOKEN_BYTES} bytes")
        finally:
            await response.aclose()
        token, lifetime = _read_token(body)
        if token is None:
            raise MirrorError(f"{url}: the token server {urlsplit(realm).netloc} sent no token")
        log.debug("%s: token for %s, valid %d s", self.ref.url, query["scope"], lifetime)
        # used a little less long than granted, so a request does not arrive just after
        return f"Bearer {token}", max(0.0, lifetime - min(10.0, lifetime / 10))


def _read_token(body: bytes) -> tuple[str | None, float]:
    """(token, lifetime in seconds) of a token server's JSON answer."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None, 0
    if not isinstance(doc, dict):
        return None, 0
    token = doc.get("token") or doc.get("access_token")
    if not isinstance(token, str) or not token or any(c in token for c in "\r\n"):
        return None, 0
    lifetime = doc.get("expires_in", DEFAULT_TOKEN_LIFETIME)
    if not isinstance(lifetime, int | float) or isinstance(lifetime, bool) or lifetime <= 0:
        lifetime = DEFAULT_TOKEN_LIFETIME
    return token, float(lifetime)


class OciMirror(HttpMirror):
    """One registry repository as a mirror; paths are ``manifests/…`` and ``blobs/…``."""

    kind = "oci"

    def __init__(self, ref: OciReference, timeouts: Timeouts, ca_certs: Path | None = None,
                 proxies: ProxyChain | None = None, credentials: Credentials | None = None):
        super().__init__(ref.url, timeouts, ca_certs, proxies, base=ref.api,
                         follow_redirects=False)
        self.ref = ref
        self.auth_state = RegistryAuth(ref, credentials)
        self.registry = _origin(ref.api)

    @property
    def login(self) -> str:
        """``anonymous``, ``basic`` or ``bearer`` (with the user's name when configured)."""
        user = self.auth_state.credentials
        return self.auth_state.kind + (f" as {user.username}" if user is not None
                                       and self.auth_state.kind != "anonymous" else "")

    async def _send_once(self, client: httpx.AsyncClient, url: str,
                         headers: dict[str, str] | None) -> httpx.Response:
        headers = dict(headers or {})
        if "/manifests/" in urlsplit(url).path:
            headers["Accept"] = MANIFEST_ACCEPT
        response = await self._to_registry(client, url, headers)
        for _ in range(MAX_REDIRECTS):
            if response.status_code not in _REDIRECTS or "location" not in response.headers:
                return response
            await response.aclose()
            url = urljoin(url, response.headers["location"])
            if _origin(url) == self.registry:
                response = await self._to_registry(client, url, headers)
            else:  # object storage, a CDN: the registry's login is not theirs to see
                response = await _plain(client, url, headers)
        await response.aclose()
        raise MirrorError(f"{redact(url)}: more than {MAX_REDIRECTS} redirects")  # (signed URLs)

    async def _to_registry(self, client: httpx.AsyncClient, url: str, headers: dict[str, str],
                           method: str = "GET", content: bytes | None = None
                           ) -> httpx.Response:
        """A request to the registry with the current login; on 401, log in (again) and
        repeat it once."""
        sent = self.auth_state.current()
        response = await _plain(client, url, _with_auth(headers, sent), method, content)
        if response.status_code != 401:
            return response
        challenge = response.headers.get("www-authenticate", "")
        await response.aclose()
        header = await self.auth_state.login(challenge, sent, client, url)
        response = await _plain(client, url, _with_auth(headers, header), method, content)
        if response.status_code == 401:
            await response.aclose()
            raise MirrorError(f"{url}: the registry {self.ref.domain} refused the login"
                              f"{self.auth_state.as_user()} (HTTP 401)")
        return response


    # ---- writes (``lazymount publish``) ----------------------------------------------------

    async def has_blob(self, digest: str) -> bool:
        """Whether the repository holds the blob ``sha256:<hex>``."""
        return await self._write("HEAD", f"blobs/{digest}") == 200

    async def push_blob(self, data: bytes) -> str:
        """Upload ``data`` unless the repository holds it already; its digest."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if await self.has_blob(digest):
            return digest
        status, location = await self._write_located("POST", "blobs/uploads/")
        if status != 202 or not location:
            raise MirrorError(f"{self.url}: the registry did not start an upload "
                              f"(HTTP {status})")
        target = urljoin(f"{self.base}/blobs/uploads/", location)
        if _origin(target) != self.registry:  # the upload (and the login) stay with it
            raise MirrorError(f"{self.url}: the registry sends the upload to another origin "
                              f"({redact(target[:200])}), which this client does not do")
        target += ("&" if "?" in target else "?") + urlencode({"digest": digest})
        status = await self._write("PUT", target, data,
                                   {"Content-Type": "application/octet-stream"})
        if status != 201:
            raise MirrorError(f"{self.url}: the registry refused the blob {digest[:19]} "
                              f"(HTTP {status})")
        return digest

    async def put_manifest(self, tag: str, body: bytes, media_type: str) -> None:
        """``body`` as the manifest tagged ``tag``."""
        status = await self._write("PUT", f"manifests/{tag}", body, {"Content-Type": media_type})
        if status != 201:
            raise MirrorError(f"{self.url}: the registry refused the manifest {tag} "
                              f"(HTTP {status})")

    async def _write(self, method: str, path: str, content: bytes | None = None,
                     headers: dict[str, str] | None = None) -> int:
        return (await self._write_located(method, path, content, headers))[0]

    async def _write_located(self, method: str, path: str, content: bytes | None = None,
                             headers: dict[str, str] | None = None) -> tuple[int, str | None]:
        """(status, Location) of one request to the registry (``path``: relative to the
        repository's API base, or a URL on the registry); its body is not read."""
        url = path if "://" in path else f"{self.base}/{path}"
        try:
            response = await self._to_registry(self.client, url, dict(headers or {}), method,
                                               content)
        except httpx.HTTPError as exc:
            raise MirrorError(f"{redact(url)}: {method} failed: {describe(exc)}") from None
        except MirrorError as exc:  # a login refused: anonymous logins may only pull
            if self.auth_state.credentials is not None:
                raise
            raise MirrorError(f"{exc}; writing needs a login allowed to push (`docker login "
                              f"{self.ref.domain}`)") from None
        await response.aclose()
        return response.status_code, response.headers.get("location")


async def _plain(client: httpx.AsyncClient, url: str, headers: dict[str, str],
                 method: str = "GET", content: bytes | None = None) -> httpx.Response:
    request = client.build_request(method, url, headers=headers, content=content)
    return await client.send(request, stream=True)


def _with_auth(headers: dict[str, str], value: str | None) -> dict[str, str]:
    return dict(headers, Authorization=value) if value else headers
