"""One command line: every training, calibration and evaluation command is a ``spine-node``
command whose defaults are the trainers' config dataclasses' (issue 25)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from dicom_node.cli import app
from dicom_node.commands import train_options as o
from pipeline.keypoints.train_config import KpTrainConfig
from pipeline.localization.train_config import TrainConfig
from pipeline.segmentation.train_config import RefineTrainConfig, SegTrainConfig

ROOT = Path(__file__).resolve().parents[2]

#: Command-line names that differ from the config field they set.
FIELD_OF = {"seeds": "train_seeds", "out": "out_dir", "cache": "cache_dir"}
CONFIGS = {"localization": TrainConfig, "segmentation": SegTrainConfig,
           "refiner": RefineTrainConfig, "keypoints": KpTrainConfig}


def _train_command(name: str):
    group = typer.main.get_command(app)
    return group.commands["train"].commands[name]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_training_option_defaults_to_its_config_field(name):
    cls = CONFIGS[name]
    fields = cls.__dataclass_fields__
    checked = 0
    for p in _train_command(name).params:
        field = p.name if p.name in fields else FIELD_OF.get(p.name)
        if name == "localization" and p.name == "seeds":
            field = "seeds"
        if field not in fields:
            continue
        expected = o.config_default(cls, field)
        if field.endswith("seeds"):
            expected = o.seeds_text(expected)
        elif field == "patch" and not isinstance(expected, int):
            expected = ",".join(str(v) for v in expected)
        got = p.default
        if isinstance(expected, Path) or isinstance(got, Path):
            got, expected = str(got), str(expected)
        assert got == expected, f"train {name} --{p.name}: {got!r}, {cls.__name__}.{field}: {expected!r}"
        checked += 1
    assert checked >= 10, f"train {name}: only {checked} options matched config fields"


def test_seed_text_reads_back():
    for seeds in ([100, 101, 102], [1, 3, 4, 5, 9], [8001]):
        assert o.seeds_option(o.seeds_text(seeds)) == seeds


def test_no_second_command_line_in_the_pipeline():
    """No ``python -m pipeline...`` entry points: no ``__main__`` block, no argparse."""
    offenders = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                if "argparse" in mods:
                    offenders.append(f"{path.relative_to(ROOT)}: imports argparse")
            if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
                offenders.append(f"{path.relative_to(ROOT)}: __main__ block")
    assert not offenders, offenders


def test_the_command_line_loads_without_torch():
    code = "import sys, dicom_node.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         check=True)
    assert out.stdout.strip() == "False"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicom_node", *args], capture_output=True,
                          text=True, cwd=ROOT)


def test_localization_comparison_refuses_whole_pipeline_options():
    r = _cli("evaluate", "--seeds", "9001", "--relabel", "both", "--gt-centroids")
    assert r.returncode == 2, r.stderr
    assert "--localization/--relabel" in r.stderr


def test_keypoint_planes_refuse_evaluation_seeds(tmp_path):
    r = _cli("train", "keypoint-planes", "9001-9002", "--cache", str(tmp_path))
    assert r.returncode != 0
    assert "9001" in (r.stderr + r.stdout)
    assert not any(tmp_path.iterdir())
