"""The control socket: how ``lazymount status`` and ``lazymount refresh`` ask a running mount.

One Unix stream socket per mount, named after the mount point, in ``/run/lazymount/`` for
root and ``$XDG_RUNTIME_DIR/lazymount/`` otherwise. A request is one JSON line
(``{"command": "status"}``, ``{"command": "package", "path": "..."}``,
``{"command": "refresh"}``), the answer one JSON line. When the mount is shared
(``allow_other``) anyone may ask for its status; only its owner (or root) may make it
refresh, which the kernel's peer credentials tell.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lazymount.errors import LazymountError, UsageError

if TYPE_CHECKING:  # the daemon's side only: the clients (`lazymount status`) need no trio
    import trio

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1 << 16
SYSTEM_DIR = Path("/run/lazymount")
ASK_TIMEOUT = 900.0  # seconds a client waits: a refresh may load a large index
# What one user (by the kernel's peer credentials) and all users but root may hold open at
# once: a socket every user may reach must not let one of them take the daemon's file
# descriptors (1,000 idle connections did, and then reads through the mount failed).
MAX_PER_USER = 8
MAX_CONNECTIONS = 64
REQUEST_TIMEOUT = 10.0  # seconds to send the request line; an idle connection is closed
COMPLAINT_INTERVAL = 60.0  # seconds between two log lines about bad requests
TOO_MANY = "too many connections"

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def runtime_dir(euid: int | None = None) -> Path:
    """Where the sockets of the mounts this user runs live."""
    if (os.geteuid() if euid is None else euid) == 0:
        return SYSTEM_DIR
    base = os.environ.get("XDG_RUNTIME_DIR")
    return Path(base) / "lazymount" if base else Path(f"/tmp/lazymount-{os.geteuid()}")


def socket_name(mountpoint: str) -> str:
    """``/opt/spack`` -> ``opt-spack.sock``: escaped as ``systemd-escape --path`` does; a
    long path is shortened with its digest (a socket path has at most 107 bytes)."""
    path = os.path.normpath(os.path.abspath(mountpoint)).strip("/")
    parts = []
    for position, byte in enumerate(os.fsencode(path)):
        char = chr(byte)
        if char == "/":
            parts.append("-")
        elif char.isascii() and (char.isalnum() or char == "_" or (char == "." and position)):
            parts.append(char)
        else:
            parts.append(f"\\x{byte:02x}")
    name = "".join(parts) or "-"
    if len(name) > 60:
        name = f"{name[:40]}-{hashlib.sha256(os.fsencode(path)).hexdigest()[:16]}"
    return f"{name}.sock"


def socket_paths(mountpoint: str) -> list[Path]:
    """Where the socket of ``mountpoint`` may be: the caller's own directory first, then
    the system one (a user asking about root's mount)."""
    name = socket_name(mountpoint)
    places = [runtime_dir() / name]
    if places[0].parent != SYSTEM_DIR:
        places.append(SYSTEM_DIR / name)
    return places


def known_sockets() -> list[Path]:
    """Every mount socket in the caller's and the system's directory."""
    found = []
    for directory in dict.fromkeys([runtime_dir(), SYSTEM_DIR]):
        try:
            found += sorted(directory.glob("*.sock"))
        except OSError:
            pass
    return found


# ---- the daemon's side ------------------------------------------------------------------------


def bind(mountpoint: str, shared: bool) -> socket.socket:
    """The listening socket of the mount at ``mountpoint``: readable by everyone when the
    mount is ``shared`` (allow_other), else by its owner only. A socket file left by a dead
    daemon is replaced. Raises UsageError."""
    path = runtime_dir() / socket_name(mountpoint)
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        _check_ours(path.parent)
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        os.chmod(path, 0o666 if shared else 0o600)
        sock.listen(64)
    except OSError as exc:
        raise UsageError(f"cannot make the control socket {path}: {exc.strerror}") from None
    return sock


def _check_ours(directory: Path) -> None:
    """Refuse a socket directory someone else could have placed or can write to (a
    ``/tmp/lazymount-UID`` made by another user would let them answer for us)."""
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise UsageError(f"the control socket directory {directory} is not a directory that "
                         "only this user can write to; remove it or set XDG_RUNTIME_DIR")


class _Gate:
    """How many connections each user holds; admits one within the bounds (root is held
    to its own bound only, so an exhausted total never locks root out)."""

    def __init__(self) -> None:
        self.held: dict[int, int] = {}

    def admit(self, uid: int) -> str | None:
        """None if ``uid`` may open one more (counted), else why not."""
        if self.held.get(uid, 0) >= MAX_PER_USER:
            return f"uid {uid} already holds {MAX_PER_USER} connections"
        if uid != 0 and sum(n for u, n in self.held.items() if u != 0) >= MAX_CONNECTIONS:
            return f"{MAX_CONNECTIONS} connections are open"
        self.held[uid] = self.held.get(uid, 0) + 1
        return None

    def release(self, uid: int) -> None:
        self.held[uid] -= 1
        if not self.held[uid]:
            del self.held[uid]


class _Complaints:
    """Bad requests, logged one line per COMPLAINT_INTERVAL at most (with how many more
    there were): any user may send them, and the log must not grow with their number."""

    def __init__(self) -> None:
        self.last = -COMPLAINT_INTERVAL
        self.unsaid = 0

    def note(self, what: str, now: float) -> None:
        if now - self.last < COMPLAINT_INTERVAL:
            self.unsaid += 1
            return
        more = f" (and {self.unsaid} more since the last one)" if self.unsaid else ""
        log.warning("control socket: %s%s", what, more)
        self.last, self.unsaid = now, 0


class BadRequest(Exception):
    """A request that is not one JSON object on a line, sent in time."""


async def serve(sock: socket.socket, handler: Handler) -> None:
    """Answer requests on ``sock`` until cancelled. ``handler`` gets the request (with the
    asker's ``uid`` added) and returns the answer. Connections are bounded per user and in
    all (``_Gate``); a bad, over-long or idle request is answered with an error and logged
    in one rate-limited line."""
    import trio

    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    gate, complaints = _Gate(), _Complaints()

    async def one(stream: trio.SocketStream) -> None:
        try:
            uid = _peer_uid(stream.socket)
            refusal = gate.admit(uid)
            if refusal is not None:
                complaints.note(f"refused a connection: {refusal}", trio.current_time())
                await _answer(stream, {"error": f"{TOO_MANY}: {refusal}"})
                return
            try:
                await _answer(stream, await _answered(stream, uid, handler, complaints))
            finally:
                gate.release(uid)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception:  # a bug answering one request must not stop the others
            log.exception("control socket: unexpected error")
        finally:
            await stream.aclose()

    await trio.serve_listeners(one, [listener])  # type: ignore[arg-type]


async def _answered(stream: trio.SocketStream, uid: int, handler: Handler,
                    complaints: _Complaints) -> dict[str, Any]:
    import trio

    try:
        message = json.loads(await _read_line(stream))
        if not isinstance(message, dict):
            raise BadRequest("not a JSON object")
    except (BadRequest, ValueError, RecursionError) as exc:  # JSON, UTF-8 and nesting
        reason = str(exc)[:200]
        complaints.note(f"bad request from uid {uid}: {reason}", trio.current_time())
        return {"error": f"bad request: {reason}"}
    try:
        return await handler({**message, "uid": uid})
    except LazymountError as exc:
        return {"error": str(exc)}


async def _answer(stream: trio.SocketStream, answer: dict[str, Any]) -> None:
    import trio

    with trio.move_on_after(REQUEST_TIMEOUT):  # an asker that never reads is dropped
        await stream.send_all(json.dumps(answer).encode() + b"\n")


def _peer_uid(sock: Any) -> int:
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", data)[1])


async def _read_line(stream: trio.SocketStream) -> bytes:
    """One request line. BadRequest if it is too long or not sent in REQUEST_TIMEOUT."""
    import trio

    data = b""
    with trio.move_on_after(REQUEST_TIMEOUT) as waited:
        while not data.endswith(b"\n"):
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_REQUEST_BYTES:
                raise BadRequest(f"longer than {MAX_REQUEST_BYTES} bytes")
    if waited.cancelled_caught:
        raise BadRequest(f"no request line within {REQUEST_TIMEOUT:.0f} s")
    return data


# ---- the asker's side -----------------------------------------------------------------------


def ask(path: Path, request: dict[str, Any], timeout: float = ASK_TIMEOUT) -> dict[str, Any]:
    """Send ``request`` to the daemon listening on ``path``; its answer. Raises OSError if
    nobody listens there, UsageError for an answer that is not one."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    try:
        answer = json.loads(data)
    except ValueError:
        raise UsageError(f"{path}: the daemon gave no answer") from None
    if not isinstance(answer, dict):
        raise UsageError(f"{path}: the daemon's answer is not an object")
    return answer


def checked(answer: dict[str, Any]) -> dict[str, Any]:
    """``answer``, unless the daemon refused: then UsageError with its reason."""
    if "error" in answer:
        raise UsageError(str(answer["error"]))
    return answer


def _ask_patiently(path: Path, request: dict[str, Any]) -> dict[str, Any]:
    """``ask``, again for up to REQUEST_TIMEOUT seconds while the daemon says this user holds
    too many connections (several commands of one user at once)."""
    deadline = time.monotonic() + REQUEST_TIMEOUT
    while True:
        answer = ask(path, request)
        if (not str(answer.get("error", "")).startswith(TOO_MANY)
                or time.monotonic() > deadline):
            return answer
        time.sleep(0.2)


def ask_mount(mountpoint: str, request: dict[str, Any]) -> dict[str, Any]:
    """Ask the daemon of ``mountpoint``. Raises UsageError if none answers."""
    reasons = []
    for path in socket_paths(mountpoint):
        try:
            return _ask_patiently(path, request)
        except FileNotFoundError:
            continue
        except OSError as exc:
            reasons.append(f"{path}: {exc.strerror or exc}")
    why = "; ".join(reasons) or "no control socket " + " or ".join(
        str(p) for p in socket_paths(mountpoint))
    raise UsageError(f"no lazymount daemon answers for {mountpoint} ({why})")
