"""Soak fuzzing of the C-STORE path and the series loader (issue 7, "Hostile input").

    python bench/fuzz.py [--examples 10000] [--target cstore|loader|all] [--seed N] [--json FILE]

The same hypothesis strategies and judges as tests/dicom_node/test_fuzz.py (tests/helpers/hostile.py),
with many more examples and a random seed (printed, so a failure can be replayed): C-STORE
payloads go to a real StorageSCP in this process over a pynetdicom association, and what it
accepted is then scheduled and run as jobs; series go to ``pipeline.series_loader``. Exits 1 on
the first broken promise (an unnamed status, a file outside the store, a job without a reason,
a loader error that is not a SeriesLoadError), after printing the failing example.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _settings(n: int, seed: int):
    from hypothesis import HealthCheck, settings
    return settings(max_examples=n, deadline=None, database=None, derandomize=False,
                    suppress_health_check=list(HealthCheck), print_blob=True), seed


def run_cstore(n: int, seed: int, work: Path) -> dict:
    from hypothesis import given
    from hypothesis import seed as hseed

    from tests.helpers.hostile import CStoreHarness, hostile_instance
    cfg, _ = _settings(n, seed)
    harness = CStoreHarness(work / "cstore")
    start = time.perf_counter()
    try:
        @hseed(seed)
        @cfg
        @given(hostile_instance())
        def run(instance):
            harness.check(instance)

        run()
        jobs = harness.process_all()
    finally:
        harness.close()
    return {"examples": sum(harness.counts.values()), "outcomes": harness.counts,
            "jobs": jobs, "seconds": round(time.perf_counter() - start, 1)}


def run_loader(n: int, seed: int, work: Path) -> dict:
    from hypothesis import given
    from hypothesis import seed as hseed

    from tests.helpers.hostile import check_loader, hostile_series
    cfg, _ = _settings(n, seed)
    folder = work / "loader"
    folder.mkdir()
    outcomes: dict[str, int] = {}
    start = time.perf_counter()

    @hseed(seed)
    @cfg
    @given(hostile_series())
    def run(files):
        result = check_loader(files, folder)
        key = "loaded" if result == "loaded" else "refused"
        outcomes[key] = outcomes.get(key, 0) + 1

    run()
    return {"examples": sum(outcomes.values()), "outcomes": outcomes,
            "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=10_000)
    ap.add_argument("--target", choices=["cstore", "loader", "all"], default="all")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    print(f"fuzz: {args.examples} examples per target, seed {seed}", flush=True)
    warnings.simplefilter("ignore")
    report: dict = {"seed": seed, "examples_per_target": args.examples}
    with tempfile.TemporaryDirectory(prefix="spine-node-fuzz-") as tmp:
        work = Path(tmp)
        try:
            if args.target in ("loader", "all"):
                report["loader"] = run_loader(args.examples, seed, work)
                print(f"series loader: {report['loader']}", flush=True)
            if args.target in ("cstore", "all"):
                report["cstore"] = run_cstore(args.examples, seed, work)
                print(f"C-STORE: {report['cstore']}", flush=True)
        except Exception as exc:  # noqa: BLE001 - hypothesis printed the falsifying example
            report["failure"] = f"{type(exc).__name__}: {exc}"[:4000]
            print(f"FAILED (seed {seed}): {report['failure']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if "failure" in report else 0


if __name__ == "__main__":
    raise SystemExit(main())
