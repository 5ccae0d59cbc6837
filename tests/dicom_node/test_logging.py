"""JSON log lines; fields that look like patient attributes are dropped."""
from __future__ import annotations

import json
import logging

import pytest

from dicom_node.logging import JsonFormatter


def test_json_lines_without_patient_fields():
    record = logging.makeLogRecord({"name": "spine_node.scp", "levelname": "INFO",
                                    "msg": "stored %d", "args": (3,),
                                    "series_uid": "1.2.3", "patient_name": "Doe^John",
                                    "PatientID": "123", "calling_ae": "CT1"})
    out = json.loads(JsonFormatter().format(record))
    assert out["msg"] == "stored 3"
    assert out["series_uid"] == "1.2.3" and out["calling_ae"] == "CT1"
    assert "patient_name" not in out and "PatientID" not in out
    assert out["level"] == "info" and out["ts"].endswith("Z")


_BUILD_RESULTS = """
import logging, sys, tempfile
from pathlib import Path
from dicom_node.logging import setup_logging
from pipeline.outputs import build_outputs
from tests.helpers import synthetic_results as sr

setup_logging("INFO", json_format=True)
if sys.argv[1] == "library-loggers-left-alone":
    logging.getLogger("highdicom").setLevel(logging.NOTSET)
paths, _study, _series = sr.write_series(Path(tempfile.mkdtemp()))
series = sr.load(paths)
build_outputs(series, sr.analysis(series))  # SEG, SR, key image: what a job builds
"""


def _log_of_building_results(mode: str) -> list[dict]:
    import subprocess
    import sys

    from tests.helpers import REPO

    res = subprocess.run([sys.executable, "-c", _BUILD_RESULTS, mode], check=False,
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in res.stderr.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_building_a_jobs_results_adds_no_library_info_lines_to_the_log():
    # The libraries do talk at INFO (else this test would prove nothing) ...
    chatty = [x for x in _log_of_building_results("library-loggers-left-alone")
              if x["logger"].startswith("highdicom") and x["level"] == "info"]
    assert chatty
    # ... but with the node's logging set up, only their warnings and errors get through.
    lines = _log_of_building_results("as-the-node-sets-it-up")
    assert [x for x in lines if not x["logger"].startswith("spine_node")
            and x["level"] in ("debug", "info")] == []
