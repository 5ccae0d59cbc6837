"""Hostile DICOM for fuzzing (issue 7, "Hostile input"): hypothesis strategies and the two
harnesses that judge what the node does with them.

- :func:`hostile_instance`: one C-STORE payload (a Part 10 file: valid File Meta, then any data
  set bytes): invalid and traversal UIDs, unknown SOP classes, absurd Rows x Columns x frames,
  missing, short, oversized or odd pixel data, broken geometry, transfer syntaxes the bytes do
  not follow (raw pixels under JPEG, plain bytes under Deflate, big endian), truncation, flipped
  bytes and random garbage.
- :func:`hostile_series`: the files of one series for the loader: all of the above on some
  slices, plus mixed orientations, pixel spacings or sizes, duplicate positions, gaps, irregular
  spacing, another series or frame of reference mixed in, broken multi-frame groups.
- :class:`CStoreHarness`: a real :class:`dicom_node.scp.StorageSCP` in this process and one
  pynetdicom association to it; :meth:`CStoreHarness.check` sends a payload and asserts the
  node's promise: a named status (never an exception in the handler), Success only for an
  instance that is then stored under its validated UIDs, nothing written outside the store.
- :func:`check_loader`: ``load_series`` returns a volume or raises ``SeriesLoadError`` with a
  message, nothing else (no MemoryError, TypeError, ...).

CI runs a few hundred examples (tests/dicom_node/test_fuzz.py); ``python bench/fuzz.py`` is the
soak (10,000 and more).
"""
from __future__ import annotations

import io
import struct
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    MRImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
)

ROOT = "1.2.826.0.1.3680043.10.1099"
SOP_CLASSES = [CTImageStorage] * 6 + [EnhancedCTImageStorage, MRImageStorage,
                                      SecondaryCaptureImageStorage, "1.2.3.4.5.6.7"]
TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                     ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian, JPEGLosslessSV1,
                     JPEG2000Lossless, RLELossless]
HOSTILE_UIDS = ["1.2.3/../../../../tmp/evil", "../../../../tmp/evil", "1.2..3", "1.2.03",
                ".1.2", "1.2.", "", " ", "1" * 65, "1." + "2" * 63, "1.2.3\x00evil",
                "1.2.3\\4", "１.２", "1.2.3 4", "/etc/passwd", "C:\\evil", "1.2.-3",
                "%2e%2e%2fevil", "1.2.3\n4"]
MAX_PIXEL_BYTES = 64 * 1024


@st.composite
def uids(draw, hostile_ratio: float = 0.25) -> str:
    if draw(st.floats(0, 1)) < hostile_ratio:
        return draw(st.one_of(st.sampled_from(HOSTILE_UIDS),
                              st.text(max_size=70)))
    return f"{ROOT}.{draw(st.integers(1, 10**12))}"


@dataclass
class Instance:
    """A generated payload and what it was meant to be (for messages)."""

    data: bytes                  # the whole Part 10 file
    sop_class_uid: str           # as the File Meta (so the C-STORE request) says
    sop_instance_uid: str
    transfer_syntax_uid: str
    what: str

    def __repr__(self) -> str:  # hypothesis prints this on a failure
        return f"Instance({self.what}, {len(self.data)} bytes)"


def _set_raw(ds: Dataset, tag: int, vr: str, value: str) -> None:
    """Any text as the element's bytes (hostile values need not be encodable UIDs)."""
    from pydicom.dataelem import RawDataElement
    raw = value.encode("utf-8", "ignore")
    if len(raw) % 2:
        raw += b"\0"
    ds[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)


def _base(rows: int, cols: int, *, study: str, series: str, sop: str, sop_class: str,
          frame_of_ref: str, z: float, orientation=(1, 0, 0, 0, 1, 0),
          spacing=(0.8, 0.8), slice_spacing: float = 1.0) -> Dataset:
    ds = Dataset()
    for tag, value in ((0x00080016, sop_class), (0x00080018, sop), (0x0020000D, study),
                       (0x0020000E, series), (0x00200052, frame_of_ref)):
        _set_raw(ds, tag, "UI", value)
    ds.PatientName = "Fuzz^Hostile"
    ds.PatientID = "FUZZ-1"
    ds.Modality = "CT"
    ds.InstanceNumber = int(z) + 1
    ds.ImagePositionPatient = [-10.0, -10.0, z]
    ds.ImageOrientationPatient = list(orientation)
    ds.PixelSpacing = list(spacing)
    ds.SliceThickness = slice_spacing
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = 1
    ds.RescaleIntercept = -1024
    return ds


def _pixels(draw, ds: Dataset, frames: int) -> None:
    bits = int(ds.BitsAllocated)
    need = (int(ds.Rows) * int(ds.Columns) * max(1, frames) * max(bits, 1) + 7) // 8
    mode = draw(st.sampled_from(["exact", "exact", "exact", "missing", "empty", "short",
                                 "oversized", "odd"]))
    if mode == "missing":
        return
    size = {"exact": need, "empty": 0, "short": need // 2, "oversized": need * 4 + 2,
            "odd": need + 1}[mode]
    size = min(size, MAX_PIXEL_BYTES)  # absurd dimensions come with (too) little data
    ds.PixelData = (b"\x10\x04" * (size // 2 + 1))[:size]


def _geometry(draw, ds: Dataset) -> None:
    kind = draw(st.sampled_from(["ok"] * 6 + ["no_position", "no_orientation", "no_spacing",
                                              "nan", "short_vector", "zero_spacing",
                                              "not_orthonormal", "huge", "text"]))
    if kind == "no_position":
        del ds.ImagePositionPatient
    elif kind == "no_orientation":
        del ds.ImageOrientationPatient
    elif kind == "no_spacing":
        del ds.PixelSpacing
    elif kind == "nan":
        ds.ImagePositionPatient = ["nan", "inf", "-inf"]
    elif kind == "short_vector":
        ds.ImageOrientationPatient = [1, 0, 0]
    elif kind == "zero_spacing":
        ds.PixelSpacing = [0, -1]
    elif kind == "not_orthonormal":
        ds.ImageOrientationPatient = [1, 0, 0, 1, 0, 0]
    elif kind == "huge":
        ds.ImagePositionPatient = [1e300, -1e300, 1e308]
    elif kind == "text":  # non-conformant values, written as raw bytes
        from pydicom.dataelem import RawDataElement
        for tag, vr, raw in ((0x00281053, "DS", b"abc "), (0x00280010, "US", b"\x01\x00\x02\x00"),
                             (0x00280008, "IS", b"12a ")):
            ds[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)


def _multiframe(draw, ds: Dataset, frames: int) -> None:
    ds.NumberOfFrames = frames
    kind = draw(st.sampled_from(["groups", "no_groups", "wrong_count", "empty_items"]))
    if kind == "no_groups":
        return
    n = frames if kind != "wrong_count" else frames + 1
    per = []
    for k in range(min(n, 8)):
        item = Dataset()
        if kind != "empty_items":
            pos, ori, meas = Dataset(), Dataset(), Dataset()
            pos.ImagePositionPatient = [0, 0, float(k)]
            ori.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            meas.PixelSpacing = [1, 1]
            item.PlanePositionSequence = [pos]
            item.PlaneOrientationSequence = [ori]
            item.PixelMeasuresSequence = [meas]
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = per


def encode(ds: Dataset, meta_sop_class: str, meta_sop: str, ts: str) -> bytes:
    """Part 10 bytes: preamble, a valid File Meta naming ``ts``, then ``ds`` encoded as ``ts``
    says for its VR and byte order (compressed syntaxes: their pixel data stays raw)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = meta_sop_class
    meta.MediaStorageSOPInstanceUID = meta_sop
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = f"{ROOT}.1"
    buf = io.BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_file_meta_info(buf, meta, enforce_standard=False)
        body = io.BytesIO()
        implicit = ts == ImplicitVRLittleEndian
        little = ts != ExplicitVRBigEndian
        from pydicom.filebase import DicomFileLike
        fp = DicomFileLike(body)
        fp.is_little_endian, fp.is_implicit_VR = little, implicit
        write_dataset(fp, ds)
    buf.write(body.getvalue())
    return buf.getvalue()


def _meta_uid(value: str) -> str:
    """The C-STORE request's Affected SOP Instance UID comes from the File Meta; pynetdicom (as
    an SCU) cannot even send a non-UID there, so the hostile UIDs travel in the data set."""
    from storage.uids import is_valid_uid
    return value if is_valid_uid(value) else f"{ROOT}.9"


@st.composite
def hostile_instance(draw, *, study: str | None = None, series: str | None = None,
                     frame_of_ref: str | None = None, z: float = 0.0,
                     hostile: bool = True) -> Instance:
    h = 0.25 if hostile else 0.0
    study = study or draw(uids(h))
    series = series or draw(uids(h))
    sop = draw(uids(h))
    sop_class = draw(st.sampled_from(SOP_CLASSES)) if hostile else CTImageStorage
    dims = st.sampled_from([8, 8, 8, 16, 1, 0, 3, 4096, 65535])
    rows, cols = (draw(dims), draw(dims)) if hostile else (8, 8)
    ds = _base(rows, cols, study=study, series=series, sop=sop, sop_class=sop_class,
               frame_of_ref=frame_of_ref or f"{ROOT}.2", z=z)
    frames = 1
    if hostile and draw(st.floats(0, 1)) < 0.2:
        frames = draw(st.sampled_from([0, 2, 3, 999999]))
        _multiframe(draw, ds, frames)
    if hostile:
        ds.BitsAllocated = draw(st.sampled_from([16, 16, 16, 8, 32, 1, 12]))
        if draw(st.floats(0, 1)) < 0.1:
            ds.SamplesPerPixel = 3
        _pixels(draw, ds, frames)
        _geometry(draw, ds)
    else:
        ds.PixelData = b"\x10\x04" * (rows * cols)
    if hostile and draw(st.floats(0, 1)) < 0.1:
        del ds[draw(st.sampled_from(["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                                     "SOPClassUID", "Rows", "Columns", "Modality"]))]
    ts = draw(st.sampled_from(TRANSFER_SYNTAXES)) if hostile else ExplicitVRLittleEndian
    meta_sop = _meta_uid(sop)
    if hostile and draw(st.floats(0, 1)) < 0.05:
        meta_sop = f"{ROOT}.{draw(st.integers(1, 10**6))}"  # request and data set disagree
    meta_class = sop_class
    if hostile and draw(st.floats(0, 1)) < 0.05:  # request and data set name other classes
        _set_raw(ds, 0x00080016, "UI", MRImageStorage)
        meta_class = CTImageStorage
    data = encode(ds, meta_class, meta_sop, ts)
    what = f"{rows}x{cols}x{frames} {sop_class} {ts}"
    if hostile:
        cut = draw(st.sampled_from(["none"] * 6 + ["truncate", "flip", "garbage"]))
        # keep the preamble and the File Meta (its group length is the first element)
        meta_len = struct.unpack("<I", data[140:144])[0]
        start = 144 + meta_len
        if cut == "truncate" and len(data) > start:
            data = data[:draw(st.integers(start, len(data) - 1))]
        elif cut == "flip" and len(data) > start:
            arr = bytearray(data)
            for _ in range(draw(st.integers(1, 8))):
                i = draw(st.integers(start, len(arr) - 1))
                arr[i] = draw(st.integers(0, 255))
            data = bytes(arr)
        elif cut == "garbage":
            data = data[:start] + draw(st.binary(max_size=512))
        what += f" {cut}"
    return Instance(data, meta_class, meta_sop, ts, what)


@st.composite
def hostile_series(draw) -> list[bytes]:
    """The files of one (mostly) CT series, broken in one or more ways."""
    n = draw(st.integers(2, 6))
    study, series, frame_of_ref = (f"{ROOT}.{draw(st.integers(1, 10**9))}" for _ in range(3))
    orient, spacing, dz, size = (1, 0, 0, 0, 1, 0), (0.8, 0.8), 1.0, 8
    faults = draw(st.lists(st.sampled_from([
        "mixed_orientation", "mixed_spacing", "mixed_size", "duplicate_position", "gap",
        "irregular", "other_series", "other_frame_of_reference", "hostile_slice", "oblique",
        "reversed", "absurd_size", "compressed_garbage", "tilt"]), max_size=3))
    files = []
    for k in range(n):
        z = k * dz
        if "duplicate_position" in faults and k == n - 1:
            z = 0.0
        if "gap" in faults and k == n - 1:
            z = (k + 2) * dz
        if "irregular" in faults and k == n - 1:
            z = (k - 0.4) * dz
        if "reversed" in faults:
            z = -z
        ori = orient
        if "mixed_orientation" in faults and k == 1:
            ori = (1, 0, 0, 0, 0, -1)
        if "oblique" in faults:
            ori = (0.8660254, 0.5, 0, -0.5, 0.8660254, 0)
        rows = cols = size
        if "mixed_size" in faults and k == 1:
            rows = 16
        if "absurd_size" in faults:
            rows = cols = 65535
        sp = (1.5, 0.8) if "mixed_spacing" in faults and k == 1 else spacing
        ser = f"{ROOT}.77" if "other_series" in faults and k == 1 else series
        ref = f"{ROOT}.78" if "other_frame_of_reference" in faults and k == 1 else frame_of_ref
        sop = f"{ROOT}.{draw(st.integers(1, 10**12))}"
        if "hostile_slice" in faults and k == draw(st.integers(0, n - 1)):
            inst = draw(hostile_instance(study=study, series=ser, frame_of_ref=ref, z=z))
            files.append(inst.data)
            continue
        ds = _base(rows, cols, study=study, series=ser, sop=sop, sop_class=CTImageStorage,
                   frame_of_ref=ref, z=z, orientation=ori, spacing=sp)
        if "tilt" in faults:
            ds.ImagePositionPatient = [-10.0 + 3 * k, -10.0, z]
        ts = ExplicitVRLittleEndian
        if "compressed_garbage" in faults or ("absurd_size" in faults and k % 2):
            ts = draw(st.sampled_from([JPEGLosslessSV1, JPEG2000Lossless, RLELossless]))
        ds.PixelData = b"\x10\x04" * min(rows * cols, MAX_PIXEL_BYTES // 2)
        files.append(encode(ds, CTImageStorage, sop, ts))
    return files


# -- judges ------------------------------------------------------------------------------------
#: What the SCP may answer (dicom_node.scp.StoreStatus); anything else means the handler raised.
NAMED_STATUSES = {0x0000, 0x0122, 0x0110, 0xA700, 0xA900, 0xC000}


class CStoreHarness:
    """A StorageSCP in this process (store in a temporary folder) and one association to it,
    re-opened when the SCP aborts it. ``check(instance)`` asserts the promise for one payload.
    """

    def __init__(self, root: Path):
        import logging

        from pynetdicom import AE, _config, build_context

        from config import load_settings
        from dicom_node.context import NodeContext
        from dicom_node.scp import StorageSCP
        from tests.helpers import free_port
        self._quiet = [(name, logging.getLogger(name).level)
                       for name in ("spine_node", "pynetdicom", "pydicom")]
        for name, _ in self._quiet:
            logging.getLogger(name).setLevel(logging.CRITICAL)
        self.root = root
        self.outside = root / "outside"       # nothing may ever appear here or beside "store"
        self.outside.mkdir(parents=True, exist_ok=True)
        settings = load_settings(None, node={"ae_title": "FUZZNODE", "host": "127.0.0.1",
                                             "port": free_port()},
                                 storage={"root": str(root / "store"), "min_free_mb": 0,
                                          "fsync": False, "sqlite_synchronous": "NORMAL"},
                                 # every stored series reaches the loader: no selection
                                 selection={"min_slices": 1, "min_coverage_mm": 0,
                                            "spine_check": False,
                                            "max_slice_mm": 1e6, "axial_tolerance_deg": 90,
                                            "rules": []},
                                 scheduler={"stable_seconds": 0},
                                 pipeline={"entry_point":
                                           "tests.dicom_node.fake_pipeline:analyse"},
                                 logging={"level": "ERROR"})
        self.ctx = NodeContext.open(settings)
        self.scp = StorageSCP(settings, self.ctx.index, self.ctx.store)
        self.scp.start()
        self._old_chunked = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are
        self.ae = AE(ae_title="FUZZER")
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 10
        # One context per (SOP class, transfer syntax): an SCP accepts one syntax per context.
        self.ae.requested_contexts = [build_context(sc, ts) for sc in dict.fromkeys(SOP_CLASSES)
                                      for ts in dict.fromkeys(TRANSFER_SYNTAXES)]
        self.assoc = None
        self.tmp = Path(tempfile.mkdtemp(dir=root))
        self.counts: dict[str, int] = {}

    def _association(self):
        if self.assoc is None or not self.assoc.is_established:
            self.assoc = self.ae.associate("127.0.0.1", self.scp.port, ae_title="FUZZNODE")
            assert self.assoc.is_established, "the SCP no longer accepts associations"
        return self.assoc

    def check(self, inst: Instance) -> str:
        path = self.tmp / "payload.dcm"
        path.write_bytes(inst.data)
        assoc = self._association()
        try:
            rsp = assoc.send_c_store(path)
        except (ValueError, AttributeError, KeyError) as exc:
            # pynetdicom refused to send it (no accepted context, unreadable File Meta):
            # the payload never reached the node.
            outcome = f"not sent ({type(exc).__name__})"
            self.counts[outcome] = self.counts.get(outcome, 0) + 1
            return outcome
        status = getattr(rsp, "Status", None) if rsp else None
        if status is None:  # the SCP aborted the association (malformed PDU data)
            self.assoc = None
            outcome = "aborted"
        else:
            assert int(status) in NAMED_STATUSES, \
                f"{inst!r}: status 0x{int(status):04X} (the C-STORE handler raised)"
            outcome = f"0x{int(status):04X}"
            if int(status) == 0:
                self._assert_stored(inst)
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        self._assert_contained()
        return outcome

    def _assert_stored(self, inst: Instance) -> None:
        from storage.uids import is_valid_uid
        rel = self.ctx.index.instance_path(inst.sop_instance_uid)
        assert rel is not None, f"{inst!r}: Success but not indexed"
        parts = rel.split("/")
        assert parts[0] == "instances" and len(parts) == 4, rel
        assert all(is_valid_uid(p) for p in parts[1:3]) and is_valid_uid(parts[3][:-4]), rel
        assert (self.ctx.store.root / rel).is_file(), f"{inst!r}: Success but no file"

    def _assert_contained(self) -> None:
        assert not any(self.outside.iterdir()), "something was written outside the store"
        for entry in self.root.iterdir():
            assert entry.name in ("store", "outside", self.tmp.name), \
                f"{entry} appeared beside the store"

    def process_all(self) -> dict[str, int]:
        """Schedule every stored series and run each job (fake analysis) as the node would:
        each ends done, failed or skipped, and a failed or skipped one says why."""
        import datetime as dt

        from dicom_node.scheduler import schedule_stable_series
        from dicom_node.worker import Worker
        from storage.db import utcnow
        ctx = self.ctx
        schedule_stable_series(ctx.index, ctx.settings, now=utcnow() + dt.timedelta(seconds=1))
        worker = Worker(ctx.settings, ctx.index, ctx.queue, ctx.store,
                        publish=lambda **_: None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            while worker.run_once():
                pass
        states: dict[str, int] = {}
        for job in ctx.index.jobs():
            assert job.state in ("done", "failed", "skipped"), (job.id, job.state)
            if job.state != "done":
                assert job.error and len(job.error) > 10, (job.id, job.state, job.error)
                assert not job.error.startswith("unexpected error"), job.error
            states[job.state] = states.get(job.state, 0) + 1
        return states

    def close(self) -> None:
        from pynetdicom import _config
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()
        self.scp.drain(timeout_s=5)
        self.ctx.close()
        _config.STORE_SEND_CHUNKED_DATASET = self._old_chunked
        import logging
        for name, level in self._quiet:
            logging.getLogger(name).setLevel(level)
        store = self.root / "store" / "instances"
        for p in store.rglob("*") if store.exists() else []:
            assert store in p.parents


def check_loader(files: list[bytes], folder: Path) -> str:
    """Write ``files`` to ``folder`` and load them: a volume or a SeriesLoadError, nothing
    else. Returns "loaded" or the error message."""
    from pipeline.series_loader import SeriesLoadError, load_series
    for old in folder.glob("*.dcm"):
        old.unlink()
    paths = []
    for k, data in enumerate(files):
        p = folder / f"{k:03d}.dcm"
        p.write_bytes(data)
        paths.append(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            series = load_series(paths)
        except SeriesLoadError as exc:
            assert str(exc), "a SeriesLoadError without a message"
            return str(exc)
    assert series.image.GetSize()[2] >= 2
    return "loaded"
