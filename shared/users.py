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
neither whether nor where a token matched.

The file named by ``INCIDENT_API_USERS_FILE`` is read again when it changes
(:class:`UsersSource`, checked at most every ``CHECK_SECONDS``): Kubernetes
updates a mounted Secret in place, without restarting anything, so removing
a person from the Secret takes effect within about a minute (the kubelet's
sync) and ends their board sessions. A new list that does not parse is not
taken: the old one stays and an error names the entry's number. A file that
is gone (its key or the Secret deleted) is an empty list: every personal
token is refused, with an error naming the path, until it is back. At the
start, a missing or unreadable file stops the query (a wrong path).

Only the query function reads the list (at its start, where a malformed
one stops it); the other functions never parse it."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

CHECK_SECONDS = 5.0
log = logging.getLogger("users")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,99}")
HEX64 = re.compile(r"[0-9a-f]{64}")


class UsersError(ValueError):
    """The list is malformed; the message names the line, never a token."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def _utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def new_token() -> str:
    """256 random bits, URL-safe: never guessed, so SHA-256 alone protects the stored hash."""
    return "irp_" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class ApiUsers:
    """Names and their token hashes; empty: no personal tokens."""

    entries: tuple[tuple[str, str], ...] = ()
    # When this list was read (naive UTC, like the database's timestamps).
    loaded_at: datetime = field(default_factory=_utc_now, compare=False)

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

    def read_after(self, moment: datetime) -> bool:
        """Whether this list was read after ``moment`` (naive UTC): then a
        board session made before it with another stamp was made with a list
        older than this one. One made later may come from a replica that
        already has a newer list than this (the kubelet updates each pod's
        copy of the Secret in its own time). The session's time is the
        database's clock, this the replica's: NTP keeps them within
        milliseconds, and a list read within that of a session's creation is
        not one minutes behind."""
        return self.loaded_at > moment

    def hashes(self) -> tuple[str, ...]:
        return tuple(stored for _, stored in self.entries)


def parse(text: str, source: str = "INCIDENT_API_USERS", forbidden: str | None = None) -> ApiUsers:
    """``forbidden``: the SHA-256 of the shared token, which no personal token may be."""
    entries: list[tuple[str, str]] = []
    names: set[str] = set()
    owners: dict[str, str] = {}  # hash -> name
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
        if name in names:
            raise UsersError(f"{source}: {name} is listed twice")
        if digest in owners:
            raise UsersError(f"{source}: {name} has the same token as {owners[digest]}")
        if digest == forbidden:
            # The shared token's caller names itself; a person's token proves who it is: one token cannot be both.
            raise UsersError(f"{source}: entry {number}: a personal token equals INCIDENT_API_TOKEN; give that person a "
                             "token of their own")
        entries.append((name, digest))
        names.add(name)
        owners[digest] = name
    return ApiUsers(tuple(entries))


class UsersSource:
    """The list as it is now: ``INCIDENT_API_USERS`` (fixed for the process)
    or the file named by ``INCIDENT_API_USERS_FILE``, read again when its
    status (inode, size, modification time) changes, looked at no more than
    every ``check_seconds``: a request pays one clock read, and one stat now
    and then. Parsed at first use, not when the settings are read: only the
    query function uses it (:meth:`load` at its start)."""

    def __init__(self, text: str | None = None, path: str | None = None, forbidden: str | None = None,
                 check_seconds: float = CHECK_SECONDS, clock=time.monotonic):
        self._text, self._path, self._forbidden = text, path, forbidden
        self._source = "INCIDENT_API_USERS_FILE" if path else "INCIDENT_API_USERS"
        self._check_seconds, self._clock = check_seconds, clock
        self._lock = threading.Lock()
        self._users: ApiUsers | None = None
        self._seen: tuple | None = None
        self._checked = 0.0

    def load(self) -> ApiUsers:
        """The list, read now; raises UsersError when it is malformed or unreadable."""
        with self._lock:
            if self._users is None:
                if self._path:
                    self._seen, text = self._read()
                else:
                    text = self._text or ""
                self._users = parse(text, self._source, self._forbidden)
                self._checked = self._clock()
            return self._users

    def current(self) -> ApiUsers:
        """The list as it is now. A request takes it once and asks that one
        list everything (shared/http.py request_users): two reads could
        straddle a reload, and a token identified by the old list be stamped
        from the new one."""
        users = self._users if self._users is not None else self.load()
        if not self._path or self._clock() - self._checked < self._check_seconds:
            return users
        with self._lock:
            if self._clock() - self._checked >= self._check_seconds:
                self._checked = self._clock()
                self._refresh()
            return self._users

    def _refresh(self) -> None:
        try:
            status = self._status()
            if status == self._seen:
                return
            if status is None:
                # The key or the Secret was removed: that revokes every personal token, as an empty list would.
                log.error("Personal token list file is gone: no personal token is accepted until it is back",
                          extra={"path": self._path})
                self._seen, self._users = None, ApiUsers()
                return
            seen, text = self._read()
            users = parse(text, self._source, self._forbidden)
        except UsersError as exc:
            # The old list stays: a typo in the Secret must not sign everyone out, nor let anyone in.
            log.error("Personal token list not reloaded; the previous one stays", extra={"error": str(exc)})
            return
        self._seen = seen
        if users != self._users:
            # The same list read again keeps the time it was first read: it is no newer.
            log.info("Personal token list reloaded", extra={"people": len(users.entries)})
            self._users = users

    def _status(self) -> tuple | None:
        """The file's status, or None when there is no file at the path."""
        try:
            status = os.stat(self._path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise UsersError(f"{self._source}: cannot read {self._path}: {exc.strerror}") from None
        return (status.st_ino, status.st_size, status.st_mtime_ns)

    def _read(self) -> tuple[tuple, str]:
        """The file's status and text, the status taken first: a change while
        reading shows as a new status at the next check and is read again."""
        status = self._status()
        try:
            if status is None:
                raise FileNotFoundError(2, "No such file or directory")
            with open(self._path, encoding="utf-8") as handle:
                return status, handle.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsersError(f"{self._source}: cannot read {self._path}: {getattr(exc, 'strerror', None) or 'not UTF-8'}") from None


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
