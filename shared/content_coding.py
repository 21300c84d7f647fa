"""A request body's ``Content-Encoding`` undone, within the body limit.

Relays in front of a webhook sometimes compress what they forward. Read as
it is, a gzip body is "not UTF-8 text", a 400 the sender never retries;
labelled with a compression coding nobody here reads, it must be a 415
naming it (RFC 9110 15.5.16), not parsed as if plain. Some senders put a
charset or a transfer coding there (``UTF-8``, ``chunked``): those are not
compressions, and the body is read as it is, as it was before codings were
looked at. No more than the route's limit plus one byte is ever decoded
(a few kilobytes of gzip can hold gigabytes), from input fed one chunk at
a time. The work done is bounded
too: a gzip body may hold at most MAX_GZIP_MEMBERS members, and a deflate
body exactly one stream.
"""

from __future__ import annotations

import logging
import zlib

from shared.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

log = logging.getLogger("http")

IDENTITY = "identity"
# zlib's window bits: 16 + 15 reads a gzip member, 15 a zlib stream, -15 raw
# deflate (what some clients send as "deflate" though RFC 9110 says zlib).
_GZIP, _ZLIB, _RAW = 31, 15, -15
READABLE = {"gzip": (_GZIP,), "x-gzip": (_GZIP,), "deflate": (_ZLIB, _RAW)}
# The IANA HTTP Content Coding Registry's compressions and encryptions this
# code cannot undo: a body so coded is unreadable, so a 415 naming the coding.
# Anything else in the header (a charset, "chunked") is a sender's mistake
# about a body that is not coded at all.
UNREADABLE = frozenset({"br", "zstd", "compress", "x-compress", "dcb", "dcz", "aes128gcm", "exi", "pack200-gzip"})
# gzip allows members one after another; a real sender writes one or a few.
# Thousands of empty 20-byte members make thousands of decompressors.
MAX_GZIP_MEMBERS = 32
_CHUNK = 64 * 1024


def codings(header: str) -> list[str]:
    """The codings in the order they were applied, identity left out."""
    found = [part.strip().lower() for part in header.split(",")]
    return [coding for coding in found if coding and coding != IDENTITY]


def decode(body: bytes, header: str | None, limit: int) -> bytes:
    """``body`` with every compression of ``header`` undone, last applied
    first; each decoding yields at most ``limit`` + 1 bytes (then a 413)."""
    applied = codings(header or "")
    unreadable = [coding for coding in applied if coding in UNREADABLE]
    if unreadable:
        raise UnsupportedMediaType(
            f"Content-Encoding {unreadable[-1]!r} is not supported; send the body as it is, or as gzip or deflate")
    not_codings = [coding for coding in applied if coding not in READABLE]
    if not_codings:
        log.warning("Content-Encoding is not a content coding; the body is read as it is",
                    extra={"content_encoding": (header or "")[:100]})
    for coding in reversed([coding for coding in applied if coding in READABLE]):
        body = _inflate(body, coding, limit)
    return body


def _inflate(data: bytes, coding: str, limit: int) -> bytes:
    """The first way of reading ``coding`` that works; when none does, the
    error of the first (the standard one: zlib for deflate)."""
    first_error = None
    for window in READABLE[coding]:
        try:
            return _inflate_with(data, window, limit)
        except zlib.error as exc:
            first_error = first_error or exc
    raise BadRequest(f"the body is not valid {coding}: {first_error}") from None


def _inflate_with(data: bytes, window: int, limit: int) -> bytes:
    """Every stream of ``data``: up to MAX_GZIP_MEMBERS gzip members, or the
    one zlib or raw deflate stream. Input is fed a chunk at a time (zlib then
    copies at most that chunk into ``unconsumed_tail`` or ``unused_data``) and
    each read is at most min(chunk, ``limit`` + 1 - decoded so far), so
    besides the input what is held is at most ``limit`` + 1 decoded bytes,
    one chunk of input, and, while they are joined, one copy of the output."""
    view = memoryview(data)
    parts: list[bytes] = []
    size = 0
    position = 0
    members = 0
    while position < len(view):
        members += 1
        if window != _GZIP:
            if members > 1:
                raise zlib.error("data after the end of the stream (a deflate body is one stream)")
        elif members > MAX_GZIP_MEMBERS:
            raise BadRequest(f"the body is not valid gzip: more than {MAX_GZIP_MEMBERS} gzip members")
        inflater = zlib.decompressobj(window)
        pending: bytes | memoryview = b""
        produced = True
        while not inflater.eof:
            if not pending:
                if position < len(view):
                    pending = view[position:position + _CHUNK]
                    position += len(pending)
                elif not produced:
                    raise zlib.error("the stream ends before its end")
            chunk = inflater.decompress(pending, min(_CHUNK, limit + 1 - size))
            produced = bool(chunk)
            if chunk:
                parts.append(chunk)
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"body is over the limit of {limit} bytes once decompressed")
            pending = inflater.unconsumed_tail
        position -= len(inflater.unused_data)
    return b"".join(parts)
