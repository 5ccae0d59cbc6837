"""Extra acceptor processes (``node.acceptor_processes``, dicom_node/acceptors.py): concurrent
dcmtk senders are served by more than one process, every instance is stored and indexed once,
and the children never outlive ``serve`` (SIGTERM drains them, kill -9 of serve stops them)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import storescu, wait_for, write_ct_series

pytestmark = [pytest.mark.integration]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped) counts as gone
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().split(") ")[-1][0] != "Z"


def _pids_logging(log: str, msg: str) -> set[int]:
    pids = set()
    for line in log.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("msg") == msg:
            pids.add(rec["pid"])
    return pids


def _closing_pids(log: str) -> set[int]:
    return _pids_logging(log, "association closed")


def _listening(node, pid: int) -> bool:
    return pid in _pids_logging(node.log(), "storage SCP listening")


def test_two_processes_share_the_port_and_store_every_instance_once(node_factory, tmp_path):
    node = node_factory(node={"acceptor_processes": 2},
                        logging={"level": "INFO"}, scheduler={"stable_seconds": 3600}).start()
    wait_for(lambda: len(_children(node.proc.pid)) == 1, 30, "the acceptor process")
    child = _children(node.proc.pid)[0]
    wait_for(lambda: _listening(node, child), 30, "the acceptor process listening")
    series = [write_ct_series(tmp_path / f"s{k}", n_slices=6, rows=32, columns=32) for k in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda s: storescu(node, s.directory), series))
    assert [r.returncode for r in results] == [0] * 8, [r.stdout[-500:] for r in results]
    studies = node.cli_json("studies")
    assert sum(sum(se["instances"] for se in st["series"]) for st in studies) == 48
    # both processes answered associations (8 associations, the kernel spreads them)
    wait_for(lambda: _closing_pids(node.log()) == {node.proc.pid, child}, 10,
             f"associations closed by both processes, got {_closing_pids(node.log())}")
    # a re-send of everything adds nothing (duplicates across processes)
    assert storescu(node, series[0].directory).returncode == 0
    assert sum(sum(se["instances"] for se in st["series"]) for st in node.cli_json("studies")) == 48

    assert node.stop() == 0
    assert not _alive(child)


def test_acceptors_stop_when_serve_is_killed(node_factory):
    node = node_factory(node={"acceptor_processes": 3}).start()
    wait_for(lambda: len(_children(node.proc.pid)) == 2, 30, "two acceptor processes")
    children = _children(node.proc.pid)
    node.kill9()
    wait_for(lambda: not any(_alive(c) for c in children), 15, "acceptors gone after kill -9")


def test_a_dead_acceptor_is_started_again(node_factory, tmp_path):
    node = node_factory(node={"acceptor_processes": 2}).start()
    wait_for(lambda: len(_children(node.proc.pid)) == 1, 30, "the acceptor process")
    first = _children(node.proc.pid)[0]
    time.sleep(5.5)  # past the restart delay of a fresh child
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: [c for c in _children(node.proc.pid) if c != first and _alive(c)], 20,
             "a new acceptor process")
    s = write_ct_series(tmp_path / "s", n_slices=4, rows=32, columns=32)
    assert storescu(node, s.directory).returncode == 0
