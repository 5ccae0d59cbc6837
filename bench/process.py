"""Benchmark of ``spine-node process`` on a 512 x 512 x 300 phantom series (issue 5 target:
within 60 s on the 2-core CPU with peak memory under 4 GB; within 2 s on one H100).

    python bench/process.py [--seed 8101] [--slices 300] [--device auto] [--warm N] [--json FILE]
                            [--profile DIR]

Writes the phantom study once (DICOM, one file per slice) into a temporary folder, then runs
``python -m dicom_node process`` in a fresh child process, so that the wall time includes
start-up, model loading and DICOM decoding, and the child's peak resident set size
(``ru_maxrss``) is the whole pipeline's memory. The seed is outside 9001-9010 (evaluation).

``--warm N`` then times a long-running worker's view in this process: the series loaded once,
the models loaded once onto the device, and ``analyse`` run N times (the first run includes the
GPU's warm-up); it reports each run's stage timings and the median of runs 2..N. On a GPU the
stages end in host copies of their results, so their wall times include the device's work.
``--profile DIR`` (with ``--warm``) then runs ``analyse`` once more under cProfile and the torch
profiler and writes ``DIR/cprofile.txt`` (functions by own and by cumulative time) and
``DIR/torch.txt`` (operators by device time on a GPU, by CPU time otherwise).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=8101)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--matrix", type=int, default=512)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", type=Path, help="write the study here and keep it")
    ap.add_argument("--warm", type=int, default=0, metavar="N",
                    help="also run analyse N times in this process on preloaded series and models")
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="with --warm: profile one more warm run into DIR (cprofile.txt, torch.txt)")
    ap.add_argument("--localization", type=Path,
                    help="a localization weight file to use instead of the shipped one (before it is "
                         "installed): the child then runs load_series + analyse in-process, not the CLI")
    ap.add_argument("--child", nargs=2, metavar=("DICOM_DIR", "OUT_DIR"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return _child(Path(a.child[0]), Path(a.child[1]), a.device, a.localization)
    from pipeline.phantom import generate, write_study

    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="spine-bench-"))
    study = work / "study"
    if not (study / "dicom").exists():
        ph = generate(a.seed, acquisition={"matrix": a.matrix, "n_slices": a.slices})
        write_study(ph, study)
    out = work / "out"
    cmd = [sys.executable, "-m", "dicom_node", "process", str(study / "dicom"), "--out", str(out),
           "--device", a.device]
    if a.localization:
        cmd = [sys.executable, __file__, "--child", str(study / "dicom"), str(out), "--device", a.device,
               "--localization", str(a.localization)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    import SimpleITK as sitk  # noqa: F401  (size of the series, from the files)

    n_files = len(list((study / "dicom").iterdir()))
    report = {"seed": a.seed, "series": f"{a.matrix}x{a.matrix}x{n_files}", "device": a.device,
              "localization": str(a.localization) if a.localization else "shipped",
              "cpu_count": os.cpu_count(), "returncode": proc.returncode, "wall_s": round(wall, 2),
              "peak_rss_mb": round(peak_kb / 1024, 1), "timings_s": summary.get("timings_s"),
              "vertebrae": [v["name"] for v in summary.get("vertebrae", [])],
              "fractured": [v["name"] for v in summary.get("vertebrae", []) if v["fractured"]]}
    if proc.returncode != 0:
        report["stderr"] = proc.stderr[-3000:]
    if a.warm:
        report["warm"] = _warm(study / "dicom", a.device, a.warm, a.profile)
    text = json.dumps(report, indent=2)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")
    return report


def _warm(dicom_dir: Path, device: str, runs: int, profile: Path | None = None) -> dict:
    """Stage timings of ``analyse`` run ``runs`` times on a series and models loaded once."""
    import statistics

    from dicom_node.commands.analysis import dicom_files
    from pipeline.registry import load_model, resolve_device
    from pipeline.run import analyse
    from pipeline.series_loader import load_series

    t0 = time.perf_counter()
    series = load_series(dicom_files(dicom_dir))
    t_load = time.perf_counter() - t0
    dev = resolve_device(device)
    t0 = time.perf_counter()
    models = {n: load_model(n, str(dev)) for n in ("localization", "segmentation", "keypoints")}
    t_models = time.perf_counter() - t0
    per_run = [analyse(series, device=str(dev), models=models).timings_s for _ in range(max(runs, 1))]
    steady = per_run[1:] or per_run
    median = {k: round(statistics.median(r[k] for r in steady), 3) for k in steady[0]}
    gpu = None
    if dev.type == "cuda":
        import torch

        gpu = {"name": torch.cuda.get_device_name(dev), "peak_allocated_mb":
               round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)}
    if profile:
        _profile(profile, lambda: analyse(series, device=str(dev), models=models), dev.type == "cuda")
    return {"device": str(dev), "gpu": gpu, "load_series_s": round(t_load, 3), "load_models_s": round(t_models, 3),
            "runs": [{k: round(v, 3) for k, v in r.items()} for r in per_run], "median_after_first": median}


def _profile(out: Path, run, cuda: bool) -> None:
    """One more warm run under cProfile, then one under the torch profiler, into ``out``."""
    import cProfile
    import io
    import pstats

    import torch

    out.mkdir(parents=True, exist_ok=True)
    prof = cProfile.Profile()
    prof.enable()
    run()
    prof.disable()
    text = io.StringIO()
    for key in ("tottime", "cumulative"):
        pstats.Stats(prof, stream=text).sort_stats(key).print_stats(45)
    (out / "cprofile.txt").write_text(text.getvalue())
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as tp:
        run()
    key = "cuda_time_total" if cuda else "self_cpu_time_total"
    (out / "torch.txt").write_text(tp.key_averages().table(sort_by=key, row_limit=40) + "\n")


def _child(dicom_dir: Path, out: Path, device: str, localization: Path) -> dict:
    import torch

    from dicom_node.commands.analysis import dicom_files
    from pipeline.registry import build_from_checkpoint
    from pipeline.run import analyse
    from pipeline.series_loader import load_series

    t0 = time.perf_counter()
    series = load_series(dicom_files(dicom_dir))
    t_load = time.perf_counter() - t0
    loc = build_from_checkpoint(torch.load(localization, map_location="cpu", weights_only=True))
    result = analyse(series, device=device, models={"localization": loc})
    result.timings_s = {"load": t_load, **result.timings_s, "total": time.perf_counter() - t0}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(result.summary(), indent=2) + "\n")
    return result.summary()


if __name__ == "__main__":
    main()
