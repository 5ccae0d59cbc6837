"""No import cycles among the project's modules (issue 25), counting imports inside functions
too: a cycle hidden in a function still ties two modules together.

The graph is built from the source (``ast``), so the test needs no import of its own.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("config", "storage", "pipeline", "dicom_node")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = p
    return mods


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:
                    target = f"{node.module}.{a.name}"
                    graph[m].add(target if target in mods else node.module)
            elif isinstance(node, ast.Import):
                graph[m].update(a.name for a in node.names)
        graph[m] = {t for t in graph[m] if t in mods and t != m}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_itself_through_others():
    assert cycles(import_graph()) == []


def test_layers_import_only_leftwards():
    """DESIGN.md: config -> storage -> pipeline -> dicom_node; none imports a room to its right."""
    order = {pkg: k for k, pkg in enumerate(PACKAGES)}
    wrong = [(m, t) for m, ts in import_graph().items() for t in ts
             if order[t.split(".")[0]] > order[m.split(".")[0]]]
    assert wrong == []


#: Modules that only training, calibration or data preparation need.
TRAINING_MODULES = ("pipeline.training", "pipeline.localization.train", "pipeline.localization.dataset",
                    "pipeline.localization.calibrate", "pipeline.segmentation.train",
                    "pipeline.segmentation.train_refiner", "pipeline.segmentation.refine_training",
                    "pipeline.segmentation.dataset", "pipeline.segmentation.coarse_prior",
                    "pipeline.keypoints.train", "pipeline.keypoints.dataset",
                    "pipeline.keypoints.fracture_phantoms", "pipeline.phantom_caches", "pipeline.synthesis",
                    "pipeline.realdata")


def test_inference_reaches_no_training_code():
    """Everything ``pipeline.run.analyse`` can import (transitively, imports inside functions
    included) is inference: each model's ``infer`` module imports nothing from its training."""
    graph = import_graph()
    seen, todo = set(), ["pipeline.run"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    reached = sorted(m for m in seen if m.startswith(TRAINING_MODULES))
    assert not reached, f"the inference path imports training code: {reached}"


def test_the_keypoint_trainer_imports_no_other_models_training_code():
    """Keypoint training reads the phantom caches (pipeline.phantom_caches), not segmentation's
    dataset or trainer; segmentation training imports nothing of the keypoints' training."""
    graph = import_graph()
    for pkg, other in (("pipeline.keypoints", "pipeline.segmentation"),
                       ("pipeline.segmentation", "pipeline.keypoints")):
        crossing = sorted((m, t) for m, targets in graph.items() if m.startswith(pkg + ".")
                          for t in targets if t.startswith(other + ".") and t in TRAINING_MODULES)
        assert not crossing, crossing
