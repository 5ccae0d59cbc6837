#!/usr/bin/env python3
"""Regenerate the generated tables of docs/conformance-statement.md from the code.

    python docs/generate_conformance.py          # rewrite the statement's generated blocks
    python docs/generate_conformance.py --check  # exit 1 if they differ from the code

Run from the repository root with the project's virtual environment. The network tables come
from the Storage SCP that ``serve`` builds (:mod:`dicom_node.conformance`); the module and coding
scheme tables from a SEG, an SR and a key image built by the real result builders
(:func:`pipeline.outputs.build_outputs`) for the small synthetic series of the tests.
"""
from __future__ import annotations

import argparse
import difflib
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATEMENT = ROOT / "docs" / "conformance-statement.md"


def example_objects() -> dict:
    """One SEG, SR and key image, by result kind, built for the synthetic test series."""
    sys.path.insert(0, str(ROOT))
    from pipeline.outputs import build_outputs
    from tests.helpers import synthetic_results

    with tempfile.TemporaryDirectory() as tmp:
        paths, _study, _series = synthetic_results.write_series(Path(tmp) / "ct")
        series = synthetic_results.load(paths)
        objects = build_outputs(series, synthetic_results.analysis(series))
    return {kind.value: ds for kind, ds in objects.items()}


def rendered_statement() -> tuple[str, str]:
    """(the statement as it is, the statement as the code says it should be)."""
    sys.path.insert(0, str(ROOT))
    from dicom_node.conformance import render_blocks, update_statement

    text = STATEMENT.read_text()
    return text, update_statement(text, render_blocks(example_objects()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 and show the difference if out of date")
    args = parser.parse_args()
    current, wanted = rendered_statement()
    if current == wanted:
        print(f"{STATEMENT.relative_to(ROOT)} is up to date")
        return 0
    if args.check:
        sys.stdout.writelines(difflib.unified_diff(
            current.splitlines(keepends=True), wanted.splitlines(keepends=True),
            "statement", "generated from the code"))
        return 1
    STATEMENT.write_text(wanted)
    print(f"{STATEMENT.relative_to(ROOT)} regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
