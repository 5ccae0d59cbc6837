"""Fixtures of the dicom_node tests."""
from __future__ import annotations

import pytest


@pytest.fixture(params=[True, False], ids=["fast_path", "stock"])
def fast_path(request) -> bool:
    """``node.fast_path`` of the node under test: a test that takes it runs on both receive
    paths, the storage SCP's fast path (dicom_node/fastpath) and stock pynetdicom."""
    return request.param
