"""What a radiologist sees: the node's SEG, SR and key image opened in OHIF, in a real browser.

The topology of deploy/compose.yaml, without containers and on loopback only: a phantom spine
study goes to Orthanc (Debian's, with the DICOMweb plugin, configured from deploy/orthanc/),
Orthanc routes the stable CT series to ``spine-node serve`` (the phantom's ground truth stands in
for the models, tests/deploy/groundtruth_pipeline.py), the node sends its SEG, SR and key image
back; OHIF (the npm package ``@ohif/app``'s prebuilt ``dist/``, with deploy/ohif/app-config.js)
is served by nginx with deploy/ohif/nginx.conf.template, which also proxies Orthanc's DICOMweb;
headless Chromium opens the study over the DevTools protocol (tests/deploy/ohif.py).

What the test reads from the page, and what it keeps as screenshots in the folder it prints
(``var/test-artifacts/viewer/``, SPINE_NODE_TEST_ARTIFACTS overrides the parent):

1. the series list: the CT, the SEG, the SR and the key image (``1-series-list.png``), and the
   key image opened (``2-key-image.png``);
2. the SEG over the CT, sagittal: its segments named by level, the fractured one red, the others
   in colours that are neither red nor bone white (``3-ct-with-seg.png``);
3. the SR: every vertebra's finding, as the SR states it, beside it on the key image, grades for
   the assessed vertebrae and none for those cut by the field of view, with no error in the
   browser's console (``4-sr-findings.png``).

Run: ``./scripts/test tests/deploy/test_viewer.py`` (about a minute; the first run fetches OHIF,
50 MB, with ``npm pack`` into var/cache/ohif/). Needs Debian's ``orthanc orthanc-dicomweb nginx
chromium dcmtk`` and ``npm`` (.ci/run installs them); skips, saying which, without them.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from pipeline.outputs.sr_key_image import COMMENT
from tests.deploy.ohif import Chromium, NginxFront, ohif_dist, require
from tests.deploy.test_orthanc_routing import _phantom_study, _start
from tests.helpers import REPO, wait_for

pytestmark = pytest.mark.integration

ARTIFACTS = Path(os.environ.get("SPINE_NODE_TEST_ARTIFACTS", REPO / "var" / "test-artifacts")
                 ) / "viewer"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
#: How long OHIF may take for one step (load a study, a SEG, an SR) on 2 shared cores.
STEP_S = 90


def _comments(sr: pydicom.Dataset) -> dict[str, str]:
    """The SR's one-line finding per vertebra (TEXT "Comment" of its groups), by level."""
    out = {}
    stack = list(sr.ContentSequence)
    while stack:
        item = stack.pop()
        stack.extend(item.get("ContentSequence", []))
        concept = item.get("ConceptNameCodeSequence")
        if item.ValueType == "TEXT" and concept and concept[0].CodeValue == COMMENT.value:
            text = str(item.TextValue)
            out[text.split(":", 1)[0]] = text
    return out


def _css_rgb(text: str) -> tuple[int, int, int]:
    return tuple(int(float(v)) for v in re.findall(r"[\d.]+", text)[:3])


@pytest.fixture
def browser(tmp_path):
    chromium = Chromium(tmp_path / "chromium")
    yield chromium
    chromium.stop()


@pytest.fixture
def front(tmp_path):
    fronts: list[NginxFront] = []

    def start(orthanc_http_port: int) -> NginxFront:
        fronts.append(NginxFront(tmp_path / "nginx", ohif_dist(), orthanc_http_port).start())
        return fronts[-1]

    yield start
    for f in fronts:
        f.stop()


def test_results_are_shown_by_ohif_as_the_report_states_them(orthanc_factory, node, front,
                                                             browser, tmp_path, capsys):
    # Everything the test needs, before anything starts (skips name the missing package).
    require("chromium", "/usr/bin/chromium", install="chromium")
    require("nginx", "/usr/sbin/nginx", install="nginx")
    if not DICOMWEB_PLUGIN.exists():
        pytest.skip("Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")
    dist = ohif_dist()
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    with capsys.disabled():
        print(f"\nviewer screenshots: {ARTIFACTS} (OHIF {dist.parent.parent.name})")

    # Phantom seed 2 over T11-L3: T9, T10 and L4 are cut by the field of view (not assessed),
    # L1 has a grade 2 wedge fracture.
    phantom = tmp_path / "phantom"
    study_dir = _phantom_study(phantom)
    gt = json.loads((phantom / "gt.json").read_text())
    node.config["pipeline"]["entry_point"] = "tests.deploy.groundtruth_pipeline:analyse"
    node.env["GROUND_TRUTH_PHANTOM_DIR"] = str(phantom)
    orthanc = orthanc_factory(node.port)
    assert orthanc.config["RemoteAccessAllowed"] is False
    assert str(DICOMWEB_PLUGIN) in orthanc.config["Plugins"]
    _start(node, orthanc)
    orthanc.storescu(study_dir)

    def results_back() -> dict | None:
        if '"state": "failed"' in node.log():
            raise AssertionError(f"the node's job failed\n{node.log()[-4000:]}")
        by_modality = {s["MainDicomTags"].get("Modality"): s for s in orthanc.series()}
        return by_modality if {"SEG", "SR", "OT"} <= set(by_modality) else None

    series = wait_for(results_back, 180, "SEG, SR and key image in Orthanc",
                      lambda: node.log()[-4000:] + "\n--- orthanc ---\n" + orthanc.log())
    (sr_instance,) = orthanc.get(f"/series/{series['SR']['ID']}/instances")
    with urllib.request.urlopen(f"http://127.0.0.1:{orthanc.http_port}/instances/"
                                f"{sr_instance['ID']}/file", timeout=30) as rsp:
        sr = pydicom.dcmread(io.BytesIO(rsp.read()))
    if shutil.which("dciodvfy"):  # dicom3tools: the SR the viewer gets is valid
        path = tmp_path / "sr.dcm"
        sr.save_as(path, enforce_file_format=True)
        check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True,
                               timeout=120)
        errors = [line for line in (check.stdout + check.stderr).splitlines()
                  if line.startswith("Error")]
        assert errors == [], check.stdout + check.stderr
    stated = _comments(sr)
    truth = {v["name"]: v for v in gt["vertebrae"]}
    assert sorted(stated) == sorted(truth), "the SR states one finding per vertebra"
    assert stated["L1"] == "L1: fracture, Genant grade 2 (moderate), wedge deformity"
    for name in ("T9", "T10", "L4"):
        assert truth[name]["partial"] and stated[name] == \
            f"{name}: not assessed (cut by the field of view)"

    site = front(orthanc.http_port)
    browser.start()
    study_uid = gt["study_instance_uid"]
    browser.navigate(f"{site.url}/viewer?StudyInstanceUIDs={study_uid}")

    # 1. The series list: CT, SEG, SR and the key image.
    descriptions = {m: series[m]["MainDicomTags"].get("SeriesDescription", "")
                    for m in ("SEG", "SR", "OT")}
    thumbnails = browser.wait_js(
        """(() => {
            const t = [...document.querySelectorAll('[data-cy^="study-browser-thumbnail"]')]
              .map(e => e.innerText.replace(/\\s+/g, ' '));
            return t.length >= 4 ? t : null; })()""", STEP_S, "the study's four series in OHIF")
    assert browser.evaluate("window.crossOriginIsolated") is True, "COOP/COEP from nginx"
    for modality, description in descriptions.items():
        assert any(t.startswith(modality) and description in t for t in thumbnails), \
            (modality, description, thumbnails)
    assert any(t.startswith("CT") for t in thumbnails), thumbnails
    _dismiss(browser)
    browser.wait_js("document.querySelector('canvas') !== null", STEP_S, "the CT viewport")
    browser.pump(3)
    browser.screenshot(ARTIFACTS / "1-series-list.png")

    # The key image, opened from the list.
    browser.click_text('[data-cy="study-browser-thumbnail"]', descriptions["OT"], count=2)
    browser.wait_js(f"""document.querySelector('[data-cy="viewport-overlay-top-left"]')
        .innerText.includes({json.dumps(descriptions["OT"])})""", STEP_S, "the key image")
    browser.pump(3)
    browser.screenshot(ARTIFACTS / "2-key-image.png")

    # 2. The SEG over the CT, sagittal, its segments named, the fractured one red.
    browser.click_text('[data-cy="study-browser-thumbnail-no-image"]', descriptions["SEG"],
                       count=2)
    browser.wait_js("""[...document.querySelectorAll('button')]
        .some(b => b.innerText.trim() === 'Yes')""", STEP_S, "OHIF to offer the SEG")
    browser.click_text("button", "Yes")
    browser.wait_js("""document.querySelector('[data-cy="panelSegmentation-btn"]') !== null""",
                    STEP_S, "the segmentation to load")
    _click_cy(browser, "orientationMenu-btn")
    browser.click_text("button, div, span", "Sagittal")
    if "Segmentations" not in browser.text():
        _click_cy(browser, "panelSegmentation-btn")
    levels = [v["name"] for v in gt["vertebrae"]]
    # The segmentation panel: one row per segment, its label and its colour.
    rows = browser.wait_js(f"""(() => {{
        const out = {{}};
        for (const row of document.querySelectorAll('[data-cy="data-row"]')) {{
          const title = row.querySelector('[data-cy="data-row-title"]');
          const dot = row.querySelector('[data-cy="data-row-colorhex"]');
          if (title && dot) out[title.innerText.trim()] = getComputedStyle(dot).backgroundColor;
        }}
        return Object.keys(out).length >= {len(levels)} ? out : null; }})()""",
                           STEP_S, "every segment named in the segmentation panel")
    assert sorted(rows) == sorted(levels), rows
    browser.pump(4)
    shot = browser.screenshot(ARTIFACTS / "3-ct-with-seg.png")
    # Drawn, not only listed: the overlay's red (the fracture) and blue (normal levels) are in
    # the viewport, on the rendered CT.
    pane = browser.evaluate("""(() => {
        const r = document.querySelector('[data-cy="viewport-pane"]').getBoundingClientRect();
        return [r.left, r.top, r.right, r.bottom].map(Math.round); })()""")
    pixels = np.asarray(Image.open(shot).convert("RGB").crop(pane)).astype(int)
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    assert ((r > 150) & (g < 90) & (b < 90)).sum() > 200, "no fractured (red) vertebra drawn"
    assert ((b > 150) & (r < 90)).sum() > 200, "no normal (blue) vertebra drawn"
    colours = {name: _css_rgb(css) for name, css in rows.items()}
    for name, (r, g, b) in colours.items():
        if truth[name]["fractured"]:
            assert r > 200 and g < 60 and b < 60, (name, colours)
        else:
            assert not (r > 200 and g < 100 and b < 100), f"{name} looks fractured: {colours}"
            assert min(r, g, b) < 200, f"{name} is near-white, like bone: {colours}"
    assert len(set(colours.values())) >= 4, colours

    # 3. The SR: every vertebra's finding beside it on the key image, no error. OHIF places
    # each finding's text beside it at a fixed size: a larger page keeps them apart.
    _click_cy(browser, "side-panel-header-right")
    browser.resize(2400, 1500)
    before = len(browser.console)
    browser.click_text('[data-cy="study-browser-thumbnail-no-image"]', descriptions["SR"],
                       count=2)
    boxes = browser.wait_js(f"""(() => {{
        const boxes = [...document.querySelectorAll('svg text')]
          .map(t => [...t.querySelectorAll('tspan')].map(s => s.textContent.trim()));
        return boxes.length >= {len(levels)} ? boxes : null; }})()""",
                            STEP_S, "the SR's findings drawn on the key image")
    browser.pump(3)
    browser.screenshot(ARTIFACTS / "4-sr-findings.png")
    by_level = {}
    for lines in boxes:
        match = re.match(r"(?:363698007: )?([CTL]\d+)[: ]", lines[0]) if lines else None
        if match:
            by_level[match.group(1)] = lines
    assert sorted(by_level) == sorted(levels), boxes
    for name, lines in by_level.items():
        if truth[name]["partial"]:
            assert lines == [f"363698007: {name} vertebra"], lines  # placed, nothing stated
            continue
        assert lines[0].rstrip(": ") == stated[name], lines
        grade = truth[name]["genant_grade"]
        assert f"Genant grade {grade}" in lines[0]
        heights = sorted(float(h) for h in re.findall(r"Height: ([\d.]+) mm", " ".join(lines)))
        expected = sorted(round(truth[name]["heights_mm"][k], 2)
                          for k in ("anterior", "middle", "posterior"))
        assert heights == pytest.approx(expected, abs=0.011), (name, lines)
    browser.pump(2)
    sr_console = browser.console[before:]
    assert Chromium.crashes(sr_console) == [], Chromium.crashes(sr_console)
    assert not [c for c in sr_console if "SCOORD" in c["text"] or "ReferencedSOPSequence"
                in c["text"]], sr_console
    # The page fetched nothing beyond loopback.
    urls = browser.evaluate("performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and all(u.startswith(site.url) for u in urls), \
        [u for u in urls if not u.startswith(site.url)]


def _dismiss(browser: Chromium) -> None:
    """Close the first-visit tour and the "investigational use" banner, as a new user does."""
    for text in ("Skip all", "Confirm and hide"):
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                browser.click_text("button, a, span, div", text)
                browser.pump(0.5)
                break
            except Exception:  # noqa: BLE001 - not shown (yet)
                browser.pump(0.5)


def _click_cy(browser: Chromium, cy: str) -> None:
    box = browser.wait_js(f"""(() => {{
        const e = document.querySelector('[data-cy="{cy}"]');
        if (!e) return null;
        const r = e.getBoundingClientRect();
        return {{x: r.x + r.width / 2, y: r.y + r.height / 2}}; }})()""", STEP_S, cy)
    browser.click_at(box["x"], box["y"])
    browser.pump(1.5)
