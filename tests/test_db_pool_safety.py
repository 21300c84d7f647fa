"""A connection whose protocol state is unknown never goes back to the pool."""

import pytest
import sqlalchemy as sa

from shared import db

ECHO = sa.text("SELECT CAST(:x AS text)")


@pytest.fixture
def one_connection_engine(database_url):
    eng = db.create_engine_for(database_url, pool_size=1, max_overflow=0)
    yield eng
    eng.dispose()


def raw_connection_of(eng):
    with eng.connect() as conn:
        return conn.connection.dbapi_connection


@pytest.mark.parametrize("poison", ["lone \ud800 surrogate", "\udfff"])
def test_a_driver_failure_mid_message_discards_the_connection(one_connection_engine, poison):
    before = raw_connection_of(one_connection_engine)
    with pytest.raises(UnicodeEncodeError):
        with one_connection_engine.connect() as conn:
            conn.execute(ECHO, {"x": poison})
    # The same (only) pooled connection, reused right after: every use works.
    for i in range(6):
        with one_connection_engine.connect() as conn:
            assert conn.execute(ECHO, {"x": f"ok{i}"}).scalar() == f"ok{i}"
    assert raw_connection_of(one_connection_engine) is not before


def test_an_error_the_server_reported_keeps_the_connection(one_connection_engine):
    before = raw_connection_of(one_connection_engine)
    with pytest.raises(sa.exc.DBAPIError):
        with one_connection_engine.connect() as conn:
            conn.execute(sa.text("SELECT 1 / 0"))
    with one_connection_engine.connect() as conn:
        assert conn.execute(ECHO, {"x": "fine"}).scalar() == "fine"
    assert raw_connection_of(one_connection_engine) is before
