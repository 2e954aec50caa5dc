"""The one door to PyYAML: safe loading and dumping only. PyYAML is imported on first use:
a mount that never reads or writes YAML does not load it (a faster start).

An alias repeats a value without copying it, so a small document can stand for an
exponential one (an "alias bomb": nine aliases of nine aliases, ten levels deep, are 9^10
values). Loading shares the repeated values and stays cheap; it is every later walk over
the data (a check, a ``repr`` in an error message) that would expand them. ``safe_load``
counts the values a walk would see and refuses a document whose aliases add more than
``MAX_ALIAS_VALUES`` of them."""

from __future__ import annotations

from typing import Any

# Values aliases may add to a document: anchors reused in a configuration file add tens.
MAX_ALIAS_VALUES = 10_000


class YamlError(ValueError):
    """Text that is not valid YAML; ``str()`` is PyYAML's own message (or why it is
    refused)."""


def safe_load(text: bytes | str) -> Any:
    """The document in ``text`` (plain data only: no Python objects). Raises YamlError,
    also for a document whose aliases expand too far or refer to themselves. Pure."""
    import yaml

    # libyaml's parser when PyYAML was built with it: the same safe constructors, 3-4x
    # faster (a big package's 120 KB build info: 82 -> 24 ms)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        doc = yaml.load(text, Loader=loader)
    except yaml.YAMLError as exc:
        raise YamlError(str(exc)) from None
    except RecursionError:
        raise YamlError("it is nested too deeply") from None
    _check_expansion(doc)
    return doc


def _check_expansion(doc: Any) -> None:
    """Raises YamlError if walking ``doc`` would visit more than MAX_ALIAS_VALUES values
    beyond its distinct ones, or never end (a value that contains itself). Linear in the
    distinct containers: each one's expanded size is worked out once."""
    expanded: dict[int, int] = {}  # id of a container -> values a walk of it visits
    distinct = 0
    stack: list[tuple[Any, bool]] = [(doc, False)]
    open_ids: set[int] = set()
    keep = []  # the containers whose ids are in use (ids are only unique while alive)
    while stack:
        value, done = stack.pop()
        if not isinstance(value, (list, dict)):
            continue
        key = id(value)
        if done:
            children = _children(value)
            expanded[key] = 1 + sum(expanded.get(id(c), 1) for c in children)
            open_ids.discard(key)
            if expanded[key] > distinct + MAX_ALIAS_VALUES:
                raise YamlError(f"its aliases expand to more than {MAX_ALIAS_VALUES} values "
                                f"(refused as an alias bomb)")
            continue
        if key in open_ids:
            raise YamlError("an alias refers to a value that contains it")
        if key in expanded:
            continue  # seen through another alias: its size is known
        open_ids.add(key)
        keep.append(value)
        children = _children(value)
        distinct += 1 + len(children)
        stack.append((value, True))
        stack.extend((child, False) for child in children)


def _children(value: list[Any] | dict[Any, Any]) -> list[Any]:
    if isinstance(value, dict):
        return [*value.keys(), *value.values()]
    return value


def safe_dump(data: Any, **options: Any) -> str:
    """``data`` as YAML text; ``options`` are PyYAML's ``safe_dump`` keywords. Pure."""
    import yaml

    return str(yaml.safe_dump(data, **options))
