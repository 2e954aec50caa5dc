"""A real OCI registry on loopback for tests: CNCF distribution 2.8 (Debian's
``docker-registry``), started by the test with a configuration the test writes, no system
service. Optional TLS (a throw-away CA made with ``openssl``), HTTP Basic (``htpasswd`` with
bcrypt, made with ``htpasswd -B``) and token authentication (``auth: token``) against the
small token server here (JWTs signed with ``openssl dgst``, the signing certificate in the
registry's ``rootcertbundle``).

The registry listens on ``127.0.0.1:0``; its port is read from its log. Every process and
thread started here is stopped by ``stop()``.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import re
import shutil
import ssl
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

REGISTRY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
SERVICE = "lazymount-registry"
ISSUER = "lazymount-test-tokens"
START_WAIT = 30.0


def openssl(*args: str, data: bytes | None = None) -> bytes:
    return subprocess.run(["openssl", *args], input=data, capture_output=True,
                          check=True).stdout


@dataclass
class RegistryCA:
    """A CA, a server certificate for 127.0.0.1 signed by it, and two self-signed JWT
    signing certificates (``signer``, ``signer2``), all under ``folder``."""

    folder: Path

    @classmethod
    def make(cls, folder: Path) -> RegistryCA:
        folder.mkdir(parents=True, exist_ok=True)
        ca = cls(folder)
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                "-subj", "/CN=lazymount test CA", "-keyout", str(ca.ca_key),
                "-out", str(ca.ca_cert))
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
                "-keyout", str(ca.server_key), "-out", str(folder / "server.csr"))
        (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
        openssl("x509", "-req", "-in", str(folder / "server.csr"), "-CA", str(ca.ca_cert),
                "-CAkey", str(ca.ca_key), "-CAcreateserial", "-days", "2",
                "-extfile", str(folder / "ext.cnf"), "-out", str(ca.server_cert))
        for signer in ("signer", "signer2"):  # a second one to rotate to
            openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", f"/CN=lazymount token {signer}",
                    "-keyout", str(folder / f"{signer}.key"), "-out", str(folder / f"{signer}.pem"))
        return ca

    ca_key = property(lambda self: self.folder / "ca.key")
    ca_cert = property(lambda self: self.folder / "ca.pem")
    server_key = property(lambda self: self.folder / "server.key")
    server_cert = property(lambda self: self.folder / "server.pem")

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.server_cert, self.server_key)
        return context


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenServer:
    """Issues registry tokens (``GET /token?service=&scope=``) over HTTPS.

    ``users`` maps user -> password; with ``anonymous`` a request without credentials gets a
    pull token too. ``lifetime`` is the JWT's real validity, ``expires_in`` what the answer
    tells the client. Every request is recorded (path, whether it carried credentials)."""

    ca: RegistryCA
    users: dict[str, str] = field(default_factory=dict)
    anonymous: bool = True
    lifetime: int = 300
    expires_in: int | None = 300
    requests: list[dict[str, Any]] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)
    signer: str = "signer"  # which of the CA's signing certificates signs: signer, signer2
    url: str = ""

    @property
    def cert(self) -> Path:
        """The certificate the registry must trust (its ``rootcertbundle``)."""
        return self.ca.folder / f"{self.signer}.pem"

    def sign(self, claims: dict[str, Any]) -> str:
        der = openssl("x509", "-in", str(self.cert), "-outform", "DER")
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        payload = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = openssl("dgst", "-sha256", "-sign",
                            str(self.ca.folder / f"{self.signer}.key"), data=payload.encode())
        return f"{payload}.{_b64url(signature)}"

    def issue(self, subject: str, scope: str) -> dict[str, Any]:
        """A token for ``scope``: what it asks for to a user, to anonymous pulls only."""
        access = []
        for item in scope.split():
            kind, _, rest = item.partition(":")
            name, _, actions = rest.rpartition(":")
            granted = actions.split(",") if subject else ["pull"]
            access.append({"type": kind, "name": name, "actions": granted})
        now = int(time.time())
        claims = {"iss": ISSUER, "sub": subject, "aud": SERVICE, "exp": now + self.lifetime,
                  "nbf": now - 10, "iat": now, "jti": uuid.uuid4().hex, "access": access}
        answer: dict[str, Any] = {"token": self.sign(claims)}
        self.issued.append(answer["token"])
        if self.expires_in is not None:
            answer["expires_in"] = self.expires_in
        return answer

    def start(self) -> TokenServer:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 10  # a client that stalls (in the handshake too) ends its own thread

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                credentials = self.headers.get("Authorization")
                owner.requests.append({"path": parts.path, "query": query,
                                       "authorization": credentials})
                user = owner.check(credentials)
                if user is None or query.get("service") != SERVICE:
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = json.dumps(owner.issue(user, query.get("scope", ""))).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # the handshake is made by each request's thread, not by the one that accepts: a client
        # that stalls in it must not stop the server (nor stop() waiting for it)
        self._server.socket = self.ca.server_context().wrap_socket(
            self._server.socket, server_side=True, do_handshake_on_connect=False)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"https://127.0.0.1:{self._server.server_address[1]}/token"
        return self

    def check(self, header: str | None) -> str | None:
        """The user a request authenticates as ("" for anonymous), or None if refused."""
        if header is None:
            return "" if self.anonymous else None
        scheme, _, value = header.partition(" ")
        if scheme != "Basic":
            return None
        user, _, password = base64.b64decode(value).decode().partition(":")
        return user if self.users.get(user) == password else None

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class Registry:
    """One ``docker-registry serve`` process over a storage folder; restartable with other
    settings (TLS, auth) on the same storage."""

    def __init__(self, folder: Path):
        if not os.path.exists(REGISTRY):
            raise RuntimeError("docker-registry is not installed (apt-get install "
                               "docker-registry); scripts/setup.sh installs it")
        self.folder = folder
        self.storage = folder / "storage"
        self.storage.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.scheme = "http"
        self.runs = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def base(self) -> str:
        return f"{self.scheme}://{self.host}"

    def mirror(self, name: str) -> str:
        """The lazymount/Spack mirror URL of repository ``name``."""
        return f"{'oci' if self.scheme == 'https' else 'oci+http'}://{self.host}/{name}"

    def start(self, *, tls: RegistryCA | None = None, htpasswd: dict[str, str] | None = None,
              token: TokenServer | None = None, port: int = 0) -> Registry:
        self.stop()
        self.runs += 1
        config = [
            "version: 0.1",
            "log: {level: info, accesslog: {disabled: false}}",
            f"storage: {{filesystem: {{rootdirectory: {self.storage}}}}}",
            "http:",
            f"  addr: 127.0.0.1:{port}",
        ]
        self.scheme = "https" if tls else "http"
        if tls:
            config += ["  tls:", f"    certificate: {tls.server_cert}",
                       f"    key: {tls.server_key}"]
        if htpasswd:
            path = self.folder / "htpasswd"
            lines = [subprocess.run(["htpasswd", "-Bbn", user, password], check=True,
                                    capture_output=True, text=True).stdout.strip()
                     for user, password in htpasswd.items()]
            path.write_text("\n".join(lines) + "\n")
            config += ["auth:", "  htpasswd:", "    realm: lazymount-basic-realm",
                       f"    path: {path}"]
        if token:
            config += ["auth:", "  token:", f"    realm: {token.url}", f"    service: {SERVICE}",
                       f"    issuer: {ISSUER}", f"    rootcertbundle: {token.cert}"]
        path = self.folder / f"config-{self.runs}.yml"
        path.write_text("\n".join(config) + "\n")
        self.log = self.folder / f"registry-{self.runs}.log"
        with open(self.log, "wb") as handle:
            self.process = subprocess.Popen([REGISTRY, "serve", str(path)], stdout=handle,
                                            stderr=handle, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_WAIT
        while time.monotonic() < deadline:
            found = re.search(r"listening on 127\.0\.0\.1:(\d+)", self.log.read_text())
            if found:
                self.port = int(found.group(1))
                return self
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        text = self.log.read_text()
        self.stop()
        raise RuntimeError(f"docker-registry did not start:\n{text[-3000:]}")

    def requests(self) -> list[str]:
        """``METHOD path status`` of every request of the current run (the access log)."""
        found = re.findall(r'"(GET|HEAD|PUT|POST|PATCH|DELETE) (\S+) HTTP/[\d.]+" (\d+)',
                           self.log.read_text())
        return [f"{method} {path} {status}" for method, path, status in found]

    def blob_file(self, digest: str) -> Path:
        hexdigest = digest.removeprefix("sha256:")
        return (self.storage / "docker" / "registry" / "v2" / "blobs" / "sha256"
                / hexdigest[:2] / hexdigest / "data")

    def tamper_blob(self, digest: str) -> None:
        """Flip one byte in the middle of a stored blob (the registry serves it unchecked)."""
        path = self.blob_file(digest)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


class RegistryFront:
    """A registry front on loopback, like the proxies and clouds real registries sit
    behind: it passes requests to ``backend`` (an unauthenticated registry) and can

    * ask for a Bearer token from ``tokens`` (any token that server issued is accepted),
    * send blob downloads to a "CDN" on another port with a 307 (the CDN serves the blob
      from the registry's storage and records whether an ``Authorization`` header came),
    * answer the first ``throttle`` requests of each path with ``status`` (429 or 5xx),
    * have the CDN send the bodies in ``cdn_encoded`` (digest -> (Content-Encoding, body))
      instead of the blobs, whatever the client asked for.

    Every request is recorded: (server, method, path, Authorization header or None)."""

    def __init__(self, backend: Registry, *, tokens: TokenServer | None = None,
                 redirect_blobs: bool = False, throttle: int = 0, status: int = 429):
        self.backend = backend
        self.tokens = tokens
        self.redirect_blobs = redirect_blobs
        self.throttle = throttle
        self.status = status
        self.requests: list[tuple[str, str, str, str | None]] = []
        self.cdn_encoded: dict[str, tuple[str, bytes]] = {}
        self._seen: dict[str, int] = {}
        self._servers: list[http.server.ThreadingHTTPServer] = []
        self.cdn = self._serve("cdn", self._cdn)
        self.url = self._serve("front", self._front)

    @property
    def host(self) -> str:
        return self.url.removeprefix("http://")

    def mirror(self, name: str) -> str:
        return f"oci+http://{self.host}/{name}"

    def _serve(self, name: str, answer: Any) -> str:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

            def do_GET(self) -> None:
                owner.requests.append((name, "GET", self.path,
                                       self.headers.get("Authorization")))
                status, headers, body = answer(self)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self._servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    def _front(self, request: http.server.BaseHTTPRequestHandler
               ) -> tuple[int, dict[str, str], bytes]:
        path = request.path
        self._seen[path] = self._seen.get(path, 0) + 1
        if self._seen[path] <= self.throttle:
            return self.status, {"Retry-After": "0"}, b""
        if self.tokens is not None:
            header = request.headers.get("Authorization", "")
            issued = {f"Bearer {token}" for token in self.tokens.issued}
            if header not in issued:
                name = path.split("/v2/", 1)[-1].rsplit("/", 2)[0]
                challenge = (f'Bearer realm="{self.tokens.url}",service="{SERVICE}",'
                             f'scope="repository:{name}:pull"')
                return 401, {"WWW-Authenticate": challenge}, b""
        if self.redirect_blobs and "/blobs/" in path:
            return 307, {"Location": f"{self.cdn}/cdn/{path.rsplit('/', 1)[-1]}"}, b""
        return self._pass(path, request.headers)

    def _pass(self, path: str, headers: Any) -> tuple[int, dict[str, str], bytes]:
        import urllib.error
        import urllib.request

        forwarded = {k: headers[k] for k in ("Accept", "If-None-Match") if headers.get(k)}
        outgoing = urllib.request.Request(f"{self.backend.base}{path}", headers=forwarded)
        try:
            with urllib.request.urlopen(outgoing) as answer:  # noqa: S310 (loopback)
                status, body, got = answer.status, answer.read(), answer.headers
        except urllib.error.HTTPError as exc:
            status, body, got = exc.code, exc.read(), exc.headers
        kept = {k: got[k] for k in ("Content-Type", "Docker-Content-Digest", "ETag")
                if got.get(k)}
        return status, kept, body

    def _cdn(self, request: http.server.BaseHTTPRequestHandler
             ) -> tuple[int, dict[str, str], bytes]:
        digest = request.path.rsplit("/", 1)[-1]
        if digest in self.cdn_encoded:
            encoding, body = self.cdn_encoded[digest]
            return 200, {"Content-Type": "application/octet-stream",
                         "Content-Encoding": encoding}, body
        path = self.backend.blob_file(digest)
        if not path.exists():
            return 404, {}, b""
        return 200, {"Content-Type": "application/octet-stream"}, path.read_bytes()

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
