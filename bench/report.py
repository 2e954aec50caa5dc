"""The results as a markdown table (what docs/PERFORMANCE.md shows)."""

from __future__ import annotations

from typing import Any


def ratio_text(result: Any) -> str:
    """``1.27x faster``, ``0.84x GNU tar``, ``12% of the stack`` ..."""
    ratio = result["ratio"] if isinstance(result, dict) else result.ratio
    reading = result["reading"] if isinstance(result, dict) else result.reading
    if ratio is None:
        return "-"
    if reading in ("of the stack", "of the blob"):
        return f"{ratio * 100:.1f}% {reading}"
    return f"{ratio:.2f}{reading}" if reading.startswith("x") else f"{ratio:.2f} {reading}"


def markdown(document: dict[str, Any]) -> str:
    host = document["machine"]
    mode = "quick" if document["quick"] else "full"
    lines = [
        f"Machine: {host['nproc']} x {host['cpu']}, {host['memory']} RAM, kernel "
        f"{host['kernel']} ({host['os']}), disk {host['disk']}, Python {host['python']}, "
        f"libfuse {host['libfuse']}; load average at start {host['load']}. "
        f"Mode: {mode}, {document['seconds']} s.",
        "",
        "| # | metric | lazymount | compared with | ratio | goal | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(document["results"], key=_order):
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        cells = [r["metric"], r["what"], r["lazy"], r["baseline"], ratio_text(r), r["goal"], met]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _order(result: dict[str, Any]) -> tuple[int, str, bool]:
    """Rows by metric number (2 before 10), then letter, then the ``+`` row after its twin."""
    metric = result["metric"]
    digits = len(metric) - len(metric.lstrip("0123456789"))
    return int(metric[:digits] or 0), metric[digits:].rstrip("+"), metric.endswith("+")
