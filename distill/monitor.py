"""What a run shows while it trains: the loss log, sample grids beside the teacher's 50-step images,
validation (PSNR against the teacher, and the judge with grammar prompts) that picks the kept step,
and the held-out evaluation at the end."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from boot.conditioning import save_student_unet
from boot.method import OneStepGenerator, Student
from distill import config
from distill.config import GRAMMAR, N_SAMPLES, SAMPLE_SEED0, VAL_SEED0, RunConfig
from distill.loading import Teacher


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def truncate_log(path: Path, start: int) -> None:
    """Drop records of steps a resumed run will redo (written after its last checkpoint)."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] < start]
        path.write_text("".join(line + "\n" for line in keep))


def make_pipeline(teacher: Teacher, student: Student, cfg: RunConfig, w: float):
    from boot.pipeline import BootPipeline

    meta = {"latent_shape": list(teacher.latent_shape), "guidance_range": [cfg.guidance_min, cfg.guidance_max],
            "guidance_scale": w}
    return BootPipeline(teacher.text, OneStepGenerator(student), teacher.vae, teacher.scheduler_config, meta)


class Samples:
    """Fixed prompts and seeds; the teacher's 50-step DDIM images are rendered once."""

    def __init__(self, teacher: Teacher, prompts: list[str], w: float, work: Path):
        from boot.samplers import TeacherSampler

        self.prompts, self.w, self.work = prompts, w, work
        self.seeds = [SAMPLE_SEED0 + i for i in range(len(prompts))]
        # The run's own teacher modules: its device and --teacher-dtype precision, no second copy.
        sampler = TeacherSampler(teacher.folder, config.REFERENCE_STEPS, w,
                                 parts=(teacher.text, teacher.unet, teacher.vae))
        self.teacher = sampler(prompts, self.seeds, w)
        self.initial: list | None = None

    def save(self, pipe, step: int) -> float:
        """Write samples/step-XXXXXXXX.png and samples.png; return PSNR vs the teacher (dB)."""
        from distill.evaluate import comparison_grid, psnr

        images = pipe(self.prompts, self.seeds, self.w)
        if self.initial is None:
            self.initial = images
        columns = {f"teacher-{config.REFERENCE_STEPS}": self.teacher, "student init": self.initial,
                   f"student step {step}": images}
        grid = comparison_grid(columns, self.prompts, rows=len(self.prompts))
        (self.work / "samples").mkdir(exist_ok=True)
        grid.save(self.work / "samples" / f"step-{step:08d}.png")
        grid.save(self.work / "samples.png")
        value = float(np.mean([min(psnr(a, b), 99.0) for a, b in zip(images, self.teacher)]))
        self._keep(lambda r: r["step"] != step, {"step": step, "psnr_vs_teacher": value})
        return value

    def truncate(self, start: int) -> None:
        """Drop the records of steps a resumed run redoes (a fresh run, start 0: all but step 0's)."""
        self._keep(lambda r: r["step"] <= start)

    def _keep(self, keep, new: dict | None = None) -> None:
        """Rewrite samples.jsonl with the records `keep` accepts (+ `new`), one per step, in step order."""
        path = self.work / "samples.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        records = sorted([r for r in records if keep(r)] + ([new] if new else []), key=lambda r: r["step"])
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, path)


def validation_set(cfg: RunConfig, prompts: list[str]) -> tuple[list[str], list[int]]:
    """The validation's --val-n prompts and noise seeds: eval-split captions of their own draw (seed + 1) for
    grammar runs, prompts of the file otherwise; never the --eval-n report's."""
    from distill import selection
    from shapes_world import world

    captions = (world.sample_captions(cfg.val_n, cfg.seed + 1, "eval") if cfg.prompts == GRAMMAR
                else selection.validation_prompts(prompts, cfg.val_n, cfg.seed + 1))
    return captions, [VAL_SEED0 + i for i in range(cfg.val_n)]


def guidance_candidates(cfg: RunConfig, w: float) -> list[float]:
    """w + each of --guidance-offsets, clamped into the trained range, distinct, in order."""
    return sorted({min(max(w + o, cfg.guidance_min), cfg.guidance_max) for o in cfg.guidance_offsets})


def choose_guidance(cfg: RunConfig, teacher: Teacher, pipe, w: float, work: Path,
                    prompts: list[str]) -> tuple[float, dict]:
    """The recommended guidance among guidance_candidates(cfg, w) by the --select rule on the validation prompts
    and noise: PSNR against the teacher's 50-step images at w (the validation's cached reference), or the judge's
    accuracy. Returns the chosen w and boot.json's guidance_selection record."""
    from distill import selection

    captions, seeds = validation_set(cfg, prompts)
    reference = (selection.TeacherReference(teacher.folder, config.REFERENCE_STEPS, work / "val_teacher.safetensors"
                                            ).images(captions, seeds, w) if cfg.select == "psnr" else None)
    rows = selection.guidance_table(pipe, reference, captions, seeds, guidance_candidates(cfg, w),
                                    judged=cfg.prompts == GRAMMAR)
    best = selection.pick(rows, cfg.select)
    key = selection.METRIC[cfg.select]
    return best["guidance_scale"], {
        "rule": cfg.select, "metric": key, "value": best[key], "teacher_steps": config.REFERENCE_STEPS,
        "teacher_guidance_scale": w, "n": len(captions), "noise_seeds": f"{VAL_SEED0} + i",
        "prompts": {"split": "eval", "seed": cfg.seed + 1} if cfg.prompts == GRAMMAR else cfg.prompts,
        "scales": rows}


class Validation:
    """Periodic validation of the exported student on fixed prompts and noise seeds (val.jsonl,
    val.png), keeping the weights of the best step by the --select rule in `work/best/` for
    --keep best (distill/selection.py). Every record holds the mean PSNR against the teacher's
    config.REFERENCE_STEPS-step DDIM images from the same noise (computed once, cached in
    work/val_teacher.safetensors), and with grammar prompts the judge's accuracy too. Grammar runs
    validate on eval-split captions of their own draw (seed + 1) with their own noise seeds, so picking
    the best step on them does not bias the final --eval-n report; --prompts runs on --val-n prompts of
    the file."""

    def __init__(self, cfg: RunConfig, w: float, work: Path, start: int, teacher: Path, prompts: list[str]):
        from distill import selection

        self.captions, self.seeds = validation_set(cfg, prompts)
        self.judged = cfg.prompts == GRAMMAR
        self.rule, self.key = cfg.select, selection.METRIC[cfg.select]
        self.w, self.work, self.log, self.best_dir = w, work, work / "val.jsonl", work / "best"
        if start == 0:  # a fresh run: forget an earlier run's validations and best weights
            self.log.unlink(missing_ok=True)
            shutil.rmtree(self.best_dir, ignore_errors=True)
        # Validations run right after a checkpoint, so a resumed run keeps those up to its start.
        records = [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []
        self.records = [r for r in records if r["step"] <= start]
        self.log.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        self.reference = selection.TeacherReference(teacher, config.REFERENCE_STEPS, work / "val_teacher.safetensors"
                                                    ).images(self.captions, self.seeds, w)

    @property
    def best(self) -> dict | None:
        """The best record by the rule, whose weights are in best/ (the first of equal values)."""
        from distill import selection

        return selection.pick(self.records, self.rule)

    def describe(self, record: dict) -> str:
        text = (f"PSNR vs teacher {record['psnr_vs_teacher']:.2f} dB" if record.get("psnr_vs_teacher") is not None
                else "no PSNR")
        return text + (f", judge accuracy {100 * record['accuracy']:.1f}%" if record.get("accuracy") is not None
                       else "")

    def selection(self) -> dict:
        """boot.json's record of the rule that chose the exported step, and its value there."""
        best = self.best
        return {"rule": self.rule, "metric": self.key, "value": best[self.key], "step": best["step"],
                "prompts": len(self.captions), "teacher_steps": config.REFERENCE_STEPS, "guidance_scale": self.w}

    def run(self, pipe, step: int, unet: torch.nn.Module) -> dict:
        from distill import selection

        images = pipe(self.captions, self.seeds, self.w)
        record = {"step": step, "psnr_vs_teacher": selection.mean_psnr(images, self.reference),
                  **(selection.judge_scores(self.captions, images) if self.judged else {})}
        previous = self.best
        self.records.append(record)
        append_jsonl(self.log, record)
        if previous is None or record[self.key] > previous[self.key]:
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-best-", dir=self.work))
            save_student_unet(unet, tmp / "unet")
            (tmp / "val.json").write_text(json.dumps(record))
            shutil.rmtree(self.best_dir, ignore_errors=True)
            os.replace(tmp, self.best_dir)
        self.plot()
        return record

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        steps = [r["step"] for r in self.records]
        ax.plot(steps, [r["psnr_vs_teacher"] for r in self.records], "m-o", ms=3, label="PSNR vs teacher (dB)")
        ax.set(xlabel="step", ylabel="PSNR vs teacher (dB)")
        if self.judged:
            right = ax.twinx()
            for key, style in (("accuracy", "k-o"), ("single", "b--"), ("two", "r--")):
                vals = [r.get(key) for r in self.records]
                if any(v is not None for v in vals):
                    right.plot(steps, [100 * v if v is not None else np.nan for v in vals], style, ms=3,
                               label=f"judge {key} (%)")
            right.set(ylabel="judge accuracy (%)", ylim=(0, 100))
            right.legend(loc="lower right", fontsize=8)
        best = self.best
        ax.axvline(best["step"], color="g", lw=0.8, label=f"best by {self.rule}: step {best['step']}")
        ax.set_title(f"validation: student-1 on {len(self.captions)} prompts, guidance {self.w}")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
        fig.tight_layout()
        fig.savefig(self.work / "val.png", dpi=100)
        plt.close(fig)


def evaluate_student(cfg: RunConfig, teacher: Teacher, pipe, w: float, work: Path,
                     teacher_w: float | None = None) -> dict:
    """Judge accuracy of student-1 at w and teacher-50 at teacher_w (default w) on held-out grammar captions
    (same noise)."""
    from distill import evaluate
    from shapes_world import world

    teacher_w = w if teacher_w is None else teacher_w
    captions = world.sample_captions(cfg.eval_n, cfg.seed, "eval")
    seeds = [SAMPLE_SEED0 + i for i in range(cfg.eval_n)]
    ref = evaluate.TeacherSampler(teacher.folder, config.REFERENCE_STEPS, teacher_w,
                                  parts=(teacher.text, teacher.unet, teacher.vae))
    t_res, t_images = evaluate.evaluate(ref, captions, seeds, teacher_w)
    s_res, s_images = evaluate.evaluate(pipe, captions, seeds, w, reference=t_images)
    title = f"BOOT student vs teacher, {cfg.eval_n} eval-split captions, guidance {w:g}" + (
        f" (teacher {teacher_w:g})" if teacher_w != w else "")
    evaluate.write_report([s_res, t_res], {s_res.name: s_images, t_res.name: t_images}, captions,
                          work / "eval", title)
    print(evaluate.markdown([s_res, t_res], title))
    return {"captions": cfg.eval_n, "guidance_scale": w, "teacher_guidance_scale": teacher_w,
            "student_accuracy": s_res.accuracy,
            f"teacher{config.REFERENCE_STEPS}_accuracy": t_res.accuracy,
            "psnr_vs_teacher": s_res.psnr_vs_reference, "report": str(work / "eval" / "report.md")}


def final_losses(log: Path, last: int = 20) -> dict:
    records = [json.loads(line) for line in log.read_text().splitlines()][-last:] if log.exists() else []
    keys = ("loss", "bootstrap", "boundary")
    return {k: float(np.mean([r[k] for r in records])) for k in keys} if records else {}


def plot_loss(log_path: Path, work: Path) -> None:
    from shapes_world.plots import plot_losses

    plot_losses(log_path, work / "loss.png", ["loss", "bootstrap", "boundary"], "BOOT loss (L = L_BS + β L_BC)")


def sample_prompt_list(cfg: RunConfig, prompts: list[str]) -> list[str]:
    if cfg.prompts == GRAMMAR:
        from shapes_world import world

        return world.sample_captions(N_SAMPLES, cfg.seed, "eval")
    return list(dict.fromkeys(prompts))[:N_SAMPLES]

