"""storage.prepared: the receive path's statements on the DB-API cursor store what SQLAlchemy's
own execution stores (values, DateTime text, row counts), and the kept writer connection
recovers from a failed transaction."""
from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select, text

from storage.db import Database
from storage.index import Index
from storage.models import Instance, Series
from tests.storage.test_index_queue import _record


@pytest.fixture()
def db(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'index.db'}")
    database.upgrade()
    yield database
    database.dispose()


def test_fast_insert_stores_what_sqlalchemy_stores(db):
    fast, slow = Index(db), Index(db)
    slow._fast = None                     # the same statements through Connection.execute
    assert fast._fast is not None
    assert fast.add_instances([_record(1), _record(2)]) == [True, True]
    assert slow.add_instances([_record(3), _record(2)]) == [True, False]   # duplicate: 0 rows
    assert fast.add_instances([_record(3)]) == [False]
    with db.engine.connect() as conn:
        rows = conn.execute(text("SELECT sop_instance_uid, received_at, frames, size_bytes, "
                                 "instance_number FROM instances ORDER BY id")).all()
        stamps = [r[1] for r in rows]
        # DateTime as SQLAlchemy writes it on SQLite, whichever path wrote it
        for stamp in stamps:
            dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f")
        assert [(r[0], r[2], r[4]) for r in rows] == [(_record(k).sop_instance_uid, 1, k)
                                                      for k in (1, 2, 3)]
        [series] = conn.execute(select(Series)).all()
        assert series.state == "receiving" and series.last_received_at == \
            conn.scalar(select(Instance.received_at).where(Instance.id == 3))


def test_kept_connection_is_dropped_after_a_failed_group_and_the_next_one_works(db):
    index = Index(db)
    assert index.add_instances([_record(1)]) == [True]
    first = index._writer_conn

    def fail(_new, _known):
        raise OSError("rename failed")

    with pytest.raises(OSError):
        index.add_instances([_record(2)], before_commit=fail)
    assert index._writer_conn is None
    assert index.add_instances([_record(2)]) == [True]       # rolled back before, new now
    assert index._writer_conn is not first
    index.close()
    assert index._writer_conn is None
