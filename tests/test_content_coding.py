"""Undoing a request body's Content-Encoding within the body limit
(shared/content_coding.py), in-process; over HTTP in tests/test_intake_relays.py."""

import gzip
import tracemalloc
import zlib

import pytest

from shared import content_coding, errors

BODY = b'{"alerts": []}' * 50


def raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-15)
    return packer.compress(data) + packer.flush()


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


def test_a_body_of_thousands_of_empty_gzip_members_is_refused_at_the_member_cap():
    """Each member is a new decompressor: 1 MiB of 20-byte empty members was
    52,000 of them and most of a second of CPU (2 MiB, six seconds)."""
    empty = gzip.compress(b"")
    members = empty * (1024 * 1024 // len(empty))
    with pytest.raises(errors.BadRequest, match=f"more than {content_coding.MAX_GZIP_MEMBERS} gzip members"):
        content_coding.decode(members, "gzip", 1024 * 1024)


def test_gzip_members_up_to_the_cap_are_all_read():
    body = b"".join(gzip.compress(b"%d," % n) for n in range(content_coding.MAX_GZIP_MEMBERS))
    assert content_coding.decode(body, "gzip", 1000) == b"".join(b"%d," % n for n in range(content_coding.MAX_GZIP_MEMBERS))


@pytest.mark.parametrize("stream", [zlib.compress(b""), raw_deflate(b"")], ids=["zlib", "raw"])
def test_a_deflate_body_is_one_stream_and_data_after_it_is_refused(stream):
    """RFC 9110 8.4.1.2: deflate is one zlib stream. A second stream after it
    was read like a gzip member (1 MiB of empty zlib streams: 2.4 s)."""
    with pytest.raises(errors.BadRequest, match="^the body is not valid deflate"):
        content_coding.decode(stream * 2, "deflate", 1000)


def test_a_corrupt_deflate_body_is_reported_with_the_zlib_error_not_the_raw_fallbacks():
    with pytest.raises(errors.BadRequest, match="incorrect header check"):
        content_coding.decode(b"\x00\x01\x02 not deflate", "deflate", 1000)


@pytest.mark.parametrize("header", ["UTF-8", "utf8", "text", "chunked", "gzip, utf-8"])
def test_a_header_value_that_is_not_a_compression_leaves_the_body_as_it_is(header, caplog):
    """Senders put a charset or a transfer coding in Content-Encoding
    (expressjs/body-parser #100, #108); the body was stored before codings
    were read, and a 415 is never retried."""
    body = gzip.compress(BODY) if header.startswith("gzip") else BODY
    assert content_coding.decode(body, header, len(BODY)) == BODY
    assert "not a content coding" in caplog.text


@pytest.mark.parametrize("coding", ["br", "zstd", "compress", "x-compress", "dcb", "dcz", "aes128gcm", "exi", "pack200-gzip"])
def test_every_registered_compression_that_cannot_be_undone_is_unsupported(coding):
    with pytest.raises(errors.UnsupportedMediaType, match=repr(coding)):
        content_coding.decode(b"x", coding, 100)


def test_a_gzip_bomb_is_refused_holding_little_more_than_the_limit():
    """A gzip of 1 GiB of spaces (about 1 MB of input) at a 1 MiB limit: the
    decoded body held is bounded by the limit plus one chunk, not by what
    the input could become."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    spaces = b" " * (1024 * 1024)
    bomb = b"".join(packer.compress(spaces) for _ in range(1024)) + packer.flush()
    tracemalloc.start()
    try:
        with pytest.raises(errors.PayloadTooLarge):
            content_coding.decode(bomb, "gzip", 1024 * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, peak
