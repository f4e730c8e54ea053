"""scripts/gpu_bench.sh and `python -m boot_serve.bench --in-process`.

The smoke mode (SMOKE=1 DEVICE=cpu: tiny SD-1.5-shaped networks, the shipped student, 2 teacher steps,
eager) runs here, through the script, and its report is checked against itself. The real GPU run
(`-m gpu`) needs CUDA and is skipped without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from boot_serve.bench import inprocess

ROOT = Path(__file__).resolve().parent.parent


def _script(tmp_path: Path, **env) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "report"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_bench.sh")], cwd=ROOT, capture_output=True, text=True,
                          timeout=1800, env={**os.environ, "PYTHON": sys.executable, "OUT": str(out), **env})
    return proc, out


def test_smoke_mode_on_cpu(tmp_path):
    proc, out = _script(tmp_path, SMOKE="1", DEVICE="cpu", OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert [m["model"] for m in report["models"]] == ["shipped", "sd15-tiny"]
    for m in report["models"]:
        assert [r["batch"] for r in m["batches"]] == [1, 2]
        for r in m["batches"]:
            assert r["count"] == 2 and 0 < r["p50_ms"] <= r["p99_ms"]
            assert r["images_per_s"] == pytest.approx(r["batch"] * 1000 / r["mean_ms"])
        assert all(v > 0 for v in m["split_batch1_ms"].values())
        t = m["teacher"]
        assert (t["steps"], t["unet_evaluations"]) == (2, 4)
        assert t["speedup"] == pytest.approx(t["p50_ms"] / m["batches"][0]["p50_ms"])
    md = (out / "bench.md").read_text()
    assert "teacher DDIM-2" in md and "SD-Turbo" in md and "sd15-tiny" in md
    assert (out / "bench.png").stat().st_size > 10_000


def test_cli_refuses_graphs_without_cuda(capsys):
    with pytest.raises(SystemExit) as exc:
        inprocess.parse_args(["--in-process", "--device", "cpu", "--graphs", "manual", "--sd15-tiny"])
    assert exc.value.code == 2 and "needs a CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        inprocess.parse_args(["--in-process", "--device", "cpu", "--graphs", "none"])  # nothing to measure


def test_sd15_config_is_the_sd15_architecture():
    """The random-weight full-size student has SD-1.5's networks: about 860 M UNet parameters,
    83 M in the VAE, 123 M in the text encoder (counted from the configs, on the meta device)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        sizes = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (
            UNet2DConditionModel(**inprocess.SD15["unet"]), AutoencoderKL(**inprocess.SD15["vae"]),
            CLIPTextModel(CLIPTextConfig(**inprocess.SD15["text"])))]
    assert sizes[0] == pytest.approx(859.5, abs=1) and sizes[1] == pytest.approx(83.7, abs=1)
    assert sizes[2] == pytest.approx(123.1, abs=1)


@pytest.mark.gpu
def test_gpu_run(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    proc, out = _script(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert {m["model"] for m in report["models"]} == {"shipped", "sd15-512"}


def test_the_console_script_entry_reaches_the_in_process_benchmark(capsys):
    """boot-bench is boot_serve.bench:main; with --in-process it is the in-process benchmark's command line."""
    from boot_serve import bench

    with pytest.raises(SystemExit) as done:
        bench.main(["--in-process", "--help"])
    assert done.value.code == 0
    assert "--sd15-tiny" in capsys.readouterr().out
