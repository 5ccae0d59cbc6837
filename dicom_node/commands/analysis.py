"""``spine-node process`` and ``spine-node evaluate`` (DESIGN.md, "Command line", contract)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer


def dicom_files(directory: Path) -> list[Path]:
    """The DICOM instance files under ``directory`` (recursively), DICOMDIR and others left out."""
    import pydicom

    out = []
    for p in sorted(directory.rglob("*")):
        if not p.is_file() or p.name.startswith(".") or p.name.upper() == "DICOMDIR":
            continue
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        except Exception:  # noqa: BLE001 - not DICOM: a README, a NIfTI, ...
            continue
        if "SOPClassUID" in ds:
            out.append(p)
    return out


def _device(config: Optional[Path], device: Optional[str]) -> str:
    """``--device``, else ``pipeline.device`` of the configuration (``--config``,
    $SPINE_NODE_CONFIG, the environment, the defaults); a bad configuration exits with status 2."""
    if device:
        return device
    from dicom_node.context import settings_or_exit

    return str(settings_or_exit(config).pipeline.device)


def process_directory(dicom_dir: Path, out_dir: Path, device: str = "auto") -> dict:
    """Load, analyse and write ``summary.json``, the SEG (where a vertebra was segmented), the SR
    and the key image into ``out_dir``."""
    from pipeline.run import analyse
    from pipeline.series_loader import load_series

    t0 = time.perf_counter()
    files = dicom_files(dicom_dir)
    if not files:
        raise typer.BadParameter(f"no DICOM files under {dicom_dir}", param_hint="DICOM_DIR")
    series = load_series(files)
    _repair_sop_class(series.headers)
    for note in _repair_identity(series):
        typer.echo(f"warning: {note}", err=True)
    t_load = time.perf_counter() - t0
    result = analyse(series, device=device)
    result.timings_s = {"load": t_load, **result.timings_s}
    out_dir.mkdir(parents=True, exist_ok=True)
    # summary.json first: the findings are written even if building a DICOM result fails.
    _write_summary(result.summary(), out_dir)
    written = []
    from pipeline.outputs import build_outputs

    t = time.perf_counter()
    objs = build_outputs(series, result)
    for name in ("seg", "sr", "key_image"):
        ds = getattr(objs, name, None)
        if ds is not None:
            path = out_dir / f"{name}.dcm"
            ds.save_as(path, enforce_file_format=True)
            written.append(path.name)
    result.timings_s["outputs"] = time.perf_counter() - t
    result.timings_s["total"] = time.perf_counter() - t0
    summary = result.summary()
    _write_summary(summary, out_dir)
    return {"summary": summary, "files": ["summary.json", *written]}


def _write_summary(summary: dict, out_dir: Path) -> None:
    tmp = out_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(out_dir / "summary.json")


def _repair_sop_class(headers) -> None:
    """Some real series (the TotalSegmentator example among them) leave SOP Class UID (0008,0016)
    empty in the dataset and carry it only in the file meta; the SEG/SR references need it."""
    for h in headers:
        meta = getattr(h, "file_meta", None)
        if not str(h.get("SOPClassUID", "")) and meta is not None and meta.get("MediaStorageSOPClassUID"):
            h.SOPClassUID = meta.MediaStorageSOPClassUID
        if not str(h.get("SOPInstanceUID", "")) and meta is not None and meta.get("MediaStorageSOPInstanceUID"):
            h.SOPInstanceUID = meta.MediaStorageSOPInstanceUID


def _repair_identity(series) -> list[str]:
    """Study and Series Instance UID are Type 1 in every result object (PS3.3 C.7.2.1, C.7.3.1;
    the SR's evidence references, C.17.2.1): anonymised files without them (the TotalSegmentator
    example) would give results that no validator or PACS accepts. ``process`` reads files from a
    folder, not from the SCP (which refuses such instances), so it gives the series UIDs derived
    from its SOP Instance UIDs (the same files always get the same UIDs) and says so. Returns
    the warnings."""
    import pydicom.uid

    sops = sorted(str(h.get("SOPInstanceUID", "")) for h in series.headers)
    notes = []
    for attr, keyword, what in (("study_instance_uid", "StudyInstanceUID", "study"),
                                ("series_instance_uid", "SeriesInstanceUID", "series")):
        if str(getattr(series, attr) or "").strip():
            continue
        uid = str(pydicom.uid.generate_uid(entropy_srcs=["spine-node source", what, *sops]))
        setattr(series, attr, uid)
        for h in series.headers:
            setattr(h, keyword, uid)
        notes.append(f"the series has no {keyword}; the results use {uid}, derived from its "
                     "SOP Instance UIDs")
    return notes


def vertebra_line(v: dict) -> str:
    """One vertebra of summary.json as ``process`` prints it. One the pipeline did not grade
    (cut by the field of view, or C1/C2 and others without measurable heights) says so, as the
    key image and the SR do, instead of showing summary.json's placeholder grade 0."""
    if v.get("partial"):
        return f"{v['name']:>4}  partial, not graded (cut by the field of view)"
    if v.get("grading_source") == "none":
        return f"{v['name']:>4}  not graded"
    h = v["heights_mm"] or {}
    return (f"{v['name']:>4}  grade {v['genant_grade']}  {v['morphology']:<9}  "
            f"{'FRACTURED' if v['fractured'] else 'normal   '}  "
            f"HA {h.get('anterior', float('nan')):5.1f}  HM {h.get('middle', float('nan')):5.1f}  "
            f"HP {h.get('posterior', float('nan')):5.1f} mm")


def register(app: typer.Typer) -> None:
    @app.command("process")
    def process(
        dicom_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="folder of one CT series"),
        out: Path = typer.Option(..., "--out", help="output folder (summary.json, SEG, SR, key image)"),
        device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda"),
        config: Optional[Path] = typer.Option(None, "--config", help="configuration TOML ([pipeline] device)"),
    ) -> None:
        """Run the whole pipeline on one series offline and write its results."""
        from pipeline.series_loader import SeriesLoadError

        try:
            res = process_directory(dicom_dir, out, _device(config, device))
        except SeriesLoadError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        s = res["summary"]
        for v in s["vertebrae"]:
            typer.echo(vertebra_line(v))
        typer.echo(f"{len(s['vertebrae'])} vertebrae in {s['timings_s'].get('total', 0):.1f} s; wrote "
                   + ", ".join(str(out / f) for f in res["files"]))

    @app.command("evaluate")
    def evaluate(
        seeds: Optional[str] = typer.Option(None, "--seeds", help="phantom seeds, e.g. 9001-9010"),
        data: Optional[Path] = typer.Option(
            None, "--data", exists=True, file_okay=False,
            help="real cases in VerSe layout (CT, vertebra mask, centroids; grades.json "
                 "optional) instead of phantoms"),
        split: str = typer.Option(
            "validation", "--split",
            help="with --data of the real-spine pack: validation | train | all subjects of "
                 "pipeline/realdata/split.json (another folder: all its cases)"),
        json_out: Optional[Path] = typer.Option(None, "--json", help="write the metrics here"),
        device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda"),
        gt_centroids: bool = typer.Option(False, "--gt-centroids",
                                          help="start segmentation from the true centroids (evaluates it alone)"),
        slice_spacing: Optional[float] = typer.Option(
            None, "--slice-spacing", min=0.5, max=5.0,
            help="force this slice spacing and thickness (mm) on every seed, e.g. 3 for routine thick-slice CT"),
        slices: Optional[int] = typer.Option(None, "--slices", min=8, help="force this many slices per series"),
        segmentation: Optional[Path] = typer.Option(
            None, "--segmentation", exists=True, dir_okay=False,
            help="a 2 mm segmentation network's best.pt (a training run) instead of the installed one"),
        refiner: Optional[str] = typer.Option(
            None, "--refiner", help="a refiner best.pt instead of the installed one, or 'none'"),
        localization: Optional[list[Path]] = typer.Option(
            None, "--localization", exists=True, dir_okay=False,
            help="with --seeds: localization weight files to compare (repeat the option), "
                 "the localization alone"),
        relabel: str = typer.Option(
            "file", "--relabel",
            help="with --seeds: the localization's joint relabelling along the spine as each "
                 "weight file says (file), forced on or off, or both (the installed weights "
                 "with and without it); the localization alone"),
    ) -> None:
        """Phantoms with these seeds (--seeds), or real cases (--data), through the pipeline;
        metrics against their ground truth."""
        from pipeline import evaluate as ev
        from pipeline.registry import read_manifest

        if (seeds is None) == (data is None):
            typer.echo("evaluate: give either --seeds (phantoms) or --data (real cases)", err=True)
            raise typer.Exit(2)
        dev = _device(None, device)
        models = _candidate_models(segmentation, refiner)
        if data is not None:
            _evaluate_real(data, split, dev, json_out, gt_centroids, models)
            return
        seed_list = ev.parse_seeds(seeds)
        if localization or relabel != "file":
            if segmentation or refiner or gt_centroids:
                typer.echo("evaluate: --localization/--relabel compare the localization alone; "
                           "--segmentation/--refiner/--gt-centroids the whole pipeline", err=True)
                raise typer.Exit(2)
            _compare_localization(seed_list, dev, json_out, localization or [], relabel,
                                  slice_spacing, slices)
            return
        installed = set(read_manifest())
        if {"segmentation", "keypoints"} <= installed and (gt_centroids or "localization" in installed):
            acq: dict = {}
            if slice_spacing is not None:
                acq.update(slice_spacing=slice_spacing, slice_thickness=slice_spacing)
            if slices is not None:
                acq["n_slices"] = slices
            report = ev.evaluate_pipeline(seed_list, dev, json_out, gt_centroids=gt_centroids,
                                          log=lambda m: typer.echo(m, err=True), acquisition=acq or None,
                                          models=models)
        else:  # only the localization is shipped: its keys, the others null
            report = ev.evaluate(seed_list, dev, json_out, log=lambda m: typer.echo(m, err=True))
        keys = ev.REPORT_KEYS + tuple(k for k in ("detection_precision", "detection_recall",
                                                  "genant_weighted_kappa_linear", "genant_kappa_weights",
                                                  "errors_over_mm", "timings_s", "centroids", "acquisition")
                                      if k in report)
        sys.stdout.write(json.dumps({k: report.get(k) for k in keys}, indent=2) + "\n")


def _compare_localization(seeds: list[int], device: str, json_out: Optional[Path],
                          files: list[Path], relabel: str, slice_spacing: Optional[float],
                          slices: Optional[int]) -> None:
    """``evaluate --seeds ... --localization A.pt --localization B.pt`` / ``--relabel``: several
    localization weights (or the installed one with and without joint relabelling) on the same
    phantoms, one report each."""
    import copy

    import torch

    from pipeline import evaluate as ev
    from pipeline.registry import build_from_checkpoint, load_model

    if relabel not in ("file", "on", "off", "both"):
        typer.echo(f"evaluate: --relabel {relabel}: give file, on, off or both", err=True)
        raise typer.Exit(2)
    if files and relabel == "both":
        typer.echo("evaluate: --relabel both compares the installed weights; give on or off with "
                   "--localization", err=True)
        raise typer.Exit(2)
    models: dict = {}
    if files:
        for p in files:
            m = build_from_checkpoint(torch.load(p, map_location="cpu", weights_only=True))
            if relabel != "file":
                m.meta["relabel"] = relabel == "on"
            models[str(p)] = m
    else:
        for v in (("on", "off") if relabel == "both" else (relabel,)):
            m = copy.copy(load_model("localization", device))  # the cached model keeps its meta
            m.meta = {**getattr(m, "meta", {}), "relabel": v == "on"}
            models[f"installed, relabel {v}"] = m
    acq: dict = {}
    if slice_spacing is not None:
        acq.update(slice_spacing=slice_spacing, slice_thickness=slice_spacing)
    if slices is not None:
        acq["n_slices"] = slices
    reports = ev.compare_localization(seeds, models, device, log=lambda m: typer.echo(m, err=True),
                                      acquisition=acq or None)
    if json_out:
        json_out.write_text(json.dumps(reports, indent=2) + "\n")
    keys = ev.REPORT_KEYS + ("errors_over_mm", "false_positive_vertebrae", "timings_s")
    sys.stdout.write(json.dumps({n: {k: r.get(k) for k in keys} for n, r in reports.items()},
                                indent=2) + "\n")


def _candidate_models(segmentation: Optional[Path], refiner: Optional[str]) -> Optional[dict]:
    """The models to evaluate instead of the installed ones (``--segmentation``, ``--refiner``)."""
    if segmentation is None and refiner is None:
        return None
    from pipeline.segmentation.train import candidate_model

    try:
        return {"segmentation": candidate_model(segmentation, refiner)}
    except FileNotFoundError as e:
        typer.echo(f"evaluate: {e}", err=True)
        raise typer.Exit(2) from None


def _evaluate_real(data: Path, split: str, device: str, json_out: Optional[Path],
                   gt_centroids: bool, models: Optional[dict] = None) -> None:
    """``evaluate --data``: real cases through the pipeline; pooled contract keys, the expert
    block and one block per case on stdout (all of it in ``--json``)."""
    from pipeline.evaluate import REPORT_KEYS
    from pipeline.realdata.evaluation import evaluate_cases
    from pipeline.realdata.pack import is_pack, iter_folder_cases, iter_pack_cases
    from pipeline.realdata.split import load_split
    from pipeline.verse import VerseError

    if split not in ("validation", "train", "all"):
        typer.echo(f"evaluate: --split {split!r} is not validation, train or all", err=True)
        raise typer.Exit(2)
    if is_pack(data):
        subjects = None if split == "all" else list(load_split().side(split))
        cases = iter_pack_cases(data, subjects)
        name = split
    else:
        cases, name = iter_folder_cases(data), "all"
    try:
        report = evaluate_cases(cases, device, json_out, log=lambda m: typer.echo(m, err=True),
                                split_name=name, gt_centroids=gt_centroids, models=models)
    except (VerseError, ValueError) as exc:
        typer.echo(f"evaluate: {exc}", err=True)
        raise typer.Exit(2) from None
    extra = ("detection_precision", "detection_recall", "grade0_called_normal",
             "grade2plus_called_fractured", "vertebrae_reported_where_none", "centroids", "split",
             "subjects")
    out = {k: report.get(k) for k in REPORT_KEYS + extra}
    out["expert"] = report.get("expert")
    out["cases"] = [{k: c[k] for k in ("case_id", "annotation", "id_rate", "dice", "missed",
                                       "false_positive_vertebrae", "predicted")}
                    for c in report["cases"]]
    sys.stdout.write(json.dumps(out, indent=2, default=str) + "\n")
