"""The table of the mount's options in docs/USAGE.md, made from ``configfile.KEYS``.

    python scripts/optionstable.py            # print the table
    python scripts/optionstable.py --write    # put it into docs/USAGE.md, between its markers

Each key's help string is the one ``lazymount --help`` prints, so the docs cannot drift from
the command; tests/test_docs.py checks the docs hold what this prints. Kept out of the
package: nothing the daemon imports needs it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lazymount import configfile
from lazymount.configfile import Key

USAGE = Path(__file__).resolve().parent.parent / "docs" / "USAGE.md"
BEGIN = "<!-- options: made by scripts/optionstable.py from configfile.KEYS; do not edit -->"
END = "<!-- end of options -->"

# what each parser takes, as the file writes it
VALUES = {
    configfile.parse_url: "URL or path",
    configfile.parse_path: "path",
    configfile.parse_text: "string",
    configfile.parse_size: "size (`\"50G\"`, or bytes)",
    configfile.parse_positive_duration: "duration (`30`, `\"90s\"`, `\"10m\"`, `\"1h30m\"`)",
    configfile.parse_refresh: "duration, or `\"off\"`",
    configfile.parse_listen: "`\"HOST:PORT\"`",
    configfile.parse_host_target: "archspec name",
    configfile.parse_targets: "`\"all\"` or `\"host\"`",
    configfile.parse_fill: "`\"read\"` or `\"whole\"`",
    configfile.parse_proxies: "proxy list (string)",
    configfile.parse_registries: "a table per `HOST[:PORT]`",
}


def option(key: Key) -> str:
    if key.flag is None:
        return "(the file only)"
    if key.shape == "flag":
        return f"`{key.flag}`, `--no-{key.flag.removeprefix('--')}`"
    return f"`{key.flag} {key.metavar}`"


def value(key: Key) -> str:
    if key.shape == "flag":
        return "true / false"
    kind = VALUES.get(key.parse, "value") if key.parse is not None else "value"
    return f"list; each {kind}" if key.shape == "list" else kind


def cell(text: str) -> str:
    # argparse doubles % in help strings; a | would end the table cell, a < open an HTML tag
    return text.replace("%%", "%").replace("|", "\\|").replace("<", "&lt;")


def table() -> str:
    rows = ["| option | in the configuration file | meaning |", "|---|---|---|"]
    rows += [f"| {cell(option(key))} | `{key.name}`: {cell(value(key))} | {cell(key.help)} |"
             for key in configfile.KEYS.values()]
    return "\n".join(rows) + "\n"


def generated_part(text: str) -> str:
    """What lies between the markers of a page (ValueError when they are missing)."""
    start = text.index(BEGIN) + len(BEGIN) + 1
    return text[start:text.index(END, start)]


def write(path: Path) -> None:
    text = path.read_text()
    start = text.index(BEGIN) + len(BEGIN) + 1
    end = text.index(END, start)
    path.write_text(text[:start] + table() + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"update {USAGE.name}")
    if parser.parse_args().write:
        write(USAGE)
    else:
        sys.stdout.write(table())


if __name__ == "__main__":
    main()
