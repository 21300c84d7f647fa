"""What the transaction bounds (shared/db.py Bounds) cost a short transaction.

    PYTHONPATH=. .venv/bin/python bench/bounds_cost.py [DATABASE_URL] [--transactions N] [--rounds R]

Three engines on the same database, each running N transactions of one
statement (an INSERT with parameters, then COMMIT: the shape of an intake
write) in R alternating rounds: without bounds (as before), with the bounds
in the BEGIN's message (as the functions run), and with the bounds as a
``SET LOCAL`` statement of their own (the round trip this avoids). Prints
the median microseconds per transaction of each, and the round trips per
transaction counted on the wire by a TCP proxy.
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


def run(engine, transactions: int, separate_set: bool) -> float:
    insert = sa.text("INSERT INTO bounds_cost (n, note) VALUES (:n, :note)")
    started = time.perf_counter()
    for n in range(transactions):
        with engine.begin() as tx:
            if separate_set:
                tx.exec_driver_sql(SET_LOCAL)
            tx.execute(insert, {"n": n, "note": "x"})
    return (time.perf_counter() - started) / transactions * 1e6


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url", nargs="?", default="postgresql+pg8000://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--transactions", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
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
        for engine, separate in engines.values():
            run(engine, 200, separate)  # warm: connection, caches
        for _ in range(args.rounds):
            for name, (engine, separate) in engines.items():
                times[name].append(run(engine, args.transactions, separate))
        trips = {}
        for name, (_, separate) in engines.items():
            counted = db.create_engine_for(counted_url, 1, 0, bounds=BOUNDS if "BEGIN" in name else None)
            run(counted, 10, separate)
            before = proxy.round_trips
            run(counted, 100, separate)
            trips[name] = (proxy.round_trips - before) / 100
            counted.dispose()
        for name in engines:
            print(f"{name:24s} median {statistics.median(times[name]):7.1f} us/transaction "
                  f"(rounds: {', '.join(f'{t:.0f}' for t in times[name])}); {trips[name]:.0f} round trips")
    finally:
        with engines["no bounds (before)"][0].begin() as tx:
            tx.exec_driver_sql("DROP TABLE IF EXISTS bounds_cost")
        for engine, _ in engines.values():
            engine.dispose()
        proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
