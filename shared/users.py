"""Personal API tokens: who a request comes from, verified.

``INCIDENT_API_USERS`` (or the file named by ``INCIDENT_API_USERS_FILE``)
lists people and the SHA-256 of their tokens, one per line (or separated by
commas), ``name:sha256:<64 hex digits>``; ``#`` starts a comment::

    alice:sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08

Only the hash is stored and compared. A fast unsalted hash is enough here
because the tokens are not passwords: :func:`new_token` makes 256 random
bits, so a leaked list cannot be reversed by guessing, and a slow hash
(bcrypt, scrypt) would only add its cost to every API request. A token a
person chose (low entropy) is what would need one: do not hand those out.

``python -m shared.users NAME`` prints a new token for NAME (give it to the
person) and the line to add to the list (which holds no secret).

The presented token is compared with every listed hash, each in constant
time, and every comparison runs whoever matches, so the time taken says
neither whether nor where a token matched."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sys
from dataclasses import dataclass

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,99}")
HEX64 = re.compile(r"[0-9a-f]{64}")


class UsersError(ValueError):
    """The list is malformed; the message names the line, never a token."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_token() -> str:
    """256 random bits, URL-safe: never guessed, so SHA-256 alone protects the stored hash."""
    return "irp_" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class ApiUsers:
    """Names and their token hashes; empty: no personal tokens."""

    entries: tuple[tuple[str, str], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.entries)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.entries)

    def identify(self, presented: str) -> str | None:
        """The name whose token this is, or None; constant time over the list."""
        digest = hash_token(presented).encode()
        found = None
        for name, stored in self.entries:
            if hmac.compare_digest(digest, stored.encode()) and found is None:
                found = name
        return found

    def stamp(self, name: str) -> str | None:
        """A short mark of the person's current token (not the token, not its
        hash): a board session keeps it, so a session outlives neither the
        person's removal from the list nor a new token for them."""
        for known, stored in self.entries:
            if known == name:
                return hashlib.sha256(b"board-session:" + stored.encode()).hexdigest()[:32]
        return None

    def hashes(self) -> tuple[str, ...]:
        return tuple(stored for _, stored in self.entries)


def parse(text: str, source: str = "INCIDENT_API_USERS") -> ApiUsers:
    entries: list[tuple[str, str]] = []
    for number, line in enumerate(re.split(r"[\n,]", text), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, rest = line.partition(":")
        scheme, sep2, digest = rest.partition(":")
        name, digest = name.strip(), digest.strip().lower()
        if not sep or not sep2 or scheme.strip() != "sha256" or not HEX64.fullmatch(digest):
            # The line may hold a token pasted by mistake: name the entry, not its text.
            raise UsersError(f"{source}: entry {number}: expected name:sha256:<64 hex digits> "
                             "(python -m shared.users NAME makes one)")
        if not NAME.fullmatch(name):
            raise UsersError(f"{source}: entry {number}: a name is 1-100 letters, digits or . _ @ + - and starts with a "
                             "letter or digit")
        if name in (n for n, _ in entries):
            raise UsersError(f"{source}: {name} is listed twice")
        if digest in (d for _, d in entries):
            raise UsersError(f"{source}: {name} has the same token as {next(n for n, d in entries if d == digest)}")
        entries.append((name, digest))
    return ApiUsers(tuple(entries))


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not NAME.fullmatch(argv[0]):
        print("usage: python -m shared.users NAME  (prints a new token and its INCIDENT_API_USERS line)", file=sys.stderr)
        return 2
    token = new_token()
    print(f"token for {argv[0]} (give it to them; it is not stored anywhere): {token}")
    print(f"line for INCIDENT_API_USERS_FILE: {argv[0]}:sha256:{hash_token(token)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
