"""JSON log lines; fields that look like patient attributes are dropped."""
from __future__ import annotations

import json
import logging

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
