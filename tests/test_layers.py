"""Layers point one way (read from the code's own imports, every `import`, also inside functions):

    demo/          -> boot_serve, boot
    boot_serve/    -> boot                 (serving never imports training code)
    distill/       -> boot, shapes_world, boot_serve.client (evaluating a served model)
    shapes_world/  -> boot                 (the shapes world, its judge and its teacher's trainer)
    boot_tools/    -> boot, boot_serve, distill, shapes_world (user tools; nothing imports them)
    boot/          -> only itself
    boot_serve/triton_model.py (every Triton model's 1/model.py) and the files copied beside it
                                  -> none of them (NVIDIA's Triton container runs them bare)

and no modules import each other, directly or around a circle (function-level imports count too).
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


# --------------------------------------------------------------------------------------------
# No import cycles inside the packages
# --------------------------------------------------------------------------------------------
def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages (a package is its __init__)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def module_imports(name: str, source: str, is_package: bool, modules) -> set[str]:
    """The modules of `modules` that module `name` imports, at the top or inside functions.

    `import a.b` and `from a.b import c` depend on a.b (c too where it is a module); `from a import b`
    also reads package a's namespace (its __init__ has run, or its __getattr__ answers), so it depends
    on a as well. Relative imports are resolved against `name`.
    """
    def known(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {known(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = ".".join(p for p in (package, base) if p)
            found.add(known(base))
            found |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules}
    return found - {None, name}


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    return {name: module_imports(name, path.read_text(encoding="utf-8"), path.name == "__init__.py", files)
            for name, path in files.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle ["a", "b", ..., "a"] per group of modules that import each other (Tarjan's strongly
    connected components, each shown as a shortest cycle through its first module)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while not group or w != v:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    found = []
    for group in groups:
        start = min(group)
        paths, seen = [[start]], {start}
        while start not in paths[0][1:]:  # breadth first, back to start, inside the group
            path = paths.pop(0)
            for w in sorted(graph[path[-1]] & group):
                if w == start or w not in seen:
                    seen.add(w)
                    paths.append(path + [w])
            paths.sort(key=lambda p: (p[-1] != start, len(p)))
        found.append(paths[0])
    return sorted(found)


@pytest.fixture(scope="module")
def project_import_graph():
    return import_graph(module_files())


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycles_inside_a_package(package, project_import_graph):
    cycles = [" -> ".join(c) for c in import_cycles(project_import_graph)
              if any(m == package or m.startswith(package + ".") for m in c)]
    assert not cycles, "modules that import each other: " + "; ".join(cycles)


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import():
    files = {"p": None, "p.a": None, "p.b": None, "p.c": None}
    graph = {
        "p": module_imports("p", "def __getattr__(name):\n    from p.c import C\n", True, files),
        "p.a": module_imports("p.a", "from .b import f\n", False, files),
        "p.b": module_imports("p.b", "import json\ndef f():\n    from p.a import g\n", False, files),
        "p.c": module_imports("p.c", "from . import b\n", False, files),
    }
    assert graph == {"p": {"p.c"}, "p.a": {"p.b"}, "p.b": {"p.a"}, "p.c": {"p", "p.b"}}
    assert import_cycles(graph) == [["p", "p.c", "p"], ["p.a", "p.b", "p.a"]]
    assert import_cycles({"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": set()}) == []
