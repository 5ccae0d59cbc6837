"""Who may talk to the node (issue 7, "Access"): DICOM TLS in the node itself (dcmtk
``echoscu``/``storescu +tls`` with certificates made here by openssl; a peer without a trusted
certificate is refused and audited), the host allow-list (addresses and networks), the limit
on concurrent associations, and the exporter sending over TLS."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from storage.db import Database
from tests.helpers import DCMTK_ENV, NodeProcess, dcmtk, free_port, storescu, write_ct_series

pytestmark = pytest.mark.integration


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A hospital CA with a server certificate for the node and a client certificate for a
    modality, and a second CA (a stranger) with its own client certificate."""
    folder = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogue-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key",
                 "-out", f"{ca}.crt", "-days", "2", "-subj", f"/CN={ca}", cwd=folder)
    for name, ca, usage in (("node", "ca", "serverAuth"), ("modality", "ca", "clientAuth"),
                            ("stranger", "rogue-ca", "clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN={name}", cwd=folder)
        (folder / f"{name}.ext").write_text(
            f"extendedKeyUsage={usage}\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey",
                 f"{ca}.key", "-CAcreateserial", "-out", f"{name}.crt", "-days", "2",
                 "-extfile", f"{name}.ext", cwd=folder)
    return folder


def _tls_section(pki: Path, **extra) -> dict:
    return {"tls.enabled": True, "tls.cert_file": str(pki / "node.crt"),
            "tls.key_file": str(pki / "node.key"), "tls.ca_file": str(pki / "ca.crt"),
            "tls.handshake_timeout_s": 3.0, **extra}


def _tls_node(node_factory, pki: Path, **tls) -> NodeProcess:
    node = node_factory(worker={"count": 0})
    # write_config writes flat sections; [node.tls] is a table of its own.
    cfg_text = node.config_path.read_text()
    table = "\n[node.tls]\n" + "\n".join(
        f"{k.split('.', 1)[1]} = {json.dumps(v)}" for k, v in _tls_section(pki, **tls).items()
        if k.startswith("tls.")) + "\n"
    node.config_path.write_text(cfg_text + table)
    return node.start()


def _echo(port: int, *args: str, ae: str = "SPINENODE") -> subprocess.CompletedProcess:
    return subprocess.run([dcmtk("echoscu"), "-v", *args, "-aec", ae, "127.0.0.1", str(port)],
                          capture_output=True, text=True, env=DCMTK_ENV, timeout=60)


def _audit(node: NodeProcess) -> list[tuple]:
    db = Database(f"sqlite:///{node.store_root}/spine-node.db")
    try:
        with db.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(
                "SELECT event_type, actor, outcome, details FROM audit_events ORDER BY id"))]
    finally:
        db.dispose()


def test_tls_only_listener_takes_trusted_peers_and_refuses_the_others(node_factory, pki,
                                                                      tmp_path):
    node = _tls_node(node_factory, pki)
    trusted = ["+tls", str(pki / "modality.key"), str(pki / "modality.crt"),
               "+cf", str(pki / "ca.crt")]
    echo = _echo(node.port, *trusted)
    assert echo.returncode == 0, echo.stdout + echo.stderr
    assert "Received Echo Response (Success)" in echo.stdout + echo.stderr

    series = write_ct_series(tmp_path / "ct", n_slices=5, rows=32, columns=32)
    res = storescu(node, series.directory, *trusted)
    assert res.returncode == 0, res.stdout + res.stderr
    [study] = node.cli_json("studies")
    assert study["series"][0]["instances"] == 5

    # Refused: no client certificate, a certificate from another CA, plain DICOM.
    anonymous = _echo(node.port, "+tla", "+cf", str(pki / "ca.crt"))
    stranger = _echo(node.port, "+tls", str(pki / "stranger.key"), str(pki / "stranger.crt"),
                     "+cf", str(pki / "ca.crt"))
    plain = _echo(node.port)
    for res in (anonymous, stranger, plain):
        assert res.returncode != 0, res.stdout + res.stderr
        assert "Received Echo Response" not in res.stdout + res.stderr
    # A peer that opens TCP and says nothing does not block the listener (handshake deferred
    # to the association's thread and bounded by handshake_timeout_s).
    import socket
    with socket.create_connection(("127.0.0.1", node.port)):
        t0 = time.monotonic()
        again = _echo(node.port, *trusted)
        assert again.returncode == 0, again.stdout + again.stderr
        assert time.monotonic() - t0 < 3.0
    # Still serving, and every refusal is in the audit trail as a TLS node-authentication alert.
    node.wait_for(lambda: sum(1 for e in _audit(node) if e[0] == "tls_failure") >= 3,
                  timeout=20, what="TLS failures audited")
    failures = [e for e in _audit(node) if e[0] == "tls_failure"]
    assert all(e[2] == "rejected" and "TLS handshake failed" in e[3] for e in failures)
    assert '"atna_event_id": "110113"' in failures[0][3]
    assert _echo(node.port, *trusted).returncode == 0


def test_tls_beside_the_plain_port_and_the_exporters_tls_client(node_factory, pki, tmp_path):
    """``node.tls.port`` set: plain DICOM on node.port, TLS on the other; our own SCU
    (:mod:`dicom_node.scu`, as the exporter uses it) delivers over TLS with a client
    certificate and checks the server's."""
    from dicom_node.scu import Peer, StoreError, store_files
    from dicom_node.tls import client_context

    tls_port = free_port()
    node = _tls_node(node_factory, pki, **{"tls.port": tls_port})
    assert _echo(node.port).returncode == 0                      # plain port still plain
    assert _echo(tls_port).returncode != 0                       # TLS port needs TLS

    series = write_ct_series(tmp_path / "ct", n_slices=3, rows=16, columns=16)
    ctx = client_context(ca_file=pki / "ca.crt", cert_file=pki / "modality.crt",
                         key_file=pki / "modality.key")
    peer = Peer("SPINENODE", "127.0.0.1", tls_port, "tls-node", ssl_context=ctx)
    outcomes = store_files(series.paths, peer, calling_ae="EXPORTER")
    assert [o.ok for o in outcomes] == [True] * 3, outcomes
    # A server certificate we do not trust: no association, a clear error.
    wrong = client_context(ca_file=pki / "rogue-ca.crt", cert_file=pki / "modality.crt",
                           key_file=pki / "modality.key")
    with pytest.raises(StoreError):
        store_files(series.paths[:1], Peer("SPINENODE", "127.0.0.1", tls_port, "x",
                                           ssl_context=wrong), calling_ae="EXPORTER")
    [study] = node.cli_json("studies")
    assert study["series"][0]["instances"] == 3


def test_host_allow_list_takes_addresses_and_networks(node_factory):
    outside = node_factory(node={"allowed_hosts": ["10.11.12.0/24", "192.0.2.7"]}).start()
    res = _echo(outside.port, "-aet", "MODALITY")
    assert res.returncode != 0
    assert "Association Rejected" in res.stdout + res.stderr
    rejected = outside.wait_for(lambda: [e for e in _audit(outside) if e[0] == "association"],
                                timeout=10, what="the rejection audited")
    assert rejected and rejected[0][1:3] == ("MODALITY@127.0.0.1", "rejected")
    assert "node.allowed_hosts" in rejected[0][3]

    inside = node_factory(node={"allowed_hosts": ["127.0.0.0/8"]}).start()
    res = _echo(inside.port, "-aet", "MODALITY")
    assert res.returncode == 0, res.stdout + res.stderr
    accepted = inside.wait_for(lambda: [e for e in _audit(inside) if e[0] == "association"],
                               timeout=10, what="the association audited")
    assert accepted[0][1:3] == ("MODALITY@127.0.0.1", "accepted")
    assert '"atna_event_id": "110114"' in accepted[0][3]


def test_associations_beyond_the_limit_are_rejected_transiently(node_factory):
    from pynetdicom import AE
    node = node_factory(node={"max_associations": 2}).start()
    holders = []
    try:
        for _ in range(2):
            ae = AE(ae_title="HOLDER")
            ae.add_requested_context("1.2.840.10008.1.1")
            assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
            assert assoc.is_established
            holders.append(assoc)
        res = _echo(node.port, "-aet", "THIRD")
        out = res.stdout + res.stderr
        assert res.returncode != 0
        assert "Association Rejected" in out and "Local Limit Exceeded" in out, out
    finally:
        for assoc in holders:
            assoc.release()
    # Once one is released, the next peer gets in; the refusal is audited with its reason.
    node.wait_for(lambda: _echo(node.port, "-aet", "THIRD").returncode == 0, timeout=20,
                  what="a free association slot")
    [limit] = node.wait_for(lambda: [e for e in _audit(node) if e[0] == "association"
                                     and e[2] == "rejected"], timeout=10, what="audited")
    assert limit[1] == "THIRD@127.0.0.1" and "node.max_associations = 2" in limit[3]
