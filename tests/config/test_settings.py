"""The settings model: defaults from DESIGN.md, TOML file, environment overrides, and errors
that name the bad key and value."""
from __future__ import annotations

import pytest

from config import ConfigError, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    import os
    for key in list(os.environ):
        if key.startswith("SPINE_NODE_"):
            monkeypatch.delenv(key)


def test_defaults_are_the_design_card_values():
    s = load_settings()
    assert (s.node.ae_title, s.node.host, s.node.port) == ("SPINENODE", "0.0.0.0", 11112)
    assert s.node.allowed_calling_aes == []
    assert str(s.storage.root) == "var"
    assert s.storage.database_url == "sqlite:///var/spine-node.db"
    assert s.storage.min_free_mb == 1024
    assert (s.scheduler.stable_seconds, s.scheduler.poll_seconds) == (10, 2)
    assert (s.selection.modalities, s.selection.min_slices) == (["CT"], 20)
    assert s.pipeline.device == "auto"
    assert (s.http.host, s.http.port) == ("127.0.0.1", 8080)
    assert s.destinations == []


def test_toml_file_and_destinations(tmp_path):
    cfg = tmp_path / "n.toml"
    cfg.write_text("""
[node]
ae_title = "NODE1"
allowed_calling_aes = ["CT1", "CT2"]
[storage]
root = "/data/spine"
[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = 4242
[[destinations]]
name = "viewer"
ae_title = "VIEW"
host = "10.0.0.2"
port = 104
objects = ["key_image"]
""")
    s = load_settings(cfg)
    assert s.node.ae_title == "NODE1"
    assert s.node.allowed_calling_aes == ["CT1", "CT2"]
    assert s.storage.database_url == "sqlite:////data/spine/spine-node.db"
    assert [d.name for d in s.destinations] == ["pacs", "viewer"]
    assert s.destinations[0].objects == ["seg", "sr", "key_image"]
    assert s.destinations[1].objects == ["key_image"]


def test_environment_overrides_file(tmp_path, monkeypatch):
    cfg = tmp_path / "n.toml"
    cfg.write_text("[scheduler]\nstable_seconds = 30\n")
    monkeypatch.setenv("SPINE_NODE_CONFIG", str(cfg))
    assert load_settings().scheduler.stable_seconds == 30
    monkeypatch.setenv("SPINE_NODE_SCHEDULER__STABLE_SECONDS", "5")
    monkeypatch.setenv("SPINE_NODE_NODE__ALLOWED_CALLING_AES", "CT1, CT2")
    monkeypatch.setenv("SPINE_NODE_SELECTION__MODALITIES", '["ct", "PT"]')
    s = load_settings()
    assert s.scheduler.stable_seconds == 5
    assert s.node.allowed_calling_aes == ["CT1", "CT2"]
    assert s.selection.modalities == ["CT", "PT"]


@pytest.mark.parametrize("env, expected", [
    (("SPINE_NODE_SCHEDULER__STABLE_SECONDS", "-1"),
     "scheduler.stable_seconds: -1 is not valid: must be >= 0"),
    (("SPINE_NODE_NODE__PORT", "70000"), "node.port: 70000 is not valid"),
    (("SPINE_NODE_PIPELINE__DEVICE", "tpu"), "pipeline.device: tpu is not valid"),
    (("SPINE_NODE_NODE__AE_TITLE", "A" * 17), "node.ae_title:"),
    (("SPINE_NODE_SELECTION__MIN_SLICES", "zero"), "selection.min_slices: zero is not valid"),
])
def test_bad_environment_value_names_key_and_value(monkeypatch, env, expected):
    monkeypatch.setenv(*env)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert expected in str(err.value)


def test_unknown_key_and_bad_file(tmp_path):
    cfg = tmp_path / "n.toml"
    cfg.write_text("[node]\nae_tilte = \"X\"\n")
    with pytest.raises(ConfigError, match=r"node\.ae_tilte: unknown key"):
        load_settings(cfg)
    cfg.write_text("[node\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(cfg)
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")


def test_destination_errors_name_the_entry(tmp_path):
    cfg = tmp_path / "n.toml"
    cfg.write_text('[[destinations]]\nname = "p"\nae_title = "O"\nhost = "h"\nport = 0\n'
                   '[[destinations]]\nname = "p"\nae_title = "O"\nhost = "h"\nport = 1\n'
                   'objects = ["pdf"]\n')
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    text = str(err.value)
    assert "destinations.0.port: 0 is not valid" in text
    assert "destinations.1.objects.0: pdf is not valid" in text


def test_cli_reports_configuration_error_and_exits_2(tmp_path):
    import subprocess
    import sys
    cfg = tmp_path / "n.toml"
    cfg.write_text("[scheduler]\nstable_seconds = -1\n")
    res = subprocess.run([sys.executable, "-m", "dicom_node", "jobs", "--config", str(cfg)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 2
    assert "scheduler.stable_seconds: -1 is not valid: must be >= 0" in res.stderr


def _all_keys():
    from config.settings import Destination, Settings
    keys = []
    for section, field in Settings.model_fields.items():
        if section == "destinations":
            keys += [f"destinations.{k}" for k in Destination.model_fields]
            continue
        keys += [f"{section}.{k}" for k in field.annotation.model_fields]
    return keys


def test_example_config_and_readme_document_every_key():
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    example = root / "deploy" / "spine-node.example.toml"
    load_settings(example)  # loads as it is
    text = example.read_text()
    readme = (root / "README.md").read_text()
    for key in _all_keys():
        section, name = key.split(".")
        assert f"{name} =" in text or f"# {name} =" in text, f"{key} not in {example.name}"
        if section != "destinations":
            assert f"`{key}" in readme or f"`{section}.{name}`" in readme or \
                f"{section}.{name}" in readme, f"{key} not in README.md"


def test_selection_defaults_and_rules_from_toml(tmp_path, monkeypatch):
    s = load_settings().selection
    assert (s.max_slice_mm, s.min_coverage_mm, s.axial_tolerance_deg) == (3.0, 50.0, 10.0)
    assert [(r.attribute, r.operator, r.value) for r in s.rules] == [
        ("ImageType", "contains", "ORIGINAL"), ("ImageType", "not_contains", "LOCALIZER")]
    assert list(s.kernels) == ["bone", "soft"] and "B7*" in s.kernels["bone"]
    cfg = tmp_path / "n.toml"
    cfg.write_text("""
[selection]
max_slice_mm = 2.0
[[selection.rules]]
attribute = "SeriesDescription"
operator = "regex"
value = "(?i)spine"
[[selection.rules]]
attribute = "PixelSpacing"
operator = "range"
value = [0.3, 1.0]
[selection.kernels]
sharp = ["B7*"]
""")
    s = load_settings(cfg).selection
    assert s.max_slice_mm == 2.0 and s.kernels == {"sharp": ["B7*"]}
    assert [(r.attribute, r.operator, r.value) for r in s.rules] == [
        ("SeriesDescription", "regex", "(?i)spine"), ("PixelSpacing", "range", [0.3, 1.0])]
    monkeypatch.setenv("SPINE_NODE_SELECTION__MIN_COVERAGE_MM", "80")
    monkeypatch.setenv("SPINE_NODE_SELECTION__RULES", '[{"attribute": "slices", '
                       '"operator": "min", "value": 100}]')
    s = load_settings(cfg).selection
    assert s.min_coverage_mm == 80
    assert [(r.attribute, r.operator, r.value) for r in s.rules] == [("slices", "min", 100.0)]


@pytest.mark.parametrize("rule, expected", [
    ('attribute = "ImageTyp"\noperator = "contains"\nvalue = "ORIGINAL"',
     "selection.rules.1.attribute: ImageTyp is not valid: attribute 'ImageTyp' is neither a "
     "DICOM keyword nor one of slices,"),
    ('attribute = "ImageType"\noperator = "includes"\nvalue = "ORIGINAL"',
     "selection.rules.1.operator: includes is not valid: must be 'equals'"),
    ('attribute = "SliceThickness"\noperator = "max"\nvalue = "thin"',
     "selection.rules.1: {'attribute': 'SliceThickness', 'operator': 'max', 'value': 'thin'} is "
     "not valid: rule SliceThickness max 'thin': max takes a number"),
    ('attribute = "SeriesDescription"\noperator = "regex"\nvalue = "(spine"',
     "rule SeriesDescription regex '(spine': not a regular expression: missing )"),
    ('attribute = "PixelSpacing"\noperator = "range"\nvalue = [1.0, 0.3]',
     "rule PixelSpacing range [1.0, 0.3]: range takes [low, high] with low <= high"),
    ('attribute = "ImageType"\noperator = "contains"\nvalue = [1.0, 2.0]',
     "rule ImageType contains [1.0, 2.0]: contains takes one value, not a list"),
])
def test_bad_selection_rule_names_the_rule(tmp_path, rule, expected):
    cfg = tmp_path / "n.toml"
    cfg.write_text('[[selection.rules]]\nattribute = "ImageType"\noperator = "contains"\n'
                   f'value = "ORIGINAL"\n[[selection.rules]]\n{rule}\n')
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert expected in str(err.value)
    assert str(err.value).count("\n") == 0, "only the bad rule is reported"


def test_bad_selection_bounds_and_kernels(monkeypatch):
    monkeypatch.setenv("SPINE_NODE_SELECTION__AXIAL_TOLERANCE_DEG", "120")
    monkeypatch.setenv("SPINE_NODE_SELECTION__KERNELS", '{"bone": []}')
    with pytest.raises(ConfigError) as err:
        load_settings()
    text = str(err.value)
    assert "selection.axial_tolerance_deg: 120 is not valid: must be <= 90" in text
    assert "selection.kernels:" in text and "needs a name and non-empty patterns" in text
