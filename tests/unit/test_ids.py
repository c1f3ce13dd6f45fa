from __future__ import annotations

import os
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cocoon.api.ids import MAX_ID_BYTES, is_valid_id, short_hash, validate_id
from cocoon.errors import InvalidArgument

# --- refusals first: every one names the field and the value, on one line ---


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "empty"),
        (".", "'.'"),
        ("..", "'..'"),
        ("a/b", "'/'"),
        ("/abs", "'/'"),
        ("../escape", "'/'"),
        ("a\0b", "control"),
        ("a\nb", "control"),
        ("tab\there", "control"),
        ("\x7f", "control"),
        ("a b", "outside"),
        ("a:b", "outside"),
        ("a,b", "outside"),  # Go's [\w+-\.] accepts a comma by accident of the range; we do not
        ("caf\u00e9", "outside"),  # \w is ASCII here, as in Go
        ("\u0661\u0662", "outside"),  # Arabic-Indic digits are \w in Unicode regexes
        ("x" * (MAX_ID_BYTES + 1), "1024 bytes"),
    ],
)
def test_bad_ids_are_refused_with_a_one_line_error(value, reason):
    with pytest.raises(InvalidArgument) as info:
        validate_id(value)
    text = str(info.value)
    assert "\n" not in text
    assert reason in text
    assert info.value.field == "container id"
    assert text.startswith("invalid container id")


def test_error_names_the_field_given():
    with pytest.raises(InvalidArgument) as info:
        validate_id("a/b", what="exec id")
    assert info.value.field == "exec id"
    assert str(info.value).startswith("invalid exec id")
    assert "'a/b'" in str(info.value)


def test_long_value_is_truncated_in_the_error():
    with pytest.raises(InvalidArgument) as info:
        validate_id("y" * 5000)
    assert len(str(info.value)) < 300


def test_non_string_is_refused():
    with pytest.raises(InvalidArgument, match="must be a string"):
        validate_id(42)  # type: ignore[arg-type]


def test_trailing_newline_is_refused():
    # `re.match(r"...$")` would accept "abc\n"; fullmatch must not.
    with pytest.raises(InvalidArgument):
        validate_id("abc\n")


# --- acceptance ---


@pytest.mark.parametrize(
    "value",
    ["a", "abc", "A-Z_0.9+x", "...", ".hidden", "-leading", "x" * MAX_ID_BYTES, "4f1e6c3a" * 8, "a..b"],
)
def test_good_ids_are_returned_unchanged(value):
    assert validate_id(value) == value


# --- properties ---

_ALLOWED = re.compile(r"[A-Za-z0-9_+.\-]{1,1024}")


@given(st.text(max_size=40))
def test_never_accepts_slash_nul_or_dot_names(value):
    try:
        out = validate_id(value)
    except InvalidArgument:
        return
    assert out == value
    assert "/" not in value
    assert "\0" not in value
    assert value not in (".", "..")
    assert _ALLOWED.fullmatch(value)
    assert len(value.encode()) <= MAX_ID_BYTES


@given(st.one_of(st.text(max_size=20), st.from_regex(r"[A-Za-z0-9_+.\-]{0,20}", fullmatch=True)))
def test_is_valid_id_agrees_with_validate_id(value):
    try:
        validate_id(value)
        accepted = True
    except InvalidArgument:
        accepted = False
    assert is_valid_id(value) is accepted


@given(st.text(alphabet=st.sampled_from("./\0a"), max_size=8))
def test_dot_and_slash_heavy_inputs(value):
    try:
        validate_id(value)
    except InvalidArgument:
        return
    # Whatever is accepted is one path component that cannot climb out of the state root.
    assert os.path.normpath(os.path.join("/run/cocoon", value)) == f"/run/cocoon/{value}"


@given(st.from_regex(r"[A-Za-z0-9_+.\-]{1,64}", fullmatch=True).filter(lambda v: v not in (".", "..")))
def test_accepts_whole_whitelist(value):
    assert validate_id(value) == value


@given(st.text(min_size=1, max_size=30))
def test_short_hash_is_16_hex_and_stable(value):
    h = short_hash(value)
    assert re.fullmatch(r"[0-9a-f]{16}", h)
    assert short_hash(value) == h


def test_short_hash_differs_for_different_ids():
    assert short_hash("a") != short_hash("b")


def test_short_socket_path_fits_sun_path():
    # /run/cocoon/s/<hash>/monitor.sock must stay well below 108 bytes whatever the id's length.
    path = f"/run/cocoon/s/{short_hash('z' * 1024)}/monitor.sock"
    assert len(path.encode()) < 108
