"""Undoing a request body's Content-Encoding within the body limit
(shared/content_coding.py), in-process; over HTTP in tests/test_intake_relays.py."""

import gzip
import zlib

import pytest

from shared import content_coding, errors

BODY = b'{"alerts": []}' * 50


def test_every_member_of_a_multi_member_gzip_body_is_read():
    assert content_coding.decode(gzip.compress(b"ab") + gzip.compress(b"cd"), "gzip", 100) == b"abcd"


@pytest.mark.parametrize("header", [None, "", "identity", " Identity , identity"])
def test_no_coding_leaves_the_body_as_it_is(header):
    assert content_coding.decode(b"\x1f\x8b not read", header, 100) == b"\x1f\x8b not read"


def test_a_body_of_exactly_the_limit_once_inflated_is_read_and_one_byte_more_is_refused():
    packed = gzip.compress(BODY)
    assert content_coding.decode(packed, "gzip", len(BODY)) == BODY
    with pytest.raises(errors.PayloadTooLarge, match="once decompressed"):
        content_coding.decode(packed, "gzip", len(BODY) - 1)


def test_output_that_outgrows_the_input_many_times_over_is_read_whole():
    """Inflation a chunk at a time: the last chunks come from no new input."""
    large = bytes(range(256)) * 4096 + b"\x00" * (3 * 1024 * 1024)
    assert content_coding.decode(zlib.compress(large, 9), "deflate", len(large)) == large


@pytest.mark.parametrize("data", [gzip.compress(b"{}") + b"trailing", gzip.compress(b"{}")[:-1]])
def test_a_truncated_or_trailing_gzip_body_is_a_bad_request_naming_gzip(data):
    with pytest.raises(errors.BadRequest, match="^the body is not valid gzip"):
        content_coding.decode(data, "gzip", 100)


def test_an_empty_body_stays_empty_whatever_its_coding():
    """The JSON reader then says the body is empty."""
    assert content_coding.decode(b"", "gzip", 10) == b""


def test_the_coding_named_unsupported_is_the_one_that_cannot_be_read():
    with pytest.raises(errors.UnsupportedMediaType, match="'br'"):
        content_coding.decode(b"x", "gzip, br", 100)
