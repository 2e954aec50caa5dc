"""The layers of lazymount, declared once, and every import in the package checked against them.

A module may import its own layer or a lower one, never a higher one. Imports inside functions count
as much as those at the top: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lazymount"

# Lowest first. A name is a top module (``errors``) or a sub-package (``install``); ``lazymount``
# itself holds only the version.
LAYERS: list[set[str]] = [
    {"lazymount"},
    {"errors"},
    {"system"},
    {"mirror"},
    {"buildcache"},
    {"trust"},
    {"install", "store"},
    {"catalog"},
    {"publish"},
    {"config", "configfile"},
    {"spack"},
    {"materialize", "opened"},
    {"serve"},
    {"service"},
    {"daemon"},
    {"cli", "__main__"},
]

# Third-party libraries that exactly one part of the code may import.
SOLE_IMPORTERS = {"pyfuse3": "serve", "yaml": "system", "gnupg": "trust", "elftools": "install",
                  "archspec": "catalog", "rapidgzip": "publish"}


def layer_of(part: str) -> int:
    for number, names in enumerate(LAYERS):
        if part in names:
            return number
    raise AssertionError(f"{part!r} is in no layer: add it to LAYERS in {Path(__file__).name}")


def part_of(dotted: str) -> str:
    """``lazymount.install.extract`` -> ``install``; ``lazymount`` -> ``lazymount``."""
    pieces = dotted.split(".")
    return pieces[1] if len(pieces) > 1 else pieces[0]


def exists(part: str) -> bool:
    return (PACKAGE / f"{part}.py").exists() or (PACKAGE / part / "__init__.py").exists()


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """Every module ``source`` imports, made absolute, with its line; top level or in functions."""
    found: list[tuple[int, str]] = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if node.module is None or node.level:
                # ``from . import x`` may name sub-modules: check each as a module of its own.
                found.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names)
            else:
                found.append((node.lineno, base))
    return found


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    own = part_of(module)
    problems = []
    for line, target in imports_of(source, module, is_package):
        top = target.split(".")[0]
        if top in SOLE_IMPORTERS and SOLE_IMPORTERS[top] != own:
            problems.append(f"{module}:{line} imports {top}, which only {SOLE_IMPORTERS[top]} may")
        if top != "lazymount":
            continue
        other = part_of(target)
        if not exists(other):
            other = "lazymount"  # ``from lazymount import __version__`` names an attribute
        if layer_of(other) > layer_of(own):
            problems.append(f"{module}:{line} imports {target}: {own} may not import {other}")
    return problems


def package_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_import_respects_the_layers() -> None:
    problems = []
    for path in package_modules():
        problems += violations(path.read_text(), module_name(path), path.name == "__init__.py")
    assert problems == [], "\n".join(problems)


def test_every_part_has_a_layer() -> None:
    parts = {p.stem for p in PACKAGE.glob("*.py")} | {
        p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()
    }
    parts.discard("__init__")
    for part in parts:
        layer_of(part)


@pytest.mark.parametrize("path", package_modules(), ids=lambda p: module_name(p))
def test_no_module_is_over_800_lines(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= 800


def test_a_lower_layer_importing_a_higher_one_fails() -> None:
    source = textwrap.dedent("""
        def late():
            from lazymount.cli.main import main
            return main
    """)
    assert violations(source, "lazymount.errors") == [
        "lazymount.errors:3 imports lazymount.cli.main: errors may not import cli"
    ]


def test_relative_imports_are_resolved_before_checking() -> None:
    source = "from ..serve import fs\nfrom . import extract\n"
    problems = violations(source, "lazymount.install.relocate")
    assert problems == ["lazymount.install.relocate:1 imports lazymount.serve.fs: "
                        "install may not import serve"]


def test_pyfuse3_has_one_importer() -> None:
    assert violations("import pyfuse3\n", "lazymount.daemon") == [
        "lazymount.daemon:1 imports pyfuse3, which only serve may"
    ]


# ---- docs/ARCHITECTURE.md, checked against the code ----------------------------------------

ARCHITECTURE = PACKAGE.parent / "docs" / "ARCHITECTURE.md"
_ROW = re.compile(r"\| (\d+) \| `([\w/]+\.py)` \|")
_NAMED = re.compile(r"(?<![\w/.-])((?:[a-z_]+/)*[a-z_]+\.py)\b")


def architecture_rows() -> dict[str, int]:
    """``system/files.py`` -> 2 for each row of the layer table."""
    return {path: int(layer) for layer, path in _ROW.findall(ARCHITECTURE.read_text())}


def test_architecture_has_a_row_for_every_module_in_its_layer() -> None:
    modules = {str(p.relative_to(PACKAGE)) for p in package_modules()
               if not p.name.startswith("__")}
    rows = architecture_rows()
    assert sorted(modules - rows.keys()) == [], "modules without a row in ARCHITECTURE.md"
    assert sorted(rows.keys() - modules) == [], "rows of ARCHITECTURE.md naming no module"
    wrong = {path: layer for path, layer in rows.items()
             if layer != layer_of(path.split("/")[0].removesuffix(".py"))}
    assert wrong == {}, "rows whose layer is not the one LAYERS gives"


def test_every_file_architecture_names_exists() -> None:
    text = ARCHITECTURE.read_text()
    assert not re.search(r"^(<<<<<<<|=======|>>>>>>>)", text, re.MULTILINE)
    names = {str(p.relative_to(PACKAGE)) for p in package_modules()}
    names |= {p.name for p in package_modules()}  # ``fs.py`` under its package's heading
    missing = [name for name in set(_NAMED.findall(text))
               if name not in names and not (PACKAGE.parent / name).exists()]
    assert sorted(missing) == []


def test_no_test_module_imports_another() -> None:
    """Helpers several test modules share live in conftest.py or a helper module (no
    ``test_`` prefix), so each test module can be read, run and changed alone."""
    tests = PACKAGE.parent / "tests"
    problems = [f"{path.name}:{line} imports {target}"
                for path in sorted(tests.glob("test_*.py"))
                for line, target in imports_of(path.read_text(), path.stem, False)
                if target.split(".")[0].startswith("test_")]
    assert problems == []
