"""Fuzzing (issue 7, "Hostile input"): generated hostile datasets through the C-STORE path of a
real StorageSCP (a pynetdicom association in this process) and through the series loader.

Every payload is answered with a named status (Success only when the instance is stored under
its validated UIDs), nothing is written outside the store, and the SCP keeps accepting; every
generated series loads or fails with a ``SeriesLoadError`` that says why. CI runs
``SPINE_NODE_FUZZ_EXAMPLES`` (default 200) examples of each; ``python bench/fuzz.py
--examples 10000`` is the soak.
"""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings

from tests.helpers.hostile import CStoreHarness, check_loader, hostile_instance, hostile_series

EXAMPLES = int(os.environ.get("SPINE_NODE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    h = CStoreHarness(tmp_path_factory.mktemp("fuzz-scp"))
    yield h
    h.close()


@pytest.mark.slow
def test_fuzzed_c_store_payloads_get_a_named_status_and_stay_in_the_store(harness):
    @FUZZ
    @given(hostile_instance())
    def run(instance):
        harness.check(instance)

    run()
    print(f"\nC-STORE fuzz outcomes ({EXAMPLES} examples): {harness.counts}")
    assert sum(harness.counts.values()) >= EXAMPLES
    assert harness.counts.get("0x0000", 0) > 0        # the generator also makes good ones
    assert harness.counts.get("0xC000", 0) > 0        # ... and bad ones
    # What was accepted goes on as a job that ends done, failed or skipped with a reason.
    jobs = harness.process_all()
    print(f"jobs of the accepted instances: {jobs}")
    assert sum(jobs.values()) > 0


def test_fuzzed_series_load_or_fail_with_a_reason(tmp_path):
    outcomes: dict[str, int] = {}

    @FUZZ
    @given(hostile_series())
    def run(files):
        result = check_loader(files, tmp_path)
        key = "loaded" if result == "loaded" else "refused"
        outcomes[key] = outcomes.get(key, 0) + 1

    run()
    print(f"\nseries loader fuzz outcomes ({EXAMPLES} examples): {outcomes}")
    assert outcomes.get("refused", 0) > 0
