"""docs/conformance-statement.md says what the node does, and cannot drift from it.

- Its generated tables equal what :mod:`dicom_node.conformance` renders from the code now.
- Every SOP class / transfer syntax pair it lists is accepted by a running Storage SCP, and pairs
  it does not list are rejected: the statement is compared with the network, not with constants.
- The objects the node really builds (SEG, SR, key image) have the SOP classes, transfer syntax,
  coding schemes and private codes that the statement lists.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit, MRImageStorage
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from dicom_node import conformance
from dicom_node.scp import StorageSCP
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
STATEMENT = ROOT / "docs" / "conformance-statement.md"
MPEG2_MAIN_PROFILE = "1.2.840.10008.1.2.4.100"

sys.path.insert(0, str(ROOT / "docs"))
import generate_conformance  # noqa: E402  (docs/ is not a package)


@pytest.fixture(scope="module")
def examples():
    """A SEG, an SR and a key image built by the real builders, by result kind."""
    return generate_conformance.example_objects()


@pytest.fixture(scope="module")
def statement() -> str:
    return STATEMENT.read_text()


def test_generated_tables_equal_what_the_code_renders(statement, examples):
    wanted = conformance.update_statement(statement, conformance.render_blocks(examples))
    current_blocks = conformance.generated_blocks(statement)
    wanted_blocks = conformance.generated_blocks(wanted)
    stale = [name for name in wanted_blocks if current_blocks.get(name) != wanted_blocks[name]]
    assert not stale, (f"docs/conformance-statement.md is out of date in {stale}: "
                       "run `python docs/generate_conformance.py` and review the diff")


def test_every_generated_block_has_content(statement):
    blocks = conformance.generated_blocks(statement)
    assert {"overview", "parameters", "scp-sop-classes", "scp-transfer-syntaxes", "association-policy",
            "scp-store-statuses", "created-sop-classes", "scu-contexts", "modules-seg",
            "modules-sr", "modules-key-image", "coding-schemes", "private-codes"} <= set(blocks)
    assert all(body.strip() for body in blocks.values())


@pytest.fixture
def running_scp():
    """The node's Storage SCP with its default settings, listening on a free loopback port."""
    settings = conformance.default_settings()
    settings.node.host = "127.0.0.1"
    settings.node.port = free_port()
    scp = StorageSCP(settings, index=None, store=None)
    scp.start()
    yield scp
    scp.drain(timeout_s=5)


def _negotiate(port: int, pairs: list[tuple[str, str]]) -> tuple[set, set]:
    """Propose each (SOP class, transfer syntax) as its own presentation context; return the
    accepted and the rejected pairs."""
    assert len(pairs) <= 128, "one association carries at most 128 presentation contexts"
    ae = AE(ae_title="CONFORMANCE")
    ae.acse_timeout = ae.network_timeout = 10
    for sop_class, ts in pairs:
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title="SPINENODE")
    assert assoc.is_established, "the SCP refused the association"
    try:
        accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                    for cx in assoc.accepted_contexts}
        rejected = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                    for cx in assoc.rejected_contexts}
    finally:
        assoc.release()
    return accepted, rejected


def test_scp_accepts_exactly_the_pairs_the_statement_lists(statement, running_scp):
    listed = conformance.statement_scp_pairs(statement)
    assert (CTImageStorage, ExplicitVRLittleEndian) in listed
    # The statement lists what the SCP is configured with ...
    configured = {(cx.sop_class_uid, ts) for cx in conformance.scp_contexts()
                  for ts in cx.transfer_syntaxes}
    assert listed == configured
    # ... and the SCP on the network accepts each of them, and nothing next to them.
    unlisted = [(MRImageStorage, ExplicitVRLittleEndian), (MRImageStorage, ImplicitVRLittleEndian),
                (CTImageStorage, MPEG2_MAIN_PROFILE), (Verification, JPEGBaseline8Bit)]
    assert not set(unlisted) & listed
    accepted, rejected = _negotiate(running_scp.port, sorted(listed) + unlisted)
    assert accepted == listed, {
        "listed but refused": sorted(listed - accepted),
        "accepted but not listed": sorted(accepted - listed)}
    assert rejected == set(unlisted)


def test_statement_lists_the_scp_sop_classes_it_negotiates(statement):
    blocks = conformance.generated_blocks(statement)
    listed_classes = set(conformance.uids_in(blocks["scp-sop-classes"]))
    assert listed_classes == {sop for sop, _ts in conformance.statement_scp_pairs(statement)}


def test_created_objects_match_the_statement(statement, examples):
    blocks = conformance.generated_blocks(statement)
    created = conformance.uids_in(blocks["created-sop-classes"])
    assert created == [str(examples[kind].SOPClassUID) for kind in ("seg", "sr", "key_image")]
    proposed = conformance.uids_in(blocks["scu-contexts"])
    for ds in examples.values():
        assert str(ds.SOPClassUID) in proposed
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert f"{UID(ExplicitVRLittleEndian).name} (`{ExplicitVRLittleEndian}`)" in \
            blocks["scu-contexts"]

    # Every coding scheme used anywhere in the objects is in the statement, and every private
    # code they use is defined there.
    used = conformance.coding_schemes(examples.values())
    for scheme in used:
        assert f"| `{scheme}` |" in blocks["coding-schemes"]
    private = conformance.private_schemes(examples.values())
    assert private, "the SR declares the project's private coding scheme"
    for ds in examples.values():
        for scheme, value, _meaning in conformance._codes(ds):
            if scheme in private:
                assert f"| `{scheme}` | `{value}` |" in blocks["private-codes"]


def test_no_mandatory_module_is_missing_from_a_created_object(examples):
    for kind, ds in examples.items():
        missing = [u.module for u in conformance.iod_modules(ds)
                   if u.usage == "M" and not u.present and not u.optional_only]
        assert not missing, f"{kind}: mandatory modules missing: {missing}"


def test_association_policy_names_the_scu_pdu_size(statement):
    from dicom_node import scu

    assert f"PDU size: {scu.MAX_PDU} bytes proposed" in statement
