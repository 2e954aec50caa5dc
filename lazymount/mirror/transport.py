"""Getting bytes from a mirror: a local directory, ``file://`` or ``http(s)://`` (and an OCI
registry, ``oci.py``, which builds on the HTTP transport here).

Every call has a bound: a dead or trickling mirror ends in a ``MirrorError`` with the URL
and the reason, never in a hang. Bodies are asked for and read as sent (``Accept-Encoding:
identity``); one encoded in transit is refused, never decoded. All functions here run on
the trio thread (local file reads hop to a worker thread).
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import trio

from lazymount.errors import MirrorError, NotInMirror, UsageError
from lazymount.mirror.credentials import Credentials
from lazymount.mirror.ociref import is_oci_url, parse_oci_url
from lazymount.mirror.proxies import DIRECT, GATEWAY_ERRORS, Proxy, ProxyChain, bypasses_proxies
from lazymount.mirror.timeouts import Timeouts
from lazymount.system.redact import redact as redact_text
from lazymount.system.redact import redact_url

if TYPE_CHECKING:  # imported with the first HTTP client (load_http)
    import httpx

CHUNK = 1 << 20
# httpcore receives HTTP/1.1 bodies 64 KiB at a time, and each receive is a round through
# trio, h11 and the GIL, on the thread that also serves the file system: 1 MiB receives make
# a big blob fewer rounds, so it materializes sooner (bench part "big" measures it)
RECEIVE_BYTES = 1 << 20


def load_http() -> None:
    """Import httpx and mend httpcore, once, before the first HTTP client: a mount served
    from its stored catalog asks its mirrors nothing before it is up (and a folder mirror
    never), and the two cost every mount's start 20-30 ms."""
    import httpcore

    if getattr(httpcore.AsyncHTTP11Connection, "READ_NUM_BYTES", 0) < RECEIVE_BYTES:
        httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = RECEIVE_BYTES
        _close_cancelled_handshakes()


def _close_cancelled_handshakes() -> None:
    """httpcore's trio backend closes the connection of a TLS handshake that fails with an
    ``Exception``, not of one cancelled (``trio.Cancelled`` is a ``BaseException``): each
    request whose deadline fell during a handshake left a socket open for good. Close it
    then too."""
    try:
        from httpcore._backends.trio import TrioStream
    except ImportError:  # another httpcore: nothing to mend here
        return
    start_tls = TrioStream.start_tls
    if getattr(start_tls, "closes_when_cancelled", False):
        return

    async def closing_start_tls(self: TrioStream, *args: Any, **kwargs: Any) -> Any:
        try:
            return await start_tls(self, *args, **kwargs)
        except BaseException:
            with trio.CancelScope() as closing:  # as trio.aclose_forcefully: the socket is
                closing.cancel()                 # closed at once, cancelled or not
                await self.aclose()
            raise

    closing_start_tls.closes_when_cancelled = True  # type: ignore[attr-defined]
    TrioStream.start_tls = closing_start_tls  # type: ignore[method-assign]


# asked of a shared cache for what may change under the same URL (the index and its
# manifest): it must check with the origin, so a refresh sees a new index
REVALIDATE = {"Cache-Control": "max-age=0"}
# bodies are asked for as they are (Spack's blobs are compressed already) and taken raw: a
# stacked "gzip, gzip" or a "zstd" body of a few KiB inflates to gigabytes in one decoding
# step, before any size limit could see it
HEADERS = {"User-Agent": "lazymount", "Accept-Encoding": "identity"}


@dataclass
class MirrorHealth:
    """How a mirror has been answering, for ``lazymount status``: kept by its transport."""

    state: str = "unknown"  # "ok" once it answered, "failing" while its last request failed
    last_error: str | None = None
    last_error_at: float | None = None  # time.time()
    last_ok_at: float | None = None
    fetched_bytes: int = 0  # body bytes received since the mount started

    def answered(self) -> None:
        self.state, self.last_ok_at = "ok", time.time()

    def failed(self, reason: str) -> None:
        # a library's text may name a URL of its own (a redirect's target): shown redacted
        self.state, self.last_error, self.last_error_at = "failing", redact_text(reason), \
            time.time()


class Mirror:
    """One mirror root. ``path`` arguments are mirror-relative ("v3/manifests/...").
    ``url`` is how it is named in messages and status: never with a password in it."""

    url: str
    proxy_chain: ProxyChain | None = None  # the proxies configured (HTTP mirrors)
    health: MirrorHealth
    kind = "url"  # "url": a build cache laid out as files; "oci": a registry repository

    @property
    def login(self) -> str | None:
        """How requests are authenticated, for status (never a secret): None where the
        mirror has no login of its own."""
        return None

    async def read(self, path: str, max_bytes: int, *, revalidate: bool = False) -> bytes:
        """Whole small file; refuses files over ``max_bytes``. ``revalidate``: the file may
        change under its name (an index), so a cache between us and the mirror must not
        answer it without asking the mirror. Everything else is immutable and cacheable."""
        async with self.open(path, expected=None, revalidate=revalidate) as stream:
            return await _gather(stream, max_bytes, self.where(path))

    def where(self, path: str) -> str:
        """How the file ``path`` is named in messages (never with a secret)."""
        return f"{self.url}/{path}"

    async def read_if_changed(self, path: str, max_bytes: int, etag: str | None
                              ) -> tuple[bytes | None, str | None]:
        """A small file unless it still has the entity tag ``etag``: ``(None, etag)`` when the
        mirror says it is unchanged, else ``(its bytes, its ETag or None)``. Only HTTP mirrors
        have ETags; other mirrors always read the file. Raises like ``read``."""
        return await self.read(path, max_bytes), None

    async def read_range(self, path: str, start: int, end: int) -> bytes | None:
        """Bytes ``start`` up to ``end`` (exclusive) of a file, in one request; None when
        the mirror cannot answer a range (a server that sends the whole file instead, or
        another range): nothing of such an answer is read. Raises like ``read``."""
        return None

    def open(
        self, path: str, expected: int | None, revalidate: bool = False
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Stream a file in chunks; ``expected`` (its length, if known) sizes the deadline."""
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


class LocalMirror(Mirror):
    """A mirror on a local or network filesystem."""

    def __init__(self, root: Path):
        self.root = root
        self.url = str(root)
        self.health = MirrorHealth()

    def _resolve(self, path: str) -> Path:
        # mirror-relative paths are built by layout.py; refuse anything that could climb out
        if path.startswith("/") or ".." in path.split("/"):
            raise MirrorError(f"refusing mirror path {path!r}")
        return self.root / path

    @asynccontextmanager
    async def open(self, path: str, expected: int | None,  # type: ignore[override]
                   revalidate: bool = False):
        target = self._resolve(path)
        try:
            handle = await trio.to_thread.run_sync(open, target, "rb")
        except FileNotFoundError:
            self.health.answered()
            raise NotInMirror(f"{target} does not exist") from None
        except OSError as exc:
            self.health.failed(f"cannot read {target}: {exc.strerror}")
            raise MirrorError(f"cannot read {target}: {exc.strerror}") from None
        self.health.answered()

        async def chunks() -> AsyncIterator[bytes]:
            while True:
                chunk = await trio.to_thread.run_sync(handle.read, CHUNK)
                if not chunk:
                    return
                self.health.fetched_bytes += len(chunk)
                yield chunk

        try:
            yield chunks()
        finally:
            handle.close()


    async def read_range(self, path: str, start: int, end: int) -> bytes | None:
        target = self._resolve(path)

        def read() -> bytes:
            with open(target, "rb") as handle:
                handle.seek(start)
                return handle.read(end - start)

        try:
            data = await trio.to_thread.run_sync(read)
        except FileNotFoundError:
            raise NotInMirror(f"{target} does not exist") from None
        except OSError as exc:
            raise MirrorError(f"cannot read {target}: {exc.strerror}") from None
        self.health.fetched_bytes += len(data)
        return data if len(data) == end - start else None  # not that range: a shorter file


class HttpMirror(Mirror):
    """A mirror served over HTTP(S). Retries connection failures and 5xx answers; a server
    that accepts and then stays silent is given up at once (another mirror may answer).

    Without ``proxies``, httpx follows the environment (``http_proxy``, ``NO_PROXY``...).
    With them, each request goes through the chain's proxies in its order, and a proxy that
    fails is reported to the chain and the next one tried at once; a host that ``NO_PROXY``
    names is still reached directly."""

    def __init__(self, url: str, timeouts: Timeouts, ca_certs: Path | None = None,
                 proxies: ProxyChain | None = None, *, base: str | None = None,
                 follow_redirects: bool = True):
        # a user name and password in the URL go to the client, a query string (a token)
        # to every request; neither into messages
        parsed = urlparse(url)
        parsed = parsed._replace(path=parsed.path.rstrip("/"), fragment="")
        self.auth = None
        if parsed.username is not None or parsed.password is not None:
            import httpx

            self.auth = httpx.BasicAuth(unquote(parsed.username or ""),
                                        unquote(parsed.password or ""))
        self.query = f"?{parsed.query}" if parsed.query else ""
        # requests go to ``base`` (a registry's API root, for OCI), messages name ``url``
        self.base = base.rstrip("/") if base else \
            parsed._replace(netloc=parsed.netloc.rpartition("@")[2], query="").geturl()
        self.url = redact(parsed.geturl())
        self._shown_base = redact(parsed._replace(query="").geturl())
        self.follow_redirects = follow_redirects
        self.health = MirrorHealth()
        self.timeouts = timeouts
        self.ca_certs = ca_certs
        self.proxy_chain = proxies
        self.proxies = None if proxies is None or bypasses_proxies(self.base) else proxies
        # made on the first request: loading the CA bundle takes tens of ms, and a mount
        # served from its stored catalog asks its mirrors nothing before it is up
        self._tls: ssl.SSLContext | None = None
        self._client: httpx.AsyncClient | None = None
        self._via: dict[str, httpx.AsyncClient] = {}  # proxy URL -> its client

    @property
    def tls(self) -> ssl.SSLContext:
        """The CAs this mirror may be signed by (``tls_context``). Raises UsageError."""
        if self._tls is None:
            self._tls = tls_context(self.ca_certs)
        return self._tls

    @property
    def client(self) -> httpx.AsyncClient:
        """The client for requests not sent through a proxy of the chain."""
        if self._client is None:
            self._client = self._new_client(trust_env=self.proxy_chain is None)
        return self._client

    async def _prepare(self) -> None:
        """Import httpx and load the CA bundle in a worker thread before the first request:
        40-50 ms that would hold up the file system on the trio thread (a remount asks its
        mirror right after it is up)."""
        def prepare() -> None:
            load_http()
            _ = self.tls

        await trio.to_thread.run_sync(prepare)

    def where(self, path: str) -> str:
        return redact(f"{self._shown_base}/{path}{self.query}")

    def _new_client(self, trust_env: bool, proxy: str | None = None) -> httpx.AsyncClient:
        import httpx

        load_http()
        return httpx.AsyncClient(
            timeout=httpx.Timeout(self.timeouts.read, connect=self.timeouts.connect),
            verify=self.tls,
            auth=self.auth,
            follow_redirects=self.follow_redirects,
            headers=HEADERS,
            trust_env=trust_env,
            proxy=proxy,
        )

    def _routes(self) -> list[tuple[Proxy | None, httpx.AsyncClient]]:
        """(proxy or None, client) pairs to try for one request, in order."""
        if self.proxies is None:
            return [(None, self.client)]
        routes: list[tuple[Proxy | None, httpx.AsyncClient]] = []
        for proxy in self.proxies.order():
            if proxy.url == DIRECT:
                routes.append((proxy, self.client))
                continue
            if proxy.url not in self._via:
                self._via[proxy.url] = self._new_client(trust_env=False, proxy=proxy.url)
            routes.append((proxy, self._via[proxy.url]))
        return routes

    @asynccontextmanager
    async def open(self, path: str, expected: int | None,  # type: ignore[override]
                   revalidate: bool = False):
        headers = dict(REVALIDATE) if revalidate else None
        async with self._exchange(path, expected, headers) as (_, chunks):
            yield chunks

    @asynccontextmanager
    async def _exchange(self, path: str, expected: int | None, headers: dict[str, str] | None
                        ) -> AsyncIterator[tuple[httpx.Response, AsyncIterator[bytes]]]:
        """(response, its body in chunks) of a GET, bounded by the deadline and the rate
        check; ``headers`` may make it conditional (the response may then be a 304)."""
        if self._tls is None:
            await self._prepare()
        import httpx

        url = self.where(path)
        try:
            response, deadline = await self._send(f"{self.base}/{path}{self.query}", url,
                                                  expected, headers)
        except NotInMirror:
            self.health.answered()
            raise
        except MirrorError as exc:
            self.health.failed(str(exc))
            raise
        try:
            refuse_encoded(response, url)
        except MirrorError as exc:
            await response.aclose()
            self.health.failed(str(exc))
            raise
        self.health.answered()
        if expected is None:  # size the deadline by what the server announces (v2 tarballs)
            expected = _content_length(response)
            deadline = trio.current_time() + self.timeouts.deadline(expected)

        async def chunks() -> AsyncIterator[bytes]:
            started, received = trio.current_time(), 0
            pending: list[bytes] = []  # network pieces, handed on in chunks of about CHUNK
            size = 0
            # pieces as they arrive (not httpx's fixed-size chunks, which wait for a whole
            # chunk), so the rate is checked at every read; raw, never decoded
            pieces = response.aiter_raw()
            try:
                while True:
                    # the deadline is around each receive, never around a yield: the
                    # consumer's own awaits must not run inside this generator's scope
                    with trio.fail_at(deadline):
                        piece = await anext(pieces, None)
                    if piece is None:
                        break
                    received += len(piece)
                    elapsed = trio.current_time() - started
                    if self.timeouts.too_slow(received, elapsed):
                        raise MirrorError(
                            f"{url}: transfer too slow ({received} bytes in {elapsed:.0f} s,"
                            f" below {self.timeouts.min_rate / 1024:.0f} KiB/s)")
                    self.health.fetched_bytes += len(piece)
                    pending.append(piece)
                    size += len(piece)
                    if size >= CHUNK:
                        yield b"".join(pending)
                        pending, size = [], 0
                if pending:
                    yield b"".join(pending)
            except trio.TooSlowError:
                self.health.failed(f"{url}: transfer too slow")
                raise MirrorError(f"{url}: transfer too slow, gave up after "
                                  f"{self.timeouts.deadline(expected):.0f} s") from None
            except httpx.HTTPError as exc:
                self.health.failed(f"{url}: transfer failed: {describe(exc)}")
                raise MirrorError(f"{url}: transfer failed: {describe(exc)}") from None
            except MirrorError as exc:
                self.health.failed(str(exc))
                raise

        try:
            yield response, chunks()
        finally:
            await response.aclose()

    async def read_range(self, path: str, start: int, end: int) -> bytes | None:
        # one range per request (S3 answers no more); identity: a range of a compressed
        # answer would be a range of other bytes
        headers = {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
        async with self._exchange(path, end - start, headers) as (response, chunks):
            if response.status_code != 206 or not _covers(response, start, end):
                return None  # the whole file, or another range: closed unread
            data = await _gather(chunks, end - start, self.where(path))
        if len(data) != end - start:
            raise MirrorError(f"{self.where(path)}: the range {start}-{end - 1} ended after "
                              f"{len(data)} bytes")
        return data

    async def read_if_changed(self, path: str, max_bytes: int, etag: str | None
                              ) -> tuple[bytes | None, str | None]:
        headers = dict(REVALIDATE)
        if etag:
            headers["If-None-Match"] = etag
        async with self._exchange(path, max_bytes, headers) as (response, chunks):
            if response.status_code == 304:
                return None, etag
            data = await _gather(chunks, max_bytes, self.where(path))
            return data, response.headers.get("etag")

    async def _send(self, target: str, url: str, expected: int | None,
                    headers: dict[str, str] | None) -> tuple[httpx.Response, float]:
        """The response to a GET of ``target`` (named ``url`` in messages: no credentials;
        200, or 304 for a conditional one) and the deadline of the whole transfer. Each
        attempt goes through the routes in order. A proxy that fails is left aside and its
        time is not counted: the deadline starts again for the next route, so a dead proxy
        costs one wait, once. 5xx and 429 (too many requests) answers are tried again after
        a growing pause (429: the server's ``Retry-After``, bounded by MAX_RETRY_AFTER and
        the deadline)."""
        import httpx

        last, pause = "", 0.0
        conditional = bool(headers and "If-None-Match" in headers)
        ranged = bool(headers and "Range" in headers)
        began = trio.current_time()
        deadline = began + self.timeouts.deadline(expected)
        for attempt in range(self.timeouts.retries + 1):
            if attempt:
                pause = max(pause, 2.0 ** attempt / 4)
                await trio.sleep(min(pause, max(0.0, deadline - trio.current_time())))
            for proxy, client in self._routes():
                via = f" via {proxy.shown}" if proxy is not None and proxy.url != DIRECT else ""
                try:
                    with trio.fail_at(deadline):
                        response = await self._send_once(client, target, headers)
                except (trio.TooSlowError, httpx.ReadTimeout) as exc:
                    # connected, then silence: a hung server, or a hung proxy
                    reason = (f"no answer in {deadline - began:.0f} s ({last or 'timed out'})"
                              if isinstance(exc, trio.TooSlowError) else
                              f"no answer in {self.timeouts.read:.0f} s ({describe(exc)})")
                    if proxy is None:
                        raise MirrorError(f"{url}: {reason}") from None
                    self._proxy_failed(proxy, reason)
                    last = f"{reason}{via}"
                    began = trio.current_time()
                    deadline = began + self.timeouts.deadline(expected)
                    continue
                except httpx.HTTPError as exc:
                    last = f"{describe(exc)}{via}"
                    if proxy is not None:
                        self._proxy_failed(proxy, describe(exc))
                    continue
                status = response.status_code
                if status == 200 or (status == 304 and conditional) or (
                        status in (206, 416) and ranged):  # read_range judges the range
                    self._proxy_answered(proxy)
                    return response, deadline
                await response.aclose()
                last = f"HTTP {status}{via}"
                if proxy is not None and via and status in GATEWAY_ERRORS:
                    self._proxy_failed(proxy, f"HTTP {status}")
                    continue
                self._proxy_answered(proxy)
                if status == 404:
                    raise NotInMirror(f"{url}: not found (HTTP 404)")
                if status == 429:
                    pause = _retry_after(response)
                elif status < 500:
                    raise MirrorError(f"{url}: {last}")
                break  # a 5xx or 429 of the mirror itself: try again after a pause
        raise MirrorError(f"{url}: {last}")

    async def _send_once(self, client: httpx.AsyncClient, target: str,
                         headers: dict[str, str] | None) -> httpx.Response:
        """One GET through ``client``, its body not read yet (a registry adds its login and
        follows redirects here)."""
        request = client.build_request("GET", target, headers=headers)
        return await client.send(request, stream=True)

    def _proxy_failed(self, proxy: Proxy, reason: str) -> None:
        assert self.proxies is not None
        self.proxies.failed(proxy, reason)

    def _proxy_answered(self, proxy: Proxy | None) -> None:
        if proxy is not None and self.proxies is not None:
            self.proxies.answered(proxy)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        for client in self._via.values():
            await client.aclose()


def refuse_encoded(response: httpx.Response, url: str) -> None:
    """MirrorError unless ``response``'s body is sent as it is (no ``Content-Encoding``, or
    ``identity``): lazymount asks for nothing else and decodes nothing."""
    encoding = response.headers.get("content-encoding", "").strip()
    if encoding and encoding.lower() != "identity":
        shown = "".join(c if c.isprintable() else "?" for c in encoding[:60])
        raise MirrorError(f"{url}: refusing Content-Encoding {shown} (lazymount asks for "
                          "identity: a body encoded in transit can inflate past every limit)")


async def _gather(chunks: AsyncIterator[bytes], max_bytes: int, where: str) -> bytes:
    """A whole small body from ``chunks``; refuses more than ``max_bytes``."""
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > max_bytes:
            raise MirrorError(f"{where} is larger than {max_bytes} bytes")
        parts.append(chunk)
    return b"".join(parts)


MAX_RETRY_AFTER = 30.0  # seconds; a longer Retry-After is cut to this (and to the deadline)


def _retry_after(response: httpx.Response) -> float:
    """Seconds a 429 answer asks to wait (``Retry-After: <seconds>``; 1 if it does not say
    or gives a date), at most MAX_RETRY_AFTER."""
    try:
        return min(max(0.0, float(response.headers.get("retry-after", "1"))), MAX_RETRY_AFTER)
    except ValueError:
        return 1.0


def _covers(response: httpx.Response, start: int, end: int) -> bool:
    """True if a 206 answer's Content-Range is exactly bytes ``start`` to ``end - 1``."""
    unit, _, rest = response.headers.get("content-range", "").partition(" ")
    return unit.strip() == "bytes" and rest.partition("/")[0].strip() == f"{start}-{end - 1}"


def _content_length(response: httpx.Response) -> int | None:
    try:
        return max(0, int(response.headers["content-length"]))
    except (KeyError, ValueError):
        return None


def tls_context(ca_certs: Path | None) -> ssl.SSLContext:
    """The CAs an https mirror may be signed by: the default ones (``SSL_CERT_FILE`` /
    ``SSL_CERT_DIR`` if set, else certifi's), plus ``ca_certs`` (a PEM file or a directory
    of hashed certificates; a site's private CA). Raises UsageError for an unusable one."""
    import httpx

    context = httpx.create_ssl_context()
    if ca_certs is not None:
        try:
            if ca_certs.is_dir():
                context.load_verify_locations(capath=str(ca_certs))
            else:
                context.load_verify_locations(cafile=str(ca_certs))
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"cannot use the CA bundle {ca_certs}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
    return context


CA_CERTS_HINT = ("if the mirror uses a private CA, set ca_certs = \"/path/to/ca.pem\" in the "
                 "configuration file (or --ca-certs FILE)")


def describe(exc: Exception) -> str:
    """What went wrong, in words a user can act on: a TLS certificate the CAs do not
    vouch for, a refused connection, else the exception's own text."""
    for cause in _causes(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            reason = cause.verify_message or "certificate verify failed"
            return f"certificate verify failed ({reason}); {CA_CERTS_HINT}"
    for cause in _causes(exc):
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
    name = type(exc).__name__
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return f"certificate verify failed ({text}); {CA_CERTS_HINT}"
    return f"{name}: {text}" if text else name


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, what caused it, and the members of exception groups among them."""
    pending, seen = [exc], set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending += [c for c in (current.__cause__, current.__context__) if c is not None]
        if isinstance(current, BaseExceptionGroup):
            pending += list(current.exceptions)


def redact(url: str) -> str:
    """``url`` without the user name, password, query values and fragment it may carry, for
    logs and status."""
    return redact_url(url)


def open_mirror(url: str, timeouts: Timeouts | None = None, ca_certs: Path | None = None,
                proxies: ProxyChain | None = None, credentials: Credentials | None = None
                ) -> Mirror:
    """A Mirror for a local path, ``file://``, ``http(s)://``, ``oci://`` or ``oci+http://``
    URL; ``proxies`` are used by HTTP mirrors and registries (None: the environment's
    proxy, if any); ``credentials`` log in to a registry."""
    if is_oci_url(url):
        from lazymount.mirror.oci import OciMirror  # it builds on HttpMirror, above

        return OciMirror(parse_oci_url(url), timeouts or Timeouts(), ca_certs, proxies,
                         credentials)
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        return HttpMirror(url, timeouts or Timeouts(), ca_certs, proxies)
    if parsed.scheme == "file":
        return LocalMirror(Path(unquote(parsed.path)))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return LocalMirror(Path(url).resolve())
    raise UsageError(f"mirror {url}: unsupported scheme {parsed.scheme!r} (use a path, "
                     "file://, http(s)://, oci:// or oci+http://)")

