"""Tests of apex_min.py, in the order of its sections (1 config ... 10 command line).

    python -m pytest -q test_apex_min.py        # about 8 minutes on 2 CPU cores, no GPU, no download
    APEX_SLOW=1 python -m pytest -q             # also the tests marked `slow` (1.5 minutes more)

What they compare against (something independent, not only shapes):
- conventions (apex_min's docstring): a finite difference, a quadrature of E[z - x | x_t] and the
  exact score of a Gaussian;
- the objective: stand-in networks with exact Gaussian velocities or constant velocities, for which
  the generator term's gradient is known in closed form; the loss gradient recomputed from the
  spec's formulas with the targets held constant;
- samplers: the closed-form one-step jump and the closed-form flow map of a Gaussian;
- training: an uninterrupted run against a saved-and-resumed one, and the two ranks of torchrun.

Every stop-gradient of the objective (apex_min.apex_loss, steps 2-7) has a test that fails when it is removed (checked by
running these tests against copies of apex_min.py with the stop-gradient deleted):
    step 2  fake rows generated without gradient      test_fake_rows_are_generated_without_gradient
    4, 5    guidance and consistency targets constant  test_guidance_and_consistency_targets_are_constant
    6       sg inside the robust loss                 test_robust_loss_value_and_normalised_gradient
    7       g without gradient, target sg(F - g)      test_generator_term_gradient_is_the_normalised_g
    7       the sign +(v_fake - v_real)               test_generator_term_moves_samples_toward_the_data
    paper   sg(v_fake) in the paper's mix target      test_paper_objective_gradient_paths
Stand-in networks follow the protocol of apex_loss: attribute `num_classes`, `embed_class(y)` ->
(B, D), `forward(x, t, tt, c)`.
"""
import contextlib
import copy
import dataclasses
import json
import math
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

import apex_min
import cifar_demo
import toy_2d

# The models here are tiny: one thread avoids OpenMP hand-offs, which on a shared 2-core machine
# cost more than the arithmetic (about 100x on the APEX step).
torch.set_num_threads(1)

HERE = Path(apex_min.__file__).resolve().parent
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
slow = pytest.mark.skipif(os.environ.get("APEX_SLOW") != "1",   # keeps the suite near 9 minutes
                          reason="slow (over a minute on 2 cores): APEX_SLOW=1 runs it")
TINY_DIT = dict(image_size=8, channels=3, patch_size=2, dim=32, depth=1, heads=2, num_classes=3)
# train() at its smallest: the tiny preset with the model and batch above
TINY_RUN = dict(image_size=8, patch_size=2, dim=32, depth=1, heads=2, num_classes=3, batch_size=8,
                device="cpu", log_every=1, ckpt_every=100)
# the same model and batch as command-line flags, for the tests that run apex_min.py as a process
TINY_CLI = [arg for k in ("device", "image_size", "patch_size", "dim", "depth", "heads", "num_classes",
                          "batch_size") for arg in ("--" + k.replace("_", "-"), str(TINY_RUN[k]))]


# ==================================================================================================
# helpers: tiny models, stand-ins, exact Gaussian fields
# ==================================================================================================


def tiny_dit(seed=0, perturb=0.05):
    """The tiny DiT; `perturb` adds noise to every weight, so that the zero-initialised output
    layers do not make F = 0 (and every gradient path non-trivial)."""
    torch.manual_seed(seed)
    net = apex_min.DiT(**TINY_DIT)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(perturb * torch.randn_like(p))
    return net


def shapes_batch(n=16, seed=0):
    x, y = apex_min.make_shapes(n=n, size=8, num_classes=3, seed=seed)
    return x.float() / 127.5 - 1, y


def per_row(t, x):  # (B,) -> (B, 1, ..., 1), written here rather than borrowed from apex_min.bcast
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def gaussian_velocity(x_t, t, mu, sd):
    """Exact velocity E[z - x | x_t] when x ~ N(mu, sd^2 I), x_t = t z + (1 - t) x.
    x_t ~ N((1-t) mu, var I) with var = (1-t)^2 sd^2 + t^2; Cov(z, x_t) = t, Cov(x, x_t) = (1-t) sd^2."""
    t = per_row(t, x_t)
    var = (1 - t) ** 2 * sd**2 + t**2
    return (t - (1 - t) * sd**2) / var * (x_t - (1 - t) * mu) - mu


def gaussian_score(x_t, t, mu, sd):  # exact score of x_t ~ N((1-t) mu, var I)
    t = per_row(t, x_t)
    return -(x_t - (1 - t) * mu) / ((1 - t) ** 2 * sd**2 + t**2)


class StandIn(nn.Module):
    """Base of the test networks. Every class (the null class too) embeds to the same vector e, so
    a condition that is not e is a shifted one: the fake branch is detected exactly from c alone.
    Subclasses give v_real(x, t), v_fake(x, t) (calls with tt < t use them too) and onestep(z),
    the output of the one-step call F(z, 1, 0, c) on the real branch."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.register_buffer("e", torch.full((4,), 0.1))

    def embed_class(self, y):
        return self.e.expand(len(y), -1)                                       # (B, 4)

    def forward(self, x, t, tt, c):
        fake = ((c - self.e).abs().amax(1) > 1e-6)[:, None]                   # (B, 1)
        onestep = ((t == 1) & (tt == 0))[:, None] & ~fake
        v = torch.where(fake, self.v_fake(x, t), self.v_real(x, t))
        return torch.where(onestep, self.onestep(x), v)


class ConstantFields(StandIn):
    """Real and fake velocities are constants (parameters); the one-step map is k*z + b. Then the
    generator term's g = clamp(v_fake - v_real, -1, 1) is known without sampling."""

    def __init__(self, v_real, v_fake):
        super().__init__()
        self.a_real, self.a_fake = nn.Parameter(torch.tensor(v_real)), nn.Parameter(torch.tensor(v_fake))
        self.k = nn.Parameter(torch.tensor(0.7))
        self.b = nn.Parameter(torch.zeros(len(v_real)))

    def v_real(self, x, t):
        return self.a_real.expand_as(x)

    def v_fake(self, x, t):
        return self.a_fake.expand_as(x)

    def onestep(self, z):
        return self.k * z + self.b


class GaussianFields(StandIn):
    """The case with a known answer: data N(mu_d, sd^2 I); generator x_g = gen_mean + sg * z, so
    p_theta = N(gen_mean, sg^2 I). The real branch is the exact data velocity, the fake branch the
    exact velocity of the generator's current distribution (what it converges to in training)."""

    def __init__(self, mu_d, sd, mu_g, sg):
        super().__init__()
        self.register_buffer("mu_d", torch.tensor(mu_d))
        self.sd, self.sg = sd, sg
        self.gen_mean = nn.Parameter(torch.tensor(mu_g))

    def v_real(self, x, t):
        return gaussian_velocity(x, t, self.mu_d, self.sd)

    def v_fake(self, x, t):
        return gaussian_velocity(x, t, self.gen_mean, self.sg)

    def onestep(self, z):
        return z - (self.gen_mean + self.sg * z)                               # F = z - x_g


class Recorder(nn.Module):
    """Wraps a network and records every call (inputs, output, grad mode); keeps the gradient of
    outputs that carry one. constant_generation=True detaches the output of calls made at t = 1,
    tt = 0 for the whole batch (only the fake-row generation of step 2 is such a call)."""

    def __init__(self, net, constant_generation=False):
        super().__init__()
        self.net, self.num_classes, self.calls = net, net.num_classes, []
        self.constant_generation = constant_generation

    def embed_class(self, y):
        return self.net.embed_class(y)

    def forward(self, x, t, tt, c):
        out = self.net(x, t, tt, c)
        if self.constant_generation and bool((t == 1).all() and (tt == 0).all()):
            out = out.detach()
        if out.requires_grad:
            out.retain_grad()
        self.calls.append(SimpleNamespace(x=x, t=t, tt=tt, c=c, out=out, grad_mode=torch.is_grad_enabled()))
        return out

    def main_pass(self, batch):
        """The one forward pass with gradient over the whole batch (step 3)."""
        found = [k for k in self.calls if k.grad_mode and len(k.x) == batch]
        assert len(found) == 1, f"expected one forward pass with gradient over the batch, got {len(found)}"
        return found[0]


def loss_and_grads(net, ema, x, y, cfg, seed=0):
    torch.manual_seed(seed)
    net.zero_grad(set_to_none=True)
    loss, terms = apex_min.training_loss(net, ema, x, y, cfg)
    loss.backward()
    return loss, terms, {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                         for n, p in net.named_parameters()}


def assert_one_line_error(text):
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{text}"
    assert "error" in lines[0] and "Traceback" not in text


# ==================================================================================================
# 1. Config
# ==================================================================================================


def test_presets_are_valid_configs():
    for name, preset in apex_min.PRESETS.items():
        apex_min.validate(apex_min.Config(**preset, preset=name))
    with pytest.raises(ValueError, match="batch-size"):
        apex_min.validate(apex_min.Config(batch_size=3))
    for share, batch in ((0.0, 64), (1.0, 64), (0.3, 4)):   # no fake rows, no real rows, q = 0
        with pytest.raises(ValueError, match="fake-share"):
            apex_min.validate(apex_min.Config(fake_share=share, batch_size=batch))


# ==================================================================================================
# 2. Model
# ==================================================================================================


def test_dit_shape_and_plain_flow_at_tt_equal_t():
    """cond = emb_t(t) + (t - tt) emb_tt(tt) + c: at tt = t the target-time embedding drops out."""
    net = tiny_dit()
    x, y = shapes_batch(4)
    t = torch.tensor([0.2, 0.5, 0.7, 1.0])
    c = net.embed_class(y)
    out = net(x, t, t, c)
    assert out.shape == x.shape
    with torch.no_grad():
        for p in net.tt_embed.parameters():
            p.add_(torch.randn_like(p))
    torch.testing.assert_close(net(x, t, t, c), out)                 # tt = t: emb_tt has no effect
    assert not torch.allclose(net(x, t, 0.5 * t, c), out)           # tt < t: it has


def test_mlp_fused_path_is_the_plain_mlp():
    """MLP.fused (GELU in the first product's call, taken without gradient on a GPU) against the
    plain Linear-GELU-Linear, here on the CPU, where that call's GELU is erf-based (on CUDA it is
    the tanh form the model uses; experiments/profile_step.py checks it there): the tolerance
    covers the two GELU forms (< 5e-4 apart), not a wrong shape, bias or transpose."""
    torch.manual_seed(0)
    mlp = apex_min.MLP(nn.Linear(8, 32), nn.GELU("tanh"), nn.Linear(32, 8))
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        plain = nn.Sequential.forward(mlp, x)
        torch.testing.assert_close(mlp(x), plain, rtol=0, atol=0)     # the CPU takes the plain path
        torch.testing.assert_close(mlp.fused(x), plain, rtol=0, atol=1e-3)
        assert mlp.fused(x).shape == x.shape


def test_bf16_stream_keeps_the_residual_stream_bf16_under_autocast():
    """--bf16-stream: under bf16 autocast the blocks receive a bf16 stream (a bf16 position
    embedding added to the bf16 patch embedding), without it fp32; without autocast both fp32."""
    x, y = shapes_batch(2)
    t = torch.tensor([0.3, 0.9])
    for flag, under_autocast in ((False, torch.float32), (True, torch.bfloat16)):
        torch.manual_seed(0)
        net = apex_min.build_model(apex_min.Config(**TINY_DIT, bf16_stream=flag))
        seen = []
        net.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            net(x, t, t, net.embed_class(y))
        net(x, t, t, net.embed_class(y))
        assert seen == [under_autocast, torch.float32]


# ==================================================================================================
# 3. Condition shift
# ==================================================================================================


def test_condition_shift_changes_only_the_masked_rows():
    c = torch.randn(6, 5)
    fake = torch.tensor([False, True, False, True, True, False])
    out = apex_min.condition_shift(c, fake, a=-0.5, b=1.0)
    assert torch.equal(out[~fake], c[~fake])
    torch.testing.assert_close(out[fake], -0.5 * c[fake] + 1.0)
    out = apex_min.condition_shift(c, fake, a=-1.0, b=0.0)           # the released code's shift
    torch.testing.assert_close(out[fake], -c[fake])


def test_condition_shift_acts_on_rows_of_token_conditions_when_batch_equals_tokens():
    """(B, T, D) conditions (text tokens) with B = T: a broadcast of the row mask along the token
    axis would shift token positions instead of rows; the result must equal a per-row loop."""
    c, fake = torch.randn(4, 4, 3), torch.tensor([True, False, False, True])
    out = apex_min.condition_shift(c, fake, a=-0.5, b=1.0)
    expected = torch.stack([-0.5 * row + 1.0 if f else row for row, f in zip(c, fake)])
    assert torch.equal(out, expected)


def test_a_shift_that_barely_moves_the_class_embedding_warns(tmp_path, capsys):
    """The released a = -1, b = 0 on an embedding of std 0.02 moves c by ~0.04 RMS: one warning
    line at the start of training (it diverged on CIFAR-10); the default shift gives none."""
    for (a, b), warned in (((-1.0, 0.0), True), ((-0.5, 1.0), False)):
        cfg = apex_min.Config(shift_a=a, shift_b=b, device="cpu", out_dir=str(tmp_path / f"{a}"))
        apex_min.setup(cfg)
        err = capsys.readouterr().err
        assert ("warning: the condition shift" in err) == warned and err.count("\n") == warned


def test_guidance_without_a_fixed_point_warns(tmp_path, capsys):
    """Step 4 reads guidance from the EMA it trains: scale 1 / (1 - enr), none at enr >= 1. One
    warning line there; the default 0.5 (scale 2) and flow matching (no guidance) give none."""
    for objective, enr, warned in (("apex", 1.0, True), ("consistency", 1.5, True),
                                   ("apex", 0.5, False), ("fm", 1.0, False)):
        cfg = apex_min.Config(objective=objective, enr=enr, device="cpu",
                              out_dir=str(tmp_path / f"{objective}{enr}"))
        apex_min.setup(cfg)
        err = capsys.readouterr().err
        assert ("warning: --enr" in err) == warned and err.count("\n") == warned


# ==================================================================================================
# 4. Interpolant and per-sample losses (the conventions of apex_min's docstring)
# ==================================================================================================


def test_interpolant_endpoints_and_velocity_target():
    x, z = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    zeros, ones = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    assert torch.equal(apex_min.interpolate(x, z, zeros), x)           # t = 0 is data
    assert torch.equal(apex_min.interpolate(x, z, ones), z)            # t = 1 is noise
    t, h = torch.rand(5, dtype=torch.float64) * 0.8 + 0.1, 1e-6
    finite_difference = (apex_min.interpolate(x, z, t + h) - apex_min.interpolate(x, z, t - h)) / (2 * h)
    torch.testing.assert_close(finite_difference, z - x)               # d x_t / d t = z - x
    x_t, F = apex_min.interpolate(x, z, t), z - x
    torch.testing.assert_close(x_t - per_row(t, x) * F, x)             # x_hat = x_t - t F
    torch.testing.assert_close(x_t + per_row(1 - t, x) * F, z)         # z_hat = x_t + (1 - t) F


def test_score_velocity_relation_against_exact_gaussian_scores():
    """s_t = -(x_t + (1-t) v)/t, hence s_1 - s_2 = -((1-t)/t)(v_1 - v_2). v is computed by quadrature
    of E[z - x | x_t] (independent of the closed form used by the stand-ins, which it also checks);
    s is the exact score of the Gaussian x_t."""
    torch.manual_seed(0)
    gaussians = [(0.4, 0.3), (-0.5, 0.8)]                               # (mu, sd) of two data laws
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    x_t = torch.randn(5, dtype=torch.float64)
    v, s = [], []
    for mu, sd in gaussians:
        grid = torch.linspace(mu - 12 * sd, mu + 12 * sd, 20001, dtype=torch.float64)   # values of x
        z = (x_t[:, None] - (1 - t[:, None]) * grid) / t[:, None]                       # (5, G)
        torch.testing.assert_close(apex_min.interpolate(grid.expand_as(z), z, t), x_t[:, None].expand_as(z))
        log_w = -0.5 * ((grid - mu) / sd) ** 2 - 0.5 * z**2            # p(x) p(z): Jacobian 1/t is shared
        w = torch.softmax(log_w, dim=1)
        v.append((w * (z - grid)).sum(1))                               # E[z - x | x_t]
        s.append(gaussian_score(x_t[:, None], t, mu, sd)[:, 0])
        torch.testing.assert_close(v[-1], gaussian_velocity(x_t[:, None], t, mu, sd)[:, 0])
        torch.testing.assert_close(s[-1], -(x_t + (1 - t) * v[-1]) / t)
    torch.testing.assert_close(s[0] - s[1], -((1 - t) / t) * (v[0] - v[1]))


def test_robust_loss_value_and_normalised_gradient():
    """rho = m sg((m/c^2 + 1)^-1/2)/c: value m/sqrt(m + c^2), gradient that of 2 sqrt(m + c^2).
    Fails if the stop-gradient inside rho is removed (the gradient halves for m >> c^2)."""
    torch.manual_seed(0)
    c = 1e-3
    scale = torch.tensor([3e-4, 1e-3, 1e-2, 1.0])[:, None]               # errors around and above c
    p = (scale * torch.randn(4, 6)).requires_grad_()
    q = torch.zeros(4, 6)
    rho = apex_min.robust_loss(p, q, c)
    m = (p - q).pow(2).mean(1)
    torch.testing.assert_close(rho, m / torch.sqrt(m + c**2))
    (grad,) = torch.autograd.grad(rho.sum(), p)
    (expected,) = torch.autograd.grad((2 * torch.sqrt(m + c**2)).sum(), p)
    torch.testing.assert_close(grad, expected)


# ==================================================================================================
# 5. Objectives
# ==================================================================================================


@pytest.mark.parametrize("objective", apex_min.OBJECTIVES)
@pytest.mark.parametrize("batch, share", [(4, 0.25), (7, 0.25), (16, 0.25), (18, 0.25), (7, 0.5), (16, 0.5)])
def test_row_groups_cover_the_batch(objective, batch, share):
    rows = apex_min.row_groups(batch, fake_branch=objective == "apex", fake_share=share)
    covered = sorted(i for s in rows.values() for i in range(batch)[s])
    assert covered == list(range(batch))                                # each row once
    assert all(s.stop > s.start for s in rows.values())                 # no group is empty
    assert ("fake" in rows) == (objective == "apex")


def test_fake_share():
    """The default quarter is the released equal split; another share goes to the fake rows."""
    for batch in range(4, 100):
        cuts = [s.start for s in apex_min.row_groups(batch).values()]
        assert cuts == [0, batch // 4, 2 * (batch // 4), 3 * (batch // 4)]
    rows = apex_min.row_groups(1152, fake_share=0.5)
    assert rows["fake"] == slice(576, 1152) and rows["onestep"] == slice(0, 192)
    x, y = torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,))
    net = apex_min.build_model(apex_min.Config())
    cfg = apex_min.Config(fake_share=0.5)
    seen = []
    net.forward = lambda x_t, t, tt, c, f=net.forward: seen.append(len(x_t)) or f(x_t, t, tt, c)
    apex_min.apex_loss(net, copy.deepcopy(net), x, y, cfg)
    assert seen[0] == 64 - 30   # the first pass makes the fake rows' data: 34 one-step samples


def test_apex_loss_logs_the_contrast_of_the_generators_own_samples(monkeypatch):
    """apex_loss's `contrast` term is the mean pixel std within each of the fake rows' one-step
    samples (step 2): 0 for flat images, whatever their level."""
    x, y = shapes_batch(16)
    flat = lambda net, z, c: torch.linspace(-1, 1, len(z)).view(-1, 1, 1, 1).expand_as(z).clone()
    striped = lambda net, z, c: (torch.arange(z.shape[-1]) % 2 * 2.0 - 1).expand_as(z).clone()
    n = x[0].numel()   # +-1 in equal shares: std sqrt(n / (n - 1)), Bessel's correction
    for samples, contrast in ((flat, 0.0), (striped, math.sqrt(n / (n - 1)))):
        monkeypatch.setattr(apex_min, "onestep_samples", samples)
        net = tiny_dit()
        _, terms = apex_min.apex_loss(net, copy.deepcopy(net), x, y, apex_min.Config())
        assert terms["contrast"].item() == pytest.approx(contrast, abs=1e-5)


EXPECTED_TERMS = {"apex": {"onestep", "flow", "anystep", "fake", "gen", "gap", "contrast", "loss"},
                  "consistency": {"onestep", "flow", "anystep", "loss"},
                  "fm": {"flow", "loss"}, "paper": {"fake", "mix", "loss"}}


@pytest.mark.parametrize("objective", apex_min.OBJECTIVES)
def test_loss_is_finite_with_the_expected_terms(objective):
    net = tiny_dit()
    ema = copy.deepcopy(net).requires_grad_(False)
    x, y = shapes_batch(16)
    loss, terms, grads = loss_and_grads(net, ema, x, y, apex_min.Config(objective=objective))
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert set(terms) == EXPECTED_TERMS[objective]
    assert all(torch.isfinite(v) and not v.requires_grad for v in terms.values())
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for g in grads.values())


def test_fake_rows_are_generated_without_gradient():
    """Step 2: x_fake = z1 - F(z1, 1, 0, c) is computed without gradient and detached. The gradient
    of the loss must equal the gradient computed with the generator's output fed in as a constant;
    if the stop-gradient is removed, the path through x_fake adds to it. (no_grad and .detach() are
    one stop-gradient written twice: deleting either alone changes nothing, deleting both fails here.)"""
    x, y = shapes_batch(16)
    cfg = apex_min.Config(objective="apex")
    net = tiny_dit()
    ema = copy.deepcopy(net).requires_grad_(False)
    live = Recorder(net)
    _, _, grads = loss_and_grads(live, ema, x, y, cfg)
    assert not live.main_pass(16).x.requires_grad                       # x_t of every row is data
    _, _, reference = loss_and_grads(Recorder(net, constant_generation=True), ema, x, y, cfg)
    for name in grads:
        torch.testing.assert_close(grads[name], reference[name], rtol=1e-5, atol=1e-8, msg=name)


def test_guidance_and_consistency_targets_are_constant(monkeypatch):
    """Steps 4-5: the target is built without gradient (EMA guidance, consistency jumps, sg(F)).
    Checked two ways: the EMA network, here with trainable weights, receives no gradient; and the
    gradient of the loss with respect to the network output F equals the gradient of
    mean(w * 2 sqrt(m + c^2)) (the spec's rho) with the target held constant."""
    x, y = shapes_batch(16)
    cfg = apex_min.Config(objective="apex", gen_weight=0.0, label_dropout=0.0, enr=0.5)
    live = Recorder(tiny_dit(seed=0))
    ema = tiny_dit(seed=1)                                              # requires_grad stays on
    rho_args = []
    original = apex_min.robust_loss
    monkeypatch.setattr(apex_min, "robust_loss", lambda p, q, c=1e-3: rho_args.append((p, q)) or original(p, q, c))
    loss_and_grads(live, ema, x, y, cfg)
    assert all(p.grad is None or not p.grad.any() for p in ema.parameters()), "the EMA got a gradient"
    main = live.main_pass(16)
    (_, target), = rho_args                                              # rho(F, target), one call
    F = main.out.detach().requires_grad_()
    t, tt = main.t, main.tt
    fake = (main.c != live.embed_class(y)).any(1)                       # rows with c_fake
    assert fake.sum() == 4
    w = torch.where(fake, torch.ones_like(t), 1 + torch.tan((1 - (t - tt)) * math.pi / 2.5))
    m = (F - target.detach()).pow(2).flatten(1).mean(1)
    (expected,) = torch.autograd.grad((w * 2 * torch.sqrt(m + cfg.robust_c**2)).mean(), F)
    torch.testing.assert_close(main.out.grad, expected, rtol=1e-4, atol=1e-9)


def test_generator_term_gradient_is_the_normalised_g():
    """Step 7: g = clamp(v_fake - v_real, -1, 1) with no gradient and L_gen = rho(F, sg(F - g)).
    With constant velocities g is known, and d(gen_weight * L_gen)/dF_onestep per one-step row is
    gen_weight * 2 g / (n sqrt(mean(g^2) + c^2)) / n_rows, so x_g = z - F moves along +g. The velocity
    parameters get no gradient from the term (they would if g were computed with gradient)."""
    v_real, v_fake = [0.3, -0.2, 0.5], [-0.4, 1.5, 0.1]                  # v_fake - v_real = -0.7, 1.7, -0.4
    net = ConstantFields(v_real, v_fake)
    ema = copy.deepcopy(net).requires_grad_(False)
    x, y = torch.randn(16, 3), torch.randint(3, (16,))
    runs = {}
    for weight in (0.0, 0.5):
        live = Recorder(net)
        cfg = apex_min.Config(objective="apex", gen_weight=weight)
        _, terms, grads = loss_and_grads(live, ema, x, y, cfg)
        runs[weight] = (live.main_pass(16).out.grad, grads, terms)
    O = apex_min.row_groups(16)["onestep"]
    dF = (runs[0.5][0] - runs[0.0][0])[O]                               # the generator term alone
    g = (torch.tensor(v_fake) - torch.tensor(v_real)).clamp(-1, 1)      # (-0.7, 1, -0.4)
    n, rows, c = 3, O.stop - O.start, 1e-3
    expected = 0.5 * 2 * g / (n * torch.sqrt(g.pow(2).mean() + c**2)) / rows
    torch.testing.assert_close(dF, expected.expand_as(dF), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(runs[0.5][2]["gen"], g.pow(2).mean() / torch.sqrt(g.pow(2).mean() + c**2))
    for name in ("net.a_real", "net.a_fake"):                                # g carries no gradient
        torch.testing.assert_close(runs[0.5][1][name], runs[0.0][1][name], rtol=0, atol=1e-7, msg=name)
    # the difference is not in the rest of the batch either
    torch.testing.assert_close(runs[0.5][0][O.stop:], runs[0.0][0][O.stop:], rtol=0, atol=0)


def generator_term_gradient(net, ema, x, y, seed, **options):
    """d L_gen / d(net parameters and F_onestep): the loss with gen_weight 1 minus the loss with
    gen_weight 0 under the same random numbers (they share everything before the term)."""
    losses, outs = [], []
    for weight in (1.0, 0.0):
        torch.manual_seed(seed)
        live = Recorder(net)
        cfg = apex_min.Config(objective="apex", gen_weight=weight, **options)
        losses.append(apex_min.training_loss(live, ema, x, y, cfg)[0])
        outs.append(live.main_pass(len(x)).out)
    net.zero_grad(set_to_none=True)
    (losses[0] - losses[1]).backward()        # outs[1].grad = -(the rest's gradient): add, not subtract
    return outs[0].grad + outs[1].grad


def test_generator_term_moves_samples_toward_the_data():
    """The known answer: data N(mu_d, sd^2 I), generator N(mu_g, sd^2 I), both branches exact. Then
    v_fake - v_real = (s / var_s) (mu_d - mu_g) at every x_s (a positive multiple of mu_d - mu_g), so
    a gradient step on F_onestep must move every x_g = z - F toward the data mean. A flipped sign,
    +(v_real - v_fake), would move it away. Then, trained on the generator term alone with the fake
    branch tracking the generator, the generator's mean reaches the data mean."""
    mu_d, mu_g, sd = [0.3, -0.2], [-0.2, 0.1], 0.5
    net = GaussianFields(mu_d, sd, mu_g, sd)
    ema = copy.deepcopy(net).requires_grad_(False)
    B = 64
    x, y = torch.tensor(mu_d) + sd * torch.randn(B, 2), torch.randint(3, (B,))
    O = apex_min.row_groups(B)["onestep"]
    dF = generator_term_gradient(net, ema, x, y, seed=0)[O]             # (16, 2)
    # x_g = z - F; a step F -> F - lr dF moves x_g by +lr dF: it must point along mu_d - mu_g
    toward = torch.tensor(mu_d) - torch.tensor(mu_g)
    cosine = torch.nn.functional.cosine_similarity(dF, toward[None], dim=1)
    assert (cosine > 0.999).all(), cosine

    net = GaussianFields(mu_d, 0.3, mu_g, 0.6)                          # different spreads as well
    opt = torch.optim.SGD(net.parameters(), lr=0.02)
    start = (net.gen_mean - torch.tensor(mu_d)).norm().item()
    for step in range(60):
        generator_term_gradient(net, copy.deepcopy(net).requires_grad_(False), x, y, seed=step)
        opt.step()
    assert (net.gen_mean - torch.tensor(mu_d)).norm().item() < 0.2 * start


@pytest.mark.parametrize("gen_norm", ["clamp", "dmd"])
def test_generator_term_options_keep_the_direction_and_the_s_range(gen_norm):
    """The options of step 7: with either normalisation the one-step samples move toward the data
    (exact Gaussian branches, as above); the term draws s in [gen_s_min, gen_s_max)."""
    mu_d, mu_g, sd = [0.3, -0.2], [-0.2, 0.1], 0.5
    net = GaussianFields(mu_d, sd, mu_g, sd)
    x, y = torch.tensor(mu_d) + sd * torch.randn(64, 2), torch.randint(3, (64,))
    options = {"gen_norm": gen_norm, "gen_s_min": 0.1, "gen_s_max": 0.3}
    dF = generator_term_gradient(net, copy.deepcopy(net), x, y, 0, **options)[apex_min.row_groups(64)["onestep"]]
    toward = torch.tensor(mu_d) - torch.tensor(mu_g)
    assert (torch.nn.functional.cosine_similarity(dF, toward[None], dim=1) > 0.999).all()
    seen = []

    def recording(net, x_s, s, y, cfg):
        seen.append(s)
        return apex_min.shifted_velocities(net, x_s, s, y, cfg)

    cfg = apex_min.Config(objective="apex", **options)
    apex_min.training_loss(net, copy.deepcopy(net), x, y, cfg, velocities=recording)
    (s,) = seen
    assert len(s) == 16 and s.min() >= 0.1 and s.max() < 0.3


def test_polish_schedule_and_cosine_learning_rate():
    """--polish-from f: the term off before f * total, then on with the one-step rows' loss off;
    the released settings pass unchanged. The cosine rate decays to 0 over max_steps."""
    cfg = apex_min.Config(polish_from=0.8, max_steps=10)
    early, late = apex_min.scheduled(cfg, 7, 10), apex_min.scheduled(cfg, 8, 10)
    assert (early.gen_weight, early.onestep_weight) == (0.0, 1.0)
    assert (late.gen_weight, late.onestep_weight) == (0.5, 0.0)
    assert apex_min.scheduled(apex_min.Config(), 7, 10) == apex_min.Config()
    net = tiny_dit()
    x, y = shapes_batch(16)
    for c in (early, late):   # the one-step rows' term vanishes exactly when they are freed
        torch.manual_seed(0)
        terms = apex_min.training_loss(net, copy.deepcopy(net), x, y, dataclasses.replace(c, label_dropout=0))[1]
        assert (terms["onestep"] == 0) == (c is late) and ("gen" in terms) == (c is late)
    run = SimpleNamespace(opt=torch.optim.SGD(net.parameters(), lr=1.0), step=0, net=net, ema=apex_min.EMA(net),
                          trainable=list(net.parameters()), world=1)
    cfg = apex_min.Config(lr=1.0, lr_schedule="cosine", max_steps=4, objective="fm")
    rates = []
    for _ in range(4):
        apex_min.train_step(run, net, net, x, y, cfg, contextlib.nullcontext())
        rates.append(run.opt.param_groups[0]["lr"])
    assert rates == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))])
    with pytest.raises(ValueError, match="c_fake = c"):
        apex_min.validate(apex_min.Config(shift_a=1.0, shift_b=0.0))


def test_paper_objective_gradient_paths(monkeypatch):
    """The paper-literal option: x_fake = x_t - t F keeps its gradient in L_fake (Eq. 11-12);
    the mix target T = (1-lam)(z - x) + lam sg(v_fake) carries none (Eq. 17)."""
    calls = []
    original = apex_min.mse
    monkeypatch.setattr(apex_min, "mse", lambda p, q: calls.append((p, q)) or original(p, q))
    x, y = shapes_batch(8)
    apex_min.training_loss(tiny_dit(), None, x, y, apex_min.Config(objective="paper"))
    (_, target_fake), (_, target_mix) = calls
    assert target_fake.requires_grad                                   # z' - x_fake, with gradient
    assert not target_mix.requires_grad                                 # sg(v_fake)


# The guard of the restructure: the loss and the gradient norm of every objective on one fixed
# draw (the tiny preset's network with perturbed weights, a shapes batch of 64, seed 1), pinned to
# the values the reference computed before its objective was split into named pieces. A change of
# any piece, of the order of the random draws, or of a reduction shows here.
GUARD = {  # name: (objective, overrides, loss, gradient norm)
    "apex": ("apex", {}, 1.995574712753296, 3.0961170196533203),
    "apex, generator term off": ("apex", {"gen_weight": 0.0}, 1.9052205085754395, 2.887162208557129),
    "consistency": ("consistency", {}, 2.091367721557617, 4.121363162994385),
    "fm": ("fm", {}, 1.8017500638961792, 2.676609754562378),
    "paper": ("paper", {}, 2.1379964351654053, 2.56014347076416),
}


@pytest.mark.parametrize("name", GUARD)
def test_guard_pins_the_loss_and_gradient_of_every_objective(name):
    objective, overrides, want_loss, want_norm = GUARD[name]
    cfg = apex_min.Config(objective=objective, **overrides)             # the tiny preset
    torch.manual_seed(0)
    net = apex_min.build_model(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ema = copy.deepcopy(net)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x, y = apex_min.make_shapes(n=cfg.batch_size, size=cfg.image_size, num_classes=cfg.num_classes)
    torch.manual_seed(1)
    loss, _ = apex_min.training_loss(net, ema, x.float() / 127.5 - 1, y, cfg)
    loss.backward()
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in net.parameters() if p.grad is not None))
    assert loss.item() == pytest.approx(want_loss, rel=1e-5)
    assert norm.item() == pytest.approx(want_norm, rel=1e-4)


@pytest.mark.parametrize("objective, ratio", [("apex", 0.93), ("consistency", 0.85), ("fm", 0.5), ("paper", 0.5)])
def test_a_few_adam_steps_lower_the_loss(objective, ratio):
    """Fixed batch, fixed seeds, the loss of one fixed draw of the random parts before and after.
    The recipe losses fall slowly (their residuals are clamped to [-1, 1], and the one-step rows'
    residual is divided by d = 0.01, so it stays clamped), hence 60 steps and the milder ratios;
    the generator term even grows from 0 as the fake branch separates from the real one."""
    x, y = shapes_batch(16)
    cfg = apex_min.Config(objective=objective)
    torch.manual_seed(0)
    net = apex_min.DiT(**TINY_DIT)
    ema = apex_min.EMA(net, cfg.ema_decay)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)

    def evaluate():
        torch.manual_seed(1234)
        return apex_min.training_loss(net, ema.model, x, y, cfg)[0].item()

    before = evaluate()
    torch.manual_seed(0)
    for _ in range(60):
        loss, _ = apex_min.training_loss(net, ema.model, x, y, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(net)
    after = evaluate()
    assert after < ratio * before, (before, after)


# ==================================================================================================
# 6. Samplers
# ==================================================================================================


def test_one_nfe_sampler_is_the_closed_form_jump():
    net = tiny_dit()
    z, y = torch.randn(6, 3, 8, 8), torch.randint(4, (6,))              # class 3 is the null class
    t = torch.full((6,), 0.999)
    expected = z - 0.999 * net(z, t, torch.zeros(6), net.embed_class(y))
    torch.testing.assert_close(apex_min.sample_fewstep(net, z, y, nfe=1), expected)


def test_two_nfe_sampler_renoises_the_data_endpoint():
    """[0.999, 0.6, 0]: x_hat at 0.999, re-noised to t = 0.6 with fresh noise (rho = 1), then x_hat."""
    net = tiny_dit()
    z, y = torch.randn(6, 3, 8, 8), torch.randint(3, (6,))
    c, zeros = net.embed_class(y), torch.zeros(6)
    g = torch.Generator().manual_seed(7)
    x = z - 0.999 * net(z, torch.full((6,), 0.999), zeros, c)
    x = 0.4 * x + 0.6 * torch.randn(z.shape, generator=g)
    expected = x - 0.6 * net(x, torch.full((6,), 0.6), zeros, c)
    got = apex_min.sample_fewstep(net, z, y, nfe=2, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, expected)
    assert apex_min.few_step_times(4) == [0.999, 0.833, 0.666, 0.5, 0.0]


def test_euler_on_an_exact_gaussian_field_reaches_the_closed_form_flow_map():
    """For data N(mu, sd^2 I) the flow map from t = 1 to t = 0 is z -> mu + sd z."""
    mu, sd = [0.5, -0.3], 0.4
    net = GaussianFields(mu, sd, [0.0, 0.0], 1.0).double()
    torch.manual_seed(0)
    z, y = torch.randn(256, 2, dtype=torch.float64), torch.randint(3, (256,))
    exact = torch.tensor(mu, dtype=torch.float64) + sd * z
    error = {n: (apex_min.sample_euler(net, z, y, steps=n) - exact).abs().max().item() for n in (100, 1000)}
    assert error[1000] < 3e-3
    assert error[1000] < error[100] / 5                                # first order: 10x the steps


# ==================================================================================================
# 8. Utilities
# ==================================================================================================


def test_ema_warmup_follows_the_released_recursion():
    net = nn.Linear(2, 2)
    ema = apex_min.EMA(net, target=0.99)
    start = [p.detach().clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net)
    assert ema.decay == pytest.approx(0.495)                            # 0 + (1 - 0)(0.99 - 0)/2
    for e, s, p in zip(ema.model.parameters(), start, net.parameters()):
        torch.testing.assert_close(e, 0.495 * s + 0.505 * p)
    ema.update(net)
    assert ema.decay == pytest.approx(0.495 + 0.505 * 0.495 / 2)
    for _ in range(3000):                                               # slow approach: e <- e (1 - (1-d)/2)
        ema.update(net)
    assert 0.989 < ema.decay < 0.99
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_environment_names_the_commit_and_a_dirty_tree(tmp_path, monkeypatch):
    """A record's git field: the commit, with "-dirty" while tracked Python files differ from it."""
    import importlib.util
    (tmp_path / "apex_min.py").write_text(open(apex_min.__file__).read())
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    for args in (["init", "-q"], ["add", "apex_min.py"], ["commit", "-qm", "c"]):
        subprocess.run(git + args, check=True, capture_output=True)
    spec = importlib.util.spec_from_file_location("apex_min_copy", tmp_path / "apex_min.py")
    copy_ = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, copy_)                # its dataclasses look it up
    spec.loader.exec_module(copy_)
    def head():
        return subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert copy_.environment()["git"] == head()
    (tmp_path / "notes.txt").write_text("untracked")                 # untracked files do not count,
    assert copy_.environment()["git"] == head()
    for args in (["add", "notes.txt"], ["commit", "-qm", "notes"]):
        subprocess.run(git + args, check=True, capture_output=True)
    (tmp_path / "notes.txt").write_text("a record written")          # nor changed files other than code
    assert copy_.environment()["git"] == head()
    with open(tmp_path / "apex_min.py", "a") as f:
        f.write("# changed\n")
    assert copy_.environment()["git"] == head() + "-dirty"


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A save that dies midway leaves the previous checkpoint readable and unchanged."""
    path = str(tmp_path / "ckpt.pt")
    apex_min.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    assert os.listdir(tmp_path) == ["ckpt.pt"]

    def dying_save(obj, f):
        f.write(b"half a checkpoint")                                   # f: the open temp file
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError):
        apex_min.save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    state = apex_min.load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))


# ==================================================================================================
# 2b. LoRA adapters for plug-in tuning
# ==================================================================================================


def lora_inputs(seed=1):
    torch.manual_seed(seed)
    x, y = shapes_batch(6, seed)
    t = torch.rand(6)
    return x, t, t * torch.rand(6), y


def test_lora_at_initialisation_is_exactly_the_base_model():
    base = tiny_dit()
    adapted = apex_min.add_lora(copy.deepcopy(base), rank=4)
    x, t, tt, y = lora_inputs()
    with torch.no_grad():
        assert torch.equal(adapted(x, t, tt, adapted.embed_class(y)), base(x, t, tt, base.embed_class(y)))


def test_lora_trains_only_the_adapters_and_the_target_time_embedding():
    net = apex_min.add_lora(tiny_dit(), rank=4)
    with torch.no_grad():   # non-zero B, so the gradient of A is non-zero too
        for m in net.modules():
            if isinstance(m, apex_min.LoRALinear):
                m.lora_B.normal_(std=0.05)
    x, y = shapes_batch(8)
    cfg = apex_min.Config(objective="apex")
    loss, _ = apex_min.training_loss(net, copy.deepcopy(net).requires_grad_(False), x, y, cfg)
    loss.backward()
    with_grad = {n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad, "nothing was trained"
    assert all(("lora_" in n) or n.startswith("tt_embed.") for n in with_grad), with_grad
    assert any("lora_A" in n for n in with_grad) and any("lora_B" in n for n in with_grad)
    assert all(not p.requires_grad for n, p in net.named_parameters() if ".base." in n)


def test_merged_lora_gives_the_same_outputs():
    net = apex_min.add_lora(tiny_dit(), rank=4)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, apex_min.LoRALinear):
                m.lora_B.normal_(std=0.1)
    x, t, tt, y = lora_inputs()
    with torch.no_grad():
        before = net(x, t, tt, net.embed_class(y))
        merged = apex_min.merge_lora(copy.deepcopy(net))
        after = merged(x, t, tt, merged.embed_class(y))
    assert not any(isinstance(m, apex_min.LoRALinear) for m in merged.modules())
    assert not torch.allclose(before, tiny_dit()(x, t, tt, tiny_dit().embed_class(y)), atol=1e-4)  # adapters matter
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_init_from_lora_run_and_merge_export(tmp_path):
    base_dir, lora_dir = tmp_path / "fm", tmp_path / "lora"
    apex_min.train(run_config(base_dir, objective="fm", max_steps=2))
    summary = apex_min.train(run_config(lora_dir, init_from=str(base_dir / "ckpt.pt"), tune="lora",
                                        lora_rank=2, max_steps=3))
    assert 0 < summary["trainable_params"] < summary["params"]
    path = apex_min.export_merged(str(lora_dir / "ckpt.pt"))
    merged, cfg = apex_min.model_from_checkpoint(path)
    unmerged, _ = apex_min.model_from_checkpoint(str(lora_dir / "ckpt.pt"))   # merges on load
    x, t, tt, y = lora_inputs()
    with torch.no_grad():
        torch.testing.assert_close(merged(x, t, tt, merged.embed_class(y)),
                                   unmerged(x, t, tt, unmerged.embed_class(y)))
    assert cfg.tune == "full"


@pytest.mark.parametrize("init_from, message", [("missing.pt", "no checkpoint"), ("OTHER", "architecture")])
def test_init_from_a_bad_checkpoint_fails_with_one_line(tmp_path, init_from, message):
    if init_from == "OTHER":
        apex_min.train(run_config(tmp_path / "other", objective="fm", max_steps=1, dim=64))
        init_from = str(tmp_path / "other" / "ckpt.pt")
    else:
        init_from = str(tmp_path / init_from)
    with pytest.raises(SystemExit) as stop:
        apex_min.train(run_config(tmp_path / "new", init_from=init_from, max_steps=1))
    assert message in str(stop.value) and "\n" not in str(stop.value)


# ==================================================================================================
# 9. Training loop
# ==================================================================================================


def run_config(out_dir, **overrides):
    return apex_min.Config(**{**apex_min.PRESETS["tiny"], **TINY_RUN, "out_dir": str(out_dir), **overrides})


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_save_resume_continue_equals_an_uninterrupted_run(tmp_path, device):
    # on cuda the checkpoint is loaded onto the GPU, its random states too (they must go back to
    # the CPU as bytes); GPU kernels may differ in the last bits between runs, hence the tolerance
    apex_min.train(run_config(tmp_path / "straight", max_steps=6, device=device))
    apex_min.train(run_config(tmp_path / "split", max_steps=3, device=device))
    apex_min.train(run_config(tmp_path / "split", max_steps=6, resume=True, device=device))
    a = apex_min.load_checkpoint(str(tmp_path / "straight" / "ckpt.pt"))
    b = apex_min.load_checkpoint(str(tmp_path / "split" / "ckpt.pt"))
    assert a["step"] == b["step"] == 6
    assert a["ema_decay"] == b["ema_decay"]
    atol = 1e-7 if device == "cpu" else 1e-4
    for which in ("model", "ema"):
        for name, value in a[which].items():
            torch.testing.assert_close(b[which][name], value, rtol=0, atol=atol, msg=f"{which}.{name}")
    assert not torch.equal(a["model"]["out.weight"], torch.zeros_like(a["model"]["out.weight"]))


def test_minutes_with_cosine_plan_a_length_that_ends_the_run_and_survives_resume(tmp_path):
    """--minutes without --max-steps under a cosine rate: after 20 timed steps the length is fixed
    (config.json and the checkpoint), the run ends at exactly that step, and --resume keeps it.
    A constant-rate fm run is not planned, whatever polish a preset sets (fm has no term)."""
    cfg = run_config(tmp_path, max_steps=0, minutes=0.02, lr_schedule="cosine", polish_from=0.5)
    summary = apex_min.train(cfg)
    planned = json.load(open(tmp_path / "config.json"))["max_steps"]
    assert planned > 21 and summary["step"] == planned and summary["stop"] == "max-steps"
    assert apex_min.load_checkpoint(str(tmp_path / "ckpt.pt"))["config"]["max_steps"] == planned
    assert apex_min.train(dataclasses.replace(cfg, resume=True))["step"] == planned   # no step more
    unplanned = apex_min.Config(max_steps=0, polish_from=0.5)          # before the plan: term off
    assert apex_min.scheduled(unplanned, 5, 0) is unplanned
    fm = run_config(tmp_path / "fm", max_steps=0, minutes=0.005, objective="fm", polish_from=0.5)
    assert apex_min.train(fm)["stop"] == "minutes"   # a constant-rate fm run: the clock ends it
    assert json.load(open(tmp_path / "fm" / "config.json"))["max_steps"] == 0


def test_flow_share_trains_a_flow_stage_then_the_objective_from_it(tmp_path):
    """--flow-share 0.4 of 10 steps: 4 flow-matching steps in out_dir/flow, then 6 APEX steps
    started from that run's EMA in out_dir; both checkpoints stay, the summary adds the times."""
    summary = apex_min.train_stages(run_config(tmp_path, max_steps=10, flow_share=0.4))
    flow = apex_min.load_checkpoint(str(tmp_path / "flow" / "ckpt.pt"))
    tuned = apex_min.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert (flow["config"]["objective"], flow["step"]) == ("fm", 4)
    assert (tuned["config"]["objective"], tuned["step"]) == ("apex", 6)
    assert tuned["config"]["init_from"] == str(tmp_path / "flow" / "ckpt.pt")
    first = json.load(open(tmp_path / "flow" / "summary.json"))["train_seconds"]
    assert summary["train_seconds_total"] == round(first + summary["train_seconds"], 1)
    assert json.load(open(tmp_path / "summary.json"))["train_seconds_total"] == summary["train_seconds_total"]
    with pytest.raises(SystemExit):                      # asked for where it cannot apply: an error
        apex_min.parse_config(["--flow-share", "0.4", "--objective", "fm"])
    cfg = run_config(tmp_path / "fm", max_steps=2, flow_share=0.4, objective="fm")   # from a preset:
    assert apex_min.train_stages(cfg)["step"] == 2 and not (tmp_path / "fm" / "flow").exists()  # one stage


def test_flow_share_resume_finishes_a_flow_stage_cut_off_by_ctrl_c(tmp_path):
    """A flow stage stopped by Ctrl-C (summary stop "interrupted") is resumed to its share, then
    the second stage runs: the same steps as a run never cut off."""
    apex_min.train(run_config(tmp_path / "flow", objective="fm", max_steps=2))
    summary = json.load(open(tmp_path / "flow" / "summary.json"))
    apex_min.write_json(tmp_path / "flow" / "summary.json", {**summary, "stop": "interrupted"})
    apex_min.train_stages(run_config(tmp_path, max_steps=10, flow_share=0.4, resume=True))
    assert apex_min.load_checkpoint(str(tmp_path / "flow" / "ckpt.pt"))["step"] == 4
    assert apex_min.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 6


def test_run_leaves_one_loadable_checkpoint_and_no_temp_file(tmp_path):
    apex_min.train(run_config(tmp_path, max_steps=2))
    assert not list(tmp_path.glob("*.tmp"))
    state = apex_min.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert {"model", "ema", "opt", "config", "step"} <= set(state) and state["step"] == 2
    net, cfg = apex_min.model_from_checkpoint(str(tmp_path / "ckpt.pt"))
    assert cfg.dim == 32 and isinstance(net, apex_min.DiT)
    with pytest.raises(SystemExit, match="exists"):                     # no silent overwrite
        apex_min.train(run_config(tmp_path, max_steps=2))


def test_checkpoint_of_older_code_loads_with_its_retired_options_named(tmp_path, capsys):
    """A checkpoint whose config holds options this code no longer has (older code's
    --sample-every) still loads; a note on stderr names them, and the rest of the config stays."""
    apex_min.train(run_config(tmp_path, max_steps=2))
    state = apex_min.load_checkpoint(str(tmp_path / "ckpt.pt"))
    state["config"] = {**state["config"], "sample_every": 2000, "lora_targets": "ema"}
    torch.save(state, tmp_path / "old.pt")
    capsys.readouterr()
    net, cfg = apex_min.model_from_checkpoint(str(tmp_path / "old.pt"))
    assert "options of older code ignored: lora_targets, sample_every" in capsys.readouterr().err
    assert cfg.dim == 32 and cfg.max_steps == 2 and isinstance(net, apex_min.DiT)


# A training process killed with SIGKILL, again and again. The checkpoint writes are made slow (the
# bytes go out in two halves with a pause between), so that many kills land inside a write.
KILL_RUNNER = """
import io, sys, time
import torch, apex_min
real_save = torch.save
def slow_save(obj, f):
    buffer = io.BytesIO()
    real_save(obj, buffer)
    data = buffer.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    time.sleep(0.05)
    f.write(data[len(data) // 2:])
apex_min.torch.save = slow_save
apex_min.train(apex_min.parse_config(sys.argv[1:]))
"""


def logged_steps(path):
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]   # skip a torn line


def test_sigkill_at_random_moments_then_resume_loses_at_most_one_interval(tmp_path):
    """After every kill: ckpt.pt loads, and its step is at most ckpt_every behind the last step
    logged; --resume continues from it and removes a temp file left by a write cut off."""
    import random
    import signal
    ckpt_every, kills, during_write = 5, 8, 0
    def command(max_steps, resume):
        return [sys.executable, "-c", KILL_RUNNER, *TINY_CLI, "--max-steps", str(max_steps), "--log-every", "1", "--ckpt-every", str(ckpt_every),
                "--out-dir", str(tmp_path), *(["--resume"] if resume else [])]

    log, ckpt, tmp = tmp_path / "log.jsonl", tmp_path / "ckpt.pt", tmp_path / "ckpt.pt.tmp"
    rng = random.Random(0)
    for i in range(kills):
        start = len(logged_steps(log))
        proc = subprocess.Popen(command(10**6, resume=i > 0), env=SUBPROCESS_ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        for steps in (1, ckpt_every + 1):
            while len(logged_steps(log)) < start + steps:       # first step; then past a checkpoint
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                assert time.time() < deadline, "no progress"
                time.sleep(0.01)
            # at its first step, the stale temp file of the last kill (marked below) is gone
            assert not tmp.exists() or not tmp.read_bytes().endswith(b"STALE")
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if tmp.exists():                                      # killed inside a checkpoint write
            during_write += 1
            with open(tmp, "ab") as f:
                f.write(b"STALE")
        last = logged_steps(log)[-1]
        state = apex_min.load_checkpoint(str(ckpt))           # whole and loadable
        assert last - ckpt_every <= state["step"] <= last, (last, state["step"])
    assert during_write >= 1, "no kill landed inside a checkpoint write"
    # the last resume runs to its end: from the checkpoint's step, no temp file left
    step = apex_min.load_checkpoint(str(ckpt))["step"]
    done = subprocess.run(command(step + 3, resume=True), env=SUBPROCESS_ENV, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "summary.json").read_text())["step"] == step + 3
    assert not tmp.exists()
    print(f"{kills} kills survived, {during_write} inside a checkpoint write")


def test_ctrl_c_ends_the_run_at_a_step_with_a_checkpoint_and_resume_continues(tmp_path):
    """SIGINT: the run stops at the next log step, saves its checkpoint there (exit code 130,
    summary stop "interrupted"); --resume then continues exactly as a run never interrupted."""
    import signal
    flags = ["apex_min.py", *TINY_CLI, "--log-every", "3", "--ckpt-every", "1000"]
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, *flags, "--max-steps", "100000", "--out-dir", str(cut)],
                            cwd=HERE, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while len(logged_steps(cut / "log.jsonl")) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    summary = json.loads((cut / "summary.json").read_text())
    step = apex_min.load_checkpoint(str(cut / "ckpt.pt"))["step"]
    assert summary["stop"] == "interrupted" and summary["step"] == step and step % 3 == 0
    more = ["--max-steps", str(step + 3)]
    for out, resume in ((cut, ["--resume"]), (tmp_path / "whole", [])):
        done = subprocess.run([sys.executable, *flags, *more, "--out-dir", str(out), *resume], cwd=HERE,
                              env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
    a, b = (apex_min.load_checkpoint(str(out / "ckpt.pt")) for out in (cut, tmp_path / "whole"))
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=0, atol=1e-7, msg=name)


def test_a_ctrl_c_that_arrives_twice_at_once_still_stops_at_a_log_step(tmp_path):
    """`timeout -s INT` signals the process and then its group: two SIGINTs microseconds apart.
    They are one request (stop at the next log step, with a checkpoint), not the second Ctrl-C
    that stops at once, mid-step."""
    import signal
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "apex_min.py", *TINY_CLI, "--log-every", "50", "--ckpt-every",
                             "1000", "--max-steps", "100000", "--out-dir", str(cut)],
                            cwd=HERE, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not logged_steps(cut / "log.jsonl"):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    step = apex_min.load_checkpoint(str(cut / "ckpt.pt"))["step"]
    assert json.loads((cut / "summary.json").read_text())["step"] == step and step % 50 == 0, step


def test_minutes_count_the_training_of_a_resumed_run(tmp_path):
    """--minutes is the run's budget in all: resumed with the budget spent, it stops at the first
    log step; with more minutes it trains on."""
    first = apex_min.train(run_config(tmp_path, max_steps=0, minutes=0.01, log_every=2))
    again = apex_min.train(run_config(tmp_path, max_steps=0, minutes=0.01, log_every=2, resume=True))
    assert first["stop"] == again["stop"] == "minutes" and again["step"] == first["step"] + 2
    more = apex_min.train(run_config(tmp_path, max_steps=0, minutes=0.03, log_every=2, resume=True))
    assert more["step"] > again["step"] + 2 and more["train_seconds"] >= 0.03 * 60


@pytest.mark.parametrize("max_steps", [10, 5])   # caught at a log step / by the final check
def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, max_steps):
    original, calls = apex_min.training_loss, []

    def nan_after_four(*args, **kwargs):
        calls.append(1)
        loss, terms = original(*args, **kwargs)
        return (loss * float("nan"), terms) if len(calls) > 4 else (loss, terms)

    monkeypatch.setattr(apex_min, "training_loss", nan_after_four)
    with pytest.raises(SystemExit) as stop:
        apex_min.train(run_config(tmp_path, max_steps=max_steps, log_every=2, ckpt_every=2))
    assert "non-finite" in str(stop.value) and "\n" not in str(stop.value)
    state = apex_min.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_with_another_architecture_fails_with_one_message(tmp_path):
    apex_min.train(run_config(tmp_path, max_steps=1))
    with pytest.raises(SystemExit) as stop:
        apex_min.train(run_config(tmp_path, max_steps=2, resume=True, dim=64))
    assert "architecture" in str(stop.value) and "\n" not in str(stop.value)


def test_resume_with_another_class_count_fails_with_one_message(tmp_path):
    apex_min.train(run_config(tmp_path, max_steps=1))
    with pytest.raises(SystemExit) as stop:
        apex_min.train(run_config(tmp_path, max_steps=2, resume=True, num_classes=4))
    assert "architecture" in str(stop.value) and "\n" not in str(stop.value)


def test_torchrun_two_cpu_ranks_end_with_identical_weights(tmp_path):
    helper = tmp_path / "rank_helper.py"
    helper.write_text(_experiment("ddp_2gpu").RANK_HELPER)      # saves each rank's final weights
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(helper),
           "--preset", "tiny", "--max-steps", "4", "--out-dir", str(out), *TINY_CLI]
    done = subprocess.run(cmd, cwd=tmp_path, env={**SUBPROCESS_ENV, "RANK_OUT": str(tmp_path)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    saved = apex_min.load_checkpoint(str(out / "ckpt.pt"))
    assert saved["step"] == 4
    for which in ("model", "ema"):
        for name, value in ranks[0][which].items():
            assert torch.equal(ranks[1][which][name], value), f"{which}.{name} differs between ranks"
            assert torch.equal(saved[which][name], value), f"{which}.{name} differs from the checkpoint"


def test_a_rank_killed_mid_run_ends_the_whole_torchrun_job(tmp_path):
    """SIGKILL to rank 1 of a 2-rank CPU job: torchrun stops rank 0 too, within seconds and with a
    non-zero exit naming the killed rank, and the last checkpoint still loads."""
    import signal
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "apex_min.py"), "--max-steps", "1000000", "--out-dir", str(out), *TINY_CLI,
           "--log-every", "1", "--ckpt-every", "2"]
    job = subprocess.Popen(cmd, cwd=tmp_path, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len(logged_steps(out / "log.jsonl")) < 4:
        assert job.poll() is None and time.time() < deadline, "the job did not start"
        time.sleep(0.05)
    rank1 = _experiment("ddp_2gpu").rank_pid(1, str(out))
    assert rank1 is not None, "no process of rank 1 found"
    start = time.time()
    os.kill(rank1, signal.SIGKILL)
    _, err = job.communicate(timeout=120)
    assert job.returncode != 0 and time.time() - start < 30, (job.returncode, time.time() - start)
    assert "rank      : 1" in err and "SIGKILL" in err
    apex_min.load_checkpoint(str(out / "ckpt.pt"))                         # whole and loadable


# ==================================================================================================
# 10. Command line
# ==================================================================================================


@pytest.mark.parametrize("argv", [["--bogus"], ["--objective", "nope"], ["--lr", "-1"], ["--lr", "abc"],
                                  ["--batch-size", "3"], ["--preset", "huge"], ["--max-steps", "0"]])
def test_cli_errors_exit_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        apex_min.parse_config(argv)
    assert stop.value.code == 2
    assert_one_line_error(capsys.readouterr().err)


def test_cli_precedence_defaults_preset_flags():
    cfg = apex_min.parse_config(["--preset", "tiny", "--dim", "32", "--no-compile"])
    assert (cfg.dim, cfg.depth, cfg.compile) == (32, apex_min.PRESETS["tiny"]["depth"], False)
    assert cfg.shift_a == apex_min.Config().shift_a


def test_cli_help_gives_the_cifar_presets_value_beside_the_default(capsys):
    with pytest.raises(SystemExit):
        apex_min.parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default 0.0; cifar preset 0.8)" in text and "(default 0.5) --gen-norm" in text


def test_cli_end_to_end_errors_have_no_traceback(tmp_path):
    script = str(HERE / "apex_min.py")
    bad_flag = subprocess.run([sys.executable, script, "--objective", "nope"], capture_output=True,
                              text=True, env=SUBPROCESS_ENV, timeout=60)
    assert bad_flag.returncode == 2
    assert_one_line_error(bad_flag.stderr)
    missing = subprocess.run([sys.executable, script, "--resume", "--out-dir", str(tmp_path / "none"),
                              *TINY_CLI, "--max-steps", "1"],
                             capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=60)
    assert missing.returncode != 0
    assert_one_line_error(missing.stderr)
    assert "no checkpoint" in missing.stderr


# ==================================================================================================
# 11. cifar_demo.py: FID machinery and the training-speed count (CPU, stand-in Inception)
# ==================================================================================================

def random_covariance(rng, d, n=None):
    """Sample covariance of n Gaussian points in d dimensions (rank min(n - 1, d))."""
    a = rng.standard_normal((n or 3 * d, d)) @ rng.standard_normal((d, d))
    return np.cov(a, rowvar=False)


# --- Inception network and feature extraction -------------------------------------------------

class StandInInception(torch.nn.Module):
    """Records what it is fed; features = a fixed linear map of the pooled input."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 2048)
        self.seen = []

    def forward(self, x):
        self.seen.append(dict(shape=tuple(x.shape), dtype=x.dtype, min=x.min().item(), max=x.max().item(),
                              tf32=(torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)))
        return self.proj(x.mean(dim=(2, 3)))  # (B, 2048)


def test_inception_features_preprocessing():
    model = StandInInception()
    images = torch.zeros(5, 3, 32, 32, dtype=torch.uint8)
    images[1] = 255                                                # white
    images[2] = torch.arange(32, dtype=torch.uint8).mul(8)       # ramp 0..248 along the width
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):         # a caller's autocast must not leak in
            feats = cifar_demo.inception_features(model, images, batch_size=2, device="cpu")
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)  # restored
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert feats.shape == (5, 2048) and feats.dtype == np.float64
    assert [s["shape"] for s in model.seen] == [(2, 3, 299, 299), (2, 3, 299, 299), (1, 3, 299, 299)]
    assert all(s["dtype"] == torch.float32 and s["tf32"] == (False, False) for s in model.seen)
    assert model.seen[0]["min"] == -1.0 and model.seen[0]["max"] == pytest.approx(1.0, abs=1e-6)  # black -> -1, white -> +1
    # the ramp: bilinear upsampling (align_corners=False) keeps its end values, 0 -> -1 and 248 -> 2 * 248 / 255 - 1
    model.seen.clear()
    cifar_demo.inception_features(model, images[2:3], batch_size=1, device="cpu")
    assert model.seen[0]["min"] == -1.0 and model.seen[0]["max"] == pytest.approx(2 * 248 / 255 - 1, abs=1e-6)
    # features of an image do not depend on the batch it is in
    one_by_one = cifar_demo.inception_features(model, images, batch_size=1, device="cpu")
    np.testing.assert_allclose(one_by_one, feats, rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script/save are deprecated, still work
def test_load_inception_missing_or_wrong_file(tmp_path):
    with pytest.raises(SystemExit) as missing:
        cifar_demo.load_inception(tmp_path / "nope.pt")
    assert missing.value.code == 2
    fake = tmp_path / "default_1.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(fake))
    with pytest.raises(SystemExit) as wrong:  # right name, wrong network: refused by the sha256
        cifar_demo.load_inception(fake)
    assert wrong.value.code == 2


@pytest.mark.skipif(not (HERE / ".fid" / "default_1.pt").is_file(), reason="no .fid/default_1.pt")
def test_real_inception_output_shape():
    model = cifar_demo.load_inception(HERE / ".fid" / "default_1.pt", "cpu")
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    feats = cifar_demo.inception_features(model, images, batch_size=2, device="cpu")
    assert feats.shape == (2, 2048) and np.isfinite(feats).all()
    assert feats.min() >= 0  # pool3 averages ReLU outputs


# --- statistics and the Frechet distance ---------------------------------------------------------

def test_feature_stats_by_hand():
    feats = np.random.default_rng(0).standard_normal((50, 4))
    mu, sigma = cifar_demo.feature_stats(feats)
    centred = feats - feats.sum(axis=0) / 50
    np.testing.assert_allclose(mu, feats.sum(axis=0) / 50)
    np.testing.assert_allclose(sigma, centred.T @ centred / 49)  # unbiased, as np.cov and pytorch-fid


def test_frechet_distance_of_identical_stats_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(64), random_covariance(rng, 64)
    assert abs(cifar_demo.frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3, 32), rng.uniform(0.1, 3, 32)
    mu1, mu2 = rng.standard_normal(32), rng.standard_normal(32)
    expected = ((np.sqrt(a) - np.sqrt(b)) ** 2).sum() + ((mu1 - mu2) ** 2).sum()
    got = cifar_demo.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_symmetric_and_matches_general_eigenvalues():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(40), rng.standard_normal(40)
    s1, s2 = random_covariance(rng, 40), random_covariance(rng, 40)
    d12 = cifar_demo.frechet_distance(mu1, s1, mu2, s2)
    assert d12 == pytest.approx(cifar_demo.frechet_distance(mu2, s2, mu1, s1), rel=1e-12)
    # another code path: tr sqrt(S1 S2) from the (real, positive) eigenvalues of the product itself
    trace_covmean = np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_covmean
    assert d12 == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_rank_deficient_covariances():
    rng = np.random.default_rng(3)  # fewer samples than dimensions, as with a small FID sample
    s1, s2 = random_covariance(rng, 64, n=20), random_covariance(rng, 64, n=20)
    d = cifar_demo.frechet_distance(np.zeros(64), s1, np.zeros(64), s2)
    assert np.isfinite(d) and d > 0
    assert abs(cifar_demo.frechet_distance(np.zeros(64), s1, np.zeros(64), s1)) < 1e-8


# --- CIFAR-10 pickles and reference statistics -------------------------------------------------

def write_fake_cifar(root, n=4):
    """cifar-10-batches-py with n images a batch, rows laid out as the official R, G, B planes."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    x_hwc = rng.integers(0, 256, (6 * n, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, 6 * n)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        rows = x_hwc[k * n:(k + 1) * n].transpose(0, 3, 1, 2).reshape(n, 3072)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rows, "labels": y[k * n:(k + 1) * n].tolist()}, f, protocol=2)
    return x_hwc, y


def test_load_cifar_reads_the_pickles_without_md5(tmp_path):
    """apex_min.load_cifar (the one reader both scripts use) undoes the R, G, B planes."""
    x_hwc, y = write_fake_cifar(tmp_path)
    x, labels = apex_min.load_cifar(str(tmp_path), train=True)
    assert x.dtype == torch.uint8 and x.shape == (20, 3, 32, 32) and labels.dtype == torch.int64
    assert torch.equal(x.permute(0, 2, 3, 1), torch.from_numpy(x_hwc[:20]))
    assert labels.tolist() == y[:20].tolist()
    x_test, _ = apex_min.load_cifar(str(tmp_path), train=False)
    assert torch.equal(x_test.permute(0, 2, 3, 1), torch.from_numpy(x_hwc[20:]))


def test_load_cifar_missing_names_the_folder(tmp_path, monkeypatch):
    import torchvision

    def no_network(*args, **kwargs):
        raise OSError("no route to host")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", no_network)
    with pytest.raises(SystemExit) as missing:
        apex_min.load_cifar(str(tmp_path / "nowhere"), train=True)
    message = str(missing.value)
    assert "cifar-10-batches-py" in message and "data_batch_1" in message and "\n" not in message


def test_reference_stats_cache(tmp_path, monkeypatch):
    write_fake_cifar(tmp_path)
    cache = tmp_path / "stats.npz"
    mu, sigma = cifar_demo.reference_stats(tmp_path, StandInInception(), "cpu", cache, limit=12)
    assert int(np.load(cache)["n"]) == 12 and sigma.shape == (2048, 2048)
    monkeypatch.setattr(cifar_demo, "inception_features", None)  # a second call must not recompute
    mu2, sigma2 = cifar_demo.reference_stats(tmp_path, None, "cpu", cache, limit=12)
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)


# --- sampling side, with apex_min's samplers stood in for --------------------------------------

def test_generate_class_major_and_same_noise(monkeypatch):
    calls = []

    def sample_fewstep(net, z, y, nfe):
        calls.append(nfe)
        return (z / 4 + y[:, None, None, None] / 10 - 0.5).clamp(-1, 1)  # depends on z and on the class

    fake = SimpleNamespace(sample_fewstep=sample_fewstep, sample_euler=None)
    monkeypatch.setattr(cifar_demo, "apex_min", fake)
    net = torch.nn.Identity()
    big = cifar_demo.generate(net, 5, nfe=2, batch_size=7, seed=3)
    small = cifar_demo.generate(net, 2, nfe=2, batch_size=4, seed=3)
    assert big.dtype == torch.uint8 and big.shape == (50, 3, 32, 32) and set(calls) == {2}
    for c in range(10):  # class-major, and the first samples of a class share their noise
        assert torch.equal(small[2 * c:2 * c + 2], big[5 * c:5 * c + 2])
    assert not torch.equal(big[:2], cifar_demo.generate(net, 2, nfe=2, seed=4)[:2])
    # [-1, 1] -> uint8 rounds to nearest: -1 -> 0, 0 -> 128 (127.5, half to even), 1 -> 255
    fake.sample_fewstep = lambda net, z, y, nfe: torch.tensor([-1.0, 0.0, 1.0]).repeat(len(z), 1024)[:, :3072].view(-1, 3, 32, 32)
    edges = cifar_demo.generate(net, 1, nfe=1)
    assert edges[0].flatten()[:3].tolist() == [0, 128, 255]


def test_sample_stats_see_blank_and_repeated_images():
    y = torch.arange(10).repeat_interleave(4)
    blank = torch.full((40, 3, 32, 32), -0.3)
    assert cifar_demo.sample_stats(blank, y) == {"contrast": 0.0, "spread": 0.0, "saturation": 0.0}
    red = torch.tensor([1.0, -0.5, -0.5]).view(1, 3, 1, 1).expand(40, 3, 32, 32)   # rgb 1, 0.25, 0.25
    assert cifar_demo.sample_stats(red, y)["saturation"] == 0.75   # HSV's (max - min) / max
    one = (torch.rand(10, 1, 3, 32, 32) * 2 - 1).expand(10, 4, 3, 32, 32)
    stats = cifar_demo.sample_stats(one.reshape(40, 3, 32, 32), y)   # one image per class: no spread
    assert stats["spread"] == 0.0 and 0.5 < stats["contrast"] < 0.65   # uniform pixels: std 0.577
    noise = torch.rand(40, 3, 32, 32) * 2 - 1
    assert cifar_demo.sample_stats(noise, y)["spread"] > 0.5


def test_save_class_grid(tmp_path):
    images = torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8)
    cifar_demo.save_class_grid({"1 NFE": images, "Euler 50": images}, 3, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"grid_1nfe.png", "grid_euler50.png", "grid_compare.png"}


# --- command line --------------------------------------------------------------------------------

def test_cli_missing_checkpoint_is_one_line_and_exit_2(tmp_path):
    run = subprocess.run([sys.executable, str(HERE / "cifar_demo.py"), "--ckpt", "missing.pt"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr == "cifar_demo.py: error: checkpoint not found: missing.pt\n"


@pytest.mark.parametrize("argv", [["--nfe", "0", "--check-fid"], ["--bogus"], [], ["--check-fid", "--device", "tpu9"],
                                  ["--check-fid", "--euler-steps", "-1"]])
def test_cli_bad_flags_are_one_line_and_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cifar_demo.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("cifar_demo.py: error:") and err.count("\n") == 1


# --- training speed: the analytic FLOP count ----------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny", "cifar"])
def test_forward_flops_match_torchs_flop_counter(preset):
    """The analytic count against another code path: torch's FLOP counter on a real forward pass
    (attention on the math backend, which the counter sees as two matrix products)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    cfg = apex_min.Config(**apex_min.PRESETS[preset])
    net = apex_min.build_model(cfg)
    x = torch.randn(2, cfg.channels, cfg.image_size, cfg.image_size)
    t = torch.rand(2)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x, t, t / 2, net.embed_class(torch.zeros(2, dtype=torch.long)))
    assert counter.get_total_flops() / 2 == cifar_demo.forward_flops(cfg)


@pytest.mark.parametrize("gen_weight", [0.5, 0.0])
def test_step_flops_count_the_network_calls_of_a_step(gen_weight):
    """Per image, an APEX step is the network calls apex_loss makes, weighted by their rows, with
    backward = 2 forwards; counted here from a recording of the calls, not from the formula. At
    --gen-weight 0 the generator term's calls do not run, and --polish-from p runs them on the
    last 1 - p of the steps only."""
    cfg = apex_min.Config(objective="apex", num_classes=3, gen_weight=gen_weight)
    net = Recorder(tiny_dit())
    x, y = shapes_batch(16)
    loss, _ = apex_min.training_loss(net, net, x, y, cfg)
    rows = sum(len(k.x) * (3 if k.grad_mode else 1) for k in net.calls)   # the pass with gradient: 3 f
    f = cifar_demo.forward_flops(apex_min.Config(**TINY_DIT))
    apex = {**TINY_DIT, "objective": "apex", "gen_weight": gen_weight}
    assert cifar_demo.step_flops(apex_min.Config(**apex)) == rows / 16 * f
    assert cifar_demo.step_flops(apex_min.Config(**{**TINY_DIT, "objective": "fm"})) == 3 * f
    on, off = (cifar_demo.step_flops(apex_min.Config(**{**apex, "gen_weight": w})) for w in (0.5, 0))
    polish = cifar_demo.step_flops(apex_min.Config(**{**apex, "polish_from": 0.8}))
    assert polish == pytest.approx(0.8 * off + 0.2 * on if gen_weight else off)


def test_speed_report_reproduces_the_committed_mfu_table(tmp_path, monkeypatch):
    """`cifar_demo.py --speed` on the committed H200 records (made by older code, whose configs
    hold options since retired) gives the MFU table of docs/results.md, the --gen-weight 0 row
    without the generator term's FLOPs."""
    monkeypatch.chdir(tmp_path)
    h200, ablation = (HERE / "results" / d for d in ("h200", "h200_ablation"))
    rows = cifar_demo.speed_report([f"{h200}/teacher.json", f"{h200}/tune_full.json"], "cpu", 788.2)["runs"]
    assert [(r["model_tflops"], round(100 * r["mfu"], 1)) for r in rows] == [(275.1, 34.9), (287.4, 36.5)]
    gen0 = cifar_demo.speed_report([f"{ablation}/tune_gen0.json"], "cpu", 809.3)["runs"][0]
    assert (gen0["model_tflops"], round(100 * gen0["mfu"], 1)) == (294.4, 36.4)


# ==================================================================================================
# 12. toy_2d.py: exact scores, metrics, alignment, the pipeline at test size (seconds)
# ==================================================================================================
# The end of the section runs experiments/toy_tuning.py and toy_ablations.py at test size too.


def _experiment(name):
    """experiments/<name>.py as a module (experiments/ is a folder of scripts, not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, HERE / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ensemble_batch(M, per_member=24, seed=0):
    torch.manual_seed(seed)
    x, y = toy_2d.make_batch(["ring"] * M, per_member)
    return x, y


# --- 2. model -------------------------------------------------------------------------------------


def test_toy_ensemble_member_equals_a_single_network():
    """Member m of the ensemble computes what a one-member network with m's weights computes."""
    torch.manual_seed(0)
    M = 3
    ens = toy_2d.ToyMLP(2, M, width=16, depth=2)
    for p in ens.out.parameters():          # leave the zero init so outputs are not all zero
        torch.nn.init.normal_(p, std=0.1)
    x, y = _ensemble_batch(M)
    t = torch.rand(len(x))
    tt = t * torch.rand(len(x))
    out = ens(x, t, tt, ens.embed_class(y))
    for m in range(M):
        one = toy_2d.ToyMLP(2, 1, width=16, depth=2)
        one.load_state_dict({k: v[m:m + 1] for k, v in ens.state_dict().items()})
        rows = slice(m, None, M)
        ref = one(x[rows], t[rows], tt[rows], one.embed_class(y[rows]))
        torch.testing.assert_close(out[rows], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("objective", ["apex", "consistency", "paper"])
def test_toy_ensemble_members_do_not_interact_through_the_loss(objective):
    """training_loss on interleaved rows: member 0's gradient does not depend on member 1's
    weights (row groups, fake rows and the generator term all keep whole rounds of members)."""
    M = 2
    torch.manual_seed(0)
    net = toy_2d.ToyMLP(2, M, width=16, depth=2)
    for p in net.out.parameters():
        torch.nn.init.normal_(p, std=0.1)
    ema = apex_min.EMA(net, 0.99)
    cfg = toy_2d.toy_config(objective)
    x, y = _ensemble_batch(M, per_member=24)

    def member0_grads():
        net.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        loss, _ = apex_min.training_loss(net, ema.model, x, y, cfg)
        loss.backward()
        return [p.grad[0].clone() for p in net.parameters() if p.grad is not None]

    before = member0_grads()
    with torch.no_grad():
        for p in list(net.parameters()) + list(ema.model.parameters()):
            p[1].add_(torch.randn_like(p[1]))          # change member 1 only (live and EMA)
    after = member0_grads()
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# --- 3. exact densities and scores ----------------------------------------------------------------


def _finite_difference_score(log_density, x, h=1e-5):
    cols = []
    for d in range(2):
        e = torch.zeros_like(x)
        e[:, d] = h
        cols.append((log_density(x + e) - log_density(x - e)) / (2 * h))
    return torch.stack(cols, 1)


@pytest.mark.parametrize("name", ["ring", "grid"])
def test_toy_exact_data_score_matches_finite_difference(name):
    g = torch.Generator().manual_seed(0)
    x = (1.5 * torch.randn(64, 2, generator=g)).double()
    y = torch.randint(2, (64,), generator=g)
    s = torch.rand(64, generator=g, dtype=torch.float64) * 0.9 + 0.05
    _, score = toy_2d.data_density(x, y, s, name)
    fd = _finite_difference_score(lambda p: toy_2d.data_density(p, y, s, name)[0], x)
    torch.testing.assert_close(score, fd, rtol=1e-5, atol=1e-5)


def test_toy_exact_generator_score_matches_finite_difference():
    g = torch.Generator().manual_seed(1)
    ref, ref_y = toy_2d.sample_toy("grid", 200, generator=g)
    x = torch.randn(64, 2, generator=g, dtype=torch.float64)
    y = torch.randint(2, (64,), generator=g)
    s = torch.rand(64, generator=g, dtype=torch.float64) * 0.9 + 0.05
    _, score = toy_2d.generator_density(x, y, s, ref, ref_y)
    fd = _finite_difference_score(lambda p: toy_2d.generator_density(p, y, s, ref, ref_y)[0], x)
    torch.testing.assert_close(score, fd, rtol=1e-5, atol=1e-5)


def test_toy_exact_data_density_integrates_to_one():
    """An independent check of the normalisation: a Riemann sum over a fine grid."""
    v = torch.linspace(-2.5, 2.5, 501, dtype=torch.float64)
    gy, gx = torch.meshgrid(v, v, indexing="ij")
    pts = torch.stack([gx.flatten(), gy.flatten()], 1)
    for s in (0.0, 0.3):
        logp, _ = toy_2d.data_density(pts, torch.zeros(len(pts), dtype=torch.long),
                                      torch.full((len(pts),), s, dtype=torch.float64), "ring")
        assert abs(logp.exp().sum().item() * (v[1] - v[0]).item() ** 2 - 1) < 1e-3


# --- 4. metrics -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ring", "grid"])
def test_toy_metrics_rank_a_perfect_sample_above_a_blurred_one(name):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(2000) % 2
    perfect, _ = toy_2d.sample_toy(name, 2000, generator=g, y=y)
    blurred = perfect + 0.15 * torch.randn(perfect.shape, generator=g)   # what 1-step regression does
    collapsed = torch.zeros_like(perfect)                                 # every sample at the mean
    good, bad, worst = (toy_2d.quality(p, y, name) for p in (perfect, blurred, collapsed))
    assert good["sw1"] < 0.03 < bad["sw1"] < worst["sw1"]
    assert good["within_3sigma"] > 0.97 > 0.5 > bad["within_3sigma"]
    assert good["coverage"] == 1.0 and worst["coverage"] == 0.0


# --- 5. GAN alignment -----------------------------------------------------------------------------


class ExactField(torch.nn.Module):
    """A stand-in network whose real branch is the exact data velocity and whose fake branch is
    the exact velocity of a fixed empirical 'generator' (Eq. 5). embed_class gives c = 0, so
    c_fake = -0.5 * 0 + 1 = 1 tells the branches apart."""

    num_classes, members = 2, 1

    def __init__(self, name, ref, ref_y, sign=1.0):
        super().__init__()
        self.name, self.ref, self.ref_y, self.sign = name, ref, ref_y, sign

    def embed_class(self, y):
        return torch.zeros(len(y), 1)

    def forward(self, x, t, tt, c):
        fake = c[:, 0] > 0.5
        y = self.y_of_rows.repeat(2)[: len(x)]
        _, s_real = toy_2d.data_density(x, y, t, self.name)
        _, s_fake = toy_2d.generator_density(x, y, t, self.ref, self.ref_y)
        v_real = toy_2d.velocity_from_score(s_real, x, t)
        v_fake = toy_2d.velocity_from_score(s_fake, x, t)
        v = torch.where(fake[:, None], v_real + self.sign * (v_fake - v_real), v_real)
        return v.float()


def test_toy_alignment_is_one_for_the_exact_field_and_minus_one_for_its_flip():
    g = torch.Generator().manual_seed(0)
    ref, ref_y = toy_2d.sample_toy("ring", 512, generator=g)
    ref = ref * 1.3                                     # a generator that is not the data
    x0, y = toy_2d.sample_toy("ring", 256, generator=g)
    s = (0.05 + 0.9 * torch.rand(256, generator=g))
    x_s = apex_min.interpolate(1.3 * x0, torch.randn(256, 2, generator=g), s)
    cfg = toy_2d.toy_config("apex")
    for sign, expected in ((1.0, 1.0), (-1.0, -1.0)):
        net = ExactField("ring", ref, ref_y, sign)
        net.y_of_rows = y
        v_fake, v_real = toy_2d.branch_velocities(net, x_s, s, y, cfg)
        d_net = toy_2d.network_direction(v_fake, v_real, s)
        d_exact = (toy_2d.generator_density(x_s, y, s, ref, ref_y)[1]
                   - toy_2d.data_density(x_s, y, s, "ring")[1])
        cos = toy_2d.cosine(d_net, d_exact)
        # float32 round trip through the "network": agreement to ~1e-4, not to machine precision
        assert (cos - expected).abs().max().item() < 1e-3


# --- 7-10. training, pipeline and command line ----------------------------------------------------


def test_toy_finetune_trains_with_the_loss_it_is_given():
    """finetune(..., loss=f) calls f at every step with the variant's config (None: apex_min's)."""
    settings = toy_2d.parse_settings(["--fast", "--steps", "4", "--checkpoints", "1"])
    calls = []

    def loss(net, ema, x, y, cfg):
        calls.append(cfg.objective)
        return apex_min.training_loss(net, ema, x, y, cfg)

    out = toy_2d.finetune("consistency", toy_2d.pretrain(settings), settings, loss=loss)
    assert calls == ["consistency"] * 4
    assert math.isfinite(out["rows"]["consistency@1"][0]["sw1"])


def test_toy_pipeline_end_to_end_at_test_size(tmp_path, capsys):
    result = toy_2d.main(["--fast", "--out", str(tmp_path)])
    png, js = tmp_path / "assets" / "toy_2d.png", tmp_path / "results" / "toy_2d.json"
    assert png.exists() and os.path.getsize(png) < 300 * 1024
    saved = json.loads(js.read_text())
    assert saved["rows"] == ["target", "fm@10", "fm@1", "consistency@1", "apex@1", "paper@1", "paper@10"]
    for row in saved["rows"]:
        for name in ("ring", "grid"):
            assert all(math.isfinite(v) for v in saved["summary"][row][name]["sw1"])
    first = saved["alignment"]["apex"]["final_members"][0]
    # D* and 1 - D* are two weights of one sample: 10^a + 10^b = 1 at every quantile's median
    assert abs(10 ** first["log10_d"]["quantiles_1_10_50_90_99"][2]
               + 10 ** first["log10_1md"]["quantiles_1_10_50_90_99"][2] - 1) < 0.2
    # the comparisons are measurements of the summary, recomputed here from the saved record
    apex, cons = (saved["summary"][row]["grid"]["sw1"] for row in ("apex@1", "consistency@1"))
    gap = saved["comparisons"]["grid: consistency@1 - apex@1 (sw1)"]
    assert gap == {"value": round(cons[0] - apex[0], 4), "spread": round(max(apex[1], cons[1]), 4)}
    printed = capsys.readouterr().out
    assert f"grid: consistency@1 - apex@1 (sw1): {gap['value']} (spread" in printed
    assert "_figure" in result and "_figure" not in saved


def test_toy_lora_starts_at_the_base_and_trains_only_adapters():
    toy_tuning = _experiment("toy_tuning")
    torch.manual_seed(0)
    net = toy_2d.ToyMLP(2, members=2, width=16, depth=2)
    with torch.no_grad():
        for p in net.parameters():          # leave the zero init: make every path non-trivial
            p.add_(0.1 * torch.randn_like(p))
    x, y = _ensemble_batch(2, per_member=12)
    t = torch.rand(len(x))
    before = net(x, t, t / 2, net.embed_class(y))
    lora = toy_tuning.add_lora_toy(copy.deepcopy(net), rank=3)
    assert torch.equal(lora(x, t, t / 2, lora.embed_class(y)), before)       # B = 0: exactly the base
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("tt_embed") for n in trainable)
    lora(x, t, t / 2, lora.embed_class(y)).sum().backward()
    assert all(p.grad is None for n, p in lora.named_parameters() if n not in trainable)


class _DataAsGenerator:
    """A stand-in network whose one-step samples are exact data samples of each row's class, from
    the mixture of the row's ensemble member (row i belongs to member i % M)."""
    num_classes = 2

    def __init__(self, names):
        self.names = names

    def embed_class(self, y):
        return y

    def __call__(self, z, t, tt, c):
        out, member = torch.empty_like(z), torch.arange(len(z)) % len(self.names)
        for m, name in enumerate(self.names):
            rows = member == m
            out[rows] = z[rows] - toy_2d.sample_toy(name, int(rows.sum()), y=c[rows])[0]
        return out


def test_toy_ladder_oracle_fake_velocity_matches_the_data_when_the_generator_is_exact():
    """The oracle's v_fake comes from the empirical mixture of the generator's samples of each
    row's own member and class: for a generator that samples the data exactly it must match the
    exact v_real. Rows paired with another member's or class's samples would not."""
    toy_ladder = _experiment("toy_ladder")
    names = ["ring", "ring", "grid"]
    torch.manual_seed(0)
    net, oracle = _DataAsGenerator(names), toy_ladder.Oracle(names, "both", n_ref=4096)
    y = torch.arange(96) % 2
    x0 = torch.cat([toy_2d.sample_toy(names[i % 3], 1, y=y[i:i + 1])[0] for i in range(96)])
    s = 0.3 + 0.4 * torch.rand(96)
    x_s = apex_min.interpolate(x0, torch.randn_like(x0), s)
    v_fake, v_real = oracle(net, x_s, s, y, apex_min.Config())
    error = (v_fake - v_real).norm(dim=1).mean() / v_real.norm(dim=1).mean()
    assert error < 0.05, error
    for wrong in (["grid", "grid", "ring"], "classes"):      # another member's or class's samples
        net = _DataAsGenerator(names if wrong == "classes" else wrong)
        if wrong == "classes":
            net.embed_class = lambda labels: 1 - labels
        oracle.calls = 0                                      # fresh reference samples
        v_fake, v_real = oracle(net, x_s, s, y, apex_min.Config())
        assert (v_fake - v_real).norm(dim=1).mean() / v_real.norm(dim=1).mean() > 0.2, wrong


def test_toy_modes_metrics_read_mass_and_spread_off_known_samples():
    toy_modes = _experiment("toy_modes")
    g = torch.Generator().manual_seed(0)
    y = torch.arange(8000) % 2
    x, _ = toy_2d.sample_toy("ring", len(y), generator=g, y=y)
    exact = toy_modes.mode_metrics(x, y, "ring")
    assert exact["mass_tv"] < 0.03 and abs(exact["spread"] - 1.38) < 0.05 and exact["bridge"] < 0.02
    assert exact["offset"] < 0.1
    mix = toy_2d.toy_mixture("ring")
    first = torch.stack([(mix["classes"] == k).nonzero()[0, 0] for k in (0, 1)])   # one mode a class
    piled = mix["means"][first[y]] + 0.5 * mix["std"] * torch.randn(len(y), 2, generator=g)
    piled_q = toy_modes.mode_metrics(piled, y, "ring")
    assert abs(piled_q["mass_tv"] - 0.75) < 1e-9 and abs(piled_q["spread"] - 0.5 * 1.414) < 0.03
    moved = toy_modes.mode_metrics(x + torch.tensor([0.5 * mix["std"], 0.0]), y, "ring")
    assert abs(moved["offset"] - 0.5) < 0.05 and abs(moved["spread"] - exact["spread"]) < 0.05
    assert piled_q["sw1"] > exact["sw1"]


def test_toy_ladder_ahead_rungs_update_the_fake_branch_at_test_size(tmp_path):
    """--rungs ahead: each NAME/ahead4 rung has NAME's settings and pretrained ensemble and takes the
    extra fake-only updates, so its samples differ from NAME's; its alignment is measured."""
    toy_ladder = _experiment("toy_ladder")
    done = subprocess.run([sys.executable, "experiments/toy_ladder.py", "--rungs", "ahead", "--fast", "--out",
                           str(tmp_path)], cwd=HERE, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rungs = json.loads((tmp_path / "results" / "toy_fake_ahead.json").read_text())["rungs"]
    assert list(rungs) == list(toy_ladder.AHEAD) and len(toy_ladder.AHEAD_ONLY) == 12
    for name in toy_ladder.AHEAD_ONLY:
        base = toy_ladder.AHEAD_RUNGS[name][0]
        assert rungs[name]["settings"] == rungs[base]["settings"]
        assert rungs[name]["ring"]["sw1"] != rungs[base]["ring"]["sw1"]
        assert "by_s" in rungs[name]["ring"]


def test_toy_ladder_separate_fake_network_at_test_size(tmp_path):
    """--rungs separate: NAME/sepK takes v_fake from a second network trained on the generator's
    samples; only the term sees it, so its samples differ from NAME's while gen0's do not change."""
    toy_ladder = _experiment("toy_ladder")
    done = subprocess.run([sys.executable, "experiments/toy_ladder.py", "--rungs", "separate", "--fast", "--out",
                           str(tmp_path)], cwd=HERE, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rungs = json.loads((tmp_path / "results" / "toy_fake_separate.json").read_text())["rungs"]
    assert list(rungs) == list(toy_ladder.SEPARATE)
    for name, (base, _) in toy_ladder.SEPARATE_RUNGS.items():
        assert rungs[name]["ring"]["sw1"] != rungs[base]["ring"]["sw1"]
        shared, term = rungs[name]["ring"]["by_s_shared"]["0.0-0.2"], rungs[name]["ring"]["by_s_separate"]["0.0-0.2"]
        assert term["err_real"] == shared["err_real"] and term["signal"] == shared["signal"]   # same draws
        assert term["err_fake"] != shared["err_fake"]                  # another v_fake
    assert "by_s_separate" not in rungs["apex_released"]["ring"]


def test_separate_fake_network_gives_v_fake_and_the_live_real_branch():
    """SeparateFake's velocities: v_fake is the separate network's flow velocity at (x_s, s), v_real
    the live network's real branch, as shifted_velocities returns it."""
    toy_ladder = _experiment("toy_ladder")
    settings = toy_2d.parse_settings(["--fast"])
    pretrained = toy_2d.pretrain(settings)
    sep = toy_ladder.SeparateFake(pretrained, settings, updates=1)
    net, _ = toy_2d.build(settings, len(toy_2d.member_names(settings)))
    torch.manual_seed(3)
    x_s, s, y = torch.randn(8, 2), torch.rand(8), torch.arange(8) % 2
    cfg = toy_2d.toy_config("apex")
    v_fake, v_real = sep(net, x_s, s, y, cfg)
    torch.testing.assert_close(v_real, apex_min.shifted_velocities(net, x_s, s, y, cfg)[1])
    torch.testing.assert_close(v_fake, sep.net(x_s, s, s, sep.net.embed_class(y)))
    before = [p.clone() for p in net.parameters()]
    sep.update(net, y, cfg, step=0)            # trains the separate network, never the generator
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert not torch.allclose(sep(net, x_s, s, y, cfg)[0], v_fake)


def test_toy_grid_start_script_at_test_size(tmp_path):
    """experiments/toy_grid_start.py: four grids from the same noise; its 0.999 rows at 1 NFE are
    toy_2d's own 1-NFE rows, and starting at t = 1 moves the samples (other numbers)."""
    done = subprocess.run([sys.executable, "experiments/toy_grid_start.py", "--fast", "--out", str(tmp_path)],
                          cwd=HERE, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "results" / "toy_grid_start.json").read_text())
    grid_start = _experiment("toy_grid_start")
    assert record["same_as_toy_2d"] and set(record["rows"]) == set(grid_start.VARIANTS)
    for rows in record["rows"].values():
        assert list(rows) == list(grid_start.GRIDS)
        assert rows["1 NFE from 1"]["ring"] != rows["1 NFE from 0.999"]["ring"]
    assert "equal toy_2d's: True" in done.stdout


def test_toy_modes_script_at_test_size(tmp_path):
    done = subprocess.run([sys.executable, "experiments/toy_modes.py", "--fast", "--out", str(tmp_path)],
                          cwd=HERE, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "results" / "toy_modes.json").read_text())
    toy_modes = _experiment("toy_modes")
    assert list(record["rows"]) == ["target", *toy_modes.RUNGS, *[f"{n}@2" for n in toy_modes.RUNGS]]
    for row in record["rows"].values():
        assert set(row) == {"ring", "grid"} and set(row["ring"]) == set(toy_modes.METRICS)
    for n in toy_modes.RUNGS:                   # a second step moves the samples: other numbers
        assert record["rows"][f"{n}@2"]["ring"]["sw1"] != record["rows"][n]["ring"]["sw1"]


def test_shapes_study_valid_images_hold_every_drawn_image_and_the_metrics_rank_known_samples():
    """experiments/shapes_study.py: every image make_shapes draws, flipped or not, is one of its
    class's valid images; data draws score atom_rmse 0 and colour 1; a blurred copy scores worse
    in sw1 and atom_rmse, and a copy collapsed onto one place worse in place_tv."""
    study = _experiment("shapes_study")
    atoms = study.valid_images()
    assert atoms.shape == (10, 144, 3, 16, 16)
    x, y = study.data_distribution(seed=1)
    for k in range(10):
        idx, dist = study.nearest(x[y == k], atoms[k])
        assert dist.max() < 1e-6
    data = study.data_row(seed=1, n_per_class=60)
    assert data["atom_rmse"] < 1e-6 and data["colour"] == 1.0
    g = torch.Generator().manual_seed(0)
    picks = torch.cat([torch.nonzero(y == k)[:60, 0] for k in range(10)])
    xs, ys = x[picks], y[picks]
    blurred = torch.nn.functional.avg_pool2d(xs, 5, stride=1, padding=2, count_include_pad=False)
    blur, sharp = study.scores(blurred, ys, x, y, atoms), study.scores(xs, ys, x, y, atoms)
    assert blur["sw1"] > 1.5 * sharp["sw1"] and blur["atom_rmse"] > 0.1 and sharp["atom_rmse"] < 1e-6
    collapsed = study.scores(atoms[ys, torch.zeros_like(ys)], ys, x, y, atoms)
    assert collapsed["atom_rmse"] < 1e-6 and collapsed["place_tv"] > 0.9 > data["place_tv"]
    wrong = study.scores(atoms[(ys + 1) % 10, torch.randint(144, ys.shape, generator=g)], ys, x, y, atoms)
    assert wrong["colour"] == 0.0


@slow
def test_shapes_study_script_at_test_size(tmp_path):
    """python experiments/shapes_study.py --fast: every arm and the flow stage scored at both
    samplers, the figure written; a second call reuses the finished runs (no training), and so does
    one with --arms, whose record holds those arms only, scored as before."""
    cmd = [sys.executable, "experiments/shapes_study.py", "--fast", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=HERE, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    study = _experiment("shapes_study")
    record = json.loads((tmp_path / "results" / "shapes_study.json").read_text())
    rows = record["rows"]["20"]
    assert list(rows) == ["flow", *study.FIVE, "data"]
    assert set(rows["flow"]["0"]) == {"euler", "1"} and set(rows["apex"]["0"]) == {"1", "2"}
    assert set(rows["apex"]["0"]["1"]) == set(study.METRICS)
    assert (tmp_path / "assets" / "shapes_study.png").stat().st_size > 1000
    log = tmp_path / "runs" / "shapes_study" / "steps20" / "seed0" / "apex" / "train.log"
    size = log.stat().st_size
    again = subprocess.run(cmd + ["--report"], cwd=HERE, env=SUBPROCESS_ENV, capture_output=True, text=True)
    assert again.returncode == 0 and "| apex_best - polish/gen0 | 1 |" in again.stdout
    again = subprocess.run(cmd, cwd=HERE, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and log.stat().st_size == size       # nothing trained again
    some = subprocess.run(cmd + ["--arms", "apex", "gen0"], cwd=HERE, env=SUBPROCESS_ENV, capture_output=True,
                          text=True, timeout=300)                    # a subset: its own record, its pairs
    assert some.returncode == 0 and log.stat().st_size == size
    part = json.loads((tmp_path / "results" / "shapes_study_arms-apex-gen0.json").read_text())["rows"]["20"]
    assert list(part) == ["flow", "apex", "gen0", "data"] and part["apex"] == rows["apex"]
    assert "| apex - gen0 | 1 |" in some.stdout and "consistency" not in some.stdout
    bad = subprocess.run(cmd[:2] + ["--steps", "5"], cwd=HERE, env=SUBPROCESS_ENV, capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    probe = [sys.executable, "experiments/shapes_probe.py", "--steps", "20", "--seeds", "0", "--out", str(tmp_path)]
    done = subprocess.run(probe + ["--n-per-class", "3"], cwd=HERE, env=SUBPROCESS_ENV, capture_output=True,
                          text=True, timeout=300)                    # the probe reads these runs
    assert done.returncode == 0, done.stderr[-2000:]
    probed = json.loads((tmp_path / "results" / "shapes_probe_steps20.json").read_text())["rows"]["0"]
    assert list(probed) == [*_experiment("shapes_probe").FAKE_ARMS[:4], "data"]   # polish, small_s: untrained
    one = subprocess.run(probe + ["--n-per-class", "3", "--arms", "apex"], cwd=HERE, env=SUBPROCESS_ENV,
                         capture_output=True, text=True, timeout=300)   # one arm again: the others stay
    kept = json.loads((tmp_path / "results" / "shapes_probe_steps20.json").read_text())["rows"]["0"]
    assert one.returncode == 0 and set(kept) == set(probed) and kept["gen0"] == probed["gen0"]
    assert list(kept)[-2:] == ["apex", "data"]
    report = subprocess.run(probe + ["--report"], cwd=HERE, env=SUBPROCESS_ENV, capture_output=True, text=True)
    assert report.returncode == 0 and report.stdout.count("| 0 | apex_best |") == 2 and "real_err" in report.stdout
    bad = subprocess.run(probe[:4] + ["40", "--out", str(tmp_path)], cwd=HERE, env=SUBPROCESS_ENV,
                         capture_output=True, text=True)              # no runs of that length
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    signs = [sys.executable, "experiments/collapse_signs.py", "--out", str(tmp_path)]
    done = subprocess.run(signs, cwd=HERE, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "results" / "collapse_signs.json").read_text())["rows"]
    assert [r["run"] for r in rows] == ["steps20/seed0/apex", "steps20/seed0/apex_best"]   # the term's runs
    assert rows[0]["min_fake"] is None and "| shapes | steps20/seed0/apex | 8 | - | - | - |" in done.stdout
    gone = tmp_path / "runs" / "shapes_study" / "steps20" / "seed0" / "apex_best"
    shutil.rmtree(gone)      # a run whose log is not here keeps its row; the others are read again
    again = subprocess.run(signs, cwd=HERE, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "kept from it: 1 row(s)" in again.stdout, again.stderr[-2000:]
    assert json.loads((tmp_path / "results" / "collapse_signs.json").read_text())["rows"] == rows


def test_shapes_study_net_trains_every_stage_with_that_network(tmp_path):
    """--net DIMxDEPTH: the flow stage and the arms get that network (DIM / 32 heads), in their own
    folders and record; a malformed value is one line and exit 2."""
    cmd = [sys.executable, "experiments/shapes_study.py", "--fast", "--arms", "gen0", "--out", str(tmp_path)]
    done = subprocess.run(cmd + ["--net", "32x1"], cwd=HERE, env=SUBPROCESS_ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for stage in ("flow", "gen0"):
        cfg = json.loads((tmp_path / "runs/shapes_study/steps20_net32x1/seed0" / stage / "config.json").read_text())
        assert (cfg["dim"], cfg["depth"], cfg["heads"]) == (32, 1, 1)
    record = json.loads((tmp_path / "results" / "shapes_study_arms-gen0_net32x1.json").read_text())
    assert record["net"] == "32x1" and not (tmp_path / "runs/shapes_study/steps20").exists()
    probe = subprocess.run([sys.executable, "experiments/shapes_probe.py", "--steps", "20", "--seeds", "0",
                            "--net", "32x1", "--n-per-class", "3", "--out", str(tmp_path)],
                           cwd=HERE, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0 and "| 0 | gen0 |" in probe.stdout, probe.stderr[-2000:]
    assert json.loads((tmp_path / "results" / "shapes_probe_steps20_net32x1.json").read_text())["net"] == "32x1"
    for bad in ("48x2", "128", "0x2"):
        out = subprocess.run(cmd + ["--net", bad], cwd=HERE, env=SUBPROCESS_ENV, capture_output=True, text=True)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_shapes_study_batch_trains_the_apex_stages_at_that_batch(tmp_path):
    """--batch B: the APEX stages train at batch B and the flow stage at the tiny preset's 64, in
    their own folders and record, which shapes_probe.py --batch reads; a batch below 8 is one line
    and exit 2."""
    cmd = [sys.executable, "experiments/shapes_study.py", "--fast", "--arms", "gen0", "--out", str(tmp_path)]
    done = subprocess.run(cmd + ["--batch", "32"], cwd=HERE, env=SUBPROCESS_ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    where = tmp_path / "runs/shapes_study/steps20_b32/seed0"
    assert [json.loads((where / stage / "config.json").read_text())["batch_size"] for stage in ("flow", "gen0")] \
        == [64, 32]
    record = json.loads((tmp_path / "results" / "shapes_study_arms-gen0_b32.json").read_text())
    assert record["batch"] == 32 and not (tmp_path / "runs/shapes_study/steps20").exists()
    probe = subprocess.run([sys.executable, "experiments/shapes_probe.py", "--steps", "20", "--seeds", "0",
                            "--batch", "32", "--n-per-class", "3", "--out", str(tmp_path)],
                           cwd=HERE, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0 and "| 0 | gen0 |" in probe.stdout, probe.stderr[-2000:]
    assert json.loads((tmp_path / "results" / "shapes_probe_steps20_b32.json").read_text())["batch"] == 32
    out = subprocess.run(cmd + ["--batch", "4"], cwd=HERE, env=SUBPROCESS_ENV, capture_output=True, text=True)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_shapes_study_pool_joins_the_seeds_of_several_records(tmp_path):
    """shapes_study.py --pool: a record split by seed into two files gives the table of the whole
    record again, and so does one split by arm (the flow stage and data rows in both); a record
    whose flow stage of a seed differs from an earlier record's (another teacher) is left out and
    named; a seed whose other rows differ between two records is one line and exit 2, no table;
    --figure plots the records, and asks for --pool."""
    study = _experiment("shapes_study")
    whole = json.loads((HERE / "results" / "shapes_study.json").read_text())
    parts = [{"rows": {s: {arm: {k: v for k, v in by_seed.items() if (k == "2") == last}
                           for arm, by_seed in by_arm.items()} for s, by_arm in whole["rows"].items()}}
             for last in (False, True)]
    assert study.table(study.pooled(parts)) == study.table(whole)
    assert "(3/3)" in study.table(whole) and "(2/2)" not in study.table(whole)
    by_arm = [{"rows": {s: {arm: by_seed for arm, by_seed in arms.items()
                            if arm in ("flow", "data") or (arm in ("apex", "gen0")) == first}
                        for s, arms in whole["rows"].items()}} for first in (True, False)]
    assert study.table(study.pooled(by_arm)) == study.table(whole)
    clash = json.loads(json.dumps(parts[1]))
    clash["rows"]["1500"]["flow"]["2"]["1"]["sw1"] += 1e-4     # the same seed's flow stage, another number
    files = []
    for i, part in enumerate(parts + [clash]):
        files.append(tmp_path / f"part{i}.json")
        files[-1].write_text(json.dumps(part))
    cmd = [sys.executable, "experiments/shapes_study.py", "--pool"]
    done = subprocess.run(cmd + [str(f) for f in files[:2]], cwd=HERE, env=SUBPROCESS_ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == study.table(whole).strip()
    done = subprocess.run(cmd + [str(f) for f in files], cwd=HERE, env=SUBPROCESS_ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and f"of seeds an earlier record has: {files[2]}" in done.stdout
    assert done.stdout.strip().endswith(study.table(whole).strip())
    other_arm = json.loads(json.dumps(parts[1]))
    other_arm["rows"]["1500"]["apex"]["2"]["1"]["sw1"] += 1e-4     # the same flow stage, another apex
    files[2].write_text(json.dumps(other_arm))
    done = subprocess.run(cmd + [str(f) for f in files], cwd=HERE, env=SUBPROCESS_ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == "" and "in two records that differ" in done.stderr
    assert "Traceback" not in done.stderr
    wide = tmp_path / "wide.json"        # another network's record is left out, and named
    wide.write_text(json.dumps({**clash, "net": "128x2"}))
    done = subprocess.run(cmd + [str(f) for f in files[:2]] + [str(wide)], cwd=HERE, env=SUBPROCESS_ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and f"(--net, --batch pick them): {wide}" in done.stdout
    assert done.stdout.strip().endswith(study.table(whole).strip())
    done = subprocess.run(cmd + [str(wide), "--net", "128x2"], cwd=HERE, env=SUBPROCESS_ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == study.table(study.pooled([clash])).strip()
    done = subprocess.run(cmd + [str(wide)], cwd=HERE, env=SUBPROCESS_ENV, capture_output=True, text=True)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    figure = tmp_path / "lengths.png"                 # the paired sliced W1 against the length
    done = subprocess.run(cmd + [str(f) for f in files[:2]] + ["--figure", str(figure)], cwd=HERE,
                          env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and figure.stat().st_size > 1000
    done = subprocess.run(cmd[:2] + ["--figure", str(figure)], cwd=HERE, env=SUBPROCESS_ENV,
                          capture_output=True, text=True, timeout=120)   # no records to plot
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1


def test_shapes_net_cifar_trains_the_tiny_network_on_cifar_images(tmp_path):
    """experiments/shapes_net_cifar.py --fast: every stage is the tiny preset's network and batch on
    32x32 CIFAR-10 pickles in 4x4 patches (not the cifar preset that --dataset cifar alone brings);
    the record scores every arm, the term's run has its collapse signs, --report and --pool print
    the table, --net trains another network into its own runs and record (never pooled with the
    default's), and a bad --net or a missing data folder is one line."""
    write_fake_cifar(tmp_path, n=40)
    cmd = [sys.executable, "experiments/shapes_net_cifar.py", "--fast", "--data-dir", str(tmp_path),
           "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    where = tmp_path / "runs/shapes_net_cifar/steps20/seed0"
    for stage, steps in (("flow", 12), ("small_s", 8), ("gen0", 8)):
        cfg = json.loads((where / stage / "config.json").read_text())
        assert (cfg["preset"], cfg["dataset"], cfg["image_size"], cfg["patch_size"]) == ("tiny", "cifar", 32, 4)
        assert (cfg["dim"], cfg["depth"], cfg["batch_size"], cfg["max_steps"]) == (64, 2, 64, steps)
        assert cfg["polish_from"] == 0 and cfg["minutes"] == 0 and not cfg["compile"]
    path = tmp_path / "results" / "shapes_net_cifar_steps20_seeds0.json"
    record = json.loads(path.read_text())
    rows = record["rows"]["20"]
    assert list(rows) == ["flow", "small_s", "gen0", "data"]
    assert set(rows["flow"]["0"]) == {"euler", "1"} and set(rows["small_s"]["0"]) == {"1", "2"}
    assert all(v > 0 for r in (rows["small_s"]["0"]["1"], rows["data"]["0"]["1"]) for v in r.values())
    assert record["signs"]["small_s"]["0"]["term_steps"] == 8 and record["signs"]["gen0"]["0"] == {}
    report = subprocess.run([*cmd, "--report"], cwd=HERE, capture_output=True, text=True)
    assert report.returncode == 0 and "| small_s | 1 |" in report.stdout and "collapse signs" in report.stdout
    other = json.loads(path.read_text())
    for part in (other["rows"]["20"].values(), other["signs"].values()):
        for by_seed in part:
            by_seed["7"] = by_seed.pop("0")
    (tmp_path / "other.json").write_text(json.dumps(other))
    pool = subprocess.run([sys.executable, "experiments/shapes_net_cifar.py", "--pool", str(path),
                           str(tmp_path / "other.json")], cwd=HERE, capture_output=True, text=True)
    assert pool.returncode == 0 and "per seed 0, 7" in pool.stdout and "(0/2 seeds below 0)" in pool.stdout
    more = subprocess.run([*cmd, "--arms", "apex"], cwd=HERE, capture_output=True, text=True, timeout=300)
    assert more.returncode == 0, more.stderr[-2000:]
    arms = tmp_path / "results" / "shapes_net_cifar_steps20_seeds0_arms-apex.json"
    assert list(json.loads(arms.read_text())["rows"]["20"]) == ["flow", "apex", "data"]
    assert json.loads(path.read_text()) == record   # the default arms' record is left as it was
    both = subprocess.run([sys.executable, "experiments/shapes_net_cifar.py", "--pool", str(path), str(arms)],
                          cwd=HERE, capture_output=True, text=True)
    assert "| apex | 1 |" in both.stdout and "apex - gen0, sliced W1 at 1 NFE" in both.stdout
    small = subprocess.run([*cmd, "--arms", "gen0", "--net", "32x1"], cwd=HERE, capture_output=True, text=True,
                           timeout=300)
    assert small.returncode == 0, small.stderr[-2000:]
    for stage in ("flow", "gen0"):   # another network: its own runs and record
        cfg = json.loads((tmp_path / f"runs/shapes_net_cifar/steps20_net32x1/seed0/{stage}/config.json").read_text())
        assert (cfg["dim"], cfg["depth"], cfg["heads"]) == (32, 1, 1)
    net = tmp_path / "results" / "shapes_net_cifar_steps20_seeds0_arms-gen0_net32x1.json"
    assert json.loads(net.read_text())["net"] == "32x1"
    mixed = subprocess.run([sys.executable, "experiments/shapes_net_cifar.py", "--pool", str(path), str(net)],
                           cwd=HERE, capture_output=True, text=True)
    assert mixed.returncode == 2 and "different lengths or networks" in mixed.stderr
    bad = subprocess.run([*cmd, "--net", "100x2"], cwd=HERE, capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--net 100x2" in bad.stderr
    (tmp_path / "a_file").write_text("")   # no folder can be made there: fails before any download
    missing = subprocess.run([sys.executable, "experiments/shapes_net_cifar.py", "--fast", "--out", str(tmp_path),
                              "--data-dir", str(tmp_path / "a_file")], cwd=HERE, capture_output=True, text=True)
    assert missing.returncode != 0 and len(missing.stderr.strip().splitlines()) == 1
    assert "cifar-10-batches-py" in missing.stderr


def test_shapes_net_cifar_scores_rank_data_above_a_blank_image():
    """shapes_net_cifar.scores: draws of a class's own images score a lower sliced W1 than one
    blank image per sample, whose contrast and spread are 0."""
    snc = _experiment("shapes_net_cifar")
    g = torch.Generator().manual_seed(0)
    images = [(torch.rand(200, 3, 32, 32, generator=g) * 40 + 20 * k).to(torch.uint8) for k in range(10)]
    data_q = snc.data_quantiles(images)
    y = torch.arange(10).repeat_interleave(50)
    x = torch.cat([xk[:50] for xk in images]).float() / 127.5 - 1
    blank = torch.zeros_like(x) + x.mean()
    real, flat = snc.scores(x, y, data_q), snc.scores(blank, y, data_q)
    assert real["sw1"] < 0.2 * flat["sw1"] and flat["contrast"] == 0 and flat["spread"] == 0
    assert real["contrast"] > 0.05


def test_shapes_real_branch_gives_the_generator_term_another_v_real(tmp_path, capsys):
    """experiments/shapes_real_branch.py: its `velocities` return the network's fake branch and the
    data's exact velocity (at a training image and small s: z - x), or a frozen network's velocity
    (the live network's own real branch when it is that network); without the study's small_s run
    it stops with one line; at test size it trains both arms beside small_s and scores them."""
    branch, study = _experiment("shapes_real_branch"), _experiment("shapes_study")
    data_x, data_y = study.data_distribution(0)
    cfg = apex_min.Config()
    torch.manual_seed(0)
    net = apex_min.build_model(cfg)
    x, y, z = data_x[:4], data_y[:4], torch.randn(4, 3, 16, 16)
    s = torch.tensor([0.01, 0.01, 0.02, 0.02])
    x_s = (1 - s.view(-1, 1, 1, 1)) * x + s.view(-1, 1, 1, 1) * z
    with torch.no_grad():
        v_fake, v_real = branch.exact_real(data_x, data_y)(net, x_s, s, y, cfg)
        fake_branch, real_branch = apex_min.shifted_velocities(net, x_s, s, y, cfg)
        v_fake2, v_teacher = branch.teacher_real(net)(net, x_s, s, y, cfg)
    assert torch.allclose(v_real, z - x, atol=1e-3) and torch.allclose(v_fake, fake_branch, atol=1e-5)
    assert torch.allclose(v_teacher, real_branch, atol=1e-5) and torch.equal(v_fake2, v_fake)
    with pytest.raises(SystemExit) as stop:
        branch.main(["--fast", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--arms small_s" in err and len(err.strip().splitlines()) == 1
    done = subprocess.run([sys.executable, "experiments/shapes_study.py", "--fast", "--arms", "small_s", "--out",
                           str(tmp_path)], cwd=HERE, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = branch.main(["--fast", "--out", str(tmp_path), "--workers", "1"])   # in this process
    assert apex_min.training_loss is branch.TRAINING_LOSS   # the default loss again
    assert list(record["rows"]["0"]) == ["small_s", "small_s/exact", "small_s/teacher"]
    for arm in ("small_s_exact", "small_s_teacher"):
        assert study.finished(str(tmp_path / "runs" / "shapes_study" / "steps20" / "seed0" / arm))


def test_shapes_probe_sees_blank_samples_and_a_branch_blind_to_the_class():
    """experiments/shapes_probe.py: contrast and spread are 0 for one blank image repeated and near
    the data's for data; the real branch's class dependence is > 0 for a network that reads the
    class and exactly 0 once its class embeddings are equal."""
    probe, study = _experiment("shapes_probe"), _experiment("shapes_study")
    data_x, data_y = study.data_distribution(0)
    x, y = probe.data_draws(0, 20)
    stats = cifar_demo.sample_stats(x, y)   # the probe's contrast and spread
    assert stats["contrast"] > 0.2 and stats["spread"] > 0.1
    blank = cifar_demo.sample_stats(torch.full_like(x, -0.8), y)
    assert blank == {"contrast": 0.0, "spread": 0.0, "saturation": 0.0}
    cfg = apex_min.Config()
    torch.manual_seed(0)
    net = apex_min.build_model(cfg)
    for p in net.parameters():
        p.data.normal_(0, 0.1)
    stats = probe.branch_stats(net, cfg, x, y)
    assert set(stats) == {str(s) for s in probe.S}
    assert all(v["class"] > 1e-4 and v["gap"] > 1e-4 for v in stats.values())
    net.class_embed.weight.data[:] = net.class_embed.weight.data[0]
    assert all(v["class"] == 0.0 and v["gap"] > 1e-4 for v in probe.branch_stats(net, cfg, x, y).values())
    z, s = torch.randn_like(x[:5]), 0.01   # a data image at small s: the exact velocity is z - x
    v_star = probe.exact_velocity((1 - s) * x[:5] + s * z, s, y[:5], data_x, data_y)
    assert torch.allclose(v_star, z - x[:5], atol=1e-4)
    with_data = probe.branch_stats(net, cfg, x, y, (data_x, data_y))["0.1"]
    assert with_data["exact"] > 1 and with_data["class_exact"] > 1 and with_data["real_err"] > 0


def test_collapse_signs_count_term_steps_from_the_switch_on():
    """experiments/collapse_signs.py: the onset is counted from the step the term switches on
    (`scheduled`), only logs with the term on count, a run above the floor has no onset, and the
    end gap is the last gap logged."""
    signs = _experiment("collapse_signs").signs
    log = [{"step": k, "fake": f, "gap": g} for k, f, g in
           ((100, 0.01, 0.5), (800, 0.30, 0.2), (900, 0.10, 0.004), (1000, 0.05, 0.002))]
    late = signs({"polish_from": 0.8, "max_steps": 1000}, log)   # on from step 800: 200 term steps
    assert late == {"term_steps": 200, "onset": 100, "min_fake": 0.05, "min_gap": 0.002, "end_gap": 0.002}
    throughout = signs({"polish_from": 0.0, "max_steps": 1000}, log)
    assert throughout["term_steps"] == 1000 and throughout["onset"] == 100 and throughout["min_fake"] == 0.01
    healthy = signs({"polish_from": 0.0, "max_steps": 1000}, [dict(r, fake=0.3) for r in log])
    assert healthy["onset"] is None and healthy["min_fake"] == 0.3
    assert signs({"polish_from": 0.0, "max_steps": 1000}, log[:3])["end_gap"] == 0.004   # the last one
    assert signs({"polish_from": 0.8, "max_steps": 1000}, log[:2])["min_fake"] is None   # none logged on


def test_collapse_signs_read_the_logged_contrast_where_the_logs_hold_it():
    """experiments/collapse_signs.py: with apex_loss's `contrast` in the log, the contrast onset is
    the term steps until it was first below FLAT, max_contrast and end_contrast its highest and
    last value with the term on, and the control's last over the same steps; logs without it give
    none of them."""
    cs = _experiment("collapse_signs")
    log = [{"step": k, "fake": 0.3, "gap": 0.01, "contrast": v} for k, v in
           ((100, 0.01), (800, 0.30), (900, 0.20), (1000, 0.05), (1100, 0.02))]
    out = cs.signs({"polish_from": 0.8, "max_steps": 1000}, log)   # on after step 800
    assert out["contrast_onset"] == 200 and out["max_contrast"] == 0.2 and out["end_contrast"] == 0.02
    assert cs.signs({"polish_from": 0.8, "max_steps": 1000}, log[:3])["contrast_onset"] is None
    assert "max_contrast" not in cs.signs({"polish_from": 0.0, "max_steps": 1000},
                                          [{k: v for k, v in r.items() if k != "contrast"} for r in log])
    control = [dict(r, contrast=0.3 - r["step"] / 1e4) for r in log]
    lagging = cs.lag({"config": {"polish_from": 0.8, "max_steps": 1000}, "log": log}, {"log": control})
    assert lagging["control_end_contrast"] == pytest.approx(0.19)   # the last of steps 900-1100


def test_collapse_signs_lag_compares_the_term_steps_with_the_control_of_the_same_flow_stage():
    """experiments/collapse_signs.py: a CIFAR-10 record's control (cifar_budget.control_of) is the
    run of the same flow stage, seed and guidance without the term (not another seed's, not the
    term's schedule alone); the lag is the fake loss over the term's steps over the control's at
    those steps, and a control that did not log them gives no lag."""
    cs = _experiment("collapse_signs")
    def record(seed, gen_weight, polish_from, fakes, fid, gap=True):
        log = [{"step": k, "fake": f, **({"gap": 0.01 * k / 100} if gap and k > 800 else {})}
               for k, f in zip((800, 900, 1000), fakes)]
        return {"config": {"seed": seed, "gen_weight": gen_weight, "polish_from": polish_from,
                           "max_steps": 1000},
                "flow_stage": {"config": {"out_dir": "runs/a/flow"}, "summary": {"step": 50}},
                "fid": {"fid": {"1 NFE": {"fid": fid}}}, "log": log}
    term = record(0, 0.5, 0.8, (0.4, 0.6, 0.9), 40.0)
    other_seed, schedule = record(1, 0.0, 0.0, (0.1, 0.1, 0.1), 1.0), record(0, 0.0, 0.8, (0.2, 0.2, 0.2), 2.0)
    control = record(0, 0.0, 0.0, (0.4, 0.5, 0.5), 50.0, gap=False)
    control_of = _experiment("cifar_budget").control_of
    assert control_of(term, [term, other_seed, schedule]) is None
    assert control_of(term, [term, other_seed, schedule, control]) is control
    unguided = {**control, "config": {**control["config"], "enr": 0.0}}   # another guidance strength
    assert control_of(term, [term, unguided]) is None
    assert cs.lag(term, control) == pytest.approx({"mean_gap": 0.095, "fake_lag": 1.5, "fid_gain": -10.0})
    control["log"] = control["log"][:2]                 # the control stopped before step 1000
    assert cs.lag(term, control) == {}


def test_collapse_signs_read_what_the_term_changed_in_the_samples_and_correlate_it():
    """experiments/collapse_signs.py: a CIFAR-10 run's d_contrast and d_spread are its 1-NFE
    samples' contrast and spread minus its control's (none where either FID lacks them), and the
    correlations are Pearson r within each budget and form of the term, with and without the
    guidance strength, over the rows that have both quantities (3 at least)."""
    cs = _experiment("collapse_signs")
    log = [{"step": 900, "fake": 0.4, "gap": 0.01}, {"step": 1000, "fake": 0.5, "gap": 0.02}]
    def record(fid, contrast, spread, gen_weight=0.5):
        return {"config": {"polish_from": 0.8, "max_steps": 1000, "gen_weight": gen_weight},
                "fid": {"fid": {"1 NFE": {"fid": fid, "contrast": contrast, "spread": spread}}}, "log": log}
    out = cs.lag(record(40.0, 0.38, 0.40), record(50.0, 0.40, 0.42, gen_weight=0.0))
    assert out == pytest.approx({"mean_gap": 0.015, "fake_lag": 1.0, "fid_gain": -10.0,
                                 "d_contrast": -0.02, "d_spread": -0.02})
    bare = record(50.0, 0.4, 0.4)
    del bare["fid"]["fid"]["1 NFE"]["spread"]
    assert "d_spread" not in cs.lag(record(40.0, 0.38, 0.40), bare)
    rows = [{"group": "g", "enr": enr, "fid_gain": gain, "d_spread": spread, "d_contrast": -spread,
             "fake_lag": 1 + spread} for enr, gain, spread in
            ((0.5, -10.0, 0.0), (0.5, -5.0, -0.05), (0.5, -8.0, -0.02), (0.0, 3.0, -0.06))]
    rows += [{"group": "g", "enr": 0.5, "fid_gain": -9.0, "fake_lag": 1.0}, {"run": "shapes"}]
    lines = cs.correlations(rows).splitlines()
    r = statistics.correlation([-10.0, -5.0, -8.0, 3.0], [0.0, -0.05, -0.02, -0.06])
    r5 = statistics.correlation([-10.0, -5.0, -8.0], [0.0, -0.05, -0.02])
    r_lag = statistics.correlation([-10.0, -5.0, -8.0, 3.0, -9.0], [1.0, 0.95, 0.98, 0.94, 1.0])
    assert lines[0] == (f"g: r fid_gain~d_spread {r:+.2f} (4), fid_gain~d_contrast {-r:+.2f} (4), "
                        f"fid_gain~fake_lag {r_lag:+.2f} (5), d_spread~fake_lag +1.00 (4)")
    assert lines[1].startswith(f"g, enr 0.5: r fid_gain~d_spread {r5:+.2f} (3)") and len(lines) == 2


def test_collapse_signs_pairs_a_shapes_arm_with_the_gen0_of_its_variant(tmp_path):
    """experiments/collapse_signs.py on the shapes: an arm's control is `gen0` of the same seed, or
    the `gen0` of its variant where the study pairs one (small_s/enr0 with gen0/enr0)."""
    cs = _experiment("collapse_signs")
    seed = tmp_path / "runs" / "shapes_study" / "steps1000" / "seed0"
    def run(folder, gen_weight, fake):
        (seed / folder).mkdir(parents=True)
        config = {"objective": "apex", "gen_weight": gen_weight, "polish_from": 0.0, "max_steps": 1000}
        (seed / folder / "config.json").write_text(json.dumps(config))
        (seed / folder / "summary.json").write_text(json.dumps({"stop": "max-steps"}))
        (seed / folder / "log.jsonl").write_text("".join(
            json.dumps({"step": k, "fake": fake, **({"gap": 0.1} if gen_weight else {})}) + "\n"
            for k in (500, 1000)))
    run("small_s", 0.5, 0.3), run("small_s_enr0", 0.5, 0.3), run("gen0", 0.0, 0.2), run("gen0_enr0", 0.0, 0.6)
    lags = {name: lagging for _, name, _, _, lagging in cs.runs(str(tmp_path))}
    assert lags["steps1000/seed0/small_s"]["fake_lag"] == 1.5
    assert lags["steps1000/seed0/small_s_enr0"]["fake_lag"] == 0.5


def test_grid_colour_reads_apex_min_grids(tmp_path, capsys):
    """experiments/grid_colour.py cuts a grid as apex_min.save_outputs writes it (10 a row, padding
    2) into its images, measures their saturation and finds the saturated red ones; a file that is
    no such grid: one line, exit 2."""
    from torchvision.utils import save_image
    grid_colour = _experiment("grid_colour")
    images = torch.full((100, 3, 32, 32), 0.4)
    images[:30] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)   # 30 red images
    images[30:40, :, :12] = torch.tensor([1.0, 0.1, 0.1]).view(3, 1, 1)   # 10 with a red band: 3/8
    images[40:50, :, :4] = torch.tensor([1.0, 0.1, 0.1]).view(3, 1, 1)    # 10 with a thin one: 1/8
    save_image(images, tmp_path / "g.png", nrow=10)
    tiles = grid_colour.tiles(str(tmp_path / "g.png"))
    assert tiles.shape == (100, 32, 32, 3)
    found = grid_colour.colour(tiles)
    assert found["red_images"] == 0.4 and found["red"] == round(0.3 + 0.1 * 12 / 32 + 0.1 * 4 / 32, 4)
    assert abs(found["mean_rgb"][1] - (0.4 * 0.7 - 0.3 * 0.1 * 16 / 32)) < 0.01   # the bands' g
    assert abs(found["saturation"] - (0.3 + 0.1 * 0.9 * 16 / 32)) < 0.005   # grey 0, red 1, bands 0.9
    two = torch.tensor([[[[0.5, 0.25, 0.25], [0.0, 0.0, 0.0]]]]).numpy()   # (max - min) / max; black: 0
    assert grid_colour.colour(two)["saturation"] == 0.25
    grid_colour.main([str(tmp_path / "g.png"), "--out", str(tmp_path)])
    assert json.loads((tmp_path / "results" / "grid_colour.json").read_text())["rows"][0]["red_images"] == 0.4
    save_image(images, tmp_path / "eight.png", nrow=8)
    with pytest.raises(SystemExit) as stop:
        grid_colour.main([str(tmp_path / "eight.png"), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "not a grid of 10" in err and len(err.strip().splitlines()) == 1


def test_toy_ladder_table_gives_the_generator_term_alone():
    """The ladder's table ends with apex_released - gen0 per mixture (the same rung with the
    generator term and without it, paired by seed), and leaves it out when a rung is missing."""
    toy_ladder = _experiment("toy_ladder")
    record = json.loads((HERE / "results" / "toy_ladder_steps12000.json").read_text())
    last = toy_ladder.table(record).splitlines()[-1]
    for target in ("ring", "grid"):
        d = [a - b for a, b in zip(record["rungs"]["apex_released"][target]["sw1"],
                                   record["rungs"]["gen0"][target]["sw1"])]
        mean, std = toy_2d.mean_std(d)
        assert last.startswith("apex_released - gen0") and f"{target} {mean:+.4f}+-{std:.4f}" in last
    del record["rungs"]["gen0"]
    assert "apex_released - gen0" not in toy_ladder.table(record)


def test_toy_ladder_script_at_test_size(tmp_path):
    """python experiments/toy_ladder.py --fast: the record holds every default rung with its
    per-seed metrics, and --report prints its table."""
    done = subprocess.run([sys.executable, "experiments/toy_ladder.py", "--fast", "--out", str(tmp_path)],
                          cwd=HERE, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "results" / "toy_ladder.json").read_text())
    toy_ladder = _experiment("toy_ladder")
    assert list(record["rungs"]) == [n for n in toy_ladder.RUNGS if n not in toy_ladder.EXTRA + toy_ladder.OTHERS]
    for name in ("consistency", "gen0", "apex_released", "oracle_both", "oracle_real", "oracle_fake",
                 "apex_best"):
        for target in ("ring", "grid"):
            assert set(record["rungs"][name][target]) >= {"sw1", "share3", "coverage"}
    assert (tmp_path / "assets" / "toy_ladder.png").is_file()
    done = subprocess.run([sys.executable, "experiments/toy_ladder.py", "--fast", "--rungs", "core", "--steps",
                           "12", "--out", str(tmp_path)], cwd=HERE, env=SUBPROCESS_ENV, capture_output=True,
                          text=True, timeout=120)                  # another length: its own record
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "results" / "toy_ladder_steps12.json").read_text())
    assert list(record["rungs"]) == list(toy_ladder.CORE) and record["settings"]["steps"] == 12
    done = subprocess.run([sys.executable, "experiments/toy_ladder.py", "--fast", "--rungs", "fake", "--out",
                           str(tmp_path)], cwd=HERE, env=SUBPROCESS_ENV, capture_output=True, text=True,
                          timeout=120)                             # the fake-share rungs: their own record
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "results" / "toy_fake_share.json").read_text())
    assert list(record["rungs"]) == list(toy_ladder.FAKE)
    assert record["rungs"]["apex_best/fake0.5"]["settings"]["fake_share"] == 0.5
    committed = toy_ladder.main(["--rungs", "fake", "--steps", "6000", "--report"])   # the committed record
    assert list(committed["rungs"]) == list(toy_ladder.FAKE) and committed["settings"]["steps"] == 6000


def test_results_cifar_ablation_tables_are_the_committed_record():
    """docs/results.md's tuning-ablation tables give, per arm, the per-seed FID and mean +- std of
    results/cifar_ablation.json at 1 and 2 NFE (1,000 steps, then 2,000), to the digits shown (the
    record keeps two decimals, so a shown digit may differ by that rounding too), and
    `cifar_ablation.py collect` rebuilds that record from the per-run records."""
    ablation = _experiment("cifar_ablation")
    merged = json.load(open(os.path.join(HERE, "results", "cifar_ablation.json")))
    assert ablation.merge() == merged
    text = open(os.path.join(HERE, "docs", "results.md")).read()
    for tag, digits, header in (("", 1, "| arm | flags"), ("-2k", 2, "| arm (2,000 steps) |")):
        table = text[text.index(header):].split("\n\n")[0]
        for arm in ("consistency", "gen0", "apex_released", "apex_best"):
            (row,) = [line for line in table.splitlines() if line.startswith(f"| `{arm}` |")]
            cells = [c.strip().strip("*") for c in row.split("|")[1:-1]]
            per_seed = [c for c in cells if c.count(" / ") == 2]          # 1 NFE, 2 NFE
            stats = [c for c in cells if " +- " in c]
            runs = sorted(merged["arms"][arm + tag], key=lambda r: r["seed"])
            assert [r["seed"] for r in runs] == [0, 1, 2] and len(per_seed) == len(stats) == 2, row
            for i, key in enumerate(("fid10k_nfe1", "fid10k_nfe2")):
                values = [r[key] for r in runs]
                shown = [float(v) for v in per_seed[i].split(" / ")]
                assert all(abs(x - y) <= 0.5 * 10 ** -digits + 0.005 for x, y in zip(shown, values)), row
                shown = [float(v) for v in stats[i].split(" +- ")]
                assert all(abs(x - y) <= 0.055 for x, y in zip(shown, ablation.mean_std(values))), row


def test_cifar_ablation_table_pairs_the_arms_by_seed():
    """`cifar_ablation.py table` gives each pair's per-seed differences (same teacher and seed) as
    mean +- std and the seeds where the first arm is lower, from the merged record."""
    ablation = _experiment("cifar_ablation")
    merged = json.load(open(os.path.join(HERE, "results", "cifar_ablation.json")))
    (line,) = [l for l in ablation.table(merged).splitlines() if l.startswith("apex_released-2k - gen0-2k ")]
    apex, gen0 = ({r["seed"]: r for r in merged["arms"][arm]} for arm in ("apex_released-2k", "gen0-2k"))
    for k in ("fid10k_nfe1", "fid10k_nfe2"):
        d = [apex[seed][k] - gen0[seed][k] for seed in (0, 1, 2)]
        mean, std = ablation.mean_std(d)
        assert f"{mean:+6.2f}+-{std:5.2f} ({sum(v < 0 for v in d)}/3)" in line, line


def test_profile_step_measures_a_step_and_names_its_variant(tmp_path, capsys, monkeypatch):
    profile = _experiment("profile_step")
    monkeypatch.setattr(apex_min.MLP, "forward", apex_min.MLP.forward)   # --plain-mlp replaces it
    record = profile.main(["--device", "cpu", "--tiny", "--warmup", "1", "--steps", "2", "--profile", "1",
                           "--batch-size", "24", "--plain-mlp", "--bf16-stream", "--peak-tflops", "100",
                           "--out", str(tmp_path)])
    assert record["variant"] == ["batch24", "plain-mlp", "bf16-stream"]
    assert record["peak_bf16_tflops"] == 100.0 and record["mfu"] is not None   # a given peak, on a CPU too
    assert set(record["mlp_fused_max_diff"]) == {"tanh", "none"}
    assert record["img_per_s"] > 0 and record["batch_size"] == 24 and record["profile_table"]
    assert record["self_time_table"] and abs(sum(record["time_shares"].values()) - 1) < 1e-3
    assert record["time_shares"]["matmul"] > 0          # the tiny DiT's linear layers, on the CPU
    cpu, gpu = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    events = [SimpleNamespace(key=k, device_type=d, self_cpu_time_total=c, self_device_time_total=g)
              for k, d, c, g in [("aten::addmm", cpu, 0, 50), ("nvjet_sm90_tst_bias_TNN", gpu, 0, 60),
                                 ("triton_poi_fused_gelu_view_16", gpu, 0, 20), ("Memset (Device)", gpu, 0, 10),
                                 ("cudnn_generated_sdpa_flash_fprop", gpu, 0, 10)]]   # CPU ops: not counted
    assert profile.time_shares(events, cuda=True) == {
        "matmul": 0.6, "attention": 0.1, "memset and copy": 0.1,
        "compiled elementwise and reductions": 0.2, "other": 0.0}
    assert json.load(open(tmp_path / "profile_apex_batch24_plain-mlp_bf16-stream.json"))["steps"] == 2
    with pytest.raises(SystemExit) as stop:   # a GPU-only option on a CPU: one line, exit 2
        profile.main(["--device", "cpu", "--tiny", "--sdpa", "flash"])
    assert stop.value.code == 2 and "needs a GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        profile.main(["--device", "cpu", "--tiny", "--peak-tflops", "-1"])
    assert stop.value.code == 2 and "--peak-tflops" in capsys.readouterr().err


def test_cifar_budget_merge_joins_the_curve_with_flow_matching_at_equal_minutes(tmp_path, monkeypatch):
    """experiments/cifar_budget.py: a two-stage record's budget and flow share come from its name
    and flow stage; the curve pairs the mean of the runs of the cifar preset's recipe (not another
    share; each run's FID under `runs`) with the `fm` run of the same minutes and with the mean of
    the runs without the term (`gen0`: not the schedule-only control, not another share; neither
    takes a run whose other settings differ from the preset, named in its recipe); a run's
    teacher FID comes from its record (TEACHER=1) or from teachers/NAME_flow.json; MFU is
    step_flops * img/s / peak, on the peak's GPU only."""
    budget = _experiment("cifar_budget")
    monkeypatch.setattr(budget, "RECORDS", str(tmp_path))
    def record(objective, minutes, fid, flow_minutes=None, euler=None, own_flow=True, gpu="G", **over):
        cfg = dataclasses.asdict(apex_min.Config(**{**apex_min.PRESETS["cifar"], "objective": objective,
                                                     "minutes": minutes, **over}))
        scores = {"1 NFE": {"fid": fid}, "2 NFE": {"fid": fid / 2}, **({"Euler 50": {"fid": euler}} if euler else {})}
        out = {"config": cfg, "env": {"gpu": gpu}, "fid": {"fid": scores},
               "summary": {"img_per_s_mean": 1000.0, "train_seconds": 60 * minutes, "step": 10}}
        if flow_minutes:   # its own flow stage (the total in its summary), or FLOW_FROM's (none)
            out["flow_stage"] = {"config": {"minutes": flow_minutes}, "summary": {"train_seconds": 60 * flow_minutes}}
            if own_flow:
                out["summary"]["train_seconds_total"] = 60 * (minutes + flow_minutes) + 1
        return out
    share = apex_min.PRESETS["cifar"]["flow_share"]
    for name, rec in (("a_split_5.5min", record("apex", 5.5 * 0.5, 30.0, flow_minutes=5.5 * 0.5)),
                      ("curve_5.5min", record("apex", 5.5 * (1 - share), 40.0, flow_minutes=5.5 * share)),
                      ("fm_5.5min", record("fm", 5.5, 300.0, euler=45.0)),
                      ("fm_11min", record("fm", 11, 250.0, euler=30.0)),
                      ("shared_5.5min", record("apex", 5.5 * (1 - share), 35.0, 5.5 * share, own_flow=False)),
                      ("b_fm_other_gpu_5.5min", record("fm", 5.5, 200.0, euler=40.0, gpu="H")),
                      ("enr0_5.5min", record("apex", 5.5 * (1 - share), 90.0, 5.5 * share, enr=0.0)),
                      ("g_enr0_5.5min", record("apex", 5.5 * (1 - share), 90.0, 5.5 * share, enr=0.0,
                                               gen_weight=0.0, polish_from=0.0)),
                      *((f"{name}_5.5min", record("apex", 5.5 * (1 - f), fid, 5.5 * f, gen_weight=0.0,
                                                   polish_from=p)) for name, fid, f, p in (
                          ("g1", 50.0, share, 0.0), ("g2", 54.0, share, 0.0), ("g_split", 10.0, 0.5, 0.0),
                          ("g_polish", 10.0, share, 0.8)))):
        if name == "g1_5.5min":
            rec["fid_teacher"] = {"fid": {"Euler 50": {"fid": 33.333}}}
        (tmp_path / f"{name}.json").write_text(json.dumps(rec))
    (tmp_path / "teachers").mkdir()
    (tmp_path / "teachers" / "g2_flow.json").write_text(json.dumps({"fid": {"Euler 50": {"fid": 44.0}}}))
    merged = budget.merge(peak=500.0, peak_gpu="G")
    teachers = {r["name"]: r["teacher_euler50"] for r in merged["runs"]}
    assert teachers["g1_5.5min"] == 33.33 and teachers["g2_5.5min"] == 44.0
    assert teachers["curve_5.5min"] is None
    (curve,) = merged["curve"]
    assert curve == {"minutes": 5.5, "recipe": curve["recipe"], "run": "curve_5.5min", "gpu": "G",
                     "fid10k": {"1": 37.5, "2": 18.75}, "fm_euler50": 45.0, "fm_nfe1": 300.0,
                     "runs": {"curve_5.5min": {"1": 40.0, "2": 20.0}, "shared_5.5min": {"1": 35.0, "2": 17.5}},
                     "fm_gpu": "G", "gen0": {"1": 52.0, "2": 26.0, "runs": ["g1_5.5min", "g2_5.5min"]}}
    assert curve["recipe"] == budget.preset_recipe()   # another setting is named: enr0 stays out
    assert next(r for r in merged["runs"] if r["name"] == "enr0_5.5min")["recipe"].endswith(" enr=0.0")
    assert curve["recipe"].startswith(f"flow_share={share:g} objective=apex lr_schedule=cosine")
    run = next(r for r in merged["runs"] if r["name"] == "curve_5.5min")
    assert run["train_seconds_total"] == 331.0 and run["fid50k"] is None
    shared = next(r for r in merged["runs"] if r["name"] == "shared_5.5min")   # sorts after "curve"
    assert shared["train_seconds_total"] == 330.0 and shared["recipe"] == curve["recipe"]
    flops = cifar_demo.step_flops(apex_min.Config(**apex_min.PRESETS["cifar"]))
    assert run["mfu"] == round(flops * 1000.0 / 500e12, 4)
    assert next(r for r in merged["runs"] if r["name"] == "b_fm_other_gpu_5.5min")["mfu"] is None
    assert budget.merge(peak=500.0)["runs"][1]["mfu"] is not None   # no GPU named: every run


def test_cifar_budget_pairs_each_run_with_the_controls_of_its_own_flow_stage():
    """experiments/cifar_budget.py pairs: d = run - control at 1 and 2 NFE, grouped by budget, recipe
    and control (no term, or the term's schedule alone); a control of another flow stage, seed or
    guidance strength is no control."""
    budget = _experiment("cifar_budget")
    def record(fid, seed=0, flow="runs/a/flow", **over):
        cfg = {**dataclasses.asdict(apex_min.Config(**apex_min.PRESETS["cifar"])), "seed": seed, **over}
        return {"config": cfg, "fid": {"fid": {"1 NFE": {"fid": fid}, "2 NFE": {"fid": fid / 2}}},
                "flow_stage": {"config": {"out_dir": flow, "minutes": 3.3}, "summary": {"step": 50}}}
    records = {"other_5.5min": record(1.0, seed=1, gen_weight=0.0, polish_from=0.0),    # seed 1, flow a
               "t0_5.5min": record(40.0), "g0_5.5min": record(50.0, gen_weight=0.0, polish_from=0.0),
               "p0_5.5min": record(44.0, gen_weight=0.0),
               "t1_5.5min": record(60.0, seed=1, flow="runs/b/flow"),
               "g1_5.5min": record(56.0, seed=1, flow="runs/b/flow", gen_weight=0.0, polish_from=0.0),
               "unguided_5.5min": record(30.0, enr=0.0)}
    rows = budget.pairs(records)
    assert [(r["minutes"], r["control"], r["recipe"] == budget.preset_recipe()) for r in rows] == [
        (5.5, "gen0", True), (5.5, "polish_gen0", True)]
    assert rows[0]["pairs"] == [{"run": "t0_5.5min", "1": -10.0, "2": -5.0},
                                {"run": "t1_5.5min", "1": 4.0, "2": 2.0}]
    assert rows[1]["pairs"] == [{"run": "t0_5.5min", "1": -4.0, "2": -2.0}]
    table = budget.pairs_table(rows)
    assert "1 NFE   -3.00 +-  9.90 (1/2)" in table and "1 NFE   -4.00 (1/1)" in table


def test_cifar_preset_is_the_best_measured_330s_recipe():
    """The cifar preset's recipe is the best of the 330-s runs in results/cifar_budget.json (which
    `cifar_budget.py collect` rebuilds from the per-run records), by 1-NFE FID-10k: its flow share
    that of the best of (at least 3) flow shares, its APEX stage that of the best of (at least 3)
    APEX stages from one flow stage, at seed 0 and at seed 1; the README quotes the mean and
    standard deviation of every 330-s run of the preset (at least 3) at 1 and 2 NFE, and the mean
    of the no-term controls (the curve point's `gen0`)."""
    budget = _experiment("cifar_budget")
    merged = json.load(open(budget.MERGED))
    assert budget.merge(merged["peak_bf16_tflops"], merged["peak_gpu"]) == merged
    preset = apex_min.PRESETS["cifar"]
    for prefix, setting in (("split", f"flow_share={preset['flow_share']:g} "), ("stage330_", None),
                            ("preset330_s1_", None)):   # seed 1's arms (not seed 10's)
        runs = [r for r in merged["runs"] if r["name"].startswith(prefix) and r["minutes"] == 5.5]
        assert len({r["recipe"] for r in runs}) >= 3
        best = min(runs, key=lambda r: r["fid10k"]["1"])
        assert best["fid10k"]["2"] == min(r["fid10k"]["2"] for r in runs)
        assert best["recipe"].startswith(setting) if setting else best["recipe"] == budget.preset_recipe()
        assert 320 < best["train_seconds_total"] < 340
    ours = [r["fid10k"] for r in merged["runs"] if r["recipe"] == budget.preset_recipe() and r["minutes"] == 5.5]
    assert len(ours) >= 3
    quoted = [f"{statistics.mean(f[k] for f in ours):.1f} ± {statistics.stdev(f[k] for f in ours):.1f}"
              for k in ("1", "2")]
    control = next(p for p in merged["curve"] if p["minutes"] == 5.5)["gen0"]
    row = (f"| 5.5 min: {len(ours)} runs, controls {len(control['runs'])} | {quoted[0]} | {quoted[1]} | "
           f"{control['1']:.1f} / {control['2']:.1f} |")
    assert row in open(os.path.join(HERE, "README.md")).read()


def test_readme_shows_the_fid_curve_and_quotes_its_longest_point():
    """The README embeds assets/cifar_fid_vs_time.png and its table's row for the curve's longest
    point quotes, from results/cifar_budget.json, its FID-10k (one run: with that run's FID-50k) at
    1 and 2 NFE, the FID-10k of its no-term control (the curve point's `gen0`) or "not measured",
    and flow matching's Euler 50 at the same time; a point of several runs, their mean and each
    (the 330-s point, its mean and standard deviation: the test above)."""
    budget = _experiment("cifar_budget")
    merged = json.load(open(budget.MERGED))
    readme = " ".join(open(os.path.join(HERE, "README.md")).read().split())   # lines joined
    assert "](assets/cifar_fid_vs_time.png)" in readme
    assert os.path.exists(budget.FIGURE)
    longest = max(merged["curve"], key=lambda p: p["minutes"])
    runs = {r["name"]: r for r in merged["runs"]}
    assert list(longest["runs"]) == [longest["run"]]   # one run (else the row's form changes)
    run = runs[longest["run"]]
    control = longest["gen0"]
    assert run["fid50k"] is not None and run["fid10k"] == longest["fid10k"]
    no_term = f"{control['1']:.1f} / {control['2']:.1f}" if control else "not measured"
    row = (f"| {run['minutes']:g} min, 1 run | {run['fid10k']['1']:.1f} (FID-50k {run['fid50k']['1']:.1f}) | "
           f"{run['fid10k']['2']:.1f} ({run['fid50k']['2']:.1f}) | {no_term} | | {longest['fm_euler50']:.1f} |")
    assert row in readme and f"one {run['gpu'].removeprefix('NVIDIA ').split()[0]} (`--minutes M`" in readme
    several = [p for p in merged["curve"] if len(p["runs"]) > 1 and p["minutes"] != 5.5]
    assert several   # the 11-minute point
    for point in several:   # the mean and each run
        each = {k: ", ".join(f"{f[k]:.1f}" for f in point["runs"].values()) for k in ("1", "2")}
        mean = {k: statistics.mean(f[k] for f in point["runs"].values()) for k in ("1", "2")}
        assert all(abs(mean[k] - point["fid10k"][k]) < 0.006 for k in mean)   # the point: their mean
        control = point["gen0"]
        assert (f"| {point['minutes']:g} min: {len(point['runs'])} runs, controls {len(control['runs'])} | "
                f"{mean['1']:.1f} ({each['1']}) | {mean['2']:.1f} ({each['2']}) | "
                f"{control['1']:.1f} / {control['2']:.1f} |") in readme


def test_toy_tuning_script_at_test_size(tmp_path):
    """python experiments/toy_tuning.py, run as a reader runs it (from the repository root)."""
    done = subprocess.run([sys.executable, "experiments/toy_tuning.py", "--fast", "--out",
                           str(tmp_path)], cwd=HERE, env=SUBPROCESS_ENV, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    saved = json.loads((tmp_path / "results" / "toy_2d_tuning.json").read_text())
    assert [tuple(r["row"]) for r in saved["rows"]] == list(_experiment("toy_tuning").TUNING_ROWS)
    full, lora4 = saved["rows"][0], saved["rows"][1]
    assert lora4["trainable_per_member"] < full["trainable_per_member"] == full["params_per_member"]
    assert all(math.isfinite(r["summary"]["ring"]["sw1"][0]) for r in saved["rows"])
    assert f"lora      4 ema      {lora4['trainable_per_member']:>9,}  " in done.stdout


def test_toy_ablations_script_at_test_size(tmp_path, capsys):
    """Each ablation is toy_2d's experiment with its one setting changed, saved under its record
    name; the printed gap is consistency minus apex of that record."""
    toy_ablations = _experiment("toy_ablations")
    toy_ablations.main(["gen_weight_0", "cons_delta_0.1", "--fast", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    for name, (gen_weight, d) in (("gen_weight_0", (0.0, 0.01)), ("cons_delta_0.1", (0.5, 0.1))):
        saved = json.loads((tmp_path / "results" / f"toy_2d_{name}.json").read_text())
        used = saved["configs"]["apex"]
        assert (used["gen_weight"], used["cons_delta"]) == (gen_weight, d)
        assert saved["configs"]["consistency"]["cons_delta"] == d
        apex, cons = (saved["summary"][row]["ring"]["sw1"][0]
                      for row in ("apex@1", "consistency@1"))
        assert f"| {apex:.4f} | {cons:.4f} | {cons - apex:+.4f} (spread" in printed
    assert not (tmp_path / "results" / "toy_2d_cons_delta_0.05.json").exists()
    with pytest.raises(SystemExit) as e:
        toy_ablations.main(["gen_weight_2", "--report"])
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_toy_d_star_and_one_minus_d_star_sum_to_one():
    log_ratio = torch.linspace(-50, 50, 101, dtype=torch.float64)     # log p_data - log p_theta
    d = 10 ** (-torch.nn.functional.softplus(-log_ratio) / math.log(10))
    one_minus = 10 ** (-torch.nn.functional.softplus(log_ratio) / math.log(10))
    torch.testing.assert_close(d + one_minus, torch.ones_like(d))


@pytest.mark.parametrize("argv", [["--batch", "20"], ["--targets", "moons"], ["--seeds", "0"],
                                  ["--no-such-flag"], ["--steps", "x"], ["--gen-weight", "-1"],
                                  ["--cons-delta", "0"]])
def test_toy_bad_flags_exit_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        toy_2d.parse_settings(argv)
    assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_toy_objective_flags_reach_the_objective():
    """--gen-weight and --cons-delta are the config of the variants the toy fine-tunes."""
    settings = toy_2d.parse_settings(["--fast", "--gen-weight", "0", "--cons-delta", "0.1"])
    assert (settings.gen_weight, settings.cons_delta) == (0.0, 0.1)
    assert (toy_2d.ToySettings().gen_weight, toy_2d.ToySettings().cons_delta) == (0.5, 0.01)
    used = toy_2d.finetune("apex", toy_2d.pretrain(settings), settings)["config"]
    assert (used["gen_weight"], used["cons_delta"], used["objective"]) == (0.0, 0.1, "apex")


# ==================================================================================================
# 13. notebooks/: each runs top to bottom in a fresh kernel (as Jupyter opens it: cwd notebooks/)
# ==================================================================================================
# The notebooks are committed with their outputs; `python test_apex_min.py --write-notebooks`
# re-executes them and saves the outputs (what the README's notebook links show).

NOTEBOOK_DIR = os.path.join(HERE, "notebooks")
NOTEBOOKS = ["01_apex_step_by_step.ipynb", "02_gan_alignment.ipynb", "03_cifar_one_step.ipynb"]
CELL_TIMEOUT_S = 300     # one cell; the whole notebook is meant to take under 3 minutes on 2 cores
MAX_BYTES = 1_000_000    # each committed notebook, outputs included


def execute_notebook(name: str, write: bool = False) -> float:
    """Run notebooks/<name> in a fresh kernel; returns the wall seconds. Raises on a failing cell."""
    import nbformat
    from nbclient import NotebookClient

    path = os.path.join(NOTEBOOK_DIR, name)
    nb = nbformat.read(path, as_version=4)
    # a headless, non-interactive matplotlib backend that still returns PNGs inline
    env_backup = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    try:
        client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                resources={"metadata": {"path": NOTEBOOK_DIR}})
        start = time.time()
        client.execute()
        seconds = time.time() - start
    finally:
        if env_backup is None:
            os.environ.pop("MPLBACKEND", None)
        else:
            os.environ["MPLBACKEND"] = env_backup
    if write:
        for cell in nb.cells:   # execution timestamps would change every cell on every re-run
            cell.metadata.pop("execution", None)
        nbformat.write(nb, path)
    return seconds


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name):
    pytest.importorskip("nbclient")
    pytest.importorskip("nbformat")
    pytest.importorskip("ipykernel")
    path = os.path.join(NOTEBOOK_DIR, name)
    assert os.path.getsize(path) < MAX_BYTES, f"{name} is {os.path.getsize(path)} bytes; keep it under 1 MB"
    execute_notebook(name)


if __name__ == "__main__":
    write = "--write-notebooks" in sys.argv
    names = [a for a in sys.argv[1:] if not a.startswith("--")] or NOTEBOOKS
    for name in names:
        seconds = execute_notebook(name, write=write)
        size = os.path.getsize(os.path.join(NOTEBOOK_DIR, name))
        print(f"{name}: {seconds:.1f} s{' (outputs written)' if write else ''}, {size / 1024:.0f} KB")
