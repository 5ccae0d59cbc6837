"""The fast receive path is the storage SCP's alone (``node.fast_path``, issue 25).

While the node's storage SCP runs in this process, the exporter's C-STORE SCU
(:func:`dicom_node.scu.store_files`) and a plain pynetdicom SCP beside it get stock pynetdicom
associations (``Association``, ``DULServiceProvider``, ``DIMSEServiceProvider``,
``AssociationSocket``, nothing else), the SCP's own associations are the fast path's
subclasses (or stock ones with ``node.fast_path = false``), and no attribute of any pynetdicom
module or class is different after the SCP started, received and stopped. The fast path holds
for the pynetdicom versions it was tested with only: the installed one must be one of them,
and ``pyproject.toml`` must pin them.
"""
from __future__ import annotations

import re
import sys
import threading
import tomllib
from pathlib import Path

import pynetdicom
import pytest
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket

from config import load_settings
from dicom_node.context import NodeContext
from dicom_node.fastpath.hooks import SCPDIMSE, SCPDUL, TESTED_PYNETDICOM_VERSIONS, SCPAssociation, SCPSocket
from dicom_node.scp import StorageSCP
from dicom_node.scu import Peer, Timeouts, store_files
from tests.helpers import free_port, write_ct_series

REPO = Path(__file__).resolve().parents[2]
STOCK = (Association, DULServiceProvider, DIMSEServiceProvider, AssociationSocket)
FAST = (SCPAssociation, SCPDUL, SCPDIMSE, SCPSocket)
TIMEOUTS = Timeouts(connect_s=5, acse_s=10, dimse_s=20, network_s=20)
_MISSING = object()


def _classes(assoc: Association) -> tuple[type, ...]:
    return type(assoc), type(assoc.dul), type(assoc.dimse), type(assoc.dul.socket)


def _associations_now() -> dict[str, list[tuple[type, ...]]]:
    """The classes of every association of this process at this moment, by role."""
    found: dict[str, list[tuple[type, ...]]] = {"acceptor": [], "requestor": []}
    for thread in threading.enumerate():
        if isinstance(thread, Association) and thread.dul.socket is not None:
            found["acceptor" if thread.is_acceptor else "requestor"].append(_classes(thread))
    return found


def _pynetdicom_state() -> dict[tuple[str, ...], object]:
    """Every attribute of every loaded pynetdicom module and of every class defined in one:
    what a process-wide patch (or a changed ``_config`` value) would change."""
    state: dict[tuple[str, ...], object] = {}
    for name, module in list(sys.modules.items()):
        if name != "pynetdicom" and not name.startswith("pynetdicom."):
            continue
        for attr, value in list(vars(module).items()):
            state[(name, attr)] = value
            if isinstance(value, type) and value.__module__.startswith("pynetdicom"):
                for class_attr, class_value in list(vars(value).items()):
                    state[(name, attr, class_attr)] = class_value
    return state


def _changed(before: dict, after: dict) -> list[str]:
    """What differs; not ``__slotnames__``, which ``copy.deepcopy`` caches on a class."""
    modules = {key[0] for key in before}
    changed = [key for key, value in before.items() if after.get(key, _MISSING) is not value]
    added = [key for key in after if key not in before and key[0] in modules
             and (len(key) == 2 or (key[0], key[1]) in before)
             and key[-1] != "__slotnames__"]
    return [".".join(key) for key in changed + added]


@pytest.fixture
def node_scp(tmp_path):
    """``make(fast_path)``: the node's StorageSCP in this process on a fresh store, and what
    classes the associations of the process had while it served each C-STORE."""
    opened: list[tuple[NodeContext, StorageSCP]] = []

    def make(fast_path: bool) -> tuple[StorageSCP, list[dict]]:
        settings = load_settings(None, node={"ae_title": "SCOPESCP", "host": "127.0.0.1",
                                             "port": free_port(), "fast_path": fast_path},
                                 storage={"root": str(tmp_path / "store"), "min_free_mb": 0,
                                          "fsync": False, "sqlite_synchronous": "NORMAL"},
                                 logging={"level": "WARNING"})
        ctx = NodeContext.open(settings)
        scp = StorageSCP(settings, ctx.index, ctx.store)
        seen: list[dict] = []
        on_store = scp._on_store

        def recording(event):
            seen.append(_associations_now())
            return on_store(event)

        scp._on_store = recording
        opened.append((ctx, scp))
        return scp, seen

    yield make
    for ctx, scp in opened:
        scp.drain(timeout_s=5)
        ctx.close()


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast_path", "stock"])
def test_the_exporters_association_is_stock_pynetdicom_while_the_scp_runs(node_scp, tmp_path,
                                                                          fast_path):
    """The exporter's SCU sends a series to the node's own SCP (both ends in this process,
    at the same time), then to a plain pynetdicom SCP; pynetdicom is the same before and
    after."""
    series = write_ct_series(tmp_path / "ct", n_slices=3, rows=16, columns=16)
    before = _pynetdicom_state()
    scp, seen = node_scp(fast_path)
    scp.start()
    assert scp.server.fast_path is fast_path

    outcomes = store_files(series.paths, Peer("SCOPESCP", "127.0.0.1", scp.port),
                           calling_ae="SPINENODE", timeouts=TIMEOUTS)
    assert [o.ok for o in outcomes] == [True] * 3
    assert len(seen) == 3
    for during in seen:   # while the SCP served each C-STORE
        assert during["acceptor"] == [FAST if fast_path else STOCK]
        assert during["requestor"] == [STOCK]

    # A plain pynetdicom SCP in the same process, while the node's SCP runs: stock too.
    plain_seen = []

    def on_store(event):
        plain_seen.append((_classes(event.assoc), _associations_now()["requestor"]))
        return 0x0000

    plain = AE(ae_title="PLAINSCP")
    for cx in StoragePresentationContexts:
        plain.add_supported_context(cx.abstract_syntax)
    server = plain.start_server(("127.0.0.1", 0), block=False,
                                evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        outcomes = store_files(series.paths[:1],
                               Peer("PLAINSCP", "127.0.0.1", server.server_address[1]),
                               calling_ae="SPINENODE", timeouts=TIMEOUTS)
    finally:
        server.shutdown()
    assert [o.ok for o in outcomes] == [True]
    assert plain_seen == [(STOCK, [STOCK])]

    scp.drain(timeout_s=5)
    assert _changed(before, _pynetdicom_state()) == []


def test_the_installed_pynetdicom_is_a_version_the_fast_path_was_tested_with():
    """Fails (never skips) on another version: the subclasses copy pynetdicom's reactor loops
    and service code, which a new release may change. Compare the new version's
    ``dul.py``, ``association.py``, ``dimse.py`` and ``transport.py`` with the copies in
    dicom_node/fastpath/hooks.py, run these tests and bench/ingest with ``--variant
    stock::node.fast_path=false``, then add the version to TESTED_PYNETDICOM_VERSIONS and
    pyproject.toml."""
    assert pynetdicom.__version__ in TESTED_PYNETDICOM_VERSIONS, (
        f"pynetdicom {pynetdicom.__version__} is installed; the fast path was tested with "
        f"{', '.join(TESTED_PYNETDICOM_VERSIONS)} (dicom_node/fastpath/hooks.py)")


def test_pyproject_pins_pynetdicom_to_the_tested_versions():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    [requirement] = [d for d in project["dependencies"]
                     if re.match(r"pynetdicom\b", d.replace(" ", ""))]
    pinned = re.findall(r"==\s*([\w.]+)", requirement)
    assert pinned and set(pinned) <= set(TESTED_PYNETDICOM_VERSIONS), (
        f"pyproject.toml asks for {requirement!r}; the fast path was tested with "
        f"{TESTED_PYNETDICOM_VERSIONS}")
