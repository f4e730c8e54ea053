"""deploy/'s image: the Dockerfile copies exactly the modules the guard imports, its base is pinned by
digest and it runs unprivileged, it installs only the hashed lock and bakes in no secret, and the lock is
exactly what the serving code imports."""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.deploy_helpers import DEPLOY, MANIFESTS, ROOT, _pod


def _dockerfile() -> list[str]:
    """deploy/Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile").read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _lock() -> dict[str, tuple[str, list[str]]]:
    """deploy/requirements.lock: normalized name -> (version, sha256 hashes)."""
    text = (DEPLOY / "requirements.lock").read_text().replace("\\\n", " ")
    lock = {}
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line:
            req, *opts = line.split()
            name, version = req.split("==")
            lock[_normalize(name.split("[")[0])] = (version, [o.split(":", 1)[1] for o in opts
                                                             if o.startswith("--hash=sha256:")])
    return lock


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _boot_serve_imports(path: str) -> set[str]:
    """boot_serve modules that `path` imports (at the top or inside functions), as file paths."""
    found = set()
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "boot_serve":
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "boot_serve"]
        found |= {n.replace(".", "/") + ".py" for n in names if (ROOT / (n.replace(".", "/") + ".py")).is_file()}
    return found


def _copied() -> set[str]:
    sources = set()
    for line in _dockerfile():
        if line.startswith("COPY "):
            parts = line.split()[1:]
            assert not any(p.startswith("--") for p in parts), line  # root owns the files: no --chown
            sources |= set(parts[:-1])
    return sources


def test_image_holds_every_module_the_guard_imports_and_nothing_else():
    needed, todo = set(), ["boot_serve/guard.py"]
    while todo:
        path = todo.pop()
        needed.add(path)
        todo += sorted(_boot_serve_imports(path) - needed)
    copied = _copied() - {"deploy/requirements.lock"}
    assert needed | {"boot_serve/__init__.py"} == copied, (needed - copied, copied - needed)
    # The build context holds what the image copies and nothing else (keys, venvs, weights stay out).
    ignore = [line.strip() for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*" and set(ignore[1:]) == {f"!{s}" for s in _copied()}


def test_dockerfile_base_is_pinned_by_digest_and_runs_unprivileged():
    lines = _dockerfile()
    froms = [line for line in lines if line.startswith("FROM ")]
    assert len(froms) == 1
    # The digest is a required build argument: no default, and a build without it stops at FROM.
    image = froms[0].split()[1]
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:24\.10-py3@\$\{TRITON_DIGEST:\?[^}\s]+\}", image), image
    assert lines[:2] == ["ARG TRITON_DIGEST", froms[0]]  # declared before FROM, without a default
    assert "latest" not in image
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and lines[-1].startswith("USER ")
    uid, gid = (int(x) for x in users[-1].split(":"))
    assert uid > 0 and gid > 0
    pod = _pod()["securityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"]) == (uid, gid)


def test_dockerfile_installs_only_the_hashed_lock_and_bakes_in_no_secret():
    lines = _dockerfile()
    pip = [line for line in lines if "pip install" in line]
    assert len(pip) == 1
    for option in ("--require-hashes", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
                   "-r /tmp/requirements.lock"):
        assert option in pip[0], option
    assert "COPY deploy/requirements.lock /tmp/requirements.lock" in lines
    lock = _lock()
    for name, (version, hashes) in lock.items():
        assert re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", version) and hashes, name
        assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), name
    # The pins satisfy deploy/requirements.in, which names the same distributions.
    from packaging.requirements import Requirement

    wanted = [Requirement(line.split("#")[0]) for line in (DEPLOY / "requirements.in").read_text().splitlines()
              if line.split("#")[0].strip()]
    assert {_normalize(r.name) for r in wanted} == set(lock)
    for r in wanted:
        assert r.specifier.contains(lock[_normalize(r.name)][0]), (r, lock[_normalize(r.name)][0])
    # No secret in any layer: nothing named like one is set, copied or passed as a build argument.
    secretive = re.compile(r"key|secret|token|passw", re.IGNORECASE)
    for line in lines:
        if line.startswith(("ENV ", "ARG ", "LABEL ")):
            names = re.findall(r"([A-Za-z_.]+)=", line) or [line.split()[1]]
            assert not any(secretive.search(n) for n in names), line
    assert not any(secretive.search(Path(s).name) for s in _copied() if not s.startswith("boot_serve/"))
    assert not [d for f in MANIFESTS for d in yaml.safe_load_all(f.read_text()) if d and d["kind"] == "Secret"]


def test_lock_is_exactly_what_the_serving_code_imports():
    """Every distribution the image's Python code loads (the guard's modules, and the Python-backend
    models' triton_model.py and the files copied beside it, lazy imports included) is in
    deploy/requirements.lock, and the lock holds nothing else. onnxruntime is the cpu variants' (ORT
    inside the Python backend) and is not in the GPU image; triton_python_backend_utils comes with
    Triton."""
    from boot_serve.triton_repo import MODEL_FILES

    models = [path.relative_to(ROOT).as_posix() for path in MODEL_FILES.values()]
    sources = sorted(s for s in _copied() if s.endswith(".py")) + models
    tops = set()
    for path in sources:
        for node in ast.walk(ast.parse((ROOT / path).read_text())):
            if isinstance(node, ast.Import):
                tops |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                tops.add(node.module.split(".")[0])
    tops -= set(sys.stdlib_module_names) | {"boot", "boot_serve", "__future__", "onnxruntime",
                                            "triton_python_backend_utils"}
    modules = sorted(tops) + [s.removesuffix(".py").replace("/", ".") for s in sources]
    probe = ("import importlib, importlib.metadata as md, json, sys\n"
             f"for name in {modules!r}:\n"
             "    importlib.import_module(name)\n"
             "dists = md.packages_distributions()\n"
             "loaded = {m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names) - {'boot_serve'}\n"
             "print(json.dumps(sorted({d for m in loaded for d in dists.get(m, ())})))\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    loaded = {_normalize(d) for d in json.loads(out.stdout)} - {"setuptools"}  # setuptools: its .pth hook
    assert loaded == set(_lock()), (loaded - set(_lock()), set(_lock()) - loaded)
