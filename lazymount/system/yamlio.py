"""The one door to PyYAML: safe loading and dumping only. PyYAML is imported on first use:
a mount that never reads or writes YAML does not load it (a faster start)."""

from __future__ import annotations

from typing import Any


class YamlError(ValueError):
    """Text that is not valid YAML; ``str()`` is PyYAML's own message."""


def safe_load(text: bytes | str) -> Any:
    """The document in ``text`` (plain data only: no Python objects). Raises YamlError. Pure."""
    import yaml

    # libyaml's parser when PyYAML was built with it: the same safe constructors, 3-4x
    # faster (a big package's 120 KB build info: 82 -> 24 ms)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        return yaml.load(text, Loader=loader)
    except yaml.YAMLError as exc:
        raise YamlError(str(exc)) from None


def safe_dump(data: Any, **options: Any) -> str:
    """``data`` as YAML text; ``options`` are PyYAML's ``safe_dump`` keywords. Pure."""
    import yaml

    return str(yaml.safe_dump(data, **options))
