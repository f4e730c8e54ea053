"""The distillation loop (numbered steps in `train`), the optimizer step, the EMA, resume and the
run's end (the student folder and its evaluation)."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from boot import checkpoint
from boot import dmd as boot_dmd
from boot.loss import BootLoss, FinalHopRegression
from boot.method import (
    DEFAULT_CONDITIONING,
    LEGACY_CONDITIONING,
    NoiseSchedule,
    Student,
    TeacherX0,
    to_plain_projection,
)
from boot.sdxl import pooled_args
from distill import config, memory, precision
from distill.batches import Batch, draw_batch, lr_at, step_generator
from distill.config import BOOKKEEPING, GRAMMAR, RunConfig
from distill.distributed import Dist, all_mean
from distill.loading import Teacher, build_student, freeze_parameters, recommended_guidance
from distill.monitor import (
    Samples,
    Validation,
    append_jsonl,
    choose_guidance,
    evaluate_student,
    final_losses,
    guidance_candidates,
    make_pipeline,
    plot_loss,
    sample_prompt_list,
    truncate_log,
)
from distill.refine import final_hop_targets, image_decoder, pooled_pair
from distill.student_folder import (
    lineage,
    load_unet_weights,
    saved_form,
    student_meta,
    update_student_meta,
    write_student,
)

# RunConfig fields a checkpoint may predate, with the value its run used.
PREDATING = {"condition_space": "diffusers"}


def training_conditioning(cfg: config.RunConfig) -> str:
    """The conditioning a new student trains with: a "diffusers-guidance" student of --condition-space sinusoid
    trains as a "sinusoid" one and is written converted (boot.conditioning.convert_conditioning)."""
    if cfg.conditioning == DEFAULT_CONDITIONING and cfg.condition_space == "sinusoid" and not cfg.init_from:
        return LEGACY_CONDITIONING
    return cfg.conditioning


def saved_pipeline(teacher: Teacher, exported: Student, cfg: RunConfig, w: float):
    """The pipeline of the exported student as its folder will hold it (saved_form): what the sample grids and
    the validation render, so that they score the model a run writes."""
    return make_pipeline(teacher, saved_form(exported, cfg).student, cfg, w)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, online: torch.nn.Module, decay: float, step: int) -> None:
    """θ_ema ← d·θ_ema + (1 − d)·θ with d warmed up as min(decay, (1 + step) / (10 + step)); over the
    trained parameters only (frozen ones, a LoRA student's base, are equal in both), wherever the EMA lives."""
    d = min(decay, (1 + step) / (10 + step))
    for pe, p in zip(ema.parameters(), online.parameters()):
        if p.requires_grad:
            pe.lerp_(p.detach().to(pe.device), 1 - d)


def resume_or_reset(cfg: RunConfig, resume: bool, ckpt_dir: Path, modules: dict, opt, scaler, dist: Dist,
                    extra_optimizers: dict | None = None) -> int:
    """Load the newest checkpoint (--resume) or clear old ones; return the first step to run."""
    last = checkpoint.latest(ckpt_dir)
    if not resume:
        if last is not None and dist.main:
            print(f"starting fresh: removing checkpoints in {ckpt_dir} (pass --resume to continue from {last.name})")
            shutil.rmtree(ckpt_dir)
        return 0
    if last is None:
        if dist.main:
            print(f"--resume: no checkpoint in {ckpt_dir}, starting at step 0")
        return 0
    stored = json.loads((last / "meta.json").read_text())["meta"]["config"]  # checked before any weight loads
    # Fields newer than the checkpoint: what the code that wrote it did (condition_space: it trained the
    # diffusers form directly), else today's default.
    # Both sides as the checkpoint's JSON holds them (a tuple flag reads back as a list).
    as_stored = lambda config: json.loads(json.dumps(dataclasses.asdict(config)))  # noqa: E731
    defaults = {**as_stored(RunConfig()), **PREDATING}
    free = set(BOOKKEEPING) - ({"steps"} if cfg.lr_schedule != "constant" else set())  # a cosine ends at --steps
    changed = [k for k, v in as_stored(cfg).items() if k not in free and stored.get(k, defaults[k]) != v]
    if changed:
        diff = ", ".join(f"{k} {stored.get(k, defaults[k])!r} -> {getattr(cfg, k)!r}" for k in changed)
        raise ValueError(f"--resume: {diff} differ from the checkpoint {last}; use the same flags or a new --work")
    info = checkpoint.load(last, modules, opt, extra_optimizers)
    if scaler is not None and info["meta"].get("scaler"):
        scaler.load_state_dict(info["meta"]["scaler"])
    if dist.main:
        print(f"resumed {last} (step {info['step']})")
    return int(info["step"])


def train(cfg: RunConfig, args, teacher: Teacher, prompts: list[str], prompts_info: dict, dist: Dist,
          out: Path, work: Path) -> Path:
    """The distillation procedure, top to bottom (numbered as in the module docstring)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = dist.device
    w_rec = recommended_guidance(cfg, teacher)
    # 0a. Frozen teacher f_w and cached text states (one per distinct prompt; uncond = "").
    schedule = NoiseSchedule.from_scheduler_config(teacher.scheduler_config).to(dev)
    if cfg.final_hop >= schedule.T:
        raise ValueError(f"--final-hop {cfg.final_hop} must be below the teacher's last timestep {schedule.T}")
    teacher.text.to(dev)
    # SDXL: pooled embeddings cached beside the states; the unconditional context as its pipeline makes it.
    states = memory.PromptStates(teacher.text, prompts, cfg.text_states, dev)
    uncond, uncond_pooled = (None if x is None else x.float().to(dev) for x in teacher.text.unconditional())
    teacher_x0 = TeacherX0(teacher.unet.to(dev), schedule, teacher.prediction_type, teacher.time_ids)
    teacher.vae.to(dev)
    # 0b. Online student g_θ, its EMA (a copy, on --ema-device), the bootstrap-target network, optimizer.
    projected = (cfg.guidance_min, cfg.guidance_max) if cfg.condition_space == "projected" else None
    student = build_student(teacher, schedule, cfg.init_from, cfg.parameterization, cfg.lora_rank,
                            training_conditioning(cfg), cfg.guidance_band, projected, cfg.compact).to(dev)
    if cfg.freeze:
        frozen = freeze_parameters(student.unet, cfg.freeze)
        if dist.main:
            print(f"--freeze {','.join(cfg.freeze)}: {frozen:,} UNet weights kept at their starting values")
    if dist.main:
        lineage(cfg, work, 0, fresh=not args.resume or checkpoint.latest(work / "checkpoints") is None)
    ema = (copy.deepcopy(student).to(dev if cfg.ema_device == "same" else "cpu").eval().requires_grad_(False)
           if cfg.ema > 0 else None)
    if cfg.gradient_checkpointing:
        student.unet.enable_gradient_checkpointing()
    target = ema if cfg.target == "ema" else student
    exported = ema if ema is not None else student
    opt = torch.optim.AdamW([p for p in student.unet.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0,
                            betas=(0.9, cfg.adam_beta2))
    amp_dtype = precision.autocast_dtype(cfg.mixed_precision)
    scaler = torch.amp.GradScaler(dev.type) if amp_dtype == torch.float16 else None
    # κ = α_T/σ_T multiplies the learning rate of a teacher-at-T-scaled-lr student of an epsilon teacher, else 1
    # (boot.method.update_scale); the rate applied, κ·lr, is the one logged.
    kappa = student.update_scale
    loss_fn = BootLoss(delta_steps=cfg.delta, beta=cfg.beta, solver_steps=cfg.solver_steps,
                       final_hop=cfg.final_hop, boundary_fraction=cfg.boundary_fraction, anchor_steps=cfg.anchor_steps,
                       delta_power=cfg.delta_power, huber_c=cfg.huber_c,
                       guidance_power=cfg.guidance_power, guidance_range=(cfg.guidance_min, cfg.guidance_max))
    refine = (final_hop_targets(cfg, teacher, teacher_x0, loss_fn, states, uncond, dist, work, uncond_pooled)
              if cfg.refine else None)
    refine_loss = FinalHopRegression(image_decoder(teacher) if cfg.refine_space == "image" else None)
    ckpt_dir, log_path = work / "checkpoints", work / "loss.jsonl"
    # 0b'. --dmd-weight > 0: the fake x0-model f_φ (a trainable copy of the teacher's UNet) and its own AdamW
    #      (boot/dmd.py); it lives in the checkpoints beside the student ("fake", optimizer "fake").
    fake = fake_opt = None
    if cfg.dmd_weight > 0:
        fake = boot_dmd.FakeX0.from_teacher(teacher_x0, guided=cfg.dmd_fake == "guided").to(dev)
        fake_opt = torch.optim.AdamW(fake.unet.parameters(), lr=cfg.dmd_fake_lr, weight_decay=0.0)
    dm_loss = boot_dmd.DistributionMatchingLoss()
    fake_update = boot_dmd.FakeScoreUpdate(cfg.dmd_fake_updates, cfg.dmd_t_min, cfg.dmd_t_max, cfg.grad_clip)
    extra_opts = {"fake": fake_opt} if fake_opt is not None else None

    # 0c. Reference images (rank 0) before any checkpoint is loaded: "student init" is step 0's student.
    #     --sample-every 0 renders none (at SD scale on a CPU the 50-step teacher grid alone takes hours).
    samples = None
    if dist.main and cfg.sample_every:
        samples = Samples(teacher, sample_prompt_list(cfg, prompts), w_rec, work)
        with memory.placed(exported, dev):
            samples.save(saved_pipeline(teacher, exported, cfg, w_rec), 0)
    modules = {"unet": student.unet, **({"ema": ema.unet} if ema is not None else {}),
               **({"fake": fake.unet} if fake is not None else {})}
    start = resume_or_reset(cfg, args.resume, ckpt_dir, modules, opt, scaler, dist, extra_opts)
    val = None
    if dist.main:
        truncate_log(log_path, start)
        if samples is not None:
            samples.truncate(start)
        if cfg.val_every:
            val = Validation(cfg, w_rec, work, start, teacher.folder, prompts)
            if start == 0:
                with memory.placed(exported, dev):
                    val.run(saved_pipeline(teacher, exported, cfg, w_rec), 0, exported.unet)
    if dist.world > 1:
        torch.distributed.barrier()
    net = DDP(student, device_ids=[dev.index] if dev.type == "cuda" else None,
              broadcast_buffers=False) if dist.world > 1 else student
    if cfg.compile:  # the loop's calls only; samples, checkpoints and the export use the plain modules
        net, teacher_x0 = torch.compile(net), TeacherX0(torch.compile(teacher.unet), schedule,
                                                              teacher.prediction_type, teacher.time_ids)
        target = torch.compile(target)

    t0, done = time.time(), start
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="boot", disable=not dist.main)
    for step in bar:
        # 1. This rank's slice of the global batch of `step` (--refine: of the stored final hops).
        if refine is not None:
            r = refine.rows(cfg, step, dist)
            idle = torch.zeros(len(r))  # a refinement has no boundary or anchor rows
            b = Batch(refine.prompt[r], refine.noise[r], refine.t[r], refine.w[r], idle, idle)
        else:
            r, b = None, draw_batch(cfg, step, len(prompts), teacher.latent_shape, schedule.T).shard(dist.rank,
                                                                                                      dist.world)
        cond = states(b.prompt)
        pooled_c, pooled_u = pooled_pair(states.pooled(b.prompt), uncond_pooled, len(b.prompt))
        noise, t, w = b.noise.to(dev), b.t.to(dev), b.w.to(dev)
        uncond_b = uncond.expand(len(t), -1, -1)  # the unconditional states, one row per sample (a view)
        # 2. L = L_BS + β·L_BC; gradients only through the online student's s and T branches
        #    (--refine: L_BS of the final hop against its stored target, the s = 0 branch only).
        with precision.autocast(dev, cfg.mixed_precision):
            terms = (refine_loss(net, schedule, noise, cond, w, t, refine.y[r].to(dev), pooled_c)
                     if refine is not None else
                     loss_fn(net, target, teacher_x0, noise, cond, uncond_b, w, t,
                             pooled_c, pooled_u, boundary=b.boundary.to(dev), anchor=b.anchor.to(dev)))
        loss = terms["loss"].mean()
        # 2'. --dmd-weight: + λ·L_DM on the one-step image x̂ = g(ε, 0, c, w) (boot/dmd.py), t and n from the
        #     step's own stream of draws.
        #     --dmd-fake-warmup: for the steps before, the fake model alone learns the student's x̂.
        dmd_on = fake is not None and step >= cfg.dmd_start
        fake_on = fake is not None and step >= cfg.dmd_start - cfg.dmd_fake_warmup
        if fake_on:
            gen = step_generator(cfg.seed, step, stream=1)
            t_dm = boot_dmd.draw_timesteps(cfg.dmd_t_min, cfg.dmd_t_max, schedule.T, len(t), gen).to(dev)
            n_dm = torch.randn(noise.shape, generator=gen).to(dev)
            # a refinement's loss has just made x̂ from the same noise: its graph is reused, not recomputed
            with precision.autocast(dev, cfg.mixed_precision), torch.set_grad_enabled(dmd_on):
                x_hat = (terms["x0"] if "x0" in terms
                         else net(noise, torch.zeros_like(t), cond, w, *pooled_args(pooled_c)))
        if dmd_on:
            with precision.autocast(dev, cfg.mixed_precision):
                dm = dm_loss(x_hat, teacher_x0, fake, cond, uncond_b, w, t_dm, n_dm,
                             pooled_c, pooled_u)
            loss = loss + cfg.dmd_weight * dm["loss"].mean()
        # 3. AdamW with clipping, then EMA; with DMD, then the fake model's updates on this step's x̂.
        lr = kappa * lr_at(cfg, step)
        optimizer_step(loss, opt, scaler, student.unet, lr, cfg.grad_clip)
        if ema is not None:
            update_ema(ema.unet, student.unet, cfg.ema, step)
        fake_loss = (fake_update(fake, fake_opt, x_hat, cond, gen, pooled_c, uncond_b, w,
                                 pooled_u) if fake_on else 0.0)
        # 4. Logs (averaged over ranks), samples, checkpoints; rank 0's clock decides an early stop.
        done = step + 1
        out_of_time = dist.main and cfg.max_minutes > 0 and time.time() - t0 > 60 * cfg.max_minutes
        flag = torch.tensor(float(out_of_time) * dist.world, device=dev)
        anchor = terms["anchor"].mean() if "anchor" in terms else torch.zeros((), device=dev)
        *logged, stop = all_mean(torch.stack([loss.detach(), terms["bootstrap"].mean(), terms["boundary"].mean(),
                                              anchor, flag]).float(), dist).tolist()
        last = done == cfg.steps or stop > 0
        if dist.main:
            record = dict(zip(("loss", "bootstrap", "boundary", "anchor"), logged))
            if not cfg.anchors:
                del record["anchor"]
            if fake is not None:  # this rank's values (DMD runs on one process)
                record.update(dmd=float(dm["loss"].detach().mean()) if dmd_on else 0.0, fake=fake_loss)
            bar.set_postfix(loss=f"{record['loss']:.4f}", bs=f"{record['bootstrap']:.4f}",
                            bc=f"{record['boundary']:.4f}")
            append_jsonl(log_path, {"step": step, **record, "lr": lr, "time": time.time() - t0})
            if cfg.sample_every and done % cfg.sample_every == 0 and not last:
                with memory.placed(exported, dev):
                    value = samples.save(saved_pipeline(teacher, exported, cfg, w_rec), done)
                tqdm.write(f"step {done}: sample PSNR vs teacher-{config.REFERENCE_STEPS} {value:.2f} dB")
                plot_loss(log_path, work)
            validate = val is not None and (done % cfg.val_every == 0 or last)
            if done % cfg.checkpoint_every == 0 or last or validate:
                meta = {"config": dataclasses.asdict(cfg), "scaler": scaler.state_dict() if scaler else None}
                checkpoint.save(ckpt_dir, done, modules, opt, meta, extra_optimizers=extra_opts)
            if validate:  # after the checkpoint: a resumed run never sees a validation of steps it redoes
                with memory.placed(exported, dev):
                    record = val.run(saved_pipeline(teacher, exported, cfg, w_rec), done, exported.unet)
                tqdm.write(f"step {done}: validation {val.describe(record)} (best by {cfg.select}: "
                           f"{val.describe(val.best)} at step {val.best['step']})")
        if stop > 0:
            if dist.main:
                tqdm.write(f"--max-minutes {cfg.max_minutes} reached after step {done} of {cfg.steps}; "
                           "continue with --resume")
            break
    bar.close()
    if dist.main:
        finish(cfg, teacher, exported, prompts_info, samples, done, w_rec, dist, out, work, time.time() - t0, prompts,
               val)
    return out


def optimizer_step(loss: torch.Tensor, opt, scaler, unet: torch.nn.Module, lr: float, clip: float) -> None:
    """Backward (loss-scaled under fp16), unscale, clip the global grad norm, AdamW step at `lr`."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
    else:
        loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(unet.parameters(), clip)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()


def finish(cfg: RunConfig, teacher: Teacher, exported: Student, prompts_info: dict, samples: Samples | None,
           done: int, w_rec: float, dist: Dist, out: Path, work: Path, wall: float, prompts: list[str],
           val: Validation | None = None) -> None:
    """Rank 0 after training: last sample grid, student folder, losses and evaluation summary, all of the student
    as the folder holds it (saved_form)."""
    log_path = work / "loss.jsonl"
    plot_loss(log_path, work)
    steps, extra = done, {}
    if val is not None:
        extra["validation"] = {"captions": cfg.val_n, "every": cfg.val_every, "best": val.best,
                               "last": val.records[-1] if val.records else None}
        if cfg.keep == "best":
            to_plain_projection(exported.unet)  # the form the best weights were saved in
            exported.unet.load_state_dict(load_unet_weights(work / "best" / "unet"))
            steps = val.best["step"]
            extra["steps_run"] = done
            extra["selection"] = val.selection()
            print(f"--keep best: exporting step {steps} (validation {val.describe(val.best)}, "
                  f"last step {done}: {val.describe(val.records[-1])})")
    exported.to(dist.device)  # an EMA kept on the CPU renders on the training device from here on
    saved = saved_form(exported, cfg)  # the validation scored this same form of the kept step's weights
    w_teacher = w_rec  # the guidance of every teacher reference of the run
    if cfg.guidance_offsets:
        w_rec, extra["guidance_selection"] = choose_guidance(cfg, teacher, make_pipeline(teacher, saved.student, cfg,
                                                                                         w_rec), w_rec, work, prompts)
        print(f"recommended guidance by {cfg.select}: w = {w_rec:g} (of {guidance_candidates(cfg, w_teacher)})")
    pipe = make_pipeline(teacher, saved.student, cfg, w_rec)
    if samples is not None:
        samples.w = w_rec  # the last grid at the recommended guidance, beside the teacher's at its own
    psnr = samples.save(pipe, steps) if samples is not None else None
    losses = final_losses(log_path)
    meta = student_meta(cfg, teacher, prompts_info, steps, w_rec, {
        "world_size": dist.world, "device": str(dist.device), "wall_time_s_this_run": round(wall, 1),
        "final_losses": losses, "sample_psnr_vs_teacher": psnr, **extra, **lineage(cfg, work, steps)},
        saved.record)
    write_student(out, teacher, saved.student.unet, meta, work)
    if done < cfg.steps:
        print(f"warning: stopped at step {done} of {cfg.steps} (--max-minutes {cfg.max_minutes})")
    print("final losses (mean of last 20 steps): " + ", ".join(f"{k} {v:.5f}" for k, v in losses.items()))
    if samples is not None:
        print(f"sample grid PSNR vs teacher-{config.REFERENCE_STEPS} ({len(samples.prompts)} images): {psnr:.2f} dB "
              f"-> {work / 'samples.png'}")
    if cfg.prompts == GRAMMAR and cfg.eval_n:
        summary = evaluate_student(cfg, teacher, pipe, w_rec, work, teacher_w=w_teacher)
        update_student_meta(out, evaluation=summary)
        print(f"student-1 accuracy {100 * summary['student_accuracy']:.1f}% vs teacher-{config.REFERENCE_STEPS} "
              f"{100 * summary[f'teacher{config.REFERENCE_STEPS}_accuracy']:.1f}%, PSNR vs teacher "
              f"{summary['psnr_vs_teacher']:.2f} dB ({cfg.eval_n} held-out captions)")
    print(f"student written to {out}")

