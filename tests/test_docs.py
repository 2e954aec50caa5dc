"""The README and docs/ as a reader follows them: every relative link leads to a file that
exists and, when it names a section, to a heading of that file; the README stays short; the
options table is the one the code makes, and names what ``lazymount --help`` offers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from lazymount import configfile

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to -."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = _FENCE.sub("", page.read_text())
    return {slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def test_every_relative_link_leads_somewhere() -> None:
    broken = []
    for page in PAGES:
        for target in _LINK.findall(_FENCE.sub("", page.read_text())):
            if re.match(r"[a-z+]+:", target):
                continue  # a web address
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.name}: {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.name}: {target}: no such section")
    assert broken == []


def test_the_readme_is_short_and_links_the_manual() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 250
    for name in ("USAGE", "SERVICE", "STORE", "SECURITY", "PERFORMANCE", "SPACK",
                 "PUBLISHING", "STARTUP", "SCALING", "TESTING", "ARCHITECTURE"):
        assert f"](docs/{name}.md" in readme, name


# ---- the options table of docs/USAGE.md, made from configfile.KEYS -----------------------

USAGE = ROOT / "docs" / "USAGE.md"
_GENERATED = re.compile(r"<!-- options: .*?-->\n(.*?)<!-- end of options -->", re.DOTALL)


def lazymount_help() -> str:
    """What ``lazymount --help`` prints, from the command a user runs."""
    command = Path(sys.executable).with_name("lazymount")
    assert command.exists(), command
    result = subprocess.run([str(command), "--help"], capture_output=True, text=True,
                            check=True, env={**os.environ, "COLUMNS": "200"})
    return result.stdout


def test_the_options_table_is_the_one_the_code_makes() -> None:
    made = subprocess.run([sys.executable, str(ROOT / "scripts" / "optionstable.py")],
                          capture_output=True, text=True, check=True).stdout
    found = _GENERATED.search(USAGE.read_text())
    assert found, "docs/USAGE.md has lost the markers of its options table"
    assert found.group(1) == made, "run: python scripts/optionstable.py --write"
    assert made.count("\n") == len(configfile.KEYS) + 2


def test_every_key_of_the_table_is_an_option_of_the_command() -> None:
    shown = lazymount_help()
    for key in configfile.KEYS.values():
        if key.flag is None:
            continue
        assert re.search(rf"^\s+{key.flag}\b", shown, re.MULTILINE), key.flag
        if key.shape == "flag":
            assert f"--no-{key.flag[2:]}" in shown, key.flag
        assert " ".join(key.help.replace("%%", "%").split()[:4]) in " ".join(shown.split())


def test_every_option_of_the_command_is_in_the_docs() -> None:
    options = set(re.findall(r"^  (--[a-z][\w-]*)", lazymount_help(), re.MULTILINE))
    assert "--mirror" in options
    documented = USAGE.read_text()
    assert sorted(o for o in options - {"--help"} if f"`{o}" not in documented) == []
