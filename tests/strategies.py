"""Hypothesis settings and strategies the property tests share: JSON of any shape and
build-cache indexes of a few well-formed specs."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large]
# no example database: nothing is written into the work tree
FAST = settings(max_examples=60, deadline=None, database=None, suppress_health_check=HEALTH)
SLOW = settings(max_examples=25, deadline=None, database=None, suppress_health_check=HEALTH)

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | \
    st.text(max_size=12)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=20,
)
dag_hashes = st.text("abcdefghijklmnopqrstuvwxyz234567", min_size=32, max_size=32)
names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1,
                max_size=12)


def node_strategy(dag_hash: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({
        "name": names, "version": names, "hash": st.just(dag_hash),
        "arch": st.fixed_dictionaries({"platform": st.just("linux"),
                                       "platform_os": st.just("debian12"),
                                       "target": st.sampled_from(["x86_64", "aarch64"])}),
        "namespace": st.just("builtin"),
    })


@st.composite
def indexes(draw) -> dict[str, dict[str, Any]]:
    hashes = draw(st.lists(dag_hashes, min_size=1, max_size=5, unique=True))
    return {h: {"spec": draw(node_strategy(h)), "ref_count": draw(st.integers(0, 3)),
                "in_buildcache": draw(st.booleans())} for h in hashes}
