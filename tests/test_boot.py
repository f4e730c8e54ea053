"""BOOT core (boot/method.py, boot/loss.py) against diffusers' DDIM math and closed forms; stop-gradients and
initialisation on tiny UNets. (BootPipeline: test_boot_pipeline.py.)"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from boot.loss import BootLoss, FinalHopRegression, bootstrap_target, boundary_weights
from boot.method import (
    TIME_COND_PROJ_DIM,
    NoiseSchedule,
    OneStepGenerator,
    Student,
    TeacherX0,
    add_condition_projection,
    to_x0,
)
from tests.tiny import LATENT, scheduler_config, tiny_unet

SCHEDULES = {"zero_snr": True, "sd": False}


def ddim(prediction_type: str, zero_snr: bool, steps: int = 20):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**scheduler_config(prediction_type, zero_snr))
    sched.set_timesteps(steps)
    return sched


def schedule_of(zero_snr: bool) -> NoiseSchedule:
    return NoiseSchedule.from_scheduler_config(scheduler_config("v_prediction", zero_snr))


# --------------------------------------------------------------------------------------------
# δ and the signal-space DDIM step
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("zero_snr", SCHEDULES.values(), ids=SCHEDULES.keys())
def test_delta_matches_closed_form(zero_snr):
    sched = schedule_of(zero_snr)
    abar = ddim("v_prediction", zero_snr).alphas_cumprod.double()
    lam = 0.5 * (torch.log(abar) - torch.log1p(-abar))  # λ_t = log(α_t / σ_t)
    t = torch.tensor([999, 999, 980, 500, 21, 20, 1])
    s = torch.tensor([979, 0, 960, 480, 1, 0, 0])
    expected = 1.0 - torch.exp(lam[t] - lam[s])
    assert torch.allclose(sched.delta(t, s).double(), expected, atol=1e-5)
    assert ((sched.delta(t, s) > 0) & (sched.delta(t, s) <= 1)).all()
    # δ = 1 exactly at t = T of a zero-terminal-SNR schedule: one step from T lands on f.
    assert (float(sched.delta(t[:1], s[:1])) == 1.0) == zero_snr


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("zero_snr", SCHEDULES.values(), ids=SCHEDULES.keys())
def test_ddim_step_in_signal_space(prediction_type, zero_snr):
    """diffusers' DDIMScheduler.step, rewritten with y = (x − σ ε)/α, is y_s = y_t + δ (f − y_t)."""
    sched = ddim(prediction_type, zero_snr)
    ours = schedule_of(zero_snr)
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for t in sched.timesteps.tolist():
        s = t - 1000 // 20
        if s < 0 or (prediction_type == "epsilon" and zero_snr and t == 999):
            continue
        eps, y_t, out = (torch.randn((2, *LATENT), generator=gen, dtype=torch.float64) for _ in range(3))
        a_t, s_t = float(ours.alpha[t]), float(ours.sigma[t])
        x_t = a_t * y_t + s_t * eps
        step = sched.step(out, t, x_t, eta=0.0)
        f = step.pred_original_sample
        y_s = (step.prev_sample - float(ours.sigma[s]) * eps) / float(ours.alpha[s])
        d = float(ours.delta(torch.tensor([t]), torch.tensor([s])))
        assert torch.allclose(y_s, y_t + d * (f - y_t), atol=2e-4), (t, s)
        checked += 1
    assert checked >= 18


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("zero_snr", SCHEDULES.values(), ids=SCHEDULES.keys())
def test_to_x0_matches_diffusers_pred_original_sample(prediction_type, zero_snr):
    sched = ddim(prediction_type, zero_snr)
    ours = schedule_of(zero_snr)
    gen = torch.Generator().manual_seed(1)
    for t in (1, 20, 500, 951, 998, 999):
        x_t, out = (torch.randn((2, *LATENT), generator=gen) for _ in range(2))
        tt = torch.full((2,), t)
        if prediction_type == "epsilon" and zero_snr and t == 999:
            with pytest.raises(ValueError, match="zero terminal SNR"):
                to_x0(out, x_t, tt, ours, prediction_type)
            continue
        ref = sched.step(out, t, x_t, eta=0.0).pred_original_sample
        tol = 1e-5 / max(float(ours.alpha[t]), 1e-2) if prediction_type == "epsilon" else 1e-5
        assert torch.allclose(to_x0(out, x_t, tt, ours, prediction_type), ref, atol=tol, rtol=1e-5), t


def test_schedules_match_diffusers_and_reject_bad_prediction_types():
    for zero_snr in SCHEDULES.values():
        abar = ddim("v_prediction", zero_snr).alphas_cumprod.double()
        ours = schedule_of(zero_snr)
        assert ours.T == 999 and ours.zero_terminal_snr == zero_snr
        assert torch.allclose(ours.alpha.double() ** 2, abar, atol=1e-6)
        assert torch.allclose(ours.alpha.double() ** 2 + ours.sigma.double() ** 2, torch.ones(1000).double())
    with pytest.raises(ValueError, match="prediction_type"):
        TeacherX0(tiny_unet(), schedule_of(True), "x0")
    with pytest.raises(ValueError, match="epsilon"):
        Student(tiny_unet(), schedule_of(True), "epsilon")


# --------------------------------------------------------------------------------------------
# BootLoss on a closed-form teacher
# --------------------------------------------------------------------------------------------
class LinearX0UNet(nn.Module):
    """A "sample"-prediction teacher with x0 = A·x_t + mean(c): f_w = A·x + m_u + w (m_c − m_u)."""

    A = 0.7

    def forward(self, x, t, cond):
        return SimpleNamespace(sample=self.A * x + cond.mean(dim=(1, 2)).view(-1, 1, 1, 1))


class ScaledNoise(nn.Module):
    """A student y = p·ε + q·t/T (one scalar weight each), enough to check every term of the loss."""

    def __init__(self, p: float, q: float, T: int = 999):
        super().__init__()
        self.p, self.q, self.T = nn.Parameter(torch.tensor(p)), nn.Parameter(torch.tensor(q)), T

    def forward(self, noise, t, cond, w):
        return self.p * noise + self.q * (t.float() / self.T).view(-1, 1, 1, 1)


def loss_case():
    """Two scalar students and a batch of 4 (t from T to a final hop) for the closed-form loss tests."""
    gen = torch.Generator().manual_seed(2)
    noise = torch.randn((4, 1, 2, 2), generator=gen)
    cond, uncond = torch.randn((4, 4, 5), generator=gen), torch.randn((4, 4, 5), generator=gen)
    t, w = torch.tensor([999, 400, 35, 12]), torch.tensor([1.0, 3.0, 2.0, 5.5])
    return ScaledNoise(0.3, 0.2), ScaledNoise(0.5, -0.4), noise, cond, uncond, t, w


@pytest.mark.parametrize("final_hop", [0, 40])
@pytest.mark.parametrize("solver_steps", [1, 3])
@pytest.mark.parametrize("zero_snr", SCHEDULES.values(), ids=SCHEDULES.keys())
def test_boot_loss_matches_hand_computation(zero_snr, solver_steps, final_hop):
    sched = schedule_of(zero_snr)
    abar = ddim("sample", zero_snr).alphas_cumprod.double().numpy()
    teacher = TeacherX0(LinearX0UNet(), sched, "sample")
    student, target, noise, cond, uncond, t, w = loss_case()
    loss = BootLoss(delta_steps=20, beta=0.5, solver_steps=solver_steps, final_hop=final_hop)(
        student, target, teacher, noise, cond, uncond, w, t)
    ab = lambda u: (math.sqrt(abar[u]), math.sqrt(1 - abar[u]))  # noqa: E731  (α_u, σ_u)

    e = noise.double().numpy()
    m_c, m_u = cond.double().mean((1, 2)).numpy(), uncond.double().mean((1, 2)).numpy()
    for i, (ti, wi) in enumerate(zip(t.tolist(), w.tolist())):
        final = ti <= final_hop  # straight to 0 in ceil(F·K/Δ) = 2K teacher steps
        si, n = (0, 2 * solver_steps) if final else (max(ti - 20, 0), solver_steps)
        a_t, s_t, a_s, s_s = (math.sqrt(abar[ti]), math.sqrt(1 - abar[ti]), math.sqrt(abar[si]),
                              math.sqrt(1 - abar[si]))
        shift = m_u[i] + wi * (m_c[i] - m_u[i])
        tgt = 0.5 * e[i] - 0.4 * ti / 999  # ŷ_t, then K DDIM steps of the teacher on the grid t -> s
        grid = [ti - (ti - si) * k // n for k in range(n + 1)]
        for u, v in zip(grid[:-1], grid[1:]):
            (a_u, s_u), (a_v, s_v) = ab(u), ab(v)
            f_u = LinearX0UNet.A * (a_u * tgt + s_u * e[i]) + shift
            tgt = tgt + (1 - s_v * a_u / (a_v * s_u)) * (f_u - tgt)
        d = 1 - s_s * a_t / (a_s * s_t)
        l_bs = np.mean((0.3 * e[i] + 0.2 * si / 999 - tgt) ** 2) / d**2
        l_bc = np.mean((0.3 * e[i] + 0.2 - (LinearX0UNet.A * e[i] + shift)) ** 2)
        assert loss["bootstrap"][i].item() == pytest.approx(l_bs, rel=1e-4)
        assert loss["boundary"][i].item() == pytest.approx(l_bc, rel=1e-4)
        assert loss["loss"][i].item() == pytest.approx(l_bs + 0.5 * l_bc, rel=1e-4)


@pytest.mark.parametrize("fraction,m", [(0.5, 2), (0.3, 2), (0.01, 1)])
def test_boundary_fraction_computes_the_boundary_on_the_first_samples_and_keeps_its_expectation(fraction, m):
    """--boundary-fraction f: L_BC on the first ceil(f·b) samples only, weighted b/m there; L_BS unchanged;
    the teacher and the student are called at T on those m samples alone."""
    sched = schedule_of(True)
    calls = []

    class Counting(LinearX0UNet):
        def forward(self, x, t, cond):
            calls.append(int((t == sched.T).sum()))
            return super().forward(x, t, cond)

    teacher = TeacherX0(Counting(), sched, "sample")
    student, target, noise, cond, uncond, t, w = loss_case()
    full = BootLoss(delta_steps=20, beta=0.5)(student, target, teacher, noise, cond, uncond, w, t)
    calls.clear()
    part = BootLoss(delta_steps=20, beta=0.5, boundary_fraction=fraction)(
        student, target, teacher, noise, cond, uncond, w, t)
    assert calls[-1] == 2 * m  # the boundary's CFG pair at T on m samples (the t = 999 hop's call is separate)
    torch.testing.assert_close(part["bootstrap"], full["bootstrap"])
    torch.testing.assert_close(part["boundary"][:m], full["boundary"][:m] * 4 / m)
    assert (part["boundary"][m:] == 0).all()
    torch.testing.assert_close(part["loss"], part["bootstrap"] + 0.5 * part["boundary"])
    # A process holding half the batch with the whole batch's weights computes the same per-sample losses
    # (the second half holds no boundary sample when m <= 2: no call at T there).
    weights = boundary_weights(4, fraction)
    halves = [BootLoss(delta_steps=20, beta=0.5)(student, target, teacher, noise[j], cond[j], uncond[j], w[j], t[j],
                                                 boundary=weights[j])
              for j in (slice(0, 2), slice(2, 4))]
    torch.testing.assert_close(torch.cat([h["loss"] for h in halves]), part["loss"])
    part["loss"].mean().backward()
    assert student.p.grad is not None and student.q.grad is not None


@pytest.mark.parametrize("power", [0.0, 1.0, 3.0])
@pytest.mark.parametrize("zero_snr", SCHEDULES.values(), ids=SCHEDULES.keys())
def test_delta_power_reweights_the_hops_and_keeps_their_mean_weight(zero_snr, power):
    """--delta-power p: L_BS of the hop at t is the squared error times c_p/δ^p, c_p = mean_t δ⁻² / mean_t δ^-p
    over the ordinary hops t = 1..T (δ from t to max(t − Δ, 0)); L_BC is untouched."""
    sched = schedule_of(zero_snr)
    abar = ddim("sample", zero_snr).alphas_cumprod.double().numpy()
    teacher = TeacherX0(LinearX0UNet(), sched, "sample")
    student, target, noise, cond, uncond, t, w = loss_case()
    paper = BootLoss(delta_steps=20, beta=0.5)(student, target, teacher, noise, cond, uncond, w, t)
    out = BootLoss(delta_steps=20, beta=0.5, delta_power=power)(student, target, teacher, noise, cond, uncond, w, t)

    def delta(u, v):
        return 1 - math.sqrt((1 - abar[v]) * abar[u] / (abar[v] * (1 - abar[u])))

    every = np.array([max(delta(u, max(u - 20, 0)), 1e-3) for u in range(1, 1000)])
    c = np.mean(every ** -2.0) / np.mean(every ** -power)
    for i, ti in enumerate(t.tolist()):
        d = max(delta(ti, max(ti - 20, 0)), 1e-3)
        squared_error = paper["bootstrap"][i].item() * d**2
        assert out["bootstrap"][i].item() == pytest.approx(squared_error * c / d**power, rel=1e-4)
    torch.testing.assert_close(out["boundary"], paper["boundary"])
    torch.testing.assert_close(out["loss"], out["bootstrap"] + 0.5 * out["boundary"])
    if power == 0:  # every hop weighted alike
        ratios = out["bootstrap"] / (paper["bootstrap"] * torch.tensor([delta(u, max(u - 20, 0)) ** 2 for u in
                                                                        t.tolist()], dtype=torch.float32))
        torch.testing.assert_close(ratios, ratios[:1].expand(4), rtol=1e-4, atol=0)


@pytest.mark.parametrize("c", [0.05, 0.2, 1.0])
def test_huber_c_takes_the_pseudo_huber_of_each_samples_squared_error(c):
    """--huber-c c: each sample's L_BS (its squared error over δ^p/c_p) and L_BC become sqrt(e + c²) − c of the
    squared-error loss e; the gradient of a large error then stops growing with it, while a small one keeps
    the squared error's shape (about e / 2c)."""
    sched = schedule_of(True)
    teacher = TeacherX0(LinearX0UNet(), sched, "sample")
    student, target, noise, cond, uncond, t, w = loss_case()
    plain = BootLoss(delta_steps=20, beta=0.5, delta_power=1.0)(student, target, teacher, noise, cond, uncond, w, t)
    out = BootLoss(delta_steps=20, beta=0.5, delta_power=1.0, huber_c=c)(student, target, teacher, noise, cond,
                                                                        uncond, w, t)
    for key in ("bootstrap", "boundary"):
        e = plain[key].double()
        torch.testing.assert_close(out[key].double(), (e + c * c).sqrt() - c, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["loss"], out["bootstrap"] + 0.5 * out["boundary"])
    robust = BootLoss(huber_c=c).robust
    e = torch.tensor([1e-6, 1e-4, 4.0, 100.0], dtype=torch.float64, requires_grad=True)
    robust(e).sum().backward()
    assert e.grad[0].item() == pytest.approx(1 / (2 * c), rel=1e-3)  # quadratic regime: e / 2c
    assert e.grad[3].item() < e.grad[2].item() < 1 / (2 * c)  # weight falls as 1 / (2 sqrt(e + c²))
    assert BootLoss().robust(e) is e  # c = 0: the paper's squared error, untouched


@pytest.mark.parametrize("q", [1.0, 2.0, 0.5, -1.0])
def test_guidance_power_weights_each_sample_by_w_to_the_minus_q_with_mean_weight_one(q):
    """--guidance-power q: each sample's L_BS and L_BC are multiplied by c_q/w^q, c_q making the weight's mean
    over w uniform on the guidance range 1; q = 0 leaves every sample as it was."""
    sched = schedule_of(True)
    teacher = TeacherX0(LinearX0UNet(), sched, "sample")
    student, target, noise, cond, uncond, t, w = loss_case()
    w = torch.linspace(1.5, 5.5, len(t))
    plain = BootLoss(delta_steps=20, beta=0.5, delta_power=1.0)(student, target, teacher, noise, cond, uncond, w, t)
    weighted = BootLoss(delta_steps=20, beta=0.5, delta_power=1.0, guidance_power=q, guidance_range=(1.0, 6.0))
    out = weighted(student, target, teacher, noise, cond, uncond, w, t)
    scale = weighted.guidance_weight(w)
    torch.testing.assert_close(scale[1:] / scale[:-1], (w[1:] / w[:-1]).pow(-q))
    for key in ("bootstrap", "boundary"):
        torch.testing.assert_close(out[key], plain[key] * scale)
    torch.testing.assert_close(out["loss"], out["bootstrap"] + 0.5 * out["boundary"])
    grid = torch.linspace(1.0, 6.0, 200001, dtype=torch.float64)
    assert weighted.guidance_weight(grid).mean().item() == pytest.approx(1.0, rel=1e-4)
    assert torch.equal(BootLoss().guidance_weight(w), torch.ones_like(w))


@pytest.mark.parametrize("zero_snr", SCHEDULES.values(), ids=SCHEDULES.keys())
def test_anchor_rows_regress_the_image_on_the_teachers_ddim_sample(zero_snr):
    """--anchors: on the rows with an anchor weight λ, L_A = λ·mean((g(ε, 0) − y)²), y the teacher's own K-step DDIM
    sample from x_T = α_T·ŷ_T + σ_T·ε, here stepped in x-space (x0 and ε predictions) and read as the signal
    (x_0 − σ_0·ε)/α_0; L_BS and L_BC are those of the same batch without anchors."""
    sched = schedule_of(zero_snr)
    abar = ddim("sample", zero_snr).alphas_cumprod.double().numpy()
    teacher = TeacherX0(LinearX0UNet(), sched, "sample")
    student, target, noise, cond, uncond, t, w = loss_case()
    anchor = torch.tensor([0.0, 2.0, 0.0, 3.0])
    plain = BootLoss(delta_steps=20, beta=0.5)(student, target, teacher, noise, cond, uncond, w, t)
    out = BootLoss(delta_steps=20, beta=0.5, anchor_steps=4)(student, target, teacher, noise, cond, uncond, w, t,
                                                             anchor=anchor)
    for key in ("bootstrap", "boundary"):
        torch.testing.assert_close(out[key], plain[key])
    e = noise.double().numpy()
    m_c, m_u = cond.double().mean((1, 2)).numpy(), uncond.double().mean((1, 2)).numpy()
    ab = lambda u: (math.sqrt(abar[u]), math.sqrt(1 - abar[u]))  # noqa: E731  (α_u, σ_u)
    for i in (1, 3):
        shift = m_u[i] + w[i].item() * (m_c[i] - m_u[i])
        a_T, s_T = ab(999)
        x = a_T * (0.5 * e[i] - 0.4) + s_T * e[i]  # the target student's ŷ_T = 0.5·ε − 0.4 sets x_T
        for u, v in ((999, 750), (750, 500), (500, 250), (250, 0)):
            (a_u, s_u), (a_v, s_v) = ab(u), ab(v)
            x0 = LinearX0UNet.A * x + shift
            x = a_v * x0 + s_v * (x - a_u * x0) / s_u
        a_0, s_0 = ab(0)
        y = (x - s_0 * e[i]) / a_0
        expected = anchor[i].item() * np.mean((0.3 * e[i] - y) ** 2)  # the student's g(ε, 0) = 0.3·ε
        assert out["anchor"][i].item() == pytest.approx(expected, rel=1e-4)
    assert out["anchor"][0] == 0 and out["anchor"][2] == 0
    torch.testing.assert_close(out["loss"], plain["loss"] + out["anchor"])
    grads = [torch.autograd.grad(r["loss"].sum(), student.p)[0] for r in (plain, out)]
    assert grads[1] != grads[0]  # the anchor rows' error reaches the student's weights


class Trajectory(nn.Module):
    """g(ε, t, c, w): the signal of the closed-form teacher's own DDIM trajectory from ε at T, on the grid
    T, T − h, T − 2h, ..., 0, computed here in float64 from the DDIM step in signal space,

        y_T = f_w(ε),   y_v = y_u + sign·scale·(1 − σ_v α_u / (α_v σ_u))·(f_w(α_u y_u + σ_u ε) − y_u),

    with f_w = A·x + m_u + w·(m_c − m_u) (LinearX0UNet; m = the mean of the text states, the same
    unconditional state for every sample). scale = 1, sign = 1 is the teacher's trajectory."""

    def __init__(self, abar: np.ndarray, h: int, m_u: float, scale: float = 1.0, sign: float = 1.0):
        super().__init__()
        self.abar, self.h, self.m_u, self.scale, self.sign = abar, h, m_u, scale, sign
        self.T = len(abar) - 1

    def forward(self, noise, t, cond, w):
        e, m_c = noise.double().numpy(), cond.double().mean((1, 2)).numpy()
        out = np.empty_like(e)
        for i, (ti, wi) in enumerate(zip(t.tolist(), w.tolist())):
            shift = self.m_u + wi * (m_c[i] - self.m_u)
            f = lambda x, shift=shift: LinearX0UNet.A * x + shift  # noqa: E731
            grid = list(range(self.T, 0, -self.h)) + [0]
            assert ti in grid, f"t = {ti} is not on the trajectory's grid"
            y = f(e[i])
            for u, v in zip(grid, grid[1:grid.index(ti) + 1]):
                a_u, s_u, a_v, s_v = (math.sqrt(self.abar[u]), math.sqrt(1 - self.abar[u]),
                                      math.sqrt(self.abar[v]), math.sqrt(1 - self.abar[v]))
                y = y + self.sign * self.scale * (1 - s_v * a_u / (a_v * s_u)) * (f(a_u * y + s_u * e[i]) - y)
            out[i] = y
        return torch.from_numpy(out).float()


@pytest.mark.parametrize("zero_snr", SCHEDULES.values(), ids=SCHEDULES.keys())
def test_boot_loss_is_zero_on_the_teachers_trajectory_and_only_there(zero_snr):
    """A student that outputs the teacher's own DDIM trajectory (step Δ/K, computed independently above)
    is a fixed point of L_BS and L_BC; the same trajectory with δ off by 2%, with the step's sign flipped,
    or taken with a different step than the loss's Δ/K is not. So the loss's δ, its sign and its
    solver steps are each pinned, not only its form."""
    sched, abar = schedule_of(zero_snr), ddim("sample", zero_snr).alphas_cumprod.double().numpy()
    teacher = TeacherX0(LinearX0UNet(), sched, "sample")
    gen = torch.Generator().manual_seed(7)
    noise, cond = torch.randn((5, 1, 2, 2), generator=gen), torch.randn((5, 4, 3), generator=gen)
    uncond = torch.randn((1, 4, 3), generator=gen)
    m_u = float(uncond.double().mean())
    w = torch.tensor([1.0, 2.5, 4.0, 6.0, 3.0])
    t = torch.tensor([999, 779, 399, 99, 39])  # on the grids 999 - 20k and 999 - 10k, s too
    uncond = uncond.expand(5, -1, -1)

    def loss(student, delta=20, k=1):
        out = BootLoss(delta_steps=delta, beta=1.0, solver_steps=k)(student, student, teacher, noise, cond, uncond,
                                                                     w, t)
        return out["bootstrap"], out["boundary"]

    for delta, k in ((20, 1), (20, 2), (10, 1)):
        l_bs, l_bc = loss(Trajectory(abar, delta // k, m_u), delta, k)
        assert l_bs.max() < 1e-9 and l_bc.max() < 1e-10, (delta, k, l_bs, l_bc)
    for wrong in (Trajectory(abar, 20, m_u, scale=1.02), Trajectory(abar, 20, m_u, sign=-1.0)):
        l_bs, l_bc = loss(wrong)
        assert l_bc.max() < 1e-10 and l_bs[1:].min() > 1e-7, l_bs  # t = 999 is its first step: δ(T, s) = 1 there
    assert loss(Trajectory(abar, 10, m_u), 20, 1)[0][1:].min() > 1e-7  # K = 1 is not two steps of Δ/2


def test_final_hop_regression_is_boot_losss_final_hop_with_a_frozen_target():
    """--refine's loss on a stored target equals BootLoss's L_BS when every t is a final hop and the
    target network is that frozen student; only the student at s = 0 gets gradients."""
    sched = schedule_of(True)
    teacher = TeacherX0(LinearX0UNet(), sched, "sample")
    frozen, student = ScaledNoise(0.5, -0.4).requires_grad_(False), ScaledNoise(0.3, 0.2)
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn((3, 1, 2, 2), generator=gen)
    cond, uncond = torch.randn((3, 4, 5), generator=gen), torch.randn((3, 4, 5), generator=gen)
    t, w = torch.tensor([100, 93, 81]), torch.tensor([1.0, 4.0, 6.0])
    boot_loss = BootLoss(delta_steps=20, beta=0.0, final_hop=100)(student, frozen, teacher, noise, cond, uncond, w, t)
    y = bootstrap_target(frozen, teacher, noise, cond, uncond, w, t, torch.zeros_like(t), torch.full_like(t, 5))
    out = FinalHopRegression()(student, sched, noise, cond, w, t, y)
    assert torch.allclose(out["loss"], boot_loss["bootstrap"], rtol=1e-5)
    assert out["boundary"].abs().max() == 0 and not out["bootstrap"].requires_grad
    out["loss"].mean().backward()
    assert student.p.grad.abs() > 0 and student.q.grad == 0  # g(ε, 0): the t-term q·t/T is 0 there


def test_final_hop_regression_in_image_space_compares_decoded_images():
    """--refine-space image: the squared error between D(g(ε, 0)) and D(y), per sample and /δ²; the
    gradient reaches the student through the decoder and nothing reaches the decoder or y."""
    sched = schedule_of(True)
    student = ScaledNoise(0.3, 0.2)
    decoder = nn.Conv2d(1, 3, 1).requires_grad_(False)  # latent (1 channel) -> "image" (3 channels)
    with torch.no_grad():
        decoder.weight.copy_(torch.tensor([2.0, -1.0, 0.5]).view(3, 1, 1, 1))
        decoder.bias.copy_(torch.tensor([0.1, 0.0, -0.3]))
    gen = torch.Generator().manual_seed(6)
    noise, y = torch.randn((3, 1, 2, 2), generator=gen), torch.randn((3, 1, 2, 2), generator=gen).requires_grad_()
    cond, w, t = torch.zeros(3, 4, 5), torch.tensor([1.0, 4.0, 6.0]), torch.tensor([100, 93, 81])
    out = FinalHopRegression(decode=decoder)(student, sched, noise, cond, w, t, y)
    # By hand: D is per-pixel affine, so D(a) − D(b) = k·(a − b) per channel k; the bias cancels.
    err = 0.3 * noise - y.detach()  # g(ε, 0) = p·ε with p = 0.3
    k2 = torch.tensor([4.0, 1.0, 0.25]).view(1, 3, 1, 1)
    d = sched.delta(t, torch.zeros_like(t))
    expected = (k2 * err.pow(2)).mean((1, 2, 3)) / d.pow(2)
    assert torch.allclose(out["loss"], expected, rtol=1e-5)
    latent = FinalHopRegression()(student, sched, noise, cond, w, t, y.detach())["loss"]
    assert not torch.allclose(out["loss"], latent)  # the image-space loss is not the latent one
    out["loss"].mean().backward()
    assert student.p.grad.abs() > 0 and y.grad is None and decoder.weight.grad is None


# --------------------------------------------------------------------------------------------
# Stop-gradients and initialisation on real (tiny) UNets
# --------------------------------------------------------------------------------------------
def tiny_setup(prediction_type="v_prediction", zero_snr=True, perturb=0.05):
    sched = NoiseSchedule.from_scheduler_config(scheduler_config(prediction_type, zero_snr))
    teacher_unet = tiny_unet(seed=0)
    student_unet = add_condition_projection(copy.deepcopy(teacher_unet))
    if perturb:  # a "trained" student whose output depends on t and w
        with torch.no_grad():
            student_unet.time_embedding.cond_proj.weight.normal_(0, perturb, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(4)
    batch = dict(noise=torch.randn((2, *LATENT), generator=gen), cond=torch.randn((2, 16, 384), generator=gen),
                 uncond=torch.randn((2, 16, 384), generator=gen), w=torch.tensor([1.5, 4.0]),
                 t=torch.tensor([700, 300]))
    return (TeacherX0(teacher_unet, sched, prediction_type), Student(student_unet, sched, prediction_type), batch)


def _grads(module):
    return [p.grad.clone() if p.grad is not None else None for p in module.parameters()]


def test_gradients_flow_only_through_the_online_student():
    teacher, student, b = tiny_setup()
    target = copy.deepcopy(student)  # an EMA-like copy that would accept gradients if it got any
    loss = BootLoss(delta_steps=20, beta=1.0)(student, target, teacher, b["noise"], b["cond"], b["uncond"],
                                              b["w"], b["t"])
    loss["loss"].mean().backward()
    assert all(g is None for g in _grads(target)), "the bootstrap target must be stop-gradient"
    assert all(g is None for g in _grads(teacher)), "the teacher must be frozen"
    grads = _grads(student)
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert not loss["bootstrap"].requires_grad and not loss["boundary"].requires_grad


def test_online_target_adds_no_gradient_through_the_t_branch():
    """target = the online network itself (--target online) gives exactly the gradient of a frozen
    copy of it: nothing flows through ŷ_t = g(ε, t), only through g(ε, s) and g(ε, T)."""
    teacher, student, b = tiny_setup()
    args = (b["noise"], b["cond"], b["uncond"], b["w"], b["t"])
    loss_fn = BootLoss(delta_steps=200, beta=0.0)
    loss_fn(student, student, teacher, *args)["loss"].mean().backward()
    shared = _grads(student)
    student.zero_grad(set_to_none=True)
    loss_fn(student, copy.deepcopy(student).requires_grad_(False), teacher, *args)["loss"].mean().backward()
    frozen = _grads(student)
    for a, b_ in zip(shared, frozen):
        assert torch.allclose(a, b_, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("prediction_type,zero_snr", [("v_prediction", True), ("sample", True), ("epsilon", False)])
def test_student_equals_teacher_at_T_at_initialisation(prediction_type, zero_snr):
    teacher, student, b = tiny_setup(prediction_type, zero_snr, perturb=0.0)
    T = torch.full((2,), 999)
    with torch.no_grad():
        f_T = teacher(b["noise"], T, b["cond"], None, 1.0)  # f(ε, T, c)
        for t, w in ((T, b["w"]), (torch.tensor([0, 0]), torch.tensor([1.0, 9.0])), (b["t"], b["w"])):
            g = student(b["noise"], t, b["cond"], w)
            assert torch.allclose(g, f_T, atol=1e-5), (t, w)
        gen = OneStepGenerator(student)(b["noise"], b["cond"], b["w"])
    assert torch.allclose(gen, f_T, atol=1e-5)
    assert student.unet.config.time_cond_proj_dim == TIME_COND_PROJ_DIM
    assert student.unet.time_embedding.cond_proj.weight.abs().sum() == 0


def test_ablation_parameterizations_read_the_unet_as_documented():
    """direct: the UNet's output at T is the signal; unet-at-t: the UNet is called at the target t
    (read as at T); both differ from the default, which starts as the teacher's f(ε, T)."""
    teacher, student, b = tiny_setup("v_prediction", True, perturb=0.0)
    sched, unet, T = student.schedule, student.unet, torch.full((2,), 999)
    direct = Student(unet, sched, "v_prediction", "direct")
    at_t = Student(unet, sched, "v_prediction", "unet-at-t")
    with torch.no_grad():
        raw_T = unet(b["noise"], T, b["cond"]).sample
        raw_t = unet(b["noise"], b["t"], b["cond"]).sample
        assert torch.allclose(direct(b["noise"], b["t"], b["cond"], b["w"]), raw_T, atol=1e-6)
        # v-prediction read at T on a zero-terminal-SNR schedule (α_T = 0, σ_T = 1): x0 = −v.
        assert torch.allclose(at_t(b["noise"], b["t"], b["cond"], b["w"]), -raw_t, atol=1e-6)
        assert torch.allclose(student(b["noise"], b["t"], b["cond"], b["w"]), -raw_T, atol=1e-6)
        assert (raw_t - raw_T).abs().max() > 1e-3  # the timestep input matters
    assert direct.spec.input_timestep == 999 and at_t.spec.input_timestep is None
    with pytest.raises(ValueError, match="parameterization must be one of"):
        Student(unet, sched, "v_prediction", "x0-at-t")


def test_trained_student_depends_on_t_and_guidance():
    _, student, b = tiny_setup(perturb=0.05)
    with torch.no_grad():
        g0 = student(b["noise"], torch.tensor([0, 0]), b["cond"], b["w"])
        g1 = student(b["noise"], torch.tensor([500, 500]), b["cond"], b["w"])
        g2 = student(b["noise"], torch.tensor([0, 0]), b["cond"], b["w"] + 2)
    assert (g0 - g1).abs().max() > 1e-4 and (g0 - g2).abs().max() > 1e-4
