"""DICOM TLS in front of the node, as deploy/tls/stunnel-spine-node.conf sets it up: a peer with a
certificate from the hospital CA associates over TLS and stores; one without is refused.

stunnel runs the shipped configuration's ``[dicom-tls]`` service with the test's ports and
certificates (made here with openssl); the peer is dcmtk (``echoscu``/``storescu +tls``).
"""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import DCMTK_ENV, REPO, dcmtk, free_port, write_ct_series

pytestmark = pytest.mark.integration

SHIPPED = REPO / "deploy" / "tls" / "stunnel-spine-node.conf"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _pki(folder: Path) -> Path:
    """A CA, a server certificate for the node and a client certificate for a modality."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.crt", "-days", "2", "-subj", "/CN=Test Hospital CA", cwd=folder)
    for name, usage in (("node", "serverAuth"), ("modality", "clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN={name}", cwd=folder)
        (folder / f"{name}.ext").write_text(
            f"extendedKeyUsage={usage}\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile",
                 f"{name}.ext", cwd=folder)
    return folder


def _stunnel_config(folder: Path, tls_port: int, node_port: int) -> Path:
    """The shipped ``[dicom-tls]`` service with the test's ports and files (and no setuid:
    the test does not run stunnel as a service)."""
    lines, section = [], ""
    replacements = {
        "accept": f"127.0.0.1:{tls_port}", "connect": f"127.0.0.1:{node_port}",
        "cert": str(folder / "node.crt"), "key": str(folder / "node.key"),
        "CAfile": str(folder / "ca.crt"),
    }
    for raw in SHIPPED.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
        if section and section != "[dicom-tls]":
            continue  # the outgoing service needs a real PACS
        key = line.split("=", 1)[0].strip()
        if key in ("setuid", "setgid"):
            continue
        if section == "[dicom-tls]" and key in replacements:
            line = f"{key} = {replacements[key]}"
        lines.append(line)
    path = folder / "stunnel.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def tls_node(node_factory, tmp_path):
    stunnel = shutil.which("stunnel4") or shutil.which("stunnel")
    if stunnel is None:
        pytest.skip("stunnel is not installed (apt-get install stunnel4)")
    pki = _pki(tmp_path)
    node = node_factory(worker={"count": 0}).start()
    tls_port = free_port()
    config = _stunnel_config(pki, tls_port, node.port)
    log = open(tmp_path / "stunnel.log", "wb")
    proc = subprocess.Popen([stunnel, str(config)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while b"Configuration successful" not in (tmp_path / "stunnel.log").read_bytes():
        assert proc.poll() is None and time.monotonic() < deadline, \
            (tmp_path / "stunnel.log").read_text()
        time.sleep(0.1)
    yield node, tls_port, pki
    proc.terminate()
    proc.wait(10)
    log.close()


def _tls_args(pki: Path, with_client_cert: bool = True) -> list[str]:
    identity = ["+tls", str(pki / "modality.key"), str(pki / "modality.crt")] \
        if with_client_cert else ["+tla"]
    return [*identity, "+cf", str(pki / "ca.crt")]


def test_a_peer_with_a_hospital_certificate_echoes_and_stores_over_tls(tls_node, tmp_path):
    node, tls_port, pki = tls_node
    echo = subprocess.run([dcmtk("echoscu"), *_tls_args(pki), "-aec", node.ae_title,
                           "127.0.0.1", str(tls_port)], capture_output=True, text=True,
                          env=DCMTK_ENV, timeout=60)
    assert echo.returncode == 0, echo.stdout + echo.stderr

    series = write_ct_series(tmp_path / "ct", n_slices=5, rows=32, columns=32)
    store = subprocess.run([dcmtk("storescu"), *_tls_args(pki), "-aec", node.ae_title, "+sd",
                            "127.0.0.1", str(tls_port), str(series.directory)],
                           capture_output=True, text=True, env=DCMTK_ENV, timeout=60)
    assert store.returncode == 0, store.stdout + store.stderr
    studies = node.cli_json("studies")
    (stored,) = [s for study in studies for s in study["series"]
                 if s["series_instance_uid"] == series.series_instance_uid]
    assert stored["instances"] == 5


def test_a_peer_without_a_client_certificate_is_refused(tls_node):
    node, tls_port, pki = tls_node
    echo = subprocess.run([dcmtk("echoscu"), *_tls_args(pki, with_client_cert=False), "-aec",
                           node.ae_title, "127.0.0.1", str(tls_port)], capture_output=True,
                          text=True, env=DCMTK_ENV, timeout=60)
    assert echo.returncode != 0
    plain = subprocess.run([dcmtk("echoscu"), "-aec", node.ae_title, "127.0.0.1",
                            str(tls_port)], capture_output=True, text=True, env=DCMTK_ENV,
                           timeout=60)
    assert plain.returncode != 0, "plain DICOM must not pass the TLS port"
