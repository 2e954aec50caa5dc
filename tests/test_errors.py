"""What an error is about is said once, at a boundary (``errors.about``)."""

from __future__ import annotations

import io

import pytest

from lazymount.errors import FormatError, LazymountError, StoreError, about, general
from lazymount.install.extract import extract_tarball


def test_about_prefixes_a_bare_message_once_and_keeps_the_error() -> None:
    error = FormatError("tarball is truncated")
    with pytest.raises(FormatError) as raised, about("pkg-1.0-abc"), about("the store"):
        raise error
    assert raised.value is error  # the same error: its type, errno and traceback kept
    assert str(error) == "the store: tarball is truncated"
    assert error.subject == "the store"  # the inner boundary named it; the outer one left it


def test_about_leaves_a_message_that_names_its_subject_or_needs_none() -> None:
    with pytest.raises(LazymountError) as named, about("pkg"):
        raise StoreError("pkg: cannot write 'x' to the store")
    assert str(named.value) == "pkg: cannot write 'x' to the store"
    with pytest.raises(LazymountError) as bare, about("pkg"):
        raise general(StoreError("lazymount needs GNU tar"))
    assert str(bare.value) == "lazymount needs GNU tar"
    with pytest.raises(ValueError, match="^x$"), about("pkg"):  # not ours: untouched
        raise ValueError("x")


def test_an_entry_point_names_its_subject(tmp_path) -> None:
    with pytest.raises(FormatError) as raised:
        extract_tarball(io.BytesIO(b""), "lzma", tmp_path, what="pkg-1.0-abc")
    assert str(raised.value) == "pkg-1.0-abc: unknown tarball compression 'lzma'"
