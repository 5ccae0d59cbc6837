"""Code the tests share: peers and series (:mod:`tests.helpers.peers`), hostile inputs
(:mod:`tests.helpers.hostile`), an Orthanc of their own (:mod:`tests.helpers.orthanc_server`),
synthetic analysis results (:mod:`tests.helpers.synthetic_results`)."""
from tests.helpers.peers import (
    DCMTK_ENV,
    REPO,
    NodeProcess,
    WrittenSeries,
    create_pg_database,
    dcmtk,
    free_port,
    node_config,
    storescu,
    wait_for,
    write_config,
    write_ct_series,
)

__all__ = [
    "REPO",
    "DCMTK_ENV",
    "WrittenSeries",
    "write_ct_series",
    "dcmtk",
    "wait_for",
    "free_port",
    "write_config",
    "node_config",
    "NodeProcess",
    "create_pg_database",
    "storescu",
]
