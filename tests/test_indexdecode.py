"""The msgspec fast path of the index parser gives what the json-module parser gives.

``scan_index`` decodes with typed msgspec schemas and hands entries they refuse, and whole
documents msgspec cannot read, to the json-module parser; these tests compare the two paths
on generated and mutated indexes, and check the byte spans of whole nodes.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from spackcache import index_bytes
from strategies import FAST, indexes, json_values

from lazymount.buildcache import indexdecode
from lazymount.buildcache.index import (
    IndexSource,
    _scan_with_json,
    _table,
    parse_index,
    scan_index,
)
from lazymount.errors import FormatError

FIELDS = ["name", "version", "hash", "arch", "dependencies", "compiler", "external",
          "namespace", "parameters", "annotations"]
edges = st.fixed_dictionaries({
    "name": st.sampled_from(["gcc", "zlib"]) | json_values,
    "hash": st.sampled_from(["a" * 32, "b" * 32]) | json_values,
    "parameters": st.fixed_dictionaries({
        "deptypes": st.lists(st.sampled_from(["build", "link", "run"])) | json_values,
        "virtuals": st.lists(st.sampled_from(["c", "cxx", "mpi"])) | json_values,
    }) | json_values,
}) | json_values
field_values = {
    "arch": st.fixed_dictionaries({"platform": json_values, "platform_os": json_values,
                                   "target": json_values | st.fixed_dictionaries(
                                       {"name": json_values, "features": json_values})}),
    "dependencies": st.lists(edges, max_size=3),
    "annotations": st.fixed_dictionaries({"compiler": json_values}),
    "external": st.fixed_dictionaries({"path": json_values}),
}


def both_paths(blob: bytes) -> tuple[Any, Any]:
    """What ``scan_index`` gives and what the json-module scanner gives (each a list of rows
    or the message of its FormatError)."""
    results = []
    for scan in (scan_index, lambda b: _table(_scan_with_json(b))):
        try:
            results.append(scan(blob))
        except FormatError as exc:
            results.append(str(exc))
    return results[0], results[1]


@FAST
@given(indexes(), st.data())
def test_typed_decoding_gives_what_the_json_parser_gives(records, data):
    for _ in range(data.draw(st.integers(1, 3))):
        dag_hash = data.draw(st.sampled_from(sorted(records)))
        node = records[dag_hash]["spec"]
        field = data.draw(st.sampled_from(FIELDS))
        node[field] = data.draw(field_values.get(field, json_values) | json_values)
        if data.draw(st.booleans()):
            records[dag_hash][data.draw(st.sampled_from(["ref_count", "in_buildcache"]))] = \
                data.draw(json_values)
    for blob in (index_bytes(records),
                 json.dumps({"database": {"version": "8", "installs": records}},
                            indent=data.draw(st.sampled_from([None, 1])),
                            ensure_ascii=data.draw(st.booleans())).encode()):
        ours, theirs = both_paths(blob)
        assert ours == theirs


def test_spans_hold_each_whole_node():
    records = {h: {"spec": {"name": f"p{i}", "version": "1.0", "hash": h, "note": "für"},
                   "ref_count": 0, "in_buildcache": True}
               for i, h in enumerate(["a" * 32, "b" * 32, "c" * 32])}
    for blob in (index_bytes(records),
                 json.dumps({"database": {"installs": records, "version": "8"}}, indent=3,
                            ensure_ascii=False).encode()):
        source = IndexSource(blob)
        source.fill(scan_index(blob))
        assert [source.node(row) for row in range(3)] == [r["spec"] for r in records.values()]


def test_a_key_given_twice_or_escaped_leaves_it_to_the_json_parser():
    first, second = "a" * 32, "b" * 32

    def entry(name: str, dag_hash: str) -> str:
        return json.dumps({"spec": {"name": name, "version": "1", "hash": dag_hash},
                           "in_buildcache": True})

    members = ", ".join(f'"{h}": {entry(n, h)}'
                        for n, h in [("one", first), ("two", second), ("three", first)])
    twice = ('{"database": {"version": "8", "installs": {' + members + "}}}").encode()
    escaped = twice.replace(b'"aaaa', b'"\\u0061aaa', 1)
    for blob in (twice, escaped):
        installs = indexdecode._document.decode(blob).database.installs
        assert indexdecode._located(blob, installs) is None
        ours, theirs = both_paths(blob)
        assert ours == theirs


def test_a_record_the_schemas_refuse_is_dropped_with_the_parsers_warning(caplog):
    good = {"spec": {"name": "good", "version": "1.0"}, "in_buildcache": True}
    installs = {"a" * 32: good,
                "b" * 32: {"spec": {"name": "bad", "version": "1", "arch": ["linux"]}},
                "c" * 32: {"spec": {"name": "old", "version": 2.5}},  # numbers: the parser's
                "d" * 32: {"spec": {"name": "x", "version": "1", "ref_count": 1e400}}}
    blob = index_bytes(installs).replace(b"1e+400", b"1e400")
    with caplog.at_level(logging.WARNING):
        records = parse_index(blob)
    assert [(h, r.version) for h, r in records.items()] == [
        ("a" * 32, "1.0"), ("c" * 32, "2.5"), ("d" * 32, "1")]
    assert "index record bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb: arch is not a mapping; not shown" \
        in caplog.text
