"""Shared fixtures: an exported tiny model repository and a real tritonserver running on it.

    def test_something(triton_server):          # boot_serve.triton_server.TritonServer, ready
        Client(triton_server.http_url).generate(["a red circle"], [0])

The repository is made the way a user makes one: a tiny student (tests/tiny.py) exported by
`python -m boot_serve.export`, configs written by `python -m boot_serve.triton_repo`. The
server is the bundled CPU tritonserver (or the one on PATH) on free 127.0.0.1 ports, started
once per test module that asks for it.

The `python -m distill.run` tests (test_run*.py, test_refine.py) share `setup`, a tiny random teacher with a
prompts file, and `baseline`, one uninterrupted run on it that resume, DDP, --init-from and --refine compare
with; both are made once per session.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


@pytest.fixture(scope="session", autouse=True)
def shipped_tokenizers() -> None:
    """The shipped folders' tokenizer/ (git-ignored, written by scripts/setup.sh from the installed MiniLM
    package), also where the suite runs without that setup."""
    from boot.text import write_tokenizer

    for name in ("shapes-teacher", "shapes-boot"):
        if not (ROOT / "pretrained" / name / "tokenizer" / "vocab.txt").is_file():
            write_tokenizer(ROOT / "pretrained" / name)


@pytest.fixture(scope="session")
def served_student(tmp_path_factory) -> Path:
    """A tiny student whose output depends on the guidance scale (perturbed condition projection)."""
    from tests.tiny import make_tiny_student, make_tiny_teacher

    root = tmp_path_factory.mktemp("served")
    return make_tiny_student(make_tiny_teacher(root / "teacher"), root / "student", guidance_range=(1.0, 5.0),
                             perturb=0.5)


@pytest.fixture(scope="session")
def exported_repository(served_student, tmp_path_factory) -> Path:
    """`python -m boot_serve.export` + `python -m boot_serve.triton_repo` into a fresh folder."""
    repo = tmp_path_factory.mktemp("repository") / "model_repository"
    _run("-m", "boot_serve.export", "--student", str(served_student), "--repository", str(repo))
    _run("-m", "boot_serve.triton_repo", "--repository", str(repo))
    return repo


@pytest.fixture(scope="module")
def triton_server(exported_repository, tmp_path_factory):
    """A ready tritonserver on the exported repository (stopped after the module); its log is
    in `server.log_path`."""
    from boot_serve.triton_server import TritonServer

    log = tmp_path_factory.mktemp("tritonserver") / "tritonserver.log"
    server = TritonServer(exported_repository, exit_timeout=5, log_path=log)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    """(root folder, a tiny random teacher, a prompts file) for the distill.run tests."""
    from tests.run_helpers import PROMPTS
    from tests.tiny import make_tiny_teacher

    root = tmp_path_factory.mktemp("run")
    teacher = make_tiny_teacher(root / "teacher")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return root, teacher, prompts


@pytest.fixture(scope="session")
def baseline(setup):
    """The uninterrupted 4-step run on `setup` (tests/run_helpers.py's recipe): (its folder, its stdout)."""
    from tests.run_helpers import _cli, _in_process

    root, teacher, prompts = setup
    return root / "base", _in_process(_cli(root, teacher, prompts, "base"))
