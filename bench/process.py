"""Benchmark of ``spine-node process`` on 512 x 512 phantom series of given lengths (targets:
300 slices within 60 s and 4 GB on 2 CPU cores, 2 s on one H100; issue 28: every length up to
2,000 slices within 3 GB and 20 s + 10 ms a slice).

    python bench/process.py [--seed 8101] [--slices 300[,1200,2000]] [--baseline GITREF]
                            [--device auto] [--warm N] [--json FILE] [--profile DIR] [--keep DIR]

Writes each phantom study once (DICOM, one file per slice) into a temporary folder (``--keep``:
this one, reused), then runs ``python -m dicom_node process`` in a fresh child process, so that
the wall time includes start-up, model loading and DICOM decoding, and the child's peak resident
set size (``ru_maxrss``) is the whole pipeline's memory. ``--baseline GITREF`` runs that commit
too (a git worktree in the work folder, the same virtual environment) right after each run on
the same study, and says whether the findings (level, grade, morphology, partial) are the same.
The seed is outside 9001-9010 (evaluation).

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
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=8101)
    ap.add_argument("--slices", default="300",
                    help="slices per series; several, comma-separated, run one after another")
    ap.add_argument("--matrix", type=int, default=512)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", type=Path, help="write the studies here and keep them")
    ap.add_argument("--baseline", metavar="GITREF",
                    help="also run this commit (a git worktree beside the repository, same "
                         "virtual environment) on the same studies, right after each run")
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
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="spine-bench-"))
    try:
        return _bench(a, work)
    finally:
        if not a.keep:                 # the studies (about 0.5 MB a slice) and the worktree go
            for tree in work.glob("baseline-*"):
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                               capture_output=True)
            shutil.rmtree(work, ignore_errors=True)


def _bench(a: argparse.Namespace, work: Path) -> dict:
    """Every length of ``a.slices`` (and the baseline) in the work folder ``work``."""
    baseline = _worktree(a.baseline, work) if a.baseline else None
    runs = []
    for n in [int(v) for v in str(a.slices).split(",") if v.strip()]:
        study = _study(work / (f"s{n}" if "," in str(a.slices) else ""), a.seed, n, a.matrix)
        report = _run(REPO, study, work / f"out-{n}", a.device, a.localization, a.seed, a.matrix)
        if baseline is not None:
            base = _run(baseline, study, work / f"out-{n}-baseline", a.device, None, a.seed,
                        a.matrix)
            report["baseline"] = {"ref": a.baseline, **{k: base[k] for k in (
                "returncode", "wall_s", "cpu_s", "peak_rss_mb", "timings_s", "vertebrae",
                "fractured")}}
            report["same_findings_as_baseline"] = _findings(work / f"out-{n}") == \
                _findings(work / f"out-{n}-baseline")
        if a.warm:
            report["warm"] = _warm(study / "dicom", a.device, a.warm, a.profile)
        runs.append(report)
        _table(runs)
    result = runs[0] if len(runs) == 1 else {"runs": runs}
    text = json.dumps(result, indent=2)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")
    return result


def _study(root: Path, seed: int, slices: int, matrix: int) -> Path:
    """The phantom study of ``slices`` slices under ``root`` (written once)."""
    study = root / "study"
    if not (study / "dicom").exists():
        from pipeline.phantom import generate, write_study

        write_study(generate(seed, acquisition={"matrix": matrix, "n_slices": slices}), study)
    return study


def _worktree(ref: str, work: Path) -> Path:
    """A detached git worktree of ``ref`` under ``work`` (made once), run with this virtual
    environment: its packages shadow the repository's through PYTHONPATH."""
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", ref], check=True,
                         capture_output=True, text=True).stdout.strip()
    tree = work / f"baseline-{sha}"
    if not tree.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), sha],
                       check=True, capture_output=True)
    return tree


def _run(tree: Path, study: Path, out: Path, device: str, localization: Path | None, seed: int,
         matrix: int) -> dict:
    """``process`` of ``study`` by the code in ``tree``, in a fresh child: wall time, the child's
    own peak RSS (wait4), its summary."""
    cmd = [sys.executable, "-m", "dicom_node", "process", str(study / "dicom"), "--out", str(out),
           "--device", device]
    if localization:
        cmd = [sys.executable, __file__, "--child", str(study / "dicom"), str(out), "--device", device,
               "--localization", str(localization)]
    env = dict(os.environ, PYTHONPATH=str(tree) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out.mkdir(parents=True, exist_ok=True)
    rss_file = out / "peak_rss_kb.txt"
    t0 = time.perf_counter()
    # A wrapper with this one child: its RUSAGE_CHILDREN is the child's own peak (this process's
    # would be the largest of all runs so far).
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, str(rss_file), *cmd], cwd=tree, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak_kb, cpu_s = (float(v) for v in rss_file.read_text().split()) if rss_file.exists() else (0, 0)
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    n_files = len(list((study / "dicom").iterdir()))
    report = {"seed": seed, "series": f"{matrix}x{matrix}x{n_files}", "device": device,
              "code": "this checkout" if tree == REPO else str(tree),
              "localization": str(localization) if localization else "shipped",
              "cpu_count": os.cpu_count(), "returncode": proc.returncode, "wall_s": round(wall, 2),
              "cpu_s": round(cpu_s, 2),
              "peak_rss_mb": round(peak_kb / 1024, 1), "timings_s": summary.get("timings_s"),
              "vertebrae": [v["name"] for v in summary.get("vertebrae", [])],
              "fractured": [v["name"] for v in summary.get("vertebrae", []) if v["fractured"]]}
    if proc.returncode != 0:
        report["stderr"] = proc.stderr[-3000:]
    return report


_WRAPPER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.run(sys.argv[2:]).returncode\n"
    "ru = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "open(sys.argv[1], 'w').write(f'{ru.ru_maxrss} {ru.ru_utime + ru.ru_stime}')\n"
    "sys.exit(rc)\n")


def _findings(out: Path) -> list:
    """What a radiologist reads of a run: per vertebra its level, grade, morphology, partial."""
    path = out / "summary.json"
    if not path.exists():
        return []
    return [(v["name"], v["genant_grade"], v["morphology"], v.get("partial"))
            for v in json.loads(path.read_text())["vertebrae"]]


def _table(runs: list[dict]) -> None:
    """One line per run to stderr as the runs finish."""
    for r in runs[-1:]:
        line = f"{r['series']}: {r['wall_s']} s ({r['cpu_s']} s CPU), {r['peak_rss_mb']} MB"
        if "baseline" in r:
            b = r["baseline"]
            line += (f"; baseline {b['ref']}: {b['wall_s']} s ({b['cpu_s']} s CPU), "
                     f"{b['peak_rss_mb']} MB; same "
                     f"findings: {r['same_findings_as_baseline']}")
        print(line, file=sys.stderr, flush=True)


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
    models = {n: load_model(n, str(dev)) for n in ("localization", "junction", "segmentation", "keypoints")}
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
