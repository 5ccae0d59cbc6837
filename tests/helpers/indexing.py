"""A folder of DICOM files stored and indexed as the SCP would, and one scheduler pass, for the
tests of selection and scheduling that need no network."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import pydicom

from dicom_node.scheduler import schedule_stable_series
from storage.db import utcnow
from storage.index import InstanceRecord

#: CT Image Storage: what the node accepts besides ``node.extra_storage_sop_classes``.
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def ingest_folder(ctx, directory: Path) -> None:
    """Store and index ``directory``'s ``*.dcm`` files in ``ctx`` (a NodeContext) as the SCP
    would, leaving out the SOP classes the node does not accept."""
    accepted = {CT_IMAGE_STORAGE, *ctx.settings.node.extra_storage_sop_classes}
    for p in sorted(directory.glob("*.dcm")):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        if ds.SOPClassUID not in accepted:
            continue
        rel = ctx.store.instance_relpath(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                         ds.SOPInstanceUID)
        ctx.store.write_atomic(rel, p.read_bytes())
        ctx.index.add_instance(InstanceRecord(
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID,
            ds.file_meta.TransferSyntaxUID, ds.Modality, rel, p.stat().st_size,
            int(ds.InstanceNumber)))


def tick(ctx):
    """One scheduler pass a second from now (every series stable at once)."""
    return schedule_stable_series(ctx.index, ctx.settings, now=utcnow() + dt.timedelta(seconds=1),
                                  store=ctx.store)
