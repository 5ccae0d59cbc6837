"""Publishing one job's results: build SEG, SR and key image, store them, queue their delivery.

Called by the worker after the analysis (docs/internal-interfaces.md)::

    publish(job=job, series=series, result=result, index=index, store=store, settings=settings)

1. :func:`pipeline.outputs.build_outputs` with ``version = job.version``: each object in its own
   new series ("spine-node v2 ..." after a rerun), UIDs derived from the source series and the
   version, so a publish repeated after a crash rebuilds the same instances;
2. each object is written atomically to ``results/<study>/<series>/v<version>-job<id>/<kind>.dcm``
   (:meth:`storage.files.BlobStore.write_atomic`); earlier versions live in their own folders
   and are never touched;
3. one transaction records the result rows and one delivery per object and configured
   destination that wants it (``[[destinations]] objects``);
4. the exporter is woken, so delivery starts at once; it runs in its own threads, so neither a
   slow nor a dead destination holds the worker.

:func:`study_context` says where the result stands in its study (the worker puts it in
summary.json and hands it to :func:`publish`, which puts it in the SR): the study's other
analysed series that cover other parts of the spine, and the earlier result it replaces.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydicom import Dataset
from pydicom.filewriter import dcmwrite

from dicom_node.logging import get_logger
from pipeline.outputs import AlgorithmInfo, ResultObjects, build_outputs
from pipeline.outputs.study_context import ReplacedResult, StudyContext
from storage.deliveries import DeliveryQueue, DestinationWants, NewResult

if TYPE_CHECKING:
    from storage.files import BlobStore

log = get_logger("spine_node.results")


@dataclass(frozen=True)
class PublishedObject:
    kind: str
    result_id: int
    path: str
    sop_instance_uid: str
    series_instance_uid: str


@dataclass(frozen=True)
class Published:
    """What :func:`publish` recorded."""

    version: int
    objects: list[PublishedObject]
    outputs: ResultObjects


def encode(ds: Dataset) -> bytes:
    """The dataset as a DICOM Part 10 file (preamble, File Meta, dataset)."""
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def weights_digest() -> str | None:
    """Short digest of the installed model weights (``pipeline/weights/manifest.json``)."""
    import hashlib
    import json
    from pathlib import Path

    import pipeline

    manifest = Path(pipeline.__file__).resolve().parent / "weights" / "manifest.json"
    try:
        entries = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    text = ";".join(f"{name}:{e.get('sha256', '')}" for name, e in sorted(entries.items())
                    if isinstance(e, dict))
    return hashlib.sha256(text.encode()).hexdigest()[:12] if text else None


def algorithm_info(settings: Any) -> AlgorithmInfo:
    """The algorithm identity of this node: package version, weights digest, node AE title."""
    digest = weights_digest()
    extra = (f"weights {digest}",) if digest else ()
    return AlgorithmInfo(device_serial_number=settings.node.ae_title, extra_versions=extra)


def publish(*, job: Any, series: Any, result: Any, index: Any, store: "BlobStore",
            settings: Any, algorithm: AlgorithmInfo | None = None,
            context: StudyContext | None = None) -> Published:
    """Build, store and queue the SEG, SR and key image of ``job`` (a ``storage.queue.JobRef``).

    ``series``: ``pipeline.series_loader.LoadedSeries``; ``result``:
    ``pipeline.run.AnalysisResult``; ``index``: ``storage.index.Index`` (its database is used);
    ``settings``: ``config.Settings``. Raises ``ValueError`` when there is nothing to build
    (no vertebra found); the worker turns that into a failed job with the message.
    ``context``: :func:`study_context`, said in the SR.
    """
    algorithm = algorithm or algorithm_info(settings)
    outputs = build_outputs(series, result, version=int(job.version), algorithm=algorithm,
                            context=context)
    new: list[NewResult] = []
    meta: list[tuple[str, str, str, str]] = []
    for kind, ds in outputs.items():
        relpath = store.result_relpath(job.study_instance_uid, job.series_instance_uid,
                                       job.version, job.id, f"{kind.value}.dcm")
        store.write_atomic(relpath, encode(ds))
        new.append(NewResult(kind=kind.value, path=relpath,
                             sop_instance_uid=str(ds.SOPInstanceUID),
                             series_instance_uid=str(ds.SeriesInstanceUID)))
        meta.append((kind.value, relpath, str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)))
    queue = DeliveryQueue(index.db)
    ids = queue.add_results(job.id, new, DestinationWants.from_settings(settings.destinations))
    objects = [PublishedObject(k, rid, p, sop, ser) for (k, p, sop, ser), rid in zip(meta, ids)]
    log.info("results published", extra={
        "job_id": job.id, "version": job.version, "series_uid": job.series_instance_uid,
        "objects": ",".join(o.kind for o in objects),
        "destinations": ",".join(d.name for d in settings.destinations) or "-"})
    from dicom_node import exporter
    exporter.wake()
    return Published(version=int(job.version), objects=objects, outputs=outputs)


def _z_range(series: Any) -> tuple[float, float] | None:
    try:
        zs = [float(h.ImagePositionPatient[2]) for h in series.headers]
    except (AttributeError, IndexError, TypeError, ValueError):
        return None
    return (min(zs), max(zs)) if zs else None


def _sr_header(index: Any, store: "BlobStore", job_id: int) -> Dataset | None:
    import pydicom
    for r in index.results(job_id):
        if r.kind == "sr":
            try:
                return pydicom.dcmread(store.path(r.path), stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - a missing file: the statement without the link
                return None
    return None


def study_context(*, job: Any, series: Any, index: Any, store: "BlobStore") -> StudyContext:
    """Where ``job``'s result stands in its study (DESIGN.md "Data flow": one answer per part
    of the spine, a newer answer supersedes the older one).

    - another part: a series of the study whose newest job analyses it (not ``skipped``) and
      whose z range does not overlap this series' (:func:`dicom_node.ranking.overlaps`);
    - replaced: the newest done version of a series whose newest job says this series
      superseded it (:func:`dicom_node.ranking.superseding_series`); a series analysed before
      that overlaps this one (an operator's ``rerun --series``); this series' own earlier done
      version (a late instance, a rerun).
    """
    from dicom_node.ranking import overlaps, superseding_series
    from dicom_node.selection import SeriesFacts
    from dicom_node.series_facts import read_series_facts

    uid = str(job.series_instance_uid)
    me = SeriesFacts(uid, "CT", len(series.headers),
                     frame_of_reference_uid=str(series.frame_of_reference_uid or ""),
                     z_range_mm=_z_range(series))
    by_series: dict[str, list[Any]] = {}
    for j in index.jobs(job.study_instance_uid):  # in id order
        if j.id != job.id:
            by_series.setdefault(j.series_instance_uid, []).append(j)

    def last_done(jobs: list[Any]) -> ReplacedResult | None:
        done = [j for j in jobs if j.state == "done" and j.id < job.id]
        if not done:
            return None
        return ReplacedResult(done[-1].series_instance_uid, int(done[-1].version),
                              _sr_header(index, store, done[-1].id))

    parts: list[str] = []
    replaced: list[ReplacedResult] = []
    for other_uid, jobs in by_series.items():
        if other_uid == uid:
            if (r := last_done(jobs)) is not None:
                replaced.append(r)
            continue
        newest = jobs[-1]
        if newest.state == "skipped":
            if superseding_series(newest.error or newest.reason) == uid and \
                    (r := last_done(jobs)) is not None:
                replaced.append(r)
            continue
        paths = [store.path(i.path) for i in index.series_instances(other_uid)]
        facts = read_series_facts(other_uid, "CT", len(paths),
                                  [paths[0], paths[-1]] if paths else [], ())
        if not overlaps(me, facts):
            parts.append(other_uid)
        elif (r := last_done([newest])) is not None:
            replaced.append(r)
    return StudyContext(uid, me.z_range_mm, tuple(parts), tuple(replaced))
