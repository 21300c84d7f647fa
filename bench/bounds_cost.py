"""What the transaction bounds (shared/db.py Bounds) cost a short transaction.

    PYTHONPATH=. .venv/bin/python bench/bounds_cost.py [DATABASE_URL] [--transactions N]

Three engines on the same database, each running N transactions of one
statement (an INSERT with parameters, then COMMIT: the shape of an intake
write), taking turns transaction by transaction so that a load that comes
and goes on the machine falls on all three alike: without bounds (as
before), with the bounds in the BEGIN's message (as the functions run), and
with the bounds as a ``SET LOCAL`` statement of their own (the round trip
this avoids). Prints the median and 90th percentile microseconds per
transaction of each, and the round trips per transaction counted on the
wire by a TCP proxy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from urllib.parse import urlsplit, urlunsplit

import sqlalchemy as sa

from shared import db

BOUNDS = db.Bounds(2.0, 5.0, 10.0)
SET_LOCAL = BOUNDS.begin[len(db.BEGIN) + 2:]


def transaction(engine, n: int, separate_set: bool) -> float:
    started = time.perf_counter()
    with engine.begin() as tx:
        if separate_set:
            tx.exec_driver_sql(SET_LOCAL)
        tx.execute(INSERT, {"n": n, "note": "x"})
    return (time.perf_counter() - started) * 1e6


INSERT = sa.text("INSERT INTO bounds_cost (n, note) VALUES (:n, :note)")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url", nargs="?", default="postgresql+pg8000://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--transactions", type=int, default=2000)
    args = parser.parse_args()
    from loopback.servers import TcpProxy

    parts = urlsplit(args.url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432).start()
    counted_url = urlunsplit(parts._replace(netloc=f"{parts.username or 'postgres'}@127.0.0.1:{proxy.port}"))
    engines = {
        "no bounds (before)": (db.create_engine_for(args.url, 1, 0), False),
        "bounds in BEGIN (now)": (db.create_engine_for(args.url, 1, 0, bounds=BOUNDS), False),
        "SET LOCAL of its own": (db.create_engine_for(args.url, 1, 0), True),
    }
    with engines["no bounds (before)"][0].begin() as tx:
        tx.exec_driver_sql("CREATE UNLOGGED TABLE IF NOT EXISTS bounds_cost (n int, note text)")
    try:
        times: dict[str, list[float]] = {name: [] for name in engines}
        for n in range(200 + args.transactions):  # the first 200: warming connections and caches
            for name, (engine, separate) in engines.items():
                took = transaction(engine, n, separate)
                if n >= 200:
                    times[name].append(took)
        trips = {}
        for name, (_, separate) in engines.items():
            counted = db.create_engine_for(counted_url, 1, 0, bounds=BOUNDS if "BEGIN" in name else None)
            transaction(counted, 0, separate)
            before = proxy.round_trips
            for n in range(100):
                transaction(counted, n, separate)
            trips[name] = (proxy.round_trips - before) / 100
            counted.dispose()
        for name in engines:
            ordered = sorted(times[name])
            print(f"{name:24s} median {statistics.median(ordered):6.1f} us, p90 {ordered[int(len(ordered) * 0.9)]:6.1f} us "
                  f"per transaction; {trips[name]:.0f} round trips")
    finally:
        with engines["no bounds (before)"][0].begin() as tx:
            tx.exec_driver_sql("DROP TABLE IF EXISTS bounds_cost")
        for engine, _ in engines.values():
            engine.dispose()
        proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
