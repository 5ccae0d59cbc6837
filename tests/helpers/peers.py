"""Helpers shared by the tests (imported as ``from tests.helpers import ...``).

- :func:`write_ct_series`: a synthetic CT series, one file per slice, written with pydicom.
- :func:`dcmtk`: the path of a real dcmtk tool (``/usr/bin/storescu``, not pynetdicom's
  look-alike console scripts in the venv); :data:`DCMTK_ENV` turns Nagle off for dcmtk.
- :func:`free_port`, :func:`write_config`.
- fixture ``node_factory`` / class :class:`NodeProcess`: ``spine-node serve`` as a subprocess
  on free ports with a temporary config; ``node.cli("jobs", "--json")`` runs a command against
  the same config.

The pytest fixtures that use them (``node_factory``, ``postgres_url``) are in tests/conftest.py.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[2]

#: Environment for dcmtk tools: Debian's dcmtk leaves Nagle on (~45 ms per message otherwise).
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


# -- synthetic DICOM -------------------------------------------------------------------------
@dataclass
class WrittenSeries:
    directory: Path
    paths: list[Path]
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: list[str]


def write_ct_series(out_dir: str | os.PathLike[str], *, n_slices: int = 30, rows: int = 64,
                    columns: int = 64, pixel_spacing: tuple[float, float] = (0.8, 0.8),
                    slice_spacing: float = 1.0, origin: Sequence[float] = (-25.0, -25.0, 0.0),
                    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
                    z_positions: Sequence[float] | None = None, modality: str = "CT",
                    study_instance_uid: str | None = None,
                    series_instance_uid: str | None = None,
                    frame_of_reference_uid: str | None = None,
                    sop_class_uid: str = CTImageStorage,
                    pixels: Callable[[int], np.ndarray] | None = None,
                    rescale: tuple[float, float] = (1.0, -1024.0),
                    mutate: Callable[[FileDataset, int], None] | None = None,
                    prefix: str = "slice") -> WrittenSeries:
    """Write a CT series (one Explicit VR Little Endian file per slice).

    Slice ``k`` sits at ``origin + z_k * normal`` with ``z_k = k * slice_spacing`` unless
    ``z_positions`` is given. ``pixels(k)`` returns the stored values (uint16, rows x columns;
    default: a gradient with a bright disc). ``mutate(ds, k)`` may change anything before saving.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    study = study_instance_uid or generate_uid()
    series = series_instance_uid or generate_uid()
    frame_ref = frame_of_reference_uid or generate_uid()
    ori = np.asarray(orientation, dtype=float)
    normal = np.cross(ori[:3], ori[3:])
    zs = list(z_positions) if z_positions is not None else \
        [k * slice_spacing for k in range(n_slices)]
    yy, xx = np.mgrid[0:rows, 0:columns]
    base = ((xx + yy) % 256).astype(np.uint16) + 24
    disc = ((yy - rows / 2) ** 2 + (xx - columns / 2) ** 2) < (min(rows, columns) / 5) ** 2
    now = dt.datetime(2024, 1, 2, 3, 4, 5)
    paths, sops = [], []
    for k, z in enumerate(zs):
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class_uid
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = sop_class_uid
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame_ref
        ds.PatientName = "Test^Phantom"
        ds.PatientID = "PHANTOM-1"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.Modality = modality
        ds.Manufacturer = "spine-node tests"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PositionReferenceIndicator = ""
        pos = np.asarray(origin, dtype=float) + float(z) * normal
        ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in ori]
        ds.SliceLocation = f"{float(z):.4f}"
        ds.SliceThickness = f"{slice_spacing:.4f}"
        ds.PixelSpacing = [f"{pixel_spacing[0]:.4f}", f"{pixel_spacing[1]:.4f}"]
        ds.KVP = "120"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = columns
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = f"{rescale[1]:g}"
        ds.RescaleSlope = f"{rescale[0]:g}"
        ds.RescaleType = "HU"
        arr = pixels(k) if pixels is not None else np.where(disc, 1024 + 400 + k, base + k)
        ds.PixelData = np.ascontiguousarray(arr, dtype=np.uint16).tobytes()
        if mutate is not None:
            mutate(ds, k)
        path = out / f"{prefix}{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        sops.append(sop)
    return WrittenSeries(out, paths, study, series, frame_ref, sops)


# -- tools and ports ---------------------------------------------------------------------------
def dcmtk(name: str) -> str:
    """Path of the dcmtk tool ``name``; skips the test when dcmtk is not installed.

    The venv also has pynetdicom's ``storescu``/``echoscu`` scripts; those are not dcmtk.
    """
    for candidate in (f"/usr/bin/{name}", f"/usr/local/bin/{name}"):
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    if found and "/.venv/" not in found and "site-packages" not in found:
        return found
    pytest.skip(f"dcmtk tool {name} is not installed (apt-get install dcmtk)")


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             diagnostics: Callable[[], str] = lambda: "", interval: float = 0.25) -> Any:
    """Poll ``predicate`` until it returns something true (returned) or ``timeout`` s pass
    (TimeoutError naming ``what``, followed by ``diagnostics()``)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}\n"
                               + diagnostics())
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(value)


def write_config(path: Path, sections: dict[str, Any]) -> Path:
    """Write a TOML config: ``{"node": {"port": 1}, "destinations": [{...}]}``."""
    lines = []
    for section, values in sections.items():
        if isinstance(values, list):
            for entry in values:
                lines.append(f"[[{section}]]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in entry.items()]
        else:
            lines.append(f"[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def node_config(root: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A config for tests: free ports, everything under ``root``, fast scheduler, quiet
    worker; ``sections`` are merged over it."""
    cfg: dict[str, Any] = {
        "node": {"ae_title": "SPINENODE", "host": "127.0.0.1", "port": free_port()},
        "storage": {"root": str(root / "store"), "min_free_mb": 1},
        "scheduler": {"stable_seconds": 1, "poll_seconds": 0.5},
        "worker": {"count": 1, "poll_seconds": 0.2, "drain_seconds": 5},
        "http": {"host": "127.0.0.1", "port": free_port()},
        "logging": {"level": "INFO"},
        # The tests' small synthetic series (20 slices of 1 mm) cover less z than the default
        # selection.min_coverage_mm asks of a spine CT, and hold no spine for
        # selection.spine_check to find; the tests of selection set their own.
        "selection": {"min_coverage_mm": 0, "spine_check": False},
    }
    for name, values in sections.items():
        if isinstance(values, list):
            cfg[name] = values
        else:
            cfg.setdefault(name, {}).update(values)
    return cfg


# -- a running node ----------------------------------------------------------------------------
@dataclass
class NodeProcess:
    """``spine-node serve`` in a subprocess (see :func:`node_factory`)."""

    root: Path
    config: dict[str, Any]
    config_path: Path
    log_path: Path
    proc: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)
    _log_offset: int = 0

    @property
    def port(self) -> int:
        return int(self.config["node"]["port"])

    @property
    def http_port(self) -> int:
        return int(self.config["http"]["port"])

    @property
    def ae_title(self) -> str:
        return self.config["node"]["ae_title"]

    @property
    def store_root(self) -> Path:
        return Path(self.config["storage"]["root"])

    def start(self, timeout: float = 60.0) -> "NodeProcess":
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicom_node", "serve", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.root, env=self.env)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"spine-node serve exited with {self.proc.returncode}:\n"
                                   + self.log())
            if self._ready():
                return self
            time.sleep(0.1)
        raise TimeoutError("spine-node serve did not become ready:\n" + self.log())

    def _ready(self) -> bool:
        # "node ready" is logged once SCP, scheduler, workers and HTTP are all up.
        with open(self.log_path, "rb") as fh:
            fh.seek(self._log_offset)
            return b"node ready" in fh.read()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def http_get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}",
                                        timeout=10) as rsp:
                return rsp.status, rsp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def cli(self, *args: str, check: bool = True, timeout: float = 120
            ) -> subprocess.CompletedProcess:
        """Run ``spine-node ARGS --config <this node's config>``."""
        res = subprocess.run([sys.executable, "-m", "dicom_node", *args, "--config",
                              str(self.config_path)], capture_output=True, text=True,
                             cwd=self.root, env=self.env, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"spine-node {' '.join(args)} -> {res.returncode}\n"
                                 f"{res.stdout}\n{res.stderr}")
        return res

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 60.0,
                 interval: float = 0.25, what: str = "condition") -> Any:
        """:func:`wait_for` with the node's log as diagnostics; fails at once if it exits."""
        def alive_and(pred=predicate):
            value = pred()
            if not value and self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"node exited ({self.proc.returncode}) while waiting for "
                                   f"{what}\n" + self.log()[-4000:])
            return value

        return wait_for(alive_and, timeout, what, interval=interval,
                        diagnostics=lambda: "--- node log ---\n" + self.log()[-4000:])

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait; returns the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def create_pg_database(server_url: str, name: str) -> str:
    """Create database ``name`` on the ``postgres_url`` server; returns its URL."""
    from sqlalchemy import create_engine, text
    engine = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return server_url.replace("@/postgres?", f"@/{name}?")


def storescu(node: NodeProcess, files: Sequence[Path] | Path, *options: str,
             calling_ae: str = "STORESCU", timeout: float = 300
             ) -> subprocess.CompletedProcess:
    """dcmtk ``storescu`` to the node; a directory is sent whole (``+sd``)."""
    args = [dcmtk("storescu"), "-aet", calling_ae, "-aec", node.ae_title, *options]
    if isinstance(files, Path):
        if files.is_dir():
            args.append("+sd")
        targets = [str(files)]
    else:
        targets = [str(f) for f in files]
    return subprocess.run([*args, "127.0.0.1", str(node.port), *targets],
                          capture_output=True, text=True, env=DCMTK_ENV, timeout=timeout)
