"""What ``system/redact.py`` hides in the texts lazymount shows and stores: a URL's user
information, query values and fragment, and Authorization values and Bearer tokens."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from lazymount.mirror.timeouts import Timeouts
from lazymount.mirror.transport import HttpMirror
from lazymount.system.redact import HIDDEN, redact, redact_url


@pytest.mark.parametrize(("text", "shown"), [
    ("GET https://alice:s3cret@h:8/x failed", "GET https://***@h:8/x failed"),
    ("http://h/c?token=abc", "http://h/c?token=***"),
    ("http://h/c?a=1&b=2#key: not found.", "http://h/c?a=***&b=***#***: not found."),
    ("http://h/c?SECRET, then", "http://h/c?***, then"),
    ("http://h/c?dG9rZW4=", "http://h/c?***"),  # a bare base64 token: its padding is no name
    ("http://h/c?000=", "http://h/c?***"),
    ("http://u:p@ss@[::1]:80/c", "http://***@[::1]:80/c"),  # an '@' in the password
    ("'https://s3/x?X-Amz-Signature=abc'", "'https://s3/x?X-Amz-Signature=***'"),
    ("Authorization: Bearer abc.def", "Authorization: ***"),
    ("proxy-authorization=Basic dXNlcjpwdw==", "proxy-authorization=***"),
    ("sent Bearer abc.def-ghi", "sent Bearer ***"),
    ("mail a@b about http://h/x", "mail a@b about http://h/x"),
    ("the login is bearer as alice", "the login is bearer as alice"),
])
def test_secrets_in_a_text_are_hidden(text, shown):
    assert redact(text) == shown


# what a password or token is made of in a URL ('/', '?', '#' and '@' are encoded there)
SECRETS = st.text(st.characters(codec="ascii", categories=("L", "N"),
                                include_characters="-._~%+="), min_size=4, max_size=40)


@given(secret=SECRETS, place=st.sampled_from([
    "http://{s}@h/c", "http://u:{s}@h/c", "https://h/c?token={s}", "https://h/c?a=1&t={s}",
    "https://h/c#{s}", "https://h:1/c/?{s}", "Authorization: Bearer {s}", "Bearer {s}"]))
def test_no_secret_survives_in_any_message(secret, place):
    message = "lmhello: {}: HTTP 404 (trying the next mirror)"
    assume(secret not in message.format(place.format(s=HIDDEN)))  # "http" is no secret there
    assert secret not in redact(message.format(place.format(s=secret)))


def test_a_mirror_sends_its_query_and_shows_it_hidden():
    mirror = HttpMirror("http://u:pw@127.0.0.1:8/cache/?token=SECRET#k", Timeouts())
    assert mirror.url == "http://***@127.0.0.1:8/cache?token=***"
    assert mirror.base == "http://127.0.0.1:8/cache" and mirror.query == "?token=SECRET"
    assert mirror.where("v3/layout.json") == "http://***@127.0.0.1:8/cache/v3/layout.json?token=***"
    assert redact_url(mirror.url) == mirror.url  # hiding twice changes nothing
