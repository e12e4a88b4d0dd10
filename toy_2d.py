"""toy_2d.py: APEX on 2-D Gaussian mixtures, where every score is exact. CPU, under two minutes.

    python toy_2d.py          # ring + grid, 3 seeds, 5 variants, ~90 s on 2 idle cores: writes
                              # assets/toy_2d.png and results/toy_2d.json, prints the table
    python toy_2d.py --fast   # the test-size run (seconds); its numbers are meaningless

APEX's generator correction should follow a GAN's generator gradient s_fake - s_real, with weight 1
where the GAN's (D* or 1 - D*) vanishes (Eq. (8), (26)-(28)). Both scores are exact here: for flow
matching, consistency, APEX and the paper-literal objective, fine-tuned from one flow checkpoint, it
measures 1-NFE sample quality over seeds, the cosine to the exact s_fake - s_real, the GAN weights.
"""
from __future__ import annotations

import dataclasses
import io
import itertools
import json
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import apex_min as am


# 1. Settings ======================================================================================
@dataclasses.dataclass
class ToySettings:
    targets: str = "ring,grid"    # comma list of toy_mixture names
    seeds: int = 3                # independent runs per target (one ensemble member each)
    seed: int = 0                 # base seed: initialisation, batches, noise and evaluation draws
    width: int = 128              # hidden width
    depth: int = 3                # hidden layers
    pretrain_steps: int = 1500    # shared flow-matching pre-training (the "pretrained flow model")
    steps: int = 1500             # fine-tuning steps of every variant, from the same checkpoint
    batch: int = 192              # rows per member and step; a multiple of 12 (section 3 says why)
    lr: float = 2e-3              # fine-tuning peak rate, cosine-decayed to 0 (cosine_lr says why)
    gen_weight: float = 0.5       # weight of APEX's generator term (apex_min's); 0 = off
    cons_delta: float = 0.01      # d of the consistency target (apex_min's)
    n_eval: int = 4000            # samples per member for the quality metrics
    euler_steps: int = 100        # NFE of the flow-matching reference
    checkpoints: int = 8          # alignment measurements over fine-tuning (plus step 0)
    workers: int = 0              # processes for the variants, one thread each (0: one per core)
    out: str = ""                 # folder for assets/ and results/ ("": here; --fast: runs/fast)
    fast: bool = False            # test-size run: tiny everything, seconds
    lr_pretrain: float = 3e-3     # constant; a small MLP learns a 2-D flow fast at this rate
    ema_decay: float = 0.99       # apex_min.EMA target decay, as the released code
    grad_clip: float = 1.0        # per member, as the released code's global clip
    n_ref: int = 2048             # generator samples that define p_theta's empirical mixture
    n_query: int = 1024           # held-out generator samples where directions are compared
    weight_s: float = 0.05        # noise level at which D* is computed (section 6 says why)
    low_s: float = 0.2            # the cosine is also reported over s < low_s (section 6 says why)


# no flags for these (a script may still set them, as experiments/toy_ladder.py sets n_ref)
FIXED = ("lr_pretrain", "ema_decay", "grad_clip", "n_ref", "n_query", "weight_s", "low_s")
FAST = dict(seeds=1, width=32, depth=2, pretrain_steps=30, steps=30, batch=24, n_eval=400,
            euler_steps=10, n_ref=128, n_query=64, checkpoints=2, workers=1)


def toy_config(objective: str, gen_weight: float = 0.5, cons_delta: float = 0.01) -> am.Config:
    """apex_min's Config; enr = 0, no label dropout, robust_c = 3: unguided mean velocities."""
    return am.Config(objective=objective, num_classes=2, enr=0.0, label_dropout=0.0, robust_c=3.0,
                     gen_weight=gen_weight, cons_delta=cons_delta)


def member_names(settings: ToySettings) -> list:  # target-major: m = target_index * seeds + seed
    return [name for name in settings.targets.split(",") for _ in range(settings.seeds)]


# 2. Data: 2-D Gaussian mixtures with closed-form densities ========================================
def toy_mixture(name: str) -> dict:  # means, std, classes: 8 modes on a circle or a 4x4 grid
    if name == "ring":
        ang = torch.arange(8) * (2 * math.pi / 8)
        means = torch.stack([torch.cos(ang), torch.sin(ang)], 1)
        classes, std = torch.arange(8) % 2, 0.05
    elif name == "grid":
        v = torch.linspace(-0.75, 0.75, 4)
        gy, gx = torch.meshgrid(v, v, indexing="ij")
        means = torch.stack([gx.flatten(), gy.flatten()], 1)
        classes, std = (torch.arange(4)[:, None] + torch.arange(4)[None]).flatten() % 2, 0.04
    else:
        raise ValueError(f"unknown toy mixture {name!r}: ring or grid")
    return {"means": means, "std": std, "classes": classes, "num_classes": int(classes.max()) + 1}


def sample_toy(name: str, n: int, generator=None, y=None):  # (x, y); y, if given, fixes classes
    mix = toy_mixture(name)
    K, C = len(mix["means"]), mix["num_classes"]
    if y is None:
        y = torch.randint(C, (n,), generator=generator)
    per_class = torch.stack([(mix["classes"] == k).nonzero().flatten() for k in range(C)])
    mode = per_class[y, torch.randint(K // C, (n,), generator=generator)]
    return mix["means"][mode] + mix["std"] * torch.randn(n, 2, generator=generator), y


# 3. Model: an ensemble of small MLPs with the DiT's conditioning ==================================
# Row r of any batch is member r % M's, also in apex_min's row groups when the batch per member is a
# multiple of 12; per-row losses, element-wise Adam/EMA and a per-member clip: M separate networks.
class EnsembleLinear(nn.Module):  # M Linear layers, (M, n, d_in) -> (M, n, d_out) in one matmul
    def __init__(self, members: int, d_in: int, d_out: int, zero: bool = False):
        super().__init__()
        bound = 1 / math.sqrt(d_in)                                  # nn.Linear's default init
        self.weight = nn.Parameter(torch.empty(members, d_in, d_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(members, 1, d_out).uniform_(-bound, bound))
        if zero:
            nn.init.zeros_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, h):
        return torch.baddbmm(self.bias, h, self.weight)


class ToyMLP(nn.Module):  # F(x_t, t, tt, c) of M members; the DiT's conditioning in every layer
    def __init__(self, num_classes: int = 2, members: int = 1, width: int = 64, depth: int = 3,
                 freq_dim: int = 32):
        super().__init__()
        self.num_classes, self.members, self.freq_dim = num_classes, members, freq_dim
        M, D = members, width
        self.t_embed = nn.ModuleList([EnsembleLinear(M, freq_dim, D), EnsembleLinear(M, D, D)])
        self.tt_embed = nn.ModuleList([EnsembleLinear(M, freq_dim, D), EnsembleLinear(M, D, D, zero=True)])
        self.class_table = nn.Parameter(torch.randn(M, num_classes + 1, D))  # c_fake far from c
        self.inp = EnsembleLinear(M, 2, D)
        self.hidden = nn.ModuleList([EnsembleLinear(M, D, D) for _ in range(depth)])
        self.out = EnsembleLinear(M, D, 2, zero=True)              # untrained F is 0, as the DiT

    def embed_class(self, y):  # (N,) -> (N, D): row r uses member r % M's table
        return self.class_table[torch.arange(len(y), device=y.device) % self.members, y]

    def split(self, a):  # (N, ...) -> (M, N/M, ...): interleaved rows to member-major
        assert a.shape[0] % self.members == 0, "rows must come in whole rounds of M members"
        return a.reshape(-1, self.members, *a.shape[1:]).transpose(0, 1)

    def embed_time(self, t, layers):  # (M, n) -> (M, n, D), as apex_min.TimeEmbedding
        half = self.freq_dim // 2
        args = 1000.0 * t[..., None] * torch.exp(-math.log(10000.0) * torch.arange(half) / half)
        return layers[1](F.silu(layers[0](torch.cat([torch.cos(args), torch.sin(args)], -1))))

    def forward(self, x, t, tt, c):  # x: (N, 2), t, tt: (N,), c: (N, D) -> (N, 2)
        x, t, tt, c = self.split(x), self.split(t), self.split(tt), self.split(c)   # (M, n, ...)
        cond = self.embed_time(t, self.t_embed)                                      # (M, n, D)
        if not torch.equal(t, tt):   # at tt = t (flow matching, Euler) the term is exactly 0: skipped
            cond = cond + (t - tt)[..., None] * self.embed_time(tt, self.tt_embed)
        cond = cond + c
        h = self.inp(x) + cond
        for layer in self.hidden:
            h = layer(F.silu(h)) + cond
        return self.out(F.silu(h)).transpose(0, 1).reshape(-1, 2)


def clip_per_member_(net: ToyMLP, max_norm: float) -> None:  # a global clip would couple members
    params = [p for p in net.parameters() if p.grad is not None]
    sq = sum(p.grad.pow(2).flatten(1).sum(1) for p in params)                         # (M,)
    scale = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(scale.view(-1, *[1] * (p.grad.dim() - 1)))


# 4. Exact densities and scores, float64: at s, N((1 - s) mu_k, ((1 - s)^2 std^2 + s^2) I) =====
def mixture_log_density_and_score(x, means, var):  # x (N, 2), means (N, K, 2), var (N, K)
    x, means = x.double(), means.double()
    var = torch.as_tensor(var, dtype=torch.float64).expand(x.shape[0], means.shape[1])  # (N, K)
    diff = means - x[:, None]                                                        # (N, K, 2)
    log_comp = (-math.log(means.shape[1]) - torch.log(2 * math.pi * var)
                - (diff[..., 0] ** 2 + diff[..., 1] ** 2) / (2 * var))               # (N, K)
    score = (torch.softmax(log_comp, dim=1)[..., None] * diff / var[..., None]).sum(1)  # (N, 2)
    return torch.logsumexp(log_comp, dim=1), score      # logsumexp: finite far from every mode


def data_density(x, y, s, name: str):  # log p_s(x | y) and its score for mixture `name`, s: (N,)
    mix = toy_mixture(name)
    logp = torch.empty(len(x), dtype=torch.float64)
    score = torch.empty(len(x), 2, dtype=torch.float64)
    for k in range(mix["num_classes"]):                     # class-conditional: that class's modes
        rows, mu = y == k, mix["means"][mix["classes"] == k].double()               # (K_k, 2)
        sk = s[rows].double()[:, None]                                               # (n, 1)
        var = (1 - sk) ** 2 * mix["std"] ** 2 + sk ** 2
        means = (1 - sk)[..., None] * mu                                             # (n, K_k, 2)
        logp[rows], score[rows] = mixture_log_density_and_score(x[rows], means, var)
    return logp, score


def generator_density(x, y, s, ref, ref_y):  # the same for samples `ref`; queries not in `ref`
    logp = torch.empty(len(x), dtype=torch.float64)
    score = torch.empty(len(x), 2, dtype=torch.float64)
    for k in torch.unique(y).tolist():
        rows = y == k
        sk = s[rows].double()[:, None]                                               # (n, 1)
        means = (1 - sk)[..., None] * ref[ref_y == k].double()[None]                 # (n, J, 2)
        logp[rows], score[rows] = mixture_log_density_and_score(x[rows], means, sk ** 2)
    return logp, score


def velocity_from_score(score, x, s):  # Eq. (5) solved for v: v = -(s * score + x) / (1 - s)
    s = s.double()[:, None]
    return -(s * score + x.double()) / (1 - s)


# 5. Sample quality against the exact target ======================================================
def sliced_w1(x, y, name: str, n_proj: int = 64, n_grid: int = 1024) -> float:
    """Sliced W1 to the exact class-conditional target (projected CDFs are closed forms)."""
    mix = toy_mixture(name)
    theta = (torch.arange(n_proj, dtype=torch.float64) + 0.5) * math.pi / n_proj
    proj = torch.stack([torch.cos(theta), torch.sin(theta)])                         # (2, L)
    total = 0.0
    for k in torch.unique(y).tolist():                      # classes weighted by their share
        rows = y == k
        p = (x[rows].double() @ proj).T.sort(dim=1).values.contiguous()              # (L, n)
        mu = (mix["means"][mix["classes"] == k].double() @ proj).T                   # (L, K_k)
        pad = 6 * mix["std"]
        u = torch.linspace(min(p.min().item(), mu.min().item() - pad),
                           max(p.max().item(), mu.max().item() + pad), n_grid, dtype=torch.float64)
        F_samples = torch.searchsorted(p, u.expand(n_proj, -1).contiguous(), right=True) / len(p[0])
        F_target = (0.5 * (1 + torch.erf((u - mu[..., None]) / mix["std"] / math.sqrt(2)))).mean(1)
        w1 = torch.trapezoid((F_samples - F_target).abs(), u, dim=1).mean().item()
        total += w1 * rows.float().mean().item()
    return total


def nearest_own_mode(x, y, name: str):  # (nearest mode of the own class, within 3 sigma of it)
    mix = toy_mixture(name)
    dist = torch.cdist(x.double(), mix["means"].double())                            # (n, K)
    dist = torch.where(mix["classes"][None] == y[:, None], dist, torch.inf)
    return dist.argmin(1), dist.min(1).values < 3 * mix["std"]


def quality(x, y, name: str) -> dict:
    """sw1, share within 3 sigma of an own-class mode (exact: 0.989), modes with 1/4 fair share."""
    mix = toy_mixture(name)
    nearest, near = nearest_own_mode(x, y, name)
    covered = 0
    for j, k in enumerate(mix["classes"].tolist()):
        fair = (y == k).sum().item() / (mix["classes"] == k).sum().item()
        covered += ((nearest == j) & near).sum().item() >= 0.25 * fair
    return {"sw1": sliced_w1(x, y, name), "within_3sigma": near.double().mean().item(),
            "coverage": covered / len(mix["means"])}


def member_quality(x, y, names: list) -> list:  # quality() of each member's rows of (n*M, 2)
    x, y = x.view(-1, len(names), 2), y.view(-1, len(names))
    return [quality(x[:, m], y[:, m], name) for m, name in enumerate(names)]


def mean_std(values: list) -> tuple:
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(values) > 1 else 0.0)


def summarise_quality(member_rows: list, names: list) -> dict:  # per target, (mean, std) of seeds
    return {name: {metric: mean_std([q[metric] for q, n in zip(member_rows, names) if n == name])
                   for metric in ("sw1", "within_3sigma", "coverage")}
            for name in dict.fromkeys(names)}


# 6. GAN alignment, measured exactly ===============================================================
# One-step samples noised to s ~ U(0.02, 0.98); GAN weights at s = weight_s (p_theta: a KDE of
# bandwidth s). Over s < low_s the exact difference stays above the branches' errors.
@torch.no_grad()
def branch_velocities(net, x_s, s, y, cfg: am.Config):
    """(F(x_s, s, s, c_fake), F(x_s, s, s, c)), float64; one [fake; real] call keeps the rounds."""
    c = net.embed_class(y)
    fake = torch.cat([torch.ones_like(y, dtype=torch.bool), torch.zeros_like(y, dtype=torch.bool)])
    c2 = am.condition_shift(torch.cat([c, c]), fake, cfg.shift_a, cfg.shift_b)     # Eq. (9)
    v_fake, v_real = net(torch.cat([x_s, x_s]), s.repeat(2), s.repeat(2), c2).double().chunk(2)
    return v_fake, v_real


def network_direction(v_fake, v_real, s):  # the network's estimate of s_fake - s_real (Eq. (5))
    return -((1 - s.double()) / s.double())[:, None] * (v_fake - v_real)


def cosine(a, b):  # row-wise cosine of (N, 2) float64 arrays; 0 where either is 0
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)


@torch.no_grad()
def measure_alignment(net, names, cfg, settings, generator, velocities=branch_velocities) -> list:
    """Per member, of `velocities`' branches: cosines, s, errors, signal, log10 D*, 1 - D*, realism."""
    M, n_ref, n_q = len(names), settings.n_ref, settings.n_query
    y = (torch.arange(n_ref + n_q) % net.num_classes).repeat_interleave(M)   # balanced, interleaved
    z = torch.randn(len(y), 2, generator=generator)
    x_g = am.sample_fewstep(net, z, y, times=[1.0, 0.0], generator=generator)   # z - F(z, 1, 0, c)
    s = 0.02 + 0.96 * torch.rand(n_q * M, generator=generator)
    noise = torch.randn(n_q * M, 2, generator=generator)
    q = slice(n_ref * M, None)                                       # held-out queries, all members
    x_s = am.interpolate(x_g[q], noise, s)
    x_w = am.interpolate(x_g[q], noise, torch.full_like(s, settings.weight_s))
    v_fake, v_real = velocities(net, x_s, s, y[q], cfg)
    d_net = network_direction(v_fake, v_real, s)
    out = []
    for m, name in enumerate(names):
        ref, qm = slice(m, n_ref * M, M), slice(m, None, M)          # member m's rows
        ym, sm, xm, sw = y[q][qm], s[qm], x_s[qm], torch.full_like(s[qm], settings.weight_s)
        s_fake = generator_density(xm, ym, sm, x_g[ref], y[ref])[1]
        s_real = data_density(xm, ym, sm, name)[1]
        v_fake_exact, v_real_exact = (velocity_from_score(sc, xm, sm) for sc in (s_fake, s_real))
        log_ratio = (data_density(x_w[qm], ym, sw, name)[0]                           # log p_d/p_g
                     - generator_density(x_w[qm], ym, sw, x_g[ref], y[ref])[0])
        out.append({"cos": cosine(d_net[qm], s_fake - s_real), "s": sm,
                    "err_real": (v_real[qm] - v_real_exact).norm(dim=1),
                    "err_fake": (v_fake[qm] - v_fake_exact).norm(dim=1),
                    "signal": (v_fake_exact - v_real_exact).norm(dim=1),
                    "log10_d": -F.softplus(-log_ratio) / math.log(10),      # D* = p_d / (p_d + p_g)
                    "log10_1md": -F.softplus(log_ratio) / math.log(10),
                    "realistic": nearest_own_mode(x_g[q][qm], ym, name)[1]})   # before noising
    return out


def summarise_alignment(meas: dict, low_s: float = 0.2) -> dict:  # one member's medians, quantiles
    cos, s, real = meas["cos"], meas["s"], meas["realistic"]
    by_s = {f"{lo:.1f}-{lo + 0.2:.1f}": {key: meas[key][(s >= lo) & (s < lo + 0.2)].median().item()
                                         for key in ("cos", "err_real", "err_fake", "signal")}
            for lo in (0.0, 0.2, 0.4, 0.6, 0.8)}
    q = torch.tensor([0.01, 0.1, 0.5, 0.9, 0.99], dtype=torch.float64)
    weights = {key: {"quantiles_1_10_50_90_99": meas[key].quantile(q).tolist(),
                     **{f"median_{kind}": meas[key][rows].median().item() if rows.any() else None
                        for kind, rows in (("realistic", real), ("unrealistic", ~real))}}
               for key in ("log10_d", "log10_1md")}
    return {"median_cos": cos.median().item(), "median_cos_low_s": cos[s < low_s].median().item(),
            "by_s": by_s, **weights}


# 7. Training (a `loss` has apex_min.training_loss's signature and must pickle for the workers) ====
def make_batch(names: list, batch: int):  # (batch*M, 2), (batch*M,); row r from member r % M's
    xs, ys = [], []
    for name in dict.fromkeys(names):                      # members are target-major
        x, y = sample_toy(name, batch * names.count(name))
        xs.append(x.view(batch, -1, 2))
        ys.append(y.view(batch, -1))
    return torch.cat(xs, 1).reshape(-1, 2), torch.cat(ys, 1).reshape(-1)


def build(settings: ToySettings, members: int):  # AdamW as the released configs, no decay
    net = ToyMLP(2, members, settings.width, settings.depth)
    return net, torch.optim.AdamW(net.parameters(), lr=settings.lr, betas=(0.9, 0.99),
                                  weight_decay=0.0)


def train_steps(net, ema, opt, names, cfg, settings, steps: int, lr_at, first: int = 0,
                targets=None, loss=am.training_loss) -> None:  # targets None: the EMA
    for k in range(first, first + steps):
        opt.param_groups[0]["lr"] = lr_at(k)
        x, y = make_batch(names, settings.batch)
        value, _ = loss(net, targets if targets is not None else ema.model, x, y, cfg)
        opt.zero_grad(set_to_none=True)
        # x M: each member gets the gradient it would get alone (the clip would see the factor)
        (value * net.members).backward()
        clip_per_member_(net, settings.grad_clip)
        opt.step()
        ema.update(net)


def cosine_lr(settings: ToySettings):  # to 0: the fake branch ends caught up with the generator
    return lambda k: settings.lr * 0.5 * (1 + math.cos(math.pi * k / settings.steps))


def pretrain(settings: ToySettings) -> bytes:  # flow matching: the checkpoint of every variant
    names = member_names(settings)
    torch.manual_seed(settings.seed)                       # same initialisation for every variant
    net, opt = build(settings, len(names))
    ema = am.EMA(net, settings.ema_decay)
    train_steps(net, ema, opt, names, toy_config("fm"), settings, settings.pretrain_steps,
                lambda k: settings.lr_pretrain)
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "ema": ema.model.state_dict(), "ema_decay": ema.decay},
               buffer)
    return buffer.getvalue()


def evaluation_noise(settings: ToySettings, members: int):  # fixed z, labels, sampler generator
    eval_rng = torch.Generator().manual_seed(settings.seed + 3)
    y = (torch.arange(settings.n_eval) % 2).repeat_interleave(members)
    return torch.randn(settings.n_eval * members, 2, generator=eval_rng), y, eval_rng


def finetune(variant: str, pretrained: bytes, settings: ToySettings, loss=None) -> dict:
    """One objective (`loss`, None = apex_min's) from the checkpoint: alignment, then quality."""
    torch.set_num_threads(1)
    names = member_names(settings)
    M = len(names)
    state = torch.load(io.BytesIO(pretrained), weights_only=False)
    net, opt = build(settings, M)                          # a fresh optimiser, as from a checkpoint
    net.load_state_dict(state["model"])
    ema = am.EMA(net, settings.ema_decay)
    ema.model.load_state_dict(state["ema"])
    ema.decay = state["ema_decay"]
    cfg = toy_config(variant, settings.gen_weight, settings.cons_delta)
    torch.manual_seed(settings.seed + 1)                   # the same draws start every variant
    measure_rng = torch.Generator().manual_seed(settings.seed + 2)
    history, raw, done = [], None, 0
    for mark in sorted({round(i * settings.steps / settings.checkpoints)
                        for i in range(settings.checkpoints + 1)}):
        train_steps(net, ema, opt, names, cfg, settings, mark - done, cosine_lr(settings),
                    first=done, loss=am.training_loss if loss is None else loss)
        done = mark
        # paper trains its fake branch on x_t - t F(x_t, t, c) (Eq. (11)): is that field p_theta's?
        if variant in ("apex", "paper"):
            raw = measure_alignment(net, names, cfg, settings, measure_rng)
            history.append({"step": mark,
                            "members": [summarise_alignment(r, settings.low_s) for r in raw]})
    z, y, eval_rng = evaluation_noise(settings, M)   # the EMA weights, as apex_min's samplers
    outputs = {f"{variant}@1": am.sample_fewstep(ema.model, z, y, nfe=1, generator=eval_rng)}
    if variant in ("fm", "paper"):   # fm: the multi-step reference; paper: is its flow still one?
        outputs[f"{variant}@{settings.euler_steps}"] = am.sample_euler(ema.model, z, y,
                                                                       settings.euler_steps)
    return {"variant": variant, "config": dataclasses.asdict(cfg), "alignment": history, "last": raw,
            "rows": {row: member_quality(x, y, names) for row, x in outputs.items()},
            "samples": {row: x.view(-1, M, 2) for row, x in outputs.items()}, "ema": ema.model}


# 8. Experiment and report =========================================================================
def run_jobs(fn, jobs: list, workers: int) -> list:  # spawned processes: fork can hang torch
    workers = workers or os.cpu_count() or 1       # the results do not depend on the count
    if workers <= 1 or len(jobs) <= 1:
        return [fn(*job) for job in jobs]
    import multiprocessing
    with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        return pool.starmap(fn, jobs, chunksize=1)   # one job at a time: the pool balances


def run(settings: ToySettings, loss=None) -> dict:  # every number; `loss` for every variant
    names, start = member_names(settings), time.time()
    pretrained = pretrain(settings)
    # longest first, so that two workers finish together; the measured variants cost the most
    jobs = [(v, pretrained, settings, loss) for v in ("paper", "apex", "consistency", "fm")]
    by_variant = {r["variant"]: r for r in run_jobs(finetune, jobs, settings.workers)}
    # the target row: exact samples of the target, scored like the others (the metrics' floor)
    floor_rng = torch.Generator().manual_seed(settings.seed + 4)
    y = torch.arange(settings.n_eval) % 2
    exact = torch.stack([sample_toy(n, len(y), generator=floor_rng, y=y)[0] for n in names])
    per_member = {"target": [quality(x, y, name) for x, name in zip(exact, names)]}
    samples = {"target": exact.transpose(0, 1)}
    for r in by_variant.values():
        per_member.update(r["rows"])
        samples.update(r["samples"])
    rows = ["target", f"fm@{settings.euler_steps}", "fm@1", "consistency@1", "apex@1", "paper@1",
            f"paper@{settings.euler_steps}"]
    alignment = {}
    for variant in ("apex", "paper"):
        hist = by_variant[variant]["alignment"]
        alignment[variant] = {"steps": [h["step"] for h in hist], **{key: {name: [mean_std(
            [a[key] for a, n in zip(h["members"], names) if n == name]) for h in hist]
            for name in dict.fromkeys(names)} for key in ("median_cos", "median_cos_low_s")},
            "final_members": hist[-1]["members"]}
    result = {"settings": dataclasses.asdict(settings), "environment": am.environment(),
              "configs": {v: r["config"] for v, r in by_variant.items()},
              "seconds": {"wall": round(time.time() - start, 1)}, "rows": rows,
              "per_member": per_member, "alignment": alignment,
              "summary": {row: summarise_quality(per_member[row], names) for row in rows},
              "_figure": {"samples": samples, "last": by_variant["apex"]["last"], "names": names}}
    return {**result, "comparisons": comparisons(result)}


def comparisons(result: dict) -> dict:  # APEX's sw1 against the others, its final cosines
    rows, low_s = result["rows"], result["settings"]["low_s"]
    out = {"wall_seconds": {"value": round(result["seconds"]["wall"], 1)}}
    for name in result["settings"]["targets"].split(","):
        sw = {row: result["summary"][row][name]["sw1"] for row in rows}
        a = sw["apex@1"]
        out[f"{name}: apex@1 / {rows[1]} (sw1)"] = {"value": round(a[0] / sw[rows[1]][0], 3)}
        for other in ("fm@1", "consistency@1"):
            out[f"{name}: {other} - apex@1 (sw1)"] = {"value": round(sw[other][0] - a[0], 4),
                                                      "spread": round(max(a[1], sw[other][1]), 4)}
        for key, label in (("median_cos", ""), ("median_cos_low_s", f", s < {low_s}")):
            value = round(result["alignment"]["apex"][key][name][-1][0], 3)
            out[f"{name}: apex final median cosine{label}"] = {"value": value}
    return out


def table(result: dict) -> str:
    names, low_s = result["settings"]["targets"].split(","), result["settings"]["low_s"]
    lines = [f"1-NFE sample quality, mean +- std over {result['settings']['seeds']} seed(s): "
             f"sliced W1 to the exact target (lower is better) | share within 3 sigma of a mode "
             f"of its class | mode coverage"]
    head = f"{'':15s}" + "".join(f"| {name:^36s}" for name in names)
    lines += [head, "-" * len(head)]
    for row in result["rows"]:
        lines.append(f"{row:15s}" + "".join(
            f"| {q['sw1'][0]:.4f}+-{q['sw1'][1]:.4f}  {q['within_3sigma'][0]:.3f}+-"
            f"{q['within_3sigma'][1]:.3f}  {q['coverage'][0]:.2f} "
            for q in (result["summary"][row][name] for name in names)))
    lines.append("")
    for variant in ("apex", "paper"):
        for key, title in (("median_cos", f"median alignment cosine, {variant}, step 0 (fake "
                                          "branch untrained) -> last: "),
                           ("median_cos_low_s", f"  the same over s < {low_s} only: ")):
            a = result["alignment"][variant][key]
            lines.append(title + "; ".join(f"{n} {a[n][0][0]:+.2f} -> {a[n][-1][0]:+.2f} "
                                           f"(+-{a[n][-1][1]:.2f})" for n in names))
    final = result["alignment"]["apex"]["final_members"]
    lines.append("apex, last checkpoint, by noise level s (medians, velocity units): cosine | "
                 "real-branch error | fake-branch error | exact |v_fake - v_real|")
    for b in final[0]["by_s"]:
        v = {key: mean_std([m["by_s"][b][key] for m in final])[0] for key in final[0]["by_s"][b]}
        lines.append(f"  s {b}: {v['cos']:+.2f} | {v['err_real']:.3f} | {v['err_fake']:.3f} | "
                     f"{v['signal']:.3f}")
    for key, label in (("log10_1md", "1 - D*"), ("log10_d", "D*")):
        med = [[m[key][k] for m in final if m[key][k] is not None] for k in ("median_realistic",
                                                                            "median_unrealistic")]
        med = [mean_std(v)[0] if v else float("nan") for v in med]
        q = torch.tensor([m[key]["quantiles_1_10_50_90_99"] for m in final]).mean(0).tolist()
        lines.append(f"GAN weight {label:6s} at apex's samples (log10): 1/50/99% {q[0]:+.1f} / "
                     f"{q[2]:+.1f} / {q[4]:+.1f}; median realistic {med[0]:+.2f}, unrealistic "
                     f"{med[1]:+.2f}; APEX: 0 (weight 1)")
    lines += ["", "comparisons (sw1 of 1-NFE samples; spread: the larger seed std of the two):"]
    lines += [f"  {key}: {c['value']}" + (f" (spread {c['spread']})" if "spread" in c else "")
              for key, c in comparisons(result).items()]
    return "\n".join(lines)


def figure(result: dict, path: str) -> None:  # samples, cosine over fine-tuning, GAN weights
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data, settings, rows = result["_figure"], result["settings"], result["rows"]
    names, align = settings["targets"].split(","), result["alignment"]
    mosaic = [[f"{n} {r}" for r in rows] for n in names] + [["cos"] * 4 + ["gan"] * 3]
    with plt.rc_context({"font.size": 6, "legend.fontsize": 5}):
        fig, ax = plt.subplot_mosaic(mosaic, figsize=(2 * len(rows), 2 * len(names) + 2.6),
                                     height_ratios=[1] * len(names) + [1.2], layout="tight")
        for name, row in itertools.product(names, rows):
            x, panel = data["samples"][row][:1500, data["names"].index(name)], ax[f"{name} {row}"]
            panel.scatter(*x.T, s=0.6, c=torch.arange(len(x)) % 2, cmap="coolwarm", lw=0)
            panel.set(xlim=(-1.35, 1.35), ylim=(-1.35, 1.35), xticks=[], yticks=[], aspect="equal",
                      title=f"{row}  sw1 {result['summary'][row][name]['sw1'][0]:.3f}",
                      ylabel=name if row == "target" else "")
        for (i, name), (variant, key, style) in itertools.product(enumerate(names), (
                ("apex", "median_cos", "-"), ("paper", "median_cos", ":"),
                ("apex", "median_cos_low_s", "--"))):
            label = f"{variant} {name}" + (f", s < {settings['low_s']}" if "low" in key else "")
            ax["cos"].plot(align[variant]["steps"], [v[0] for v in align[variant][key][name]],
                           style, color=f"C{i}", label=label)
        ax["cos"].set(xlabel="fine-tuning step", title="median cos(network, exact s_fake - s_real)")
        for key, label in (("log10_1md", "1 - D* (non-saturating)"), ("log10_d", "D* (minimax)")):
            w = torch.cat([m[key] for m in data["last"]]).clamp(min=-12)
            ax["gan"].hist(w, bins=48, range=(-12, 0.05), alpha=0.6, label=label)
        ax["gan"].axvline(0.0, color="k", lw=1.5, label="APEX: 1")
        ax["gan"].set(yscale="log", xlabel="log10 weight", title="GAN weights at APEX's samples")
        ax["cos"].legend()
        ax["gan"].legend()
        fig.suptitle(f"APEX on 2-D mixtures: {settings['seeds']} seed(s), {settings['steps']} "
                     f"fine-tuning steps, wall {result['seconds']['wall']:.0f} s")
        fig.savefig(path, dpi=72)
    plt.close(fig)


def results_path(settings: ToySettings, filename: str, folder: str = "results") -> str:  # mkdir
    here = os.path.dirname(os.path.abspath(__file__))   # --fast never overwrites the records
    root = settings.out or (os.path.join(here, "runs", "fast") if settings.fast else here)
    folder = os.path.join(root, folder)
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, filename)


# 9. Command line ==================================================================================
def parse_settings(argv=None, prog: str = "toy_2d.py", description: str = "APEX on 2-D Gaussian "
                   "mixtures: sample quality and exact GAN alignment, on a CPU.") -> ToySettings:
    """Flags for the fields outside FIXED; defaults < --fast < flags; bad ones exit 2, one line."""
    p = am.OneLineParser(prog=prog, description=description)
    helps, defaults = am.field_help(ToySettings), ToySettings()
    for f in (f for f in dataclasses.fields(ToySettings) if f.name not in FIXED):
        kind = {"bool": {"action": "store_true"}, "int": {"type": int}, "float": {"type": float},
                "str": {"type": str}}[f.type]
        p.add_argument("--" + f.name.replace("_", "-"), default=None, **kind,
                       help=f"{helps[f.name]} (default {getattr(defaults, f.name)!r})")
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    s = ToySettings(**{**(FAST if args.get("fast") else {}), **args})
    t = s.targets.split(",")
    if not (set(t) <= {"ring", "grid"} and len(set(t)) == len(t)):
        p.error("--targets: ring, grid or both")
    if not (s.batch > 0 and s.batch % 12 == 0 and s.n_eval >= 10 and s.n_eval % 2 == 0
            and s.workers >= 0 and min(s.seeds, s.width, s.depth, s.pretrain_steps, s.steps, s.checkpoints,
                    s.euler_steps - 1, s.lr, s.cons_delta, 1 - s.cons_delta) > 0
            and s.gen_weight >= 0):
        p.error("need a --batch multiple of 12 (section 3), an even --n-eval >= 10, --lr > 0, "
                "--gen-weight >= 0, --cons-delta in (0, 1), --euler-steps >= 2, --workers >= 0, other "
                "counts >= 1")
    return s


def main(argv=None) -> dict:
    settings = parse_settings(argv)
    torch.set_num_threads(1)      # tiny matmuls: threads cost more than they give on 2 cores
    result = run(settings)
    js, png = results_path(settings, "toy_2d.json"), results_path(settings, "toy_2d.png", "assets")
    figure(result, png)
    with open(js, "w") as f:     # all but the "_" keys (the figure's data)
        json.dump({k: v for k, v in result.items() if not k.startswith("_")}, f, indent=1)
    print(table(result))
    print(f"\nwrote {png} ({os.path.getsize(png) / 1024:.0f} KB) and {js}; "
          f"wall {result['seconds']['wall']:.1f} s")
    return result


if __name__ == "__main__":
    main()
