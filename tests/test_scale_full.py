"""`-m slow`: `distill.run`'s step and export at the full size of the SD-1.5 architecture at 512² (one BOOT step,
export with parity, served by the CPU tritonserver). Each prints its seconds and peak memory."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from boot.loss import BootLoss
from boot.method import NoiseSchedule, TeacherX0
from boot_tools import fixtures
from distill import config, loading, loop, precision, student_folder


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@pytest.fixture(scope="module")
def sd15_full(tmp_path_factory):
    folder = os.environ.get("BOOT_SD15_FULL")  # a folder made earlier by `python -m boot_tools.fixtures`
    if folder:
        return Path(folder)
    return fixtures.make_teacher("sd15", "full", tmp_path_factory.mktemp("sd15") / "teacher", dtype="fp16")


def _available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


@pytest.mark.slow
@pytest.mark.parametrize("amp,teacher_dtype,needs_gb", [("no", "fp32", 18), ("no", "bf16", 16), ("bf16", "bf16", 16)])
def test_one_boot_step_of_the_full_sd15_architecture_at_512(sd15_full, amp, teacher_dtype, needs_gb):
    """One BOOT step (target, CFG teacher at t and at T, student s/T branches forward + backward with
    gradient checkpointing, clipping, AdamW; no EMA) at batch 1, 4x64x64 latents; prints seconds and peak
    resident memory of each phase. Run each case in its own process: ru_maxrss is the process's peak.
    Weights alone: student + gradients + AdamW state 17.2 GB fp32, the teacher 3.4 GB (fp32) or 1.7 GB (bf16)."""
    if _available_gb() < needs_gb:
        pytest.skip(f"needs about {needs_gb} GB of free memory, {_available_gb():.1f} GB available")
    t0 = time.perf_counter()
    teacher = loading.load_teacher(sd15_full, precision.DTYPES[teacher_dtype])
    sched = NoiseSchedule.from_scheduler_config(teacher.scheduler_config)
    teacher_x0 = TeacherX0(teacher.unet, sched, teacher.prediction_type)
    student = loading.build_student(teacher, sched)
    student.unet.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(student.unet.parameters(), lr=1e-5, weight_decay=0.0)
    assert teacher.latent_shape == (4, 64, 64) and teacher.image_shape == (512, 512, 3)
    cond = teacher.text.encode(["a photograph of an astronaut riding a horse"]).float()
    uncond = teacher.text.encode([""]).float()
    noise = torch.randn((1, 4, 64, 64), generator=torch.Generator().manual_seed(0))
    t, w = torch.tensor([500]), torch.tensor([7.5])
    teacher.text = teacher.vae = None  # a step needs neither; give their memory (and the loaders') back
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    record = {"amp": amp, "teacher_dtype": teacher_dtype, "load_s": round(time.perf_counter() - t0, 1),
              "rss_after_load_gb": round(_peak_rss_gb(), 2)}
    t0 = time.perf_counter()
    with precision.autocast(torch.device("cpu"), amp):
        terms = BootLoss(delta_steps=20)(student, student, teacher_x0, noise, cond, uncond, w, t)
    record["loss_forward_s"] = round(time.perf_counter() - t0, 1)
    t1 = time.perf_counter()
    loop.optimizer_step(terms["loss"].mean(), opt, None, student.unet, 1e-5, 1.0)  # backward, clip, AdamW
    record.update(backward_and_adamw_s=round(time.perf_counter() - t1, 1), step_s=round(time.perf_counter() - t0, 1),
                  peak_rss_gb=round(_peak_rss_gb(), 2), loss=terms["loss"].item(), loadavg=os.getloadavg(),
                  threads=torch.get_num_threads())
    print("SCALE " + json.dumps(record))
    assert np.isfinite(record["loss"])
    assert all(p.grad is not None for p in student.unet.parameters())


@pytest.mark.slow
def test_full_size_sd15_student_exports_with_parity_and_serves(sd15_full, tmp_path):
    """The SD-1.5 architecture end to end: CLIP at 77 tokens, the full UNet, the full VAE decoder at 512²,
    exported with parity, then served by the CPU tritonserver. Prints the export time, one served request's
    latency, and each graph's time in ONNX Runtime in this process (the teacher's 50-step CFG pipeline on
    that runtime is 50 UNet calls at batch 2 + the text encoder + the VAE decoder: composed from them)."""
    from boot_serve import export as ex
    from boot_serve import runtime
    from boot_serve.client import Client
    from boot_serve.triton_repo import write_configs
    from boot_serve.triton_server import TritonServer

    student, repo = tmp_path / "student", Path(os.environ.get("BOOT_SCALE_REPO", tmp_path / "repo"))
    teacher = loading.load_teacher(sd15_full)
    sched = NoiseSchedule.from_scheduler_config(teacher.scheduler_config)
    cfg = config.RunConfig(teacher=str(sd15_full), guidance_max=8.0)
    meta = student_folder.student_meta(cfg, teacher, {"source": "test"}, 0, 7.5, {})
    student_folder.write_student(student, teacher, loading.build_student(teacher, sched).unet, meta, tmp_path)
    del teacher
    t0 = time.perf_counter()
    info = ex.export(student, repo, "fp32", parity_batches=(1,), e2e_prompts=1)
    record = {"export_s": round(time.perf_counter() - t0, 1), "peak_rss_gb": round(_peak_rss_gb(), 2),
              "image_shape": info["image_shape"], "max_length": info["max_length"],
              "parity_end_to_end": info["parity"]["end_to_end"]["image"]}
    assert info["image_shape"] == [512, 512, 3] and info["max_length"] == 77
    write_configs(repo, "cpu")
    with TritonServer(repo, exit_timeout=5, log_path=tmp_path / "tritonserver.log") as server:
        client = Client(server.http_url, timeout=1800.0)
        client.generate(["a red circle"], [0])  # warm-up
        latencies = []
        for seed in (1, 2):
            t1 = time.perf_counter()
            image = client.generate(["a photograph of an astronaut riding a horse"], [seed])[0]
            latencies.append(time.perf_counter() - t1)
        assert image.size == (512, 512)
    record["served_latency_s"] = [round(v, 1) for v in latencies]
    graphs, loaded = {}, ex.load_student(student)
    for model, batch in (("text_encoder", 1), ("boot_unet", 1), ("boot_unet", 2), ("vae_decoder", 1)):
        sess = runtime.session(repo / info["graphs"][model]["path"], providers=["CPUExecutionProvider"])
        feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), ex.example_inputs(loaded, model, batch))}
        sess.run(None, feeds)
        t1 = time.perf_counter()
        sess.run(None, feeds)
        graphs[f"{model}_b{batch}_s"] = round(time.perf_counter() - t1, 2)
        del sess
    record["ort_graphs"] = graphs
    record["teacher50_composed_s"] = round(50 * graphs["boot_unet_b2_s"] + graphs["text_encoder_b1_s"]
                                           + graphs["vae_decoder_b1_s"], 1)
    record["loadavg"] = os.getloadavg()
    print("SCALE " + json.dumps(record))
