"""A structured letter's top-level members, found without building them.

Parsed whole, a 2 MiB letter of nested arrays became a million Python lists
in each of several copies (parsed, cleaned, the event's attributes, cleaned
again): 262 MB and 5 s for one letter in a function of 192Mi serving four at
once. A letter over :data:`shared.dead_letters.MAX_ITEMS` is read here
instead: the object's members are located by a scan of its text (strings
skipped, brackets paired), and a member that would cost more than what is
left of the bound is kept as its JSON text, never built.

The scan is one pass, left to right: each step searches on from where the
last one ended, and a string must close where it is read or the text is no
JSON. (A regex matching whole strings, run by finditer, retried an unclosed
one at every following character: quadratic, hours for a 2 MiB letter.)
"""

from __future__ import annotations

import json
import re
from collections import deque
from json.decoder import scanstring

_SPACE = re.compile(r"[ \t\n\r]*")
# The start of a string or a bracket: what decides where a value ends.
_STRUCTURE = re.compile(r'[\[\]{}"]')
_CLOSES = {"]": "[", "}": "{"}
# Numbers and literals end at the next delimiter; json.loads judges them.
_SCALAR = re.compile(r'[^,\]}\s]+')


def text_of(body: bytes) -> str:
    """The body as json.loads would decode it (UTF-8, -16 or -32, a BOM dropped)."""
    return body.decode(json.detect_encoding(body), "surrogatepass")


def members(text: str) -> list[tuple[str, str]]:
    """(name, JSON text of the value) of each member of the top-level
    object, in order; ValueError when the text is no JSON object."""
    i = _skip(text, 0)
    if text[i:i + 1] != "{":
        raise ValueError("not a JSON object")
    i = _skip(text, i + 1)
    found: list[tuple[str, str]] = []
    if text[i:i + 1] == "}":
        i += 1
    else:
        while True:
            if text[i:i + 1] != '"':
                raise ValueError("a member name expected")
            name, i = scanstring(text, i + 1)
            i = _skip(text, i)
            if text[i:i + 1] != ":":
                raise ValueError("':' expected")
            start = _skip(text, i + 1)
            i = _value_end(text, start)
            found.append((name, text[start:i]))
            i = _skip(text, i)
            if text[i:i + 1] == ",":
                i = _skip(text, i + 1)
                continue
            if text[i:i + 1] == "}":
                i += 1
                break
            raise ValueError("',' or '}' expected")
    if _skip(text, i) != len(text):
        raise ValueError("extra data after the object")
    return found


def _skip(text: str, i: int) -> int:
    return _SPACE.match(text, i).end()


def _value_end(text: str, i: int) -> int:
    first = text[i:i + 1]
    if first == '"':
        return scanstring(text, i + 1)[1]
    if first not in ("[", "{"):
        match = _SCALAR.match(text, i)
        if match is None:
            raise ValueError("a value expected")
        return match.end()
    (_, end), = deque(scan(text, i), maxlen=1)  # the last span alone: the spans are never held
    return end


def scan(text: str, i: int):
    """The spans (start, end) one array or object at ``i`` is read in, in
    order, each starting where the previous ended: every character is
    visited once. A string is read by the JSON decoder's own scanner
    (which raises at once when it does not close, or holds a control
    character); a closing bracket must pair with the last one opened.
    ValueError when the value is no such JSON (the small letter's answer)."""
    opened: list[str] = []
    position = i
    while True:
        match = _STRUCTURE.search(text, position)
        if match is None:
            raise ValueError("an array or object that does not end")
        char = match.group()
        if char == '"':
            end = scanstring(text, match.end())[1]
        else:
            end = match.end()
            if char in "[{":
                opened.append(char)
            elif not opened or opened.pop() != _CLOSES[char]:
                raise ValueError(f"a '{char}' that closes no bracket of its kind")
        yield position, end
        position = end
        if not opened:
            return
