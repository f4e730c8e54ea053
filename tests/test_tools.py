"""scripts/ holds only what the README and CI call; the tools of boot_tools/ run as documented.

Each Python tool answers --help under its `python -m boot_tools.NAME` name; each GPU job's header says
how to run it and names only files that exist; the weight tools are checked on small tensors.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {"setup.sh", "quickstart.sh", "main_job.sh", "test.sh", "gpu_bench.sh"}
PYTHON_TOOLS = ["gpu_scale", "halve_unet", "handoff", "hop_errors", "pack_states", "soup"]
GPU_JOBS = sorted((ROOT / "boot_tools/gpu").glob("*.sh"))
UNET = "unet/diffusion_pytorch_model.safetensors"


def test_scripts_holds_only_what_readme_and_ci_call():
    assert {p.name for p in (ROOT / "scripts").iterdir()} == SCRIPTS
    named = (ROOT / "README.md").read_text() + (ROOT / ".ci/run").read_text()
    for name in SCRIPTS - {"setup.sh"}:  # setup.sh is what quickstart.sh and test.sh call
        assert f"scripts/{name}" in named, name
    assert "scripts/setup.sh" in (ROOT / "scripts/test.sh").read_text()


@pytest.mark.parametrize("name", PYTHON_TOOLS)
def test_python_tool_help_names_its_command(name, capsys):
    module = importlib.import_module(f"boot_tools.{name}")
    with pytest.raises(SystemExit) as exc:
        module.main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert out.startswith(f"usage: python -m boot_tools.{name}")
    assert f"python -m boot_tools.{name}" in module.__doc__
    assert name in (ROOT / "docs/gpu-tools.md").read_text()


@pytest.mark.parametrize("script", GPU_JOBS, ids=lambda p: p.name)
def test_gpu_job_header_says_how_to_run_it(script):
    text = script.read_text()
    header = "\n".join(line for line in text.splitlines()[:25] if line.startswith("#"))
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if script.name != "env.sh":  # env.sh is sourced by the others
        assert f"bash boot_tools/gpu/{script.name}" in header
        assert "SMOKE=1 DEVICE=cpu" in header
    assert re.search(r"\bInputs?\b|\bOutputs?\b", header), "the header names what it reads and writes"
    for path in re.findall(r"boot_tools/gpu/[a-z_]+\.sh", text):
        assert (ROOT / path).is_file(), path
    for module in re.findall(r"-m (boot_tools\.[a-z_]+)", text):
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module
    assert "scripts/" not in text
    assert f"`{script.name}`" in (ROOT / "docs/gpu-tools.md").read_text()


def test_pack_states_round_trip_is_lossless(tmp_path):
    from boot_tools import pack_states

    rng = np.random.default_rng(0)
    states = (rng.standard_normal((12, 16, 8)) * 3).astype(np.float16)
    ids = rng.integers(0, 30000, (12, 16)).astype(np.int64)
    src = tmp_path / "states"
    src.mkdir()
    save_numpy({"input_ids": ids, "states": states}, str(src / "states.safetensors"))
    (src / "tokenizer.json").write_text("{}")
    pack_states.main(["pack", str(src), str(tmp_path / "packed")])
    assert not (tmp_path / "packed/states.safetensors").exists()
    pack_states.main(["unpack", str(tmp_path / "packed"), str(tmp_path / "back")])
    back = load_numpy(str(tmp_path / "back/states.safetensors"))
    assert back["states"].dtype == np.float16
    assert back["states"].tobytes() == states.tobytes() and np.array_equal(back["input_ids"], ids)
    assert (tmp_path / "back/tokenizer.json").read_text() == "{}"


def _student(folder: Path, value: float) -> Path:
    (folder / "unet").mkdir(parents=True)
    save_file({"a": torch.full((3, 2), value), "b": torch.arange(4.0) * value}, folder / UNET)
    (folder / "boot.json").write_text(json.dumps({"teacher": "t"}))
    return folder


def test_halve_unet_stores_float16_in_place(tmp_path):
    from boot_tools import halve_unet

    student = _student(tmp_path / "s", 1.5)
    halve_unet.main([str(student)])
    weights = load_file(student / UNET)
    assert {v.dtype for v in weights.values()} == {torch.float16}
    assert torch.equal(weights["b"].float(), torch.arange(4.0) * 1.5)


def test_soup_is_the_mean_of_its_sources(tmp_path):
    from boot_tools import soup

    sources = [_student(tmp_path / f"s{i}", v) for i, v in enumerate((1.0, 2.0, 6.0))]
    soup.main([str(tmp_path / "out"), str(sources[0]), *map(str, sources)])
    weights = load_file(tmp_path / "out" / UNET)
    assert torch.equal(weights["a"], torch.full((3, 2), 3.0))
    assert json.loads((tmp_path / "out/boot.json").read_text())["soup"] == [str(s) for s in sources]
    with pytest.raises(SystemExit, match="exists"):
        soup.main([str(tmp_path / "out"), str(sources[0]), str(sources[1])])


def test_hop_errors_shares_add_up_and_match_the_loss_the_run_computes(capsys):
    """boot_tools.hop_errors on the shipped student: each table's shares add up to the whole, and a sample's L_BS
    is BootLoss's at that student (the quick preset's c_1/δ weight)."""
    from boot.loss import BootLoss
    from boot.method import NoiseSchedule, TeacherX0
    from boot.pipeline import BootPipeline
    from boot.samplers import TeacherSampler
    from boot_tools import hop_errors

    hop_errors.main([str(ROOT / "pretrained/shapes-boot"), "--teacher", str(ROOT / "pretrained/shapes-teacher"),
                     "--n", "24", "--batch", "12"])
    out = capsys.readouterr().out
    for title in ("t", "w"):
        block = out.split(f"| {title} | samples")[1].split("\n\n")[0]
        rows = [line.split("|") for line in block.splitlines()[2:] if line.startswith("|")]
        assert sum(int(r[2]) for r in rows) == 24
        assert sum(float(r[5].strip(" %")) for r in rows) == pytest.approx(100.0, abs=0.3)
    assert "the largest 5% hold" in out
    student = BootPipeline.from_pretrained(str(ROOT / "pretrained/shapes-boot")).generator.student
    teacher = TeacherSampler(ROOT / "pretrained/shapes-teacher", 50)
    captions = ["a red circle", "a blue square left of a green triangle"]
    t, w, loss = hop_errors.hop_losses(student, teacher, captions, 3, 1.0, (1.0, 6.0), 2)
    schedule = NoiseSchedule.from_scheduler_config(teacher.scheduler.config)
    f = TeacherX0(teacher.unet, schedule, teacher.scheduler.config.prediction_type)
    noise = hop_errors.seed_noise([3 * 1_000_003 + i for i in range(2)], teacher.latent_shape, 1.0)
    with torch.no_grad():
        direct = BootLoss(delta_power=1.0, beta=0.0)(student, student, f, noise, teacher.text.encode(captions),
                                                     teacher.text.unconditional()[0].expand(2, -1, -1),
                                                     torch.from_numpy(w), torch.from_numpy(t))["bootstrap"]
    np.testing.assert_allclose(loss, direct.double().numpy(), rtol=1e-5)
    assert 1 <= t.min() and t.max() <= schedule.T and 1.0 <= w.min() and w.max() <= 6.0
