"""A request body's ``Content-Encoding`` undone, within the body limit.

Relays in front of a webhook sometimes compress what they forward. Read as
it is, a gzip body is "not UTF-8 text", a 400 the sender never retries;
labelled with a coding nobody here reads, it must be a 415 naming it
(RFC 9110 15.5.16), not parsed as if plain. What is decompressed is bounded
by the same limit as what is read: a few kilobytes of gzip can hold
gigabytes.
"""

from __future__ import annotations

import zlib

from shared.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

IDENTITY = "identity"
# zlib's window bits: 16 + 15 reads a gzip member, 15 a zlib stream, -15 raw
# deflate (what some clients send as "deflate" though RFC 9110 says zlib).
_GZIP, _ZLIB, _RAW = 31, 15, -15
READABLE = {"gzip": (_GZIP,), "x-gzip": (_GZIP,), "deflate": (_ZLIB, _RAW)}
_CHUNK = 64 * 1024


def codings(header: str) -> list[str]:
    """The codings in the order they were applied, identity left out."""
    found = [part.strip().lower() for part in header.split(",")]
    return [coding for coding in found if coding and coding != IDENTITY]


def decode(body: bytes, header: str | None, limit: int) -> bytes:
    """``body`` with every coding of ``header`` undone, last applied first;
    at most ``limit`` bytes come out of any of them."""
    applied = codings(header or "")
    unreadable = [coding for coding in applied if coding not in READABLE]
    if unreadable:
        raise UnsupportedMediaType(
            f"Content-Encoding {unreadable[-1]!r} is not supported; send the body as it is, or as gzip or deflate")
    for coding in reversed(applied):
        body = _inflate(body, coding, limit)
    return body


def _inflate(data: bytes, coding: str, limit: int) -> bytes:
    last_error = None
    for window in READABLE[coding]:
        try:
            return _inflate_with(data, window, limit)
        except zlib.error as exc:
            last_error = exc
    raise BadRequest(f"the body is not valid {coding}: {last_error}") from None


def _inflate_with(data: bytes, window: int, limit: int) -> bytes:
    """Every member of the stream (gzip allows several, one after another),
    decompressed a chunk at a time so no more than ``limit`` + 1 bytes are
    ever held."""
    out = bytearray()
    while data:
        inflater = zlib.decompressobj(window)
        pending = data
        while True:
            chunk = inflater.decompress(pending, _CHUNK)
            out += chunk
            if len(out) > limit:
                raise PayloadTooLarge(f"body is over the limit of {limit} bytes once decompressed")
            pending = inflater.unconsumed_tail
            if inflater.eof or not (pending or chunk):
                break
        if not inflater.eof:
            raise zlib.error("the stream ends before its end")
        data = inflater.unused_data
    return bytes(out)
