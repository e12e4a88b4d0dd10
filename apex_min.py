"""apex_min: a minimal, single-file reference of APEX one-step generation.

"Self-Adversarial One Step Generation via Condition Shifting" (Liu et al., arXiv 2604.12322v1).
Equation numbers refer to v1. "Step k" refers to the recipe listed in apex_loss's docstring (the
authors' released training code); docs/method.md sets the paper, that recipe and this code side by
side. Every departure from the paper or the released code is marked NOTE(deviation).

Conventions (stated once, used everywhere)
    x_t = t * z + (1 - t) * x,   z ~ N(0, I),   t = 1 is noise, t = 0 is data     Eq. (1)
    the network output F ~ z - x  (= d x_t / d t), a velocity                      Eq. (2)
    x_hat = x_t - t * F  (data endpoint),  z_hat = x_t + (1 - t) * F  (noise endpoint)
    score from velocity:  s_t(x_t) = -(x_t + (1 - t) * v) / t                      Eq. (5)
    any-step model F(x_t, t, tt, c), tt <= t: average velocity from t to tt, so
        x_tt = x_t - (t - tt) * F;  one step:  x = z - F(z, 1, 0, c).
    images live in [-1, 1].

Notation (paper -> code)
    x, z, x_t, t                      x, z, x_t, t
    target time of an any-step jump   tt
    F_theta(x_t, t, c)                F = net(x_t, t, tt, c)
    c, c_fake = A c + b  (Eq. 9)      c, condition_shift(c, fake, a, b)
    v_fake = F(., t, c_fake)          v_fake (the fake branch of the same network)
    v_real = F(., t, c)               v_real (the real branch)
    w(t)                              tan_weight (step 6)
    lambda of Eq. (17)                cfg.paper_lambda; lambda_p = lambda_e = 1
    fake rows of the batch            boolean mask `fake` (never a sign trick on t)

Sections: 1 config, 2 model, 3 condition shift, 4 interpolant, 5 the APEX objective, 6 samplers,
7 data, 8 utilities (EMA, checkpoints, LoRA), 9 training, 10 command line.
Importing this file has no side effects.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import pickle
import platform
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as functional
from einops import rearrange

# ==================================================================================================
# 1. Config
# ==================================================================================================


@dataclass
class Config:
    # --- run -------------------------------------------------------------------------------------
    preset: str = "tiny"          # tiny | cifar: a named bundle of the fields below
    dataset: str = "shapes"       # cifar (CIFAR-10 pickles) | shapes (synthetic 16x16, no download)
    data_dir: str = "data"        # folder holding cifar-10-batches-py/
    out_dir: str = "runs/tiny"    # run folder: config.json, env.json, ckpt.pt, log.jsonl, grids
    resume: bool = False          # continue from out_dir/ckpt.pt
    seed: int = 0
    device: str = "auto"          # auto | cpu | cuda
    # --- model: a DiT --------------------------------------------------------------------------
    image_size: int = 16
    channels: int = 3
    patch_size: int = 2
    dim: int = 64
    depth: int = 2
    heads: int = 2
    num_classes: int = 10         # class `num_classes` is the null (unconditional) class
    # --- objective (apex_loss's steps) ---------------------------------------------------------
    objective: str = "apex"       # apex | consistency (apex, fake branch off) | fm | paper
    shift_a: float = -0.5         # c_fake = a * c + b, Eq. (9); Table 7's best cell
    shift_b: float = 1.0
    enr: float = 0.5              # strength of training-time guidance (step 4)
    cons_delta: float = 0.01      # d of the consistency target (step 5)
    cons_order: int = 2           # N jumps of the consistency target (step 5)
    robust_c: float = 1e-3        # c of the per-sample robust loss (step 6)
    gen_weight: float = 0.5       # weight of the one-step generator term (step 7)
    label_dropout: float = 0.1    # share of labels replaced by the null class
    paper_lambda: float = 0.5     # lambda of Eq. (17) for --objective paper (never given by the paper)
    # --- optimisation ----------------------------------------------------------------------------
    batch_size: int = 64          # global batch (split over processes)
    lr: float = 2e-4
    beta2: float = 0.99
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.99       # target decay of the warm-up EMA (step 8)
    warmup_steps: int = 0         # linear learning-rate warm-up
    max_steps: int = 300          # stop after this many steps (0 = no limit)
    minutes: float = 0.0          # training minutes, from the end of the first (compiling) step
    compile: bool = False         # torch.compile the network (CUDA)
    # --- plug-in tuning from a flow checkpoint (Sec. 4 of the paper: APEX tunes a flow model) ----
    init_from: str = ""           # start from this checkpoint's EMA weights (e.g. an --objective fm run)
    tune: str = "full"            # full | lora: train every weight, or low-rank adapters only
    lora_rank: int = 16           # rank of the adapters with --tune lora
    lora_targets: str = "ema"     # ema | teacher: the network of the targets under LoRA
    merge_lora: str = ""          # only export: fold the adapters of this LoRA checkpoint into plain weights
    # --- logging -------------------------------------------------------------------------------
    log_every: int = 25           # progress bar and log.jsonl every k steps
    sample_every: int = 0         # sample grids every k steps (0 = at the end only)
    ckpt_every: int = 100         # checkpoint every k steps (and at the end)


PRESETS = {
    # a few seconds per hundred steps on a laptop CPU; used by the tests and notebook 03
    "tiny": dict(dataset="shapes", image_size=16, patch_size=2, dim=64, depth=2, heads=2,
                 batch_size=64, lr=2e-4, max_steps=300, out_dir="runs/tiny"),
    # sized for a few minutes on one H100: the 330 s budget of the CIFAR target is the default
    "cifar": dict(dataset="cifar", image_size=32, patch_size=2, dim=384, depth=8, heads=6,
                  batch_size=512, lr=3e-4, warmup_steps=200, max_steps=0, minutes=5.5,
                  compile=True, log_every=50, sample_every=2000, ckpt_every=1000,
                  out_dir="runs/cifar"),
}
OBJECTIVES = ("apex", "consistency", "fm", "paper")


def validate(cfg: Config) -> None:
    """Raise ValueError with one readable sentence for a bad value."""
    checks = [
        (cfg.preset in PRESETS, f"--preset must be one of {sorted(PRESETS)}"),
        (cfg.dataset in ("cifar", "shapes"), "--dataset must be cifar or shapes"),
        (cfg.objective in OBJECTIVES, f"--objective must be one of {list(OBJECTIVES)}"),
        (cfg.device in ("auto", "cpu", "cuda"), "--device must be auto, cpu or cuda"),
        (cfg.tune in ("full", "lora") and cfg.lora_rank >= 1,
         "--tune must be full or lora, --lora-rank >= 1"),
        (cfg.lora_targets in ("ema", "teacher"), "--lora-targets must be ema or teacher"),
        (cfg.tune == "full" or cfg.init_from, "--tune lora needs --init-from CKPT (a base model to adapt)"),
        (cfg.image_size % cfg.patch_size == 0, "--image-size must be a multiple of --patch-size"),
        (cfg.dim % cfg.heads == 0, "--dim must be a multiple of --heads"),
        (min(cfg.dim, cfg.depth, cfg.heads, cfg.patch_size, cfg.num_classes) > 0,
         "model sizes must be positive"),
        (cfg.batch_size >= 4, "--batch-size must be at least 4 (four row groups)"),
        (cfg.lr > 0 and cfg.grad_clip > 0, "--lr and --grad-clip must be positive"),
        (0 <= cfg.ema_decay < 1, "--ema-decay must be in [0, 1)"),
        (0 <= cfg.label_dropout < 1, "--label-dropout must be in [0, 1)"),
        (0 < cfg.cons_delta < 1 and cfg.cons_order >= 1, "--cons-delta in (0,1), --cons-order >= 1"),
        (cfg.robust_c > 0, "--robust-c must be positive"),
        (cfg.max_steps >= 0 and cfg.minutes >= 0, "--max-steps and --minutes must be >= 0"),
        (cfg.max_steps > 0 or cfg.minutes > 0, "set a budget: --max-steps or --minutes"),
        (min(cfg.log_every, cfg.ckpt_every) > 0 and cfg.sample_every >= 0,
         "--log-every and --ckpt-every must be positive"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)


# ==================================================================================================
# 2. Model: a class-conditional DiT with an any-step time embedding
# ==================================================================================================


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t in [0, 1] followed by an MLP (as DiT's TimestepEmbedder)."""

    def __init__(self, dim: int, freq_dim: int = 256, zero_init: bool = False):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)
        if zero_init:
            # zero output: a model trained only at tt = t (flow matching) never moves this layer,
            # since its input is multiplied by (t - tt) = 0; so F(x, t, tt) == F(x, t, t) for it.
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)

    def forward(self, t):  # (B,) -> (B, D)
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
        args = 1000.0 * t.float()[:, None] * freqs[None]              # t scaled as DiT's [0, 1000]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


def modulate(x, shift, scale):  # adaLN: (B, T, D) with (B, D) shift and scale
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (DiT, Peebles & Xie 2023)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[1].weight)   # adaLN-Zero: every block starts as the identity
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x, cond):  # x: (B, T, D), cond: (B, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(cond).chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift1, scale1)
        q, k, v = rearrange(self.qkv(h), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        h = functional.scaled_dot_product_attention(q, k, v)                          # (B, H, T, D/H)
        x = x + gate1[:, None] * self.proj(rearrange(h, "b h t d -> b t (h d)"))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:  # (grid*grid, dim), fixed
    coords = torch.arange(grid, dtype=torch.float64)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    out = [f(c.flatten()[:, None] * omega[None]) for c in (yy, xx) for f in (torch.sin, torch.cos)]
    return torch.cat(out, dim=1).float()


class DiT(nn.Module):
    """F(x_t, t, tt, c): velocity (tt = t) or average velocity from t to tt (tt < t).

    Conditioning, as the released Qwen-Image wrapper: cond = emb_t(t) + (t - tt) * emb_tt(tt) + c,
    where c is a class-embedding vector; the condition shift (section 3) acts on c alone, so the
    same weights serve the real branch (c) and the fake branch (c_fake)."""

    def __init__(self, image_size=32, channels=3, patch_size=2, dim=384, depth=8, heads=6, num_classes=10):
        super().__init__()
        self.patch_size, self.channels, self.num_classes = patch_size, channels, num_classes
        self.grid = image_size // patch_size
        self.patch_embed = nn.Linear(patch_size * patch_size * channels, dim)
        self.register_buffer("pos", sincos_pos_embed(dim, self.grid)[None], persistent=False)
        self.t_embed = TimeEmbedding(dim)
        self.tt_embed = TimeEmbedding(dim, zero_init=True)
        self.class_embed = nn.Embedding(num_classes + 1, dim)   # last row: the null class
        nn.init.normal_(self.class_embed.weight, std=0.02)
        self.blocks = nn.ModuleList([DiTBlock(dim, heads) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.out = nn.Linear(dim, patch_size * patch_size * channels)
        for layer in (self.ada_out[1], self.out):   # zero output: the untrained F is 0
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def embed_class(self, y):  # (B,) int -> (B, D); y == num_classes is the null class
        return self.class_embed(y)

    def forward(self, x, t, tt, c):  # x: (B, C, H, W), t, tt: (B,), c: (B, D)
        p = self.patch_size
        cond = self.t_embed(t) + (t - tt)[:, None] * self.tt_embed(tt) + c           # (B, D)
        h = rearrange(x, "b c (gh p1) (gw p2) -> b (gh gw) (p1 p2 c)", p1=p, p2=p)   # (B, T, p*p*C)
        h = self.patch_embed(h) + self.pos                                           # (B, T, D)
        for block in self.blocks:
            h = block(h, cond)
        shift, scale = self.ada_out(cond).chunk(2, dim=-1)
        h = self.out(modulate(self.norm_out(h), shift, scale))                       # (B, T, p*p*C)
        return rearrange(h, "b (gh gw) (p1 p2 c) -> b c (gh p1) (gw p2)", gh=self.grid, p1=p, p2=p)


def build_model(cfg: Config) -> DiT:
    return DiT(cfg.image_size, cfg.channels, cfg.patch_size, cfg.dim, cfg.depth, cfg.heads, cfg.num_classes)


# ==================================================================================================
# 3. Condition shift (the APEX-specific part)
# ==================================================================================================


def condition_shift(c, fake, a: float, b: float):
    """Sec. 3.1, Eq. (9): c_fake = A c + b with A = a*I, b = b*1, on the rows where `fake` is True.

    The shifted condition turns the same network into a second, "fake" velocity field; trained by
    flow matching on the generator's own samples it becomes the velocity of p_theta (Sec. 3.2).

    NOTE(deviation): the paper shifts text-encoder features and the released code hard-codes
    a = -1, b = 0 on the projected text tokens; we shift the class-embedding vector with the best
    cell of the paper's Table 7 (a = -0.5, b = 1.0) as default. The released shift collapses
    here: our class embedding has std ~0.02, so -c is almost c and the branches cannot decouple."""
    return torch.where(fake[:, None], a * c + b, c)


# ==================================================================================================
# 4. Interpolant and per-sample losses
# ==================================================================================================


def bcast(t, x):  # (B,) -> (B, 1, ..., 1) to broadcast against x
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def interpolate(x, z, t):
    return bcast(t, x) * z + (1 - bcast(t, x)) * x          # Eq. (1); its d/dt is z - x


def robust_loss(p, q, c: float = 1e-3):
    """Per-sample robust loss of the released code (step 6): m = mean((p-q)^2),
    rho = m * sg((m/c^2 + 1)^-1/2) / c, whose gradient is that of 2*sqrt(m + c^2): every sample's
    gradient is normalised by its own error, so a few large-error rows cannot dominate."""
    m = (p.float() - q.float()).pow(2).flatten(1).mean(1)                    # (B,)
    return m * (m / c**2 + 1).rsqrt().detach() / c


def mse(p, q):  # per-sample mean squared error (B,)
    return (p.float() - q.float()).pow(2).flatten(1).mean(1)




# ==================================================================================================
# 5. The APEX objective: named pieces, then their assembly (apex_loss)
# ==================================================================================================
# The networks are callables F(x, t, tt, c) with `embed_class(y)` and `num_classes`, so the same
# pieces train the DiT, the 2-D MLP of toy_2d.py and the test stand-ins.


def drop_labels(y, share: float, null_class: int):
    """Replace a random share of the labels by the null class, which trains the unconditional
    branch that training-time guidance (step 4) needs.
    NOTE(deviation): label dropout (10%); TwinFlow's MNIST tutorial used shuffled labels."""
    if share <= 0:
        return y
    drop = torch.rand(y.shape, device=y.device) < share
    return torch.where(drop, torch.full_like(y, null_class), y)


def row_groups(batch: int, fake_branch: bool = True) -> dict:
    """Step 1: contiguous row slices of the batch, equal parts. Static slices, not random masks,
    keep every shape fixed, so a step needs no host sync and compiles once.
    NOTE(deviation): without the fake branch (`consistency`, our ablation) the batch is cut in
    three, so the fake rows' share goes to the other groups."""
    names = ("onestep", "flow", "anystep", "fake") if fake_branch else ("onestep", "flow", "anystep")
    q = batch // len(names)
    cuts = [i * q for i in range(len(names))] + [batch]
    return {name: slice(cuts[i], cuts[i + 1]) for i, name in enumerate(names)}


def sample_times(rows: dict, batch: int, device):
    """Step 1: (t, tt). One-step rows jump 1 -> 0; flow rows are nearly instantaneous
    (tt = t (1 - 0.05 u)); any-step rows jump to tt ~ U(0, t); fake rows are flow matching (tt = t)."""
    t = torch.rand(batch, device=device)
    u = torch.rand(batch, device=device)
    onestep, flow, anystep = rows["onestep"], rows["flow"], rows["anystep"]
    t[onestep] = 1.0
    tt = t.clone()
    tt[onestep] = 0.0
    tt[flow] = t[flow] * (1 - 0.05 * u[flow])
    tt[anystep] = t[anystep] * (1 - u[anystep])
    return t, tt


@torch.no_grad()
def onestep_samples(net, z, c):
    """Step 2: the generator's one-step samples x = z - F(z, 1, 0, c), the data of the fake rows.
    No gradient: the fake branch must learn the velocity of p_theta as it is, not change it.
    Drawn from the live network (the generator being trained), not from the EMA."""
    ones = torch.ones(z.shape[0], device=z.device)
    return (z - net(z, ones, 0 * ones, c)).detach()


@torch.no_grad()
def guided_target(ema, x_t, t, y, target, enr: float):
    """Step 4: training-time guidance, target + enr * (v_cond - v_null) from the EMA at tt = t,
    so that the model samples without CFG. A constant: no gradient through the EMA."""
    null = torch.full_like(y, ema.num_classes)
    c = torch.cat([ema.embed_class(y), ema.embed_class(null)])                    # (2n, D)
    v_cond, v_null = ema(torch.cat([x_t, x_t]), t.repeat(2), t.repeat(2), c).float().chunk(2)
    return target + enr * (v_cond - v_null)


@torch.no_grad()
def consistency_target(ema, F, x_t, t, tt, y, target, d: float, order: int):
    """Step 5 (RCGM): one small step of size d along the target to t_m = max(t - d, tt), then
    `order` average-velocity jumps of the EMA from t_m to tt; `disp` is x' - x_tt. The residual
    r compares the network's own jump (t - tt) F with that path, divided by d; rows with
    t - tt < d use plain flow matching. Returns sg(F) - clamp(r, -1, 1): a bounded step toward
    consistency (the clamp also makes F a per-coordinate Huber location of z - x, not its mean)."""
    F = F.detach().float()
    t_m = torch.maximum(t - d, tt)
    x_prime = x_t.float() - d * target
    x_jump, c = x_prime, ema.embed_class(y)
    for k in range(order):
        t_a = t_m + (tt - t_m) * k / order
        t_b = t_m + (tt - t_m) * (k + 1) / order
        x_jump = x_jump - bcast(t_a - t_b, x_jump) * ema(x_jump.to(x_t.dtype), t_a, t_b, c).float()
    disp = x_prime - x_jump
    r_jump = (bcast(t - tt, F) * F - disp) / d - target
    r_flow = F - target
    r = torch.where(bcast(t - tt < d, F), r_flow, r_jump)
    return F - r.clamp(-1, 1)


def tan_weight(t, tt, fake):
    """Step 6: w = 1 + tan((1 - (t - tt)) pi / 2.5), large for short jumps; w = 1 on fake rows."""
    w = 1 + torch.tan((1 - (t - tt)) * math.pi / 2.5)
    return torch.where(fake, torch.ones_like(w), w)


@torch.no_grad()
def shifted_velocities(net, x_s, s, y, cfg: Config):
    """The estimate of (v_fake, v_real) at x_s that the generator term uses: both branches of the
    live network at tt = s, in one call on the stacked batch [fake; real] (Sec. 3.2 of the paper).
    A study replaces this function (apex_loss's `velocities`) to use exact velocities instead."""
    c = net.embed_class(y)
    n = x_s.shape[0]
    fake = torch.arange(2 * n, device=x_s.device) < n                           # first half fake
    c2 = condition_shift(torch.cat([c, c]), fake, cfg.shift_a, cfg.shift_b)      # Eq. (9)
    v = net(torch.cat([x_s, x_s]), s.repeat(2), s.repeat(2), c2)
    v_fake, v_real = v.float().chunk(2)
    return v_fake, v_real


def generator_term(net, F_one, z, y, cfg: Config, velocities=shifted_velocities):
    """Step 7: the one-step generator term and the fake branch's health.

    x_g = z - F_one, noised to a random s; g = clamp(v_fake - v_real, -1, 1) there, without
    gradient. By Eq. (5), +(v_fake - v_real) is -(s_fake - s_real) times s/(1-s) > 0: the
    reverse-KL (DMD) direction, toward the data (Eq. 8 and 26-28 of the paper). The loss
    rho(F_one, sg(F_one - g)) moves F by -g, so x_g = z - F moves by +g. The clamp bounds the
    correction. Returns (loss, mean (v_fake - v_real)^2): how far the branches are apart, the
    health signal (near 0 at the start of tuning and for a shift that leaves them coupled)."""
    with torch.no_grad():
        x_g = z - F_one.detach()
        s = torch.rand(x_g.shape[0], device=x_g.device)
        x_s = interpolate(x_g, torch.randn_like(x_g), s)
        v_fake, v_real = velocities(net, x_s, s, y, cfg)
        gap = (v_fake - v_real).pow(2).mean()
        g = (v_fake - v_real).clamp(-1, 1)
    return robust_loss(F_one, F_one.detach().float() - g, cfg.robust_c).mean(), gap


def apex_loss(net, ema, x, y, cfg: Config, velocities=shifted_velocities):
    """The APEX objective on a batch (x, y): the released recipe with the condition shift.
    Returns (loss, dict of detached terms). `ema` is the network of the targets (steps 4-5).
    With cfg.objective == "consistency" the fake branch is off (no fake rows, no step 7).

    1. times: the batch is cut into one-step (t = 1, tt = 0), flow (tt ~ t), any-step
       (tt ~ U(0, t)) and fake rows (tt = t)                       row_groups, sample_times
    2. the fake rows' data are the generator's own one-step samples  onestep_samples
    3. one forward pass with gradient; fake rows see c_fake (Eq. 9)
    4. training-time guidance from the EMA on the flow and any-step rows   guided_target
    5. the consistency target on every row that is not fake           consistency_target
    6. loss per row: w * rho(F, target), tan weight and robust loss   tan_weight, robust_loss
    7. the generator term on the one-step rows, weight gen_weight     generator_term
    8. (outside: the EMA of the weights with its warm-up, class EMA)"""
    fake_branch = cfg.objective == "apex"
    B = x.shape[0]
    rows = row_groups(B, fake_branch)
    onestep, guided = rows["onestep"], slice(rows["flow"].start, rows["anystep"].stop)
    real = slice(0, rows["fake"].start if fake_branch else B)           # every row that is not fake
    fake = torch.zeros(B, dtype=torch.bool, device=x.device)
    fake[real.stop:] = True                                             # a mask says which are fake
    t, tt = sample_times(rows, B, x.device)                                              # step 1
    z = torch.randn_like(x)
    c = net.embed_class(y)                                                               # (B, D)
    if fake_branch:                                                                      # step 2
        z_gen = torch.randn_like(x[rows["fake"]])
        x_gen = onestep_samples(net, z_gen, c[rows["fake"]].detach())
        x = torch.cat([x[real], x_gen.to(x.dtype)])
    x_t = interpolate(x, z, t)
    target = (z - x).float()                                                             # Eq. (2)
    F = net(x_t, t, tt, condition_shift(c, fake, cfg.shift_a, cfg.shift_b))              # step 3
    if cfg.enr > 0:                                                                      # step 4
        target[guided] = guided_target(ema, x_t[guided], t[guided], y[guided], target[guided], cfg.enr)
    target[real] = consistency_target(ema, F[real], x_t[real], t[real], tt[real], y[real],
                                      target[real], cfg.cons_delta, cfg.cons_order)      # step 5
    per_row = tan_weight(t, tt, fake) * robust_loss(F, target, cfg.robust_c)            # step 6
    loss = per_row.mean()
    terms = {name: per_row[part].mean().detach() for name, part in rows.items()}
    if fake_branch and cfg.gen_weight > 0:                                               # step 7
        gen, terms["gap"] = generator_term(net, F[onestep], z[onestep], y[onestep], cfg, velocities)
        loss = loss + cfg.gen_weight * gen
        terms["gen"] = gen.detach()
    terms["loss"] = loss.detach()
    return loss, terms


def fm_loss(net, x, y):
    """Plain (conditional) flow matching, Eq. (2): F(x_t, t, t, c) regresses z - x."""
    t = torch.rand(x.shape[0], device=x.device)
    z = torch.randn_like(x)
    F = net(interpolate(x, z, t), t, t, net.embed_class(y))
    loss = mse(F, z - x).mean()
    return loss, {"loss": loss.detach(), "flow": loss.detach()}


def paper_loss(net, x, y, cfg: Config):
    """The paper-literal objective (Eq. 11-12, 17-25), for comparison.

    NOTE(deviation): the paper gives no lambda; we use cfg.paper_lambda = 0.5. Its weight
    1/omega(t) contradicts its own derivation; we use w(t) = 1. Read literally, the lambda term
    pulls the real branch toward v_fake, the opposite sign of the default generator term."""
    B, dev = x.shape[0], x.device
    t, t2 = torch.rand(B, device=dev), torch.rand(B, device=dev)
    z, z2 = torch.randn_like(x), torch.randn_like(x)
    c = net.embed_class(y)
    c_fake = condition_shift(c, torch.ones(B, dtype=torch.bool, device=dev), cfg.shift_a, cfg.shift_b)
    x_t = interpolate(x, z, t)
    F_real = net(x_t, t, t, c)
    x_fake = x_t - bcast(t, x) * F_real            # Eq. (11): WITH gradient, the adversarial path
    F_fake = net(interpolate(x_fake, z2, t2), t2, t2, c_fake)
    loss_fake = mse(F_fake, z2 - x_fake).mean()    # Eq. (12)
    with torch.no_grad():
        v_fake = net(x_t, t, t, c_fake).float()
    T = (1 - cfg.paper_lambda) * (z - x).float() + cfg.paper_lambda * v_fake   # Eq. (17), sg(v_fake)
    loss_mix = mse(F_real, T).mean()               # Eq. (18) with w(t) = 1
    loss = loss_fake + loss_mix                    # lambda_p = lambda_e = 1
    return loss, {"loss": loss.detach(), "fake": loss_fake.detach(), "mix": loss_mix.detach()}


def training_loss(net, ema, x, y, cfg: Config, velocities=shifted_velocities):
    """The loss train() minimises: label dropout, then the objective named by cfg.objective."""
    y = drop_labels(y, cfg.label_dropout, net.num_classes)
    if cfg.objective == "fm":
        return fm_loss(net, x, y)
    if cfg.objective == "paper":
        return paper_loss(net, x, y, cfg)
    return apex_loss(net, ema, x, y, cfg, velocities)


# ==================================================================================================
# 6. Samplers (run them on the EMA weights)
# ==================================================================================================

FEW_STEP_TIMES = {1: [0.999, 0.0], 2: [0.999, 0.6, 0.0], 4: [0.999, 0.833, 0.666, 0.5, 0.0]}


def few_step_times(nfe: int) -> list:
    """The released grids for 1/2/4 NFE; other NFE: t = 1 - linspace(0.001, 0.5, n), then 0.
    NOTE(deviation): the gap for NFE other than 1, 2, 4 is ours (the 4-NFE grid's, 0.5)."""
    if nfe in FEW_STEP_TIMES:
        return FEW_STEP_TIMES[nfe]
    if nfe < 1:
        raise ValueError("nfe must be >= 1")
    return [1 - (0.001 + (0.5 - 0.001) * i / (nfe - 1)) for i in range(nfe)] + [0.0]


@torch.no_grad()
def sample_fewstep(net, z, y, nfe: int = 1, times=None, rho: float = 1.0, generator=None):
    """The released (UCGM) few-step sampler. Each step jumps to the data endpoint with
    F(x, t, 0, c) and re-noises it to the next time with fresh noise (rho = 1)."""
    times = few_step_times(nfe) if times is None else times
    x, c = z, net.embed_class(y)
    for t_cur, t_next in zip(times[:-1], times[1:]):
        t = torch.full((z.shape[0],), t_cur, device=z.device)
        F = net(x, t, torch.zeros_like(t), c)
        x_hat, z_hat = x - t_cur * F, x + (1 - t_cur) * F        # data and noise endpoints
        eps = torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype)
        x = (1 - t_next) * x_hat + t_next * (math.sqrt(1 - rho) * z_hat + math.sqrt(rho) * eps)
    return x


@torch.no_grad()
def sample_euler(net, z, y, steps: int = 50):
    """Multi-step diagnostic: the model as a plain flow (tt = t), Euler from t = 1 to t = 0."""
    x, c = z, net.embed_class(y)
    ts = torch.linspace(1.0, 0.0, steps + 1).tolist()
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        t = torch.full((z.shape[0],), t_cur, device=z.device)
        x = x - (t_cur - t_next) * net(x, t, t, c)                 # dx/dt = F, stepping down in t
    return x


# ==================================================================================================
# 7. Data
# ==================================================================================================


def load_cifar(data_dir: str, train: bool = True):
    """CIFAR-10 from the standard `cifar-10-batches-py` pickles: (uint8 (N,3,32,32), int64 (N,)).

    Reads the pickles directly (no md5 check); downloads through torchvision only when they are
    missing, and otherwise stops with one line that says how to fill the folder."""
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    if not all(os.path.exists(os.path.join(folder, n)) for n in names):
        try:
            import torchvision
            torchvision.datasets.CIFAR10(data_dir, train=train, download=True)
        except Exception as e:  # no network, no torchvision: say what to do, in one line
            raise SystemExit(f"error: CIFAR-10 not found in {folder} and could not be downloaded "
                             f"({type(e).__name__}); put the python pickles there, e.g. with "
                             f"`python to_torchvision.py {data_dir}` from a local copy")
    xs, ys = [], []
    for n in names:
        with open(os.path.join(folder, n), "rb") as f:
            d = pickle.load(f, encoding="latin1")
        xs.append(torch.as_tensor(d["data"], dtype=torch.uint8).reshape(-1, 3, 32, 32))
        ys.append(torch.as_tensor(d["labels"], dtype=torch.int64))
    return torch.cat(xs), torch.cat(ys)


def make_shapes(n: int = 2048, size: int = 16, num_classes: int = 10, seed: int = 0):
    """A synthetic class-conditional image set that needs no download (tiny preset, tests, CPU):
    class k is a square of the k-th colour at a random place on a dark background."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(num_classes, (n,), generator=g)
    hues = torch.arange(num_classes) / num_classes
    rgb = 0.5 + 0.5 * torch.stack([torch.cos(2 * math.pi * (hues + k / 3)) for k in range(3)], 1)  # (K, 3)
    x = torch.full((n, 3, size, size), 0.1)
    side = size // 3
    pos = torch.randint(size - side + 1, (n, 2), generator=g)
    for i in range(n):
        r, s = pos[i].tolist()
        x[i, :, r:r + side, s:s + side] = rgb[y[i]][:, None, None]
    return (x * 255).round().to(torch.uint8), y


class ImageData:
    """The whole training set on the device as uint8; a batch is random indices, random
    horizontal flips and a scale to [-1, 1], with no host work."""

    def __init__(self, cfg: Config, device):
        if cfg.dataset == "cifar":
            x, y = load_cifar(cfg.data_dir, train=True)
        else:
            x, y = make_shapes(size=cfg.image_size, num_classes=cfg.num_classes, seed=cfg.seed)
        if x.shape[1:] != (cfg.channels, cfg.image_size, cfg.image_size):
            raise SystemExit(f"error: data of shape {tuple(x.shape[1:])} does not fit the model "
                             f"({cfg.channels}, {cfg.image_size}, {cfg.image_size})")
        self.x, self.y = x.to(device), y.to(device)

    def batch(self, n: int):
        idx = torch.randint(len(self.x), (n,), device=self.x.device)
        x = self.x[idx].float() / 127.5 - 1                                    # (n, C, H, W) in [-1, 1]
        flip = torch.rand(n, device=x.device) < 0.5
        return torch.where(bcast(flip, x), x.flip(3), x), self.y[idx]


# ==================================================================================================
# 8. Utilities: EMA, checkpoints, LoRA, grids, environment
# ==================================================================================================


class EMA:
    """EMA of the weights with the released warm-up (step 8):
    decay_k = decay_{k-1} + (1 - decay_{k-1}) * (target - decay_{k-1}) / 2, decay_0 = 0."""

    def __init__(self, model: nn.Module, target: float = 0.99):
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.target, self.decay = target, 0.0

    @torch.no_grad()
    def update(self, model: nn.Module):
        self.decay = self.decay + (1 - self.decay) * (self.target - self.decay) / 2
        ema_p, live_p = list(self.model.parameters()), list(model.parameters())
        torch._foreach_lerp_(ema_p, live_p, 1 - self.decay)   # ema = decay*ema + (1-decay)*live


def save_checkpoint(path: str, state: dict) -> None:
    """Atomic: write a temp file beside the target, flush it to disk, then rename over the target.
    A kill at any moment leaves the previous checkpoint whole (and at most a stale temp file,
    which train() removes)."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str, device="cpu") -> dict:
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint at {path}")
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as e:
        raise SystemExit(f"error: cannot read checkpoint {path}: {type(e).__name__}")


def check_architecture(saved: dict, cfg: Config, path: str) -> None:
    arch = ("image_size", "channels", "patch_size", "dim", "depth", "heads", "num_classes")
    differ = [f"{k} {saved.get(k)} vs {getattr(cfg, k)}" for k in arch if saved.get(k) != getattr(cfg, k)]
    if differ:
        raise SystemExit(f"error: {path} holds another architecture ({', '.join(differ)})")


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: W x + (B A x) * (alpha / r).
    B starts at zero, so at initialisation the layer is exactly the base layer."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float = None):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = (alpha or rank) / rank
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + functional.linear(functional.linear(x, self.lora_A), self.lora_B) * self.scale

    def merged(self) -> nn.Linear:
        out = copy.deepcopy(self.base)
        out.weight.data += (self.lora_B @ self.lora_A) * self.scale
        return out.requires_grad_(True)


def add_lora(net: DiT, rank: int) -> DiT:
    """Freeze the network and put adapters on the attention and MLP projections of every block.
    The target-time embedding emb_tt stays trainable: a flow checkpoint has never used it (its
    last layer is zero, so at tt = t the model is exactly the checkpoint), and the one-step jump
    needs it."""
    net.requires_grad_(False)
    for block in net.blocks:
        block.qkv, block.proj = LoRALinear(block.qkv, rank), LoRALinear(block.proj, rank)
        block.mlp[0], block.mlp[2] = LoRALinear(block.mlp[0], rank), LoRALinear(block.mlp[2], rank)
    net.tt_embed.requires_grad_(True)
    return net


def merge_lora(net: DiT) -> DiT:
    """Fold every adapter into its base weight: a plain DiT with the same function."""
    for block in net.blocks:
        for name in ("qkv", "proj"):
            if isinstance(getattr(block, name), LoRALinear):
                setattr(block, name, getattr(block, name).merged())
        for i in (0, 2):
            if isinstance(block.mlp[i], LoRALinear):
                block.mlp[i] = block.mlp[i].merged()
    return net


def network_from_state(ckpt: dict, which: str) -> DiT:
    """The plain DiT of a checkpoint's `which` weights (model or ema), LoRA adapters merged."""
    cfg = Config(**ckpt["config"])
    net = build_model(cfg)
    if cfg.tune == "lora":
        net = add_lora(net, cfg.lora_rank)
    net.load_state_dict(ckpt[which])
    return merge_lora(net)


def model_from_checkpoint(path: str, device="cpu", which: str = "ema"):
    """(network with the `which` weights, Config) from a checkpoint written by train()."""
    ckpt = load_checkpoint(path, device)
    net = network_from_state(ckpt, which)
    return net.to(device).eval().requires_grad_(False), Config(**ckpt["config"])


def export_merged(path: str) -> str:
    """Write PATH's LoRA adapters folded into plain DiT weights (model and EMA) to *_merged.pt."""
    ckpt = load_checkpoint(path)
    if ckpt["config"].get("tune") != "lora":
        raise SystemExit(f"error: {path} is not a LoRA checkpoint (its --tune is {ckpt['config'].get('tune')})")
    state = {"config": {**ckpt["config"], "tune": "full"}, "step": ckpt["step"], "merged_from": path}
    for which in ("model", "ema"):
        state[which] = network_from_state(ckpt, which).state_dict()
    out = path[:-3] + "_merged.pt" if path.endswith(".pt") else path + "_merged.pt"
    save_checkpoint(out, state)
    return out


@torch.no_grad()
def save_grid(net, path: str, cfg: Config, nfe: int, per_class: int = 10, seed: int = 0):
    """A sample grid, one row per class, fixed noise: the run's visible progress."""
    from torchvision.utils import save_image
    dev = next(net.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    y = torch.arange(cfg.num_classes, device=dev).repeat_interleave(per_class)
    z = torch.randn(len(y), cfg.channels, cfg.image_size, cfg.image_size, device=dev, generator=g)
    x = sample_fewstep(net, z, y, nfe=nfe, generator=g)
    save_image((x.clamp(-1, 1) + 1) / 2, path, nrow=per_class)


def environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "host": platform.node(),
           "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    try:
        import subprocess
        here = os.path.dirname(os.path.abspath(__file__))
        env["git"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                    text=True, timeout=5).stdout.strip() or None
    except Exception:
        env["git"] = None
    return env


# ==================================================================================================
# 9. Training: setup, the step, logging and checkpoints
# ==================================================================================================


def setup_process(cfg: Config):
    """(device, rank, world size): CUDA or CPU; one process, or one per GPU under torchrun."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if distributed else (0, 1)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but CUDA is not available")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cpu")
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True   # fp32 master weights; matmuls run in bf16 anyway
        torch.backends.cudnn.allow_tf32 = True
    if distributed:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if cfg.batch_size % world:
        raise SystemExit(f"error: --batch-size {cfg.batch_size} is not divisible by {world} processes")
    return device, rank, world


def build_training(cfg: Config, device) -> SimpleNamespace:
    """The network (from scratch, or --init-from a flow checkpoint's EMA weights, with LoRA
    adapters under --tune lora), its EMA, the optimiser and the network of the targets."""
    net = build_model(cfg)
    if cfg.init_from:
        base = load_checkpoint(cfg.init_from, "cpu")
        check_architecture(base["config"], cfg, cfg.init_from)
        if base["config"].get("tune") == "lora":
            raise SystemExit(f"error: {cfg.init_from} is a LoRA run; merge it first (--merge-lora)")
        net.load_state_dict(base["ema"])
    teacher = copy.deepcopy(net).requires_grad_(False).to(device) if cfg.tune == "lora" else None
    if cfg.tune == "lora":
        net = add_lora(net, cfg.lora_rank)
    net = net.to(device)
    ema = EMA(net, cfg.ema_decay)
    trainable = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, cfg.beta2),
                            weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    # under LoRA the guidance and consistency targets may come from the frozen base model instead
    targets = teacher if (teacher is not None and cfg.lora_targets == "teacher") else ema.model
    return SimpleNamespace(net=net, ema=ema, opt=opt, trainable=trainable, targets=targets,
                           step=0, train_seconds=0.0)


def training_state(run: SimpleNamespace, cfg: Config) -> dict:
    """Everything exact resume needs: weights, EMA, optimiser, step, clock and random streams."""
    device = next(run.net.parameters()).device
    return {"model": run.net.state_dict(), "ema": run.ema.model.state_dict(),
            "ema_decay": run.ema.decay, "opt": run.opt.state_dict(),
            "config": dataclasses.asdict(cfg), "step": run.step, "train_seconds": run.train_seconds,
            "rng": {"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}


def resume(run: SimpleNamespace, cfg: Config, path: str, rank: int, device) -> None:
    ckpt = load_checkpoint(path, device)
    check_architecture(ckpt["config"], cfg, path)
    saved = (ckpt["config"].get("tune"), ckpt["config"].get("lora_rank"))
    if cfg.tune == "lora" and saved != (cfg.tune, cfg.lora_rank):
        raise SystemExit(f"error: {path} was trained with another --tune/--lora-rank")
    run.net.load_state_dict(ckpt["model"])
    run.ema.model.load_state_dict(ckpt["ema"])
    run.ema.decay = ckpt["ema_decay"]
    run.opt.load_state_dict(ckpt["opt"])
    run.step, run.train_seconds = ckpt["step"], ckpt.get("train_seconds", 0.0)
    if rank == 0:  # exact continuation on one process; other ranks get fresh, distinct streams
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    else:
        torch.manual_seed(cfg.seed + rank + 7919 * run.step)


def allreduce_gradients(model: nn.Module, world: int) -> None:
    """Data parallelism: average the gradients of all processes with one flat all-reduce.
    (Written out instead of wrapping in DistributedDataParallel, because the APEX step calls the
    network several times per backward, some calls without gradient.)"""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def train_step(run: SimpleNamespace, net_fn, targets_fn, x, y, cfg: Config, autocast, world: int):
    """One optimiser step: learning-rate warm-up, loss, backward, all-reduce, clip, AdamW, EMA."""
    for group in run.opt.param_groups:   # linear warm-up, then constant (as the released code)
        group["lr"] = cfg.lr * min(1.0, (run.step + 1) / max(1, cfg.warmup_steps))
    with autocast:
        loss, terms = training_loss(net_fn, targets_fn, x, y, cfg)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    if world > 1:
        allreduce_gradients(run.net, world)
    torch.nn.utils.clip_grad_norm_(run.trainable, cfg.grad_clip)
    run.opt.step()
    run.ema.update(run.net)
    run.step += 1
    return loss.detach(), terms


def write_json(path: str, value: dict, mode: str = "w") -> None:
    with open(path, mode) as f:
        f.write(json.dumps(value, indent=None if mode == "a" else 2) + "\n")


class Progress:
    """What a run shows and keeps: the clocks, img/s, the progress bar, log.jsonl, checkpoints and
    sample grids (rank 0 writes), and the checks that stop every rank together."""

    def __init__(self, run: SimpleNamespace, cfg: Config, main: bool, device):
        from tqdm import tqdm
        self.run, self.cfg, self.main, self.device = run, cfg, main, device
        self.ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
        n_params = sum(p.numel() for p in run.net.parameters())
        self.bar = tqdm(total=cfg.max_steps or None, initial=run.step, disable=not main,
                        mininterval=2, desc=f"{cfg.objective} {n_params / 1e6:.1f}M")
        self.bad = torch.zeros((), dtype=torch.bool, device=device)  # a non-finite loss since the last check
        self.t_start = self.t0 = self.last_t = time.time()
        self.first_step = self.last_step = run.step
        self.img_per_s = self.warmup_seconds = 0.0

    def step_done(self, loss, terms: dict, world: int) -> bool:
        """After every step. Returns True once the --minutes budget is spent (on every rank)."""
        run, cfg = self.run, self.cfg
        self.bad |= ~torch.isfinite(loss)              # no host sync: checked at the intervals
        self.bar.update(1)
        if run.step == self.first_step + 1:
            # the clocks start when the first step of this invocation has finished: that step
            # includes torch.compile's compilation, reported as warmup_seconds
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.t0 = self.last_t = time.time()
            self.warmup_seconds, self.last_step = self.t0 - self.t_start, run.step
        at_log, at_ckpt = run.step % cfg.log_every == 0, run.step % cfg.ckpt_every == 0
        if not (at_log or at_ckpt):
            return False
        time_up = cfg.minutes > 0 and time.time() - self.t0 > 60 * cfg.minutes
        flags = torch.stack([self.bad.float(), torch.tensor(float(time_up), device=self.device)])
        if world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0] > 0:
            raise FloatingPointError
        now = time.time()
        run.train_seconds += now - self.last_t
        self.img_per_s = (run.step - self.last_step) * cfg.batch_size / (now - self.last_t)
        self.last_t, self.last_step = now, run.step
        values = {k: round(v.item(), 5) for k, v in terms.items()}
        self.bar.set_postfix({k: f"{v:.4f}" for k, v in values.items()} | {"img/s": f"{self.img_per_s:.0f}"})
        if self.main and at_log:
            line = {"step": run.step, **values, "img_per_s": round(self.img_per_s, 1),
                    "train_seconds": round(run.train_seconds, 2)}
            write_json(os.path.join(cfg.out_dir, "log.jsonl"), line, mode="a")
        if self.main and at_ckpt:
            self.checkpoint()
        if self.main and cfg.sample_every and run.step % cfg.sample_every == 0:
            self.grids()
        return bool(flags[1] > 0)

    def checkpoint(self):
        save_checkpoint(self.ckpt_path, training_state(self.run, self.cfg))

    def grids(self):
        for nfe in (1, 2):
            name = f"samples_{self.run.step:07d}_nfe{nfe}.png"
            save_grid(self.run.ema.model, os.path.join(self.cfg.out_dir, name), self.cfg, nfe)

    def finish(self, terms: dict, stop: str) -> dict:
        """Close the clocks; rank 0 saves the checkpoint, then the grids and summary.json."""
        run, cfg = self.run, self.cfg
        self.bar.close()
        run.train_seconds += time.time() - self.last_t
        steps_run = run.step - self.first_step
        mean = (steps_run - 1) * cfg.batch_size / max(time.time() - self.t0, 1e-9)
        summary = {"step": run.step, "stop": stop, "train_seconds": round(run.train_seconds, 1),
                   "img_per_s_last_window": round(self.img_per_s, 1), "img_per_s_mean": round(mean, 1),
                   "warmup_seconds": round(self.warmup_seconds, 1),
                   "params": sum(p.numel() for p in run.net.parameters()),
                   "trainable_params": sum(p.numel() for p in run.trainable),
                   "terms": {k: round(v.item(), 5) for k, v in terms.items()}}
        if self.main:
            self.checkpoint()     # first: a late error in sampling must not cost the training
            self.grids()
            write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
            print(json.dumps(summary))
        return summary


def train(cfg: Config) -> dict:
    """Train with cfg; returns a summary dict. Works as one process or under torchrun.
    Writes to cfg.out_dir: config.json, env.json, ckpt.pt (atomic, every ckpt_every steps),
    log.jsonl (a line every log_every steps), and at the end summary.json and sample grids."""
    validate(cfg)
    device, rank, world = setup_process(cfg)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    os.makedirs(cfg.out_dir, exist_ok=True)
    torch.manual_seed(cfg.seed + rank)
    data = ImageData(cfg, device)
    run = build_training(cfg, device)
    if cfg.resume:
        resume(run, cfg, ckpt_path, rank, device)
    elif os.path.exists(ckpt_path):
        raise SystemExit(f"error: {ckpt_path} exists; pass --resume to continue it or choose another --out-dir")
    if rank == 0 and os.path.exists(ckpt_path + ".tmp"):
        os.remove(ckpt_path + ".tmp")        # a write cut off by a kill: never a whole checkpoint
    if world > 1:  # one set of weights everywhere, whatever each process drew
        for p in list(run.net.parameters()) + list(run.ema.model.parameters()):
            dist.broadcast(p.data, 0)
    if rank == 0:
        write_json(os.path.join(cfg.out_dir, "config.json"), dataclasses.asdict(cfg))
        write_json(os.path.join(cfg.out_dir, "env.json"), {**environment(), "world_size": world})
    net_fn, targets_fn = run.net, run.targets
    if cfg.compile and device.type == "cuda":
        # one graph per call shape and grad mode (the step calls the network at 4 batch sizes):
        # static shapes, and room for all of them in the recompile cache
        import torch._dynamo as dynamo
        dynamo.config.recompile_limit = max(32, dynamo.config.recompile_limit)
        net_fn = torch.compile(run.net, dynamic=False)
        targets_fn = torch.compile(run.targets, dynamic=False)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    progress, stop, terms = Progress(run, cfg, rank == 0, device), "max-steps", {}
    try:
        while cfg.max_steps == 0 or run.step < cfg.max_steps:
            x, y = data.batch(cfg.batch_size // world)
            loss, terms = train_step(run, net_fn, targets_fn, x, y, cfg, autocast, world)
            if progress.step_done(loss, terms, world):
                stop = "minutes"
                break
    except KeyboardInterrupt:
        stop = "interrupted"
    except FloatingPointError:
        stop = "non-finite loss"
    if stop == "non-finite loss" or bool(progress.bad):
        progress.bar.close()
        raise SystemExit(f"error: non-finite loss before step {run.step}; stopped. The last good "
                         f"checkpoint ({ckpt_path}) is untouched; lower --lr or resume from it.")
    summary = progress.finish(terms, stop)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if stop == "interrupted":
        raise SystemExit(130)
    return summary


# ==================================================================================================
# 10. Command line: argparse generated from the Config dataclass
# ==================================================================================================


def field_help(settings_class=Config) -> dict:
    """The comment beside each field of a settings dataclass (Config, or toy_2d's ToySettings),
    reused as its --help text (one source of truth)."""
    import inspect
    import re
    src = inspect.getsource(settings_class)
    return {m[1]: m[2] for m in re.finditer(r"^\s+(\w+): \w+ = [^#\n]*#\s*(.*)$", src, re.M)}


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one clear line and exit code 2, never a traceback
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_config(argv=None) -> Config:
    """Precedence: dataclass defaults < preset < flags."""
    p = OneLineParser(prog="apex_min.py", description="APEX one-step generation (arXiv 2604.12322), "
                      "minimal reference. `--dataset cifar` uses the cifar preset.")
    defaults = Config()
    groups = {"run": "preset", "model": "image_size", "objective": "objective",
              "optimisation": "batch_size", "logging": "log_every"}
    current, helps = None, field_help()
    for field in dataclasses.fields(Config):
        for title, first in groups.items():
            if field.name == first:
                current = p.add_argument_group(title)
        flag = "--" + field.name.replace("_", "-")
        text = f"{helps.get(field.name, '')} (default {getattr(defaults, field.name)!r})"
        if field.type in ("bool", bool):
            current.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            kind = {"int": int, "float": float, "str": str}[str(field.type)]
            current.add_argument(flag, type=kind, default=None, help=text)
    args = vars(p.parse_args(argv))
    preset = args["preset"] or ("cifar" if args["dataset"] == "cifar" else "tiny")
    if preset not in PRESETS:
        p.error(f"--preset must be one of {sorted(PRESETS)}")
    values = {**PRESETS[preset], "preset": preset, **{k: v for k, v in args.items() if v is not None}}
    cfg = Config(**values)
    try:
        validate(cfg)
    except ValueError as e:
        p.error(str(e))
    return cfg


if __name__ == "__main__":
    config = parse_config()
    if config.merge_lora:
        print(f"wrote {export_merged(config.merge_lora)}")
    else:
        train(config)
