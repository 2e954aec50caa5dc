"""The status of a running mount worded for a person (``lazymount status``), from the dict
``status.collect`` makes. Plain text work only: the command that prints it imports nothing of
the daemon."""

from __future__ import annotations

from typing import Any

from lazymount.system.printable import printable_values
from lazymount.system.sizes import show_size


def render(status: dict[str, Any]) -> str:
    """The status for a person (names and errors can come from a mirror: each value is
    shown with its control characters escaped)."""
    status = printable_values(status)
    index, pkgs, store = status["index"], status["packages"], status["store"]
    lines = [
        f"lazymount {status['version']} at {status['mountpoint']} (pid {status['pid']}, "
        f"since {status['started']})",
        f"index:    {index['packages']} packages, checked {index['refreshed']} "
        f"({_age(index['age_s'])} ago)"
        + (f"; last refresh failed: {index['last_error']}" if index.get("last_error") else ""),
        f"packages: {pkgs['ready']} ready, {pkgs['materializing']} materializing, "
        f"{len(pkgs['failed'])} failed",
    ]
    for failure in pkgs["failed"]:
        lines.append(f"  failed  {failure['name']}/{failure['hash'][:7]}: {failure['reason']}")
    for opened in pkgs.get("opened", []):  # through a table of contents: partly present
        lines.append(f"  opened  {opened['label']}: {opened['files_present']} of "
                     f"{opened['files']} files, {show_size(opened['bytes_present'])} of "
                     f"{show_size(opened['bytes'])}")
    host = status.get("host")
    if host:
        how = "--host-target" if host["given"] else "detected"
        shows = "only the builds it runs" if host["targets"] == "host" else "every build"
        served = ", host/ served" if host["view"] else ""
        lines.append(f"host:     {host['target']} ({how}); shows {shows}{served}")
    quota = f" of {_bytes(store['quota_bytes'])}" if store.get("quota_bytes") else ""
    lines.append(f"store:    {store['path']}: {_bytes(store['bytes'])}{quota}, "
                 f"{store['packages']} packages")
    lines.append(f"fetched:  {_bytes(status['fetched_bytes'])} since start")
    lines.append("mirrors:")
    for mirror in status["mirrors"]:
        layout = f"v{mirror['layout']}" if mirror["layout"] else "layout unknown"
        if mirror.get("kind") == "oci":
            layout += f", OCI registry, login {mirror['login']}"
        line = f"  {mirror['state']:<8} {mirror['url']} ({layout})"
        if mirror["state"] != "ok" and mirror["last_error"]:
            line += f"\n           last error: {mirror['last_error']}"
        lines.append(line)
    if status.get("proxies"):
        lines.append("proxies:")
        for proxy in status["proxies"]:
            state = "up" if proxy["up"] else "resting"
            line = (f"  {state:<8} {proxy['proxy']} (group {proxy['group'] + 1}, "
                    f"{proxy['answered']} answered")
            if not proxy["up"]:
                line += f", {proxy['failures']} failures, retried in {proxy['retry_in']:.0f} s"
            line += ")"
            if proxy["last_error"] and not proxy["up"]:
                line += f"\n           last error: {proxy['last_error']}"
            lines.append(line)
    shared = status.get("shared_store")
    if shared:
        lines.append(f"shared:   {shared['path']}"
                     + ("" if shared["writable"] else " (read-only here)"))
    return "\n".join(lines) + "\n"


def render_package(answer: dict[str, Any]) -> str:
    answer = printable_values(answer)
    if answer.get("package") is None:
        return f"{answer['path']}: {answer['reason']}\n"
    text = f"{answer['prefix']}: {answer['package']}: {answer['state']}"
    text += f": {answer['reason']}" if answer.get("reason") else ""
    lines = render_status(answer["host"]) if answer.get("host") else []
    return "\n".join([text, *lines]) + "\n"


def render_status(info: dict[str, Any]) -> list[str]:
    """A package's host target (``HostDirs.status_of`` in the daemon) for a person: a few
    indented lines."""
    if info["runs_here"]:
        lines = [f"  target: {info['target']}, runs on this CPU ({info['host_target']})"
                 + ("; host/ chooses it" if info["chosen_for_host"] else "")]
    else:
        lines = [f"  target: {info['target']}, does not run here: {info['why_not']}"]
    if len(info["alternatives"]) > 1:
        lines.append(f"  builds of this version, best for {info['host_target']} first:")
        for alternative in info["alternatives"]:
            note = "runs here" if alternative["runs_here"] else alternative["why_not"]
            lines.append(f"    {alternative['target']:<12} {alternative['prefix']} ({note})")
    return lines


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _bytes(count: int | None) -> str:
    return "?" if count is None else show_size(count)
