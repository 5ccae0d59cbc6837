"""A full disk (issue 7): the store on a 96 MiB tmpfs, not the machine's disk.

Below ``storage.min_free_mb`` C-STORE answers 0xA700 (Out of Resources), no partial file is
left, ``/health`` answers 503 and says why; once space is freed the node accepts again. With no
floor at all, the file system itself running out (ENOSPC) is answered the same way.
Needs root (``mount -t tmpfs``); skipped otherwise.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import storescu, write_config, write_ct_series

pytestmark = pytest.mark.integration

MiB = 2**20


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(path: Path, leave_free: int) -> Path:
    """A filler file that leaves about ``leave_free`` bytes free on ``path``'s file system."""
    filler = path / "filler.bin"
    filler.unlink(missing_ok=True)
    free = os.statvfs(path).f_bavail * os.statvfs(path).f_frsize
    with open(filler, "wb") as fh:
        fh.truncate(0)
        chunk = b"\0" * MiB
        for _ in range(max(0, (free - leave_free) // MiB)):
            fh.write(chunk)
    return filler


def _responses(out: str) -> list[str]:
    return re.findall(r"Received Store Response \(([^)]*)\)", out)


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_full_disk_answers_out_of_resources_keeps_nothing_partial_and_recovers(
        node_factory, tmpfs, tmp_path):
    store = tmpfs / "store"
    node = node_factory(storage={"root": str(store), "min_free_mb": 32, "fsync": True,
                                 "database_url": f"sqlite:///{tmp_path}/index.db"},
                        worker={"count": 0})
    node.start()
    series = write_ct_series(tmp_path / "ct", n_slices=30, rows=512, columns=512)  # 30 x 512 KiB
    filler = _fill(tmpfs, leave_free=44 * MiB)         # room for ~12 MiB above the floor

    res = storescu(node, series.directory, "-v", "-nh")
    answers = _responses(res.stdout + res.stderr)
    assert len(answers) == 30, res.stdout + res.stderr
    ok = answers.count("Success")
    refused = answers.count("Refused: OutOfResources")
    assert ok + refused == 30 and 10 <= ok < 30 and refused > 0, answers
    instances = [p for p in _files(store / "instances")]
    assert len(instances) == ok                        # what was answered Success is there
    assert not list(store.rglob(".tmp-*")), "a partial file was left behind"
    status, body = node.http_get("/health")
    health = json.loads(body)
    assert status == 503 and health["status"] == "unhealthy"
    assert any("storage.min_free_mb = 32" in r and "refused (0xA700)" in r or
               "below storage.min_free_mb = 32" in r for r in health["reasons"]), health

    filler.unlink()                                    # space freed: accepted again
    res = storescu(node, series.directory, "-v", "-nh")
    assert _responses(res.stdout + res.stderr) == ["Success"] * 30, res.stdout + res.stderr
    [study] = node.cli_json("studies")
    assert study["series"][0]["instances"] == 30
    status, body = node.http_get("/health")
    assert status == 200, body
    node.stop()

    # No floor: the file system itself fills up (ENOSPC) in the middle of a write.
    node.config["storage"]["min_free_mb"] = 0
    write_config(node.config_path, node.config)
    node.start()
    more = write_ct_series(tmp_path / "more", n_slices=8, rows=512, columns=512,
                           study_instance_uid=series.study_instance_uid)
    _fill(tmpfs, leave_free=int(1.5 * MiB))
    res = storescu(node, more.directory, "-v", "-nh")
    answers = _responses(res.stdout + res.stderr)
    assert len(answers) == 8 and "Refused: OutOfResources" in answers, answers
    assert not list(store.rglob(".tmp-*")), "a partial file was left behind"
    assert len(_files(store / "instances" / more.study_instance_uid
                      / more.series_instance_uid)) == answers.count("Success")
    assert "instance write failed" in node.log()
    assert node.cli("echo", f"{node.ae_title}@127.0.0.1:{node.port}").returncode == 0
