"""Fixtures shared by the tests of the result objects (tests/pipeline/test_outputs_*.py)."""
from __future__ import annotations

import pytest

from pipeline.outputs import build_outputs
from tests.helpers import synthetic_results as synth


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """(series, perfect analysis, version-1 outputs) of the small synthetic CT series; one per
    test module, so that no module sees what another did to the datasets."""
    paths, _study, _series = synth.write_series(tmp_path_factory.mktemp("ct"))
    series = synth.load(paths)
    result = synth.analysis(series)
    return series, result, build_outputs(series, result, version=1)
