"""Layers point one way (read from the code's own imports, every `import`, also inside functions):

    demo/          -> boot_serve, boot
    boot_serve/    -> boot                 (serving never imports training code)
    distill/       -> boot, shapes_world, boot_serve.client (evaluating a served model)
    shapes_world/  -> boot                 (the shapes world, its judge and its teacher's trainer)
    boot_tools/    -> boot, boot_serve, distill, shapes_world (user tools; nothing imports them)
    boot/          -> only itself
    boot_serve/triton_model.py (every Triton model's 1/model.py) and the files copied beside it
                                  -> none of them (NVIDIA's Triton container runs them bare)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("boot", "boot_serve", "distill", "demo", "shapes_world", "boot_tools")
ALLOWED = {
    "boot": {"boot"},
    "boot_serve": {"boot", "boot_serve"},
    "demo": {"boot", "boot_serve", "demo"},
    "distill": {"boot", "distill", "shapes_world", "boot_serve.client"},
    "shapes_world": {"boot", "shapes_world"},
    "boot_tools": {"boot", "boot_serve", "distill", "shapes_world", "boot_tools"},
    "model_repository": set(),
}


def project_imports(source: str) -> set[str]:
    """Dotted module names of the project's packages that `source` imports."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in PACKAGES}
    return found


def allowed(importer: str, module: str) -> bool:
    rules = ALLOWED[importer]
    return any(module == r or module.startswith(r + ".") for r in rules) or (
        # `from boot_serve import client` names the module boot_serve.client
        module in {r.rsplit(".", 1)[0] for r in rules if "." in r})


def violations(layer: str, files: list[Path]) -> dict[str, list[str]]:
    bad = {}
    for f in files:
        hits = sorted(m for m in project_imports(f.read_text(encoding="utf-8")) if not allowed(layer, m))
        if hits:
            bad[str(f.relative_to(ROOT))] = hits
    return bad


@pytest.mark.parametrize("layer", ["boot", "boot_serve", "demo", "distill", "shapes_world", "boot_tools"])
def test_packages_import_only_layers_below(layer):
    assert violations(layer, sorted((ROOT / layer).rglob("*.py"))) == {}


def test_triton_models_import_no_project_package():
    """model.py and the files copied beside it import no project package, and relatively only each other
    (Triton imports model.py as `1.model`: `from .x import y` finds 1/x.py, a copy of MODEL_FILES["x.py"])."""
    from boot_serve.triton_repo import MODEL_FILES, MODEL_SOURCE

    assert MODEL_FILES["model.py"] == MODEL_SOURCE
    assert all(path.name == name for name, path in MODEL_FILES.items() if name != "model.py")
    assert violations("model_repository", list(MODEL_FILES.values())) == {}
    siblings = {name.removesuffix(".py") for name in MODEL_FILES}
    for path in MODEL_FILES.values():
        relative = {node.module for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                    if isinstance(node, ast.ImportFrom) and node.level}
        assert relative <= siblings - {"model"}, (path.name, relative)
    imported = {node.module for node in ast.walk(ast.parse(MODEL_SOURCE.read_text(encoding="utf-8")))
                if isinstance(node, ast.ImportFrom) and node.level == 1}
    assert imported == siblings - {"model"}  # every copied file is used


def test_the_checker_finds_a_violation():
    assert project_imports("def f():\n    from distill.evaluate import psnr\n") == {"distill.evaluate",
                                                                              "distill.evaluate.psnr"}
    assert not allowed("boot_serve", "shapes_world.world") and not allowed("demo", "shapes_world")
    assert allowed("distill", "shapes_world.judge") and not allowed("shapes_world", "distill.evaluate")
    assert allowed("distill", "boot_serve.client") and not allowed("distill", "boot_serve.export")
    assert allowed("demo", "boot_serve.demo_backend")


def test_example_prompts_are_the_shapes_eval_captions():
    from boot_serve.prompts import example_prompts
    from shapes_world.world import sample_captions

    assert example_prompts(1000) == sample_captions(1000, 0, "eval")
    assert example_prompts(3, 999) == [sample_captions(1000, 0, "eval")[999], *sample_captions(2, 0, "eval")]
