"""Load (issue 7): 8 dcmtk ``storescu`` processes at once, each sending its own 300-slice
series to ``spine-node serve``: all 2,400 instances stored and indexed, 8 jobs, and the node's
peak resident memory (``VmHWM``) reported and bounded. The fake pipeline keeps the networks off
the shared CPUs; the worker still loads each 300-slice volume.

``SPINE_NODE_LOAD_MATRIX`` sets the slice size (default 512, i.e. 8 x 150 MB).
"""
from __future__ import annotations

import os
import subprocess
import time

import pytest
from sqlalchemy import text

from storage.db import Database
from tests.helpers import DCMTK_ENV, dcmtk, write_ct_series

pytestmark = [pytest.mark.integration]

ASSOCIATIONS = 8
SLICES = 300
MATRIX = int(os.environ.get("SPINE_NODE_LOAD_MATRIX", "512"))
#: The node's peak RSS must stay below this (the worker holds one 300 x 512 x 512 float32
#: volume, 300 MB, at a time; reception streams each instance to disk).
MAX_RSS_MB = 2048


def _vm(pid: int, key: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) // 1024  # kB -> MB
    raise KeyError(key)


@pytest.fixture(scope="module")
def series_set(tmp_path_factory):
    base = tmp_path_factory.mktemp("load")
    return [write_ct_series(base / f"s{k}", n_slices=SLICES, rows=MATRIX, columns=MATRIX)
            for k in range(ASSOCIATIONS)]


def test_eight_concurrent_300_slice_series_are_all_stored_indexed_and_queued(node_factory,
                                                                            series_set):
    node = node_factory(pipeline={"entry_point": "tests.dicom_node.fake_pipeline:analyse"},
                        node={"max_associations": ASSOCIATIONS + 2}).start()
    t0 = time.perf_counter()
    procs = [subprocess.Popen([dcmtk("storescu"), "-aet", f"CT{k}", "-aec", node.ae_title,
                               "+sd", "127.0.0.1", str(node.port), str(s.directory)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=DCMTK_ENV)
             for k, s in enumerate(series_set)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    seconds = time.perf_counter() - t0
    peak_receiving = _vm(node.proc.pid, "VmHWM")
    assert [p.returncode for p in procs] == [0] * ASSOCIATIONS, outs

    db = Database(f"sqlite:///{node.store_root}/spine-node.db")
    try:
        with db.engine.connect() as conn:
            per_series = dict(conn.execute(text(
                "SELECT s.series_instance_uid, count(i.id) FROM series s "
                "JOIN instances i ON i.series_id = s.id GROUP BY s.id")).all())
    finally:
        db.dispose()
    assert per_series == {s.series_instance_uid: SLICES for s in series_set}
    files = [p for p in (node.store_root / "instances").rglob("*.dcm")]
    assert len(files) == ASSOCIATIONS * SLICES

    jobs = node.wait_for(lambda: (lambda js: js if len(js) == ASSOCIATIONS and all(
        j["state"] == "done" for j in js) else None)(node.cli_json("jobs")),
        timeout=600, interval=2.0, what="8 jobs done")
    assert sorted(j["series_instance_uid"] for j in jobs) == \
        sorted(s.series_instance_uid for s in series_set)
    peak = _vm(node.proc.pid, "VmHWM")
    now = _vm(node.proc.pid, "VmRSS")
    mb = ASSOCIATIONS * SLICES * MATRIX * MATRIX * 2 / 2**20
    print(f"\nload: {ASSOCIATIONS} x {SLICES} slices of {MATRIX}x{MATRIX} ({mb:.0f} MB) in "
          f"{seconds:.1f} s ({mb / seconds:.0f} MB/s); node peak RSS (VmHWM) {peak} MB "
          f"({peak_receiving} MB when the transfers ended), RSS after the jobs {now} MB")
    assert peak < MAX_RSS_MB, f"peak RSS {peak} MB"
    assert node.stop() == 0
