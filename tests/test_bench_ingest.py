"""bench/ingest's storage peer (bench/storage_path.py): small smoke versions of the benchmark
commands (issue 8). The storage path must write what the storage SCP writes, or its share of
the node's time would not be the node's storage work."""
from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from dicom_node import part10
from tests.helpers import dcmtk

REPO = Path(__file__).resolve().parents[1]


def _bench_module(name: str) -> ModuleType:
    """A module of bench/ loaded from its file (bench/ is not a package, and not put on
    sys.path, where its names could shadow others)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ingest = _bench_module("ingest")
storage_path = _bench_module("storage_path")


def test_the_storage_path_writes_and_indexes_what_the_scp_would(tmp_path):
    _, files, _ = ingest.make_series(3, 32, tmp_path / "cache")
    ingest.write_node_config(tmp_path / "run", {}, 11112)
    seconds, cpu = storage_path.run(tmp_path / "run" / "node.toml", files)
    assert seconds > 0 and cpu >= 0
    con = sqlite3.connect(tmp_path / "run" / "store" / "spine-node.db")
    try:
        rows = con.execute("SELECT path, size_bytes FROM instances ORDER BY instance_number")\
            .fetchall()
    finally:
        con.close()
    assert len(rows) == 3
    for source, (relpath, size) in zip(files, rows):
        stored = (tmp_path / "run" / "store" / relpath).read_bytes()
        original = source.read_bytes()
        dataset = original[storage_path.part10_offset(memoryview(original)):]
        sop = Path(relpath).stem
        # as the SCP stores it: its Part 10 prefix, then the data set exactly as received
        assert stored == part10.file_prefix(storage_path._CT, sop, storage_path._EXPLICIT_LE) \
            + dataset
        assert size == len(stored)


@pytest.mark.slow
def test_bench_ingest_prints_the_storage_paths_share_of_the_nodes_time(tmp_path):
    dcmtk("storescu")   # the sender (.ci/run installs dcmtk)
    out = tmp_path / "ingest.json"
    env = {**os.environ, "SPINE_BENCH_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, str(REPO / "bench" / "ingest.py"), "--rounds", "1",
                          "--slices", "3", "--matrix", "32", "--peers", "storage,node",
                          "--json", str(out)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "storage path (no network) / node: per-round median" in run.stdout
    result = json.loads(out.read_text())
    [share] = result["ratios"]["storage_share_of_node"]["per_round"]
    storage = result["summary"]["storage"]["seconds"]
    node = result["summary"]["node"]["seconds"]
    assert share == storage / node and share > 0
    assert not any("bound" in key for key in result["ratios"])


@pytest.mark.slow
def test_bench_ingest_runs_both_receive_paths_in_the_same_rounds(tmp_path):
    """``--both-paths``: the node's fast receive path and stock pynetdicom
    (``node.fast_path = false``) receive in the same rounds, compared per round."""
    dcmtk("storescu")
    out = tmp_path / "ingest.json"
    env = {**os.environ, "SPINE_BENCH_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, str(REPO / "bench" / "ingest.py"), "--rounds", "1",
                          "--slices", "3", "--matrix", "32", "--peers", "node", "--both-paths",
                          "--json", str(out)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["summary"]) == {"node", "node-stock"}
    assert result["variants"]["node-stock"][1] == {"node.fast_path": "false"}
    [ratio] = result["ratios"]["node_vs_node-stock"]["per_round"]
    assert ratio == (result["summary"]["node-stock"]["seconds"]
                     / result["summary"]["node"]["seconds"])
    assert "node_vs_node-stock: throughput" in run.stdout
