"""The quickstart's main job leaves a checkout clean: run scripts/main_job.sh (what
scripts/quickstart.sh runs after setup) with a few training steps in a copy of the tracked tree,
then ask git what changed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def test_main_job_leaves_the_checkout_clean(tmp_path):
    clone = tmp_path / "checkout"
    for rel in _git(ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0"):
        if rel and (ROOT / rel).is_file():
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, clone / rel)
    _git(clone, "init", "-q")
    _git(clone, "add", "-A")
    _git(clone, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tree")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(clone)}
    proc = subprocess.run(["bash", "scripts/main_job.sh", "--steps", "2", "--batch-size", "2", "--eval-n", "0",
                           "--sample-every", "0", "--checkpoint-every", "1", "--num-prompts", "8"],
                          cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (clone / "students/shapes-boot/quickstart.png").is_file()
    assert (clone / "runs/quickstart/model_repository/manifest.json").is_file()
    assert _git(clone, "status", "--porcelain") == ""
