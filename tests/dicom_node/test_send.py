"""``spine-node send``: a series on disk reaches a running node (``spine-node serve``) whichever
``storescu`` is on PATH; a peer that is not there is a readable error and a failing status."""
from __future__ import annotations

import pytest

from tests.helpers import free_port, write_ct_series


@pytest.fixture
def node(node_factory):
    # No worker and a long stable time: the series stays as received.
    return node_factory(worker={"count": 0},
                        scheduler={"stable_seconds": 3600, "poll_seconds": 0.5}).start()


def test_send_stores_a_folder_of_a_series_in_the_node(node, tmp_path):
    written = write_ct_series(tmp_path / "study" / "series-1", n_slices=12, rows=16, columns=16)
    (tmp_path / "study" / "README.txt").write_text("not DICOM: left out")

    res = node.cli("send", str(tmp_path / "study"))  # to this node: its config's AE and port

    assert f"sent 12 of 12 instances to SPINENODE@127.0.0.1:{node.port}" in res.stdout
    assert node.cli_json("studies") == [{
        "study_instance_uid": written.study_instance_uid,
        "series": [{"series_instance_uid": written.series_instance_uid, "modality": "CT",
                    "instances": 12, "state": "receiving", "chosen": False, "reason": None}]}]


def test_send_to_a_peer_that_is_not_there_fails_readably(node, tmp_path):
    written = write_ct_series(tmp_path / "series", n_slices=2, rows=8, columns=8)
    port = free_port()
    res = node.cli("send", str(written.directory), "--to", f"NOBODY@127.0.0.1:{port}",
                   check=False)
    assert res.returncode == 1
    assert f"no association with NOBODY@127.0.0.1:{port}: connection refused" in res.stderr
    assert node.cli_json("studies") == []
