"""A client's IP address, read the one way wherever it arrives: from the
socket, or from the X-Forwarded-For entry a trusted proxy wrote
(shared/serve.py). The board's sign-in limit counts failures by it
(shared/login_throttle.py), so one client must make one address however it
was written.

An IPv4 client seen through a dual-stack socket or proxy is written as an
IPv4-mapped IPv6 address (``::ffff:192.0.2.1``): it is that IPv4 address.
Read as IPv6 it would be counted by its /64, which every IPv4 client shares
(``::ffff:0:0/96`` is inside ``::/64``): one guesser would hold back every
IPv4 client. Standard library only: the server reads it before any function
code runs."""

from __future__ import annotations

import ipaddress

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse(text: str | None) -> Address | None:
    """The address ``text`` names, or None. Read: ``192.0.2.1``,
    ``192.0.2.1:443``, ``2001:db8::1``, ``[2001:db8::1]``,
    ``[2001:db8::1]:443``, an IPv6 address with a zone (``fe80::1%eth0``, the
    zone left out: it is no part of the host, and it is free text, as long
    as the header may be, that would go wherever the address goes: log
    lines); an IPv4-mapped IPv6 address is its IPv4 address. A port must be
    a port number, at most five digits; anything else is no address."""
    text = (text or "").strip()
    if text.startswith("["):
        inside, closed, rest = text[1:].partition("]")
        if not closed or (rest and not _port(rest)):
            return None
        try:
            address = ipaddress.IPv6Address(inside)
        except ValueError:
            return None
    else:
        if text.count(":") == 1:  # IPv4 with a port; an IPv6 address has at least two colons
            text, _, port = text.partition(":")
            if not _port(":" + port):
                return None
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            return None
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.scope_id is not None:
            return ipaddress.IPv6Address(int(address))
    return address


def _port(suffix: str) -> bool:
    # Five digits at most before int(): a longer run is no port, and past
    # 4,300 digits int() raises instead of answering.
    digits = suffix[1:]
    return (suffix.startswith(":") and 0 < len(digits) <= 5 and digits.isascii() and digits.isdigit()
            and int(digits) <= 65535)


def forwarded_entry(text: str) -> str | None:
    """``text`` (an X-Forwarded-For entry, unquoted) as waitress reads back
    the address it names, or None when it names none: IPv4 bare, IPv6 in
    brackets, a port and a zone left out. waitress splits an unbracketed
    entry at its last colon when it holds a dot, taking what follows for a
    port: ``::ffff:192.0.2.1`` became the client ``::ffff``, the same for
    every IPv4 client, and ``2001:db8::192.0.2.1`` no address at all."""
    address = parse(text)
    if address is None:
        return None
    return str(address) if address.version == 4 else f"[{address}]"
