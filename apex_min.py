"""apex_min: a minimal, single-file reference of APEX one-step generation.

"Self-Adversarial One Step Generation via Condition Shifting" (Liu et al., arXiv 2604.12322v1,
whose equations are cited). "Step k" is a step of the released recipe, listed in apex_loss's
docstring (docs/method.md compares paper, recipe and code). NOTE(deviation) marks departures.

    x_t = t z + (1 - t) x,  z ~ N(0, I),  t = 1 is noise, t = 0 data (images in [-1, 1])  Eq. (1)
    network output F ~ z - x = d x_t / d t, a velocity                                     Eq. (2)
    data endpoint x_hat = x_t - t F,  noise endpoint z_hat = x_t + (1 - t) F
    score from velocity: s_t(x_t) = -(x_t + (1 - t) v) / t                                 Eq. (5)
    any-step F(x_t, t, tt, c), tt <= t, the average velocity: x_tt = x_t - (t - tt) F;
    one step: x = z - F(z, 1, 0, c). Paper -> code: F_theta(x_t, t, c) = net(x_t, t, tt=t, c);
    c_fake = A c + b (Eq. 9) = condition_shift; v_real = F(., t, c), v_fake = F(., t, c_fake): two
    branches of one network; w(t) = tan_weight; lambda of Eq. (17) = cfg.paper_lambda; the fake
    rows of a batch = a boolean mask `fake` (never a sign trick on t).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import pickle
import platform
import signal
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as functional
from einops import rearrange

# 1. Config

@dataclasses.dataclass
class Config:  # one field per flag; the comments are the --help texts (field_help)
    preset: str = "tiny"          # tiny | cifar: a named bundle of the fields below
    dataset: str = "shapes"       # cifar (CIFAR-10 pickles) | shapes (synthetic 16x16, no download)
    data_dir: str = "data"        # folder holding cifar-10-batches-py/
    out_dir: str = "runs/tiny"    # run folder: config, env, ckpt.pt, log.jsonl, summary, grids
    resume: bool = False          # continue from out_dir/ckpt.pt
    seed: int = 0
    device: str = "auto"          # auto | cpu | cuda
    image_size: int = 16
    channels: int = 3
    patch_size: int = 2
    dim: int = 64
    depth: int = 2
    heads: int = 2
    num_classes: int = 10         # class `num_classes` is the null (unconditional) class
    objective: str = "apex"       # apex | consistency (apex without fake branch) | fm | paper
    shift_a: float = -0.5         # c_fake = a * c + b, Eq. (9); Table 7's best cell
    shift_b: float = 1.0
    enr: float = 0.5              # training-time guidance (step 4): CFG scale 1 / (1 - enr), < 1
    cons_delta: float = 0.01      # d of the consistency target (step 5)
    cons_order: int = 2           # N jumps of the consistency target (step 5)
    robust_c: float = 1e-3        # c of the per-sample robust loss (step 6)
    gen_weight: float = 0.5       # weight of the one-step generator term (step 7)
    gen_norm: str = "clamp"       # clamp (released) | dmd: the correction normalised as DMD's
    gen_s_min: float = 0.0        # the term's s ~ U(gen_s_min, gen_s_max); released: U(0, 1)
    gen_s_max: float = 1.0
    polish_from: float = 0.0      # > 0: the term only from this share of the steps (scheduled)
    onestep_weight: float = 1.0   # weight of the one-step rows' loss (0 while polishing)
    fake_share: float = 0.25      # share of the batch in the fake rows; the rest split in three
    label_dropout: float = 0.1    # share of labels replaced by the null class
    paper_lambda: float = 0.5     # lambda of Eq. (17) for --objective paper (the paper gives none)
    batch_size: int = 64          # global batch (split over processes)
    lr: float = 2e-4
    beta2: float = 0.99
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.99       # target decay of the warm-up EMA (step 8)
    warmup_steps: int = 0         # linear learning-rate warm-up
    lr_schedule: str = "constant" # constant (released) | cosine: decay to 0 over the steps
    max_steps: int = 300          # stop after this many steps (0 = no limit)
    minutes: float = 0.0          # training minutes in all, a resumed run's included (compiling not)
    flow_share: float = 0.0       # > 0: flow matching first for this share of the budget (out_dir/flow)
    compile: bool = False         # torch.compile the network (CUDA)
    bf16_stream: bool = False     # the residual stream in bf16 under autocast (faster; FID cost open)
    init_from: str = ""           # start from this checkpoint's EMA weights (an --objective fm run)
    tune: str = "full"            # full | lora: train every weight, or low-rank adapters only
    lora_rank: int = 16           # rank of the adapters with --tune lora
    merge_lora: str = ""          # only export: fold this LoRA checkpoint's adapters into weights
    log_every: int = 25           # progress bar and log.jsonl every k steps
    ckpt_every: int = 100         # checkpoint every k steps (and at the end)

PRESETS = {
    # a few seconds per hundred steps on a laptop CPU; used by the tests and notebook 03
    "tiny": dict(dataset="shapes", image_size=16, patch_size=2, dim=64, depth=2, heads=2,
                 batch_size=64, lr=2e-4, max_steps=300, out_dir="runs/tiny"),
    # 330 s of training on one H100 or H200: flow matching for 60% of it, then APEX from that
    # model with a cosine rate, the generator term on for its last 20% with s < 0.25 (the best
    # of flow shares 0.2-0.8, then of three APEX stages, in docs/results.md)
    "cifar": dict(dataset="cifar", image_size=32, patch_size=2, dim=384, depth=8, heads=6,
                  batch_size=512, lr=3e-4, warmup_steps=200, max_steps=0, minutes=5.5,
                  flow_share=0.6, lr_schedule="cosine", polish_from=0.8, gen_s_min=0.02, gen_s_max=0.25,
                  compile=True, log_every=50, ckpt_every=1000, out_dir="runs/cifar"),
}
OBJECTIVES = ("apex", "consistency", "fm", "paper")

def validate(c: Config) -> None:  # ValueError: one readable sentence
    checks = [
        (c.preset in PRESETS, f"--preset must be one of {sorted(PRESETS)}"),
        (c.objective in OBJECTIVES, f"--objective must be one of {list(OBJECTIVES)}"),
        (c.device in ("auto", "cpu", "cuda") and c.dataset in ("cifar", "shapes"),
         "--device must be auto, cpu or cuda, --dataset cifar or shapes"),
        (c.tune in ("full", "lora") and c.lora_rank >= 1, "--tune full|lora, --lora-rank >= 1"),
        (c.tune == "full" or c.init_from or c.flow_share, "--tune lora needs a base: --init-from CKPT"),
        (0 <= c.flow_share < 1, "--flow-share must be in [0, 1)"),
        (c.image_size % c.patch_size == 0, "--image-size must be a multiple of --patch-size"),
        (c.dim % c.heads == 0, "--dim must be a multiple of --heads"),
        (min(c.dim, c.depth, c.heads, c.patch_size, c.num_classes) > 0, "sizes must be > 0"),
        (c.batch_size >= 4 and 0 < c.fake_share < 1 and c.batch_size * (1 - c.fake_share) >= 3,
         "--batch-size >= 4 and --fake-share in (0, 1), leaving 3 rows or more for the other groups"),
        (c.lr > 0 and c.grad_clip > 0 and c.robust_c > 0, "--lr, --grad-clip, --robust-c: > 0"),
        (0 <= c.ema_decay < 1 and 0 <= c.label_dropout < 1, "--ema-decay/--label-dropout: [0, 1)"),
        (0 < c.cons_delta < 1 and c.cons_order >= 1, "--cons-delta in (0,1), --cons-order >= 1"),
        (c.gen_norm in ("clamp", "dmd") and 0 <= c.gen_s_min < c.gen_s_max <= 1,
         "--gen-norm clamp|dmd, 0 <= --gen-s-min < --gen-s-max <= 1"),
        (0 <= c.polish_from < 1 and c.lr_schedule in ("constant", "cosine"),
         "--polish-from in [0, 1), --lr-schedule constant|cosine"),
        ((c.shift_a, c.shift_b) != (1.0, 0.0), "--shift-a 1 --shift-b 0: c_fake = c, no fake branch"),
        (c.max_steps >= 0 and c.minutes >= 0, "--max-steps and --minutes must be >= 0"),
        (c.max_steps > 0 or c.minutes > 0, "set a budget: --max-steps or --minutes"),
        (min(c.log_every, c.ckpt_every) > 0, "--log-every and --ckpt-every must be > 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)

# 2. Model: a class-conditional DiT with an any-step time embedding

class TimeEmbedding(nn.Module):  # DiT's TimestepEmbedder
    def __init__(self, dim: int, freq_dim: int = 256, zero_init: bool = False):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)
        if zero_init:  # emb_tt: flow matching (tt = t) never moves it, so F(., t, tt) = F(., t, t)
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)

    def forward(self, t):  # (B,) -> (B, D)
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
        args = 1000.0 * t.float()[:, None] * freqs[None]              # t scaled as DiT's [0, 1000]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))

def modulate(x, shift, scale):  # adaLN: (B, T, D) with (B, D) shift and scale
    return x * (1 + scale[:, None]) + shift[:, None]

class MLP(nn.Sequential):  # Linear, GELU (tanh), Linear: the keys mlp.0 and mlp.2 as always
    """Without gradient on a GPU (the targets, the fake rows and sampling: half of an APEX step's
    FLOPs), the GELU runs in the epilogue of the first product (cuBLASLt), one pass over the 4x-wide
    activations fewer (docs/results.md, speed). With gradient: the plain path (no derivative)."""
    def forward(self, x):
        if torch.is_grad_enabled() or not x.is_cuda or type(self[0]) is not nn.Linear:   # LoRA: plain
            return super().forward(x)
        return self.fused(x)

    def fused(self, x):  # GELU(x W1^T + b1) in one call (tanh GELU on CUDA), then the second layer
        up, device = self[0], x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        h = torch._addmm_activation(up.bias.to(dtype), x.flatten(0, -2).to(dtype), up.weight.to(dtype).t(),
                                    use_gelu=True)
        return self[2](h.unflatten(0, x.shape[:-1]))

class DiTBlock(nn.Module):  # adaLN-Zero (Peebles & Xie 2023)
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(nn.Linear(dim, 4 * dim), nn.GELU("tanh"), nn.Linear(4 * dim, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[1].weight)   # adaLN-Zero: every block starts as the identity
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x, cond):  # x: (B, T, D), cond: (B, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(cond).chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift1, scale1)
        q, k, v = rearrange(self.qkv(h), "b t (n h d) -> n b h t d", n=3, h=self.heads)
        h = functional.scaled_dot_product_attention(q, k, v)
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
    As the released Qwen-Image wrapper, cond = emb_t(t) + (t - tt) emb_tt(tt) + c; the condition
    shift acts on the class embedding c alone, so one set of weights serves both branches."""

    def __init__(self, image_size=32, channels=3, patch_size=2, dim=384, depth=8, heads=6,
                 num_classes=10):
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

    def embed_class(self, y):  # (B,) int -> (B, D)
        return self.class_embed(y)

    def forward(self, x, t, tt, c):  # x: (B, C, H, W), t, tt: (B,), c: (B, D)
        p = self.patch_size
        cond = self.t_embed(t) + (t - tt)[:, None] * self.tt_embed(tt) + c
        h = rearrange(x, "b c (gh p1) (gw p2) -> b (gh gw) (p1 p2 c)", p1=p, p2=p)
        h = self.patch_embed(h) + self.pos
        for block in self.blocks:
            h = block(h, cond)
        shift, scale = self.ada_out(cond).chunk(2, dim=-1)
        h = self.out(modulate(self.norm_out(h), shift, scale))
        return rearrange(h, "b (gh gw) (p1 p2 c) -> b c (gh p1) (gw p2)", gh=self.grid, p1=p, p2=p)

def build_model(cfg: Config) -> DiT:
    net = DiT(cfg.image_size, cfg.channels, cfg.patch_size, cfg.dim, cfg.depth, cfg.heads,
              cfg.num_classes)
    if cfg.bf16_stream:   # a bf16 position embedding: the bf16 patch embedding stays bf16
        net.pos = net.pos.bfloat16()
    return net

# 3. Condition shift, interpolant and per-sample losses

def condition_shift(c, fake, a: float, b: float):
    """Eq. (9): c_fake = A c + b, A = a I, b = b 1, on the rows where `fake` is True (any rank).
    Trained by flow matching on the generator's samples, this branch learns p_theta's velocity.
    NOTE(deviation): the released code shifts text tokens with a = -1, b = 0; we shift the class
    embedding with Table 7's best cell, a = -0.5, b = 1. The released shift collapses here: the
    embedding has std ~0.02, so -c moves the condition by ~0.04 RMS (this default: ~1); the
    branches start coupled and training diverges (docs/results.md). setup warns below 0.1."""
    return torch.where(bcast(fake, c), a * c + b, c)

def bcast(t, x):  # (B,) -> (B, 1, ..., 1): one value per row of x
    return t.reshape(-1, *([1] * (x.dim() - 1)))

def interpolate(x, z, t):
    return bcast(t, x) * z + (1 - bcast(t, x)) * x          # Eq. (1); its d/dt is z - x

def mse(p, q):  # per-sample mean squared error (B,)
    return (p.float() - q.float()).pow(2).flatten(1).mean(1)

def robust_loss(p, q, c: float = 1e-3):
    """Step 6: m * sg((m/c^2 + 1)^-1/2) / c, m = mse; its gradient, that of 2 sqrt(m + c^2), is
    normalised by each row's own error, so a few large-error rows cannot dominate."""
    m = mse(p, q)
    return m * (m / c**2 + 1).rsqrt().detach() / c

# 4. The APEX objective: named pieces, then their assembly (apex_loss)
# A network is any callable F(x, t, tt, c) with `embed_class(y)` and `num_classes` (the DiT,
# toy_2d's MLP, the tests' stand-ins).

def drop_labels(y, share: float, null_class: int):
    """The null class for a random share of labels (step 4's unconditional branch).
    NOTE(deviation): label dropout; TwinFlow's MNIST tutorial shuffled the labels instead."""
    if share <= 0:
        return y
    drop = torch.rand(y.shape, device=y.device) < share
    return torch.where(drop, torch.full_like(y, null_class), y)

def row_groups(batch: int, fake_branch: bool = True, fake_share: float = 0.25) -> dict:
    """Step 1: equal, contiguous row groups; static slices keep shapes fixed (no sync, one graph).
    NOTE(deviation): without the fake branch (`consistency`) there are three groups; option:
    fake_share other than 1/4 gives the fake rows that share and the other three the rest."""
    names = ("onestep", "flow", "anystep", "fake")[:4 if fake_branch else 3]
    q = int(batch * (1 - fake_share)) // 3 if fake_branch else batch // 3   # 1/4: batch // 4
    cuts = [i * q for i in range(len(names))] + [batch]
    return {name: slice(cuts[i], cuts[i + 1]) for i, name in enumerate(names)}

def sample_times(rows: dict, batch: int, device):
    """Step 1: (t, tt). One-step rows: 1 -> 0; flow rows: tt = t (1 - 0.05 u); any-step rows:
    tt ~ U(0, t); fake rows: flow matching, tt = t."""
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
    """Step 2: the fake rows' data z - F(z, 1, 0, c), without gradient: the fake branch learns
    p_theta's velocity as it is and must not change it."""
    ones = torch.ones(z.shape[0], device=z.device)
    return (z - net(z, ones, 0 * ones, c)).detach()

@torch.no_grad()
def guided_target(ema, x_t, t, y, target, enr: float):
    """Step 4: target + enr (v_cond - v_null) of the EMA at tt = t, so sampling needs no CFG."""
    c = torch.cat([ema.embed_class(y), ema.embed_class(torch.full_like(y, ema.num_classes))])
    v_cond, v_null = ema(torch.cat([x_t, x_t]), t.repeat(2), t.repeat(2), c).float().chunk(2)
    return target + enr * (v_cond - v_null)

@torch.no_grad()
def consistency_target(ema, F, x_t, t, tt, y, target, d: float, order: int):
    """Step 5 (RCGM): a step d along the target to t_m = max(t - d, tt), then `order` EMA jumps
    to tt; r compares the jump (t - tt) F with that path, per unit of d (rows with t - tt < d:
    flow matching). sg(F) - clamp(r, -1, 1) is a bounded step; the clamp also makes F a
    per-coordinate Huber location of z - x rather than its mean."""
    F = F.detach().float()
    t_m = torch.maximum(t - d, tt)
    x_prime = x_t.float() - d * target
    x_jump, c = x_prime, ema.embed_class(y)
    for k in range(order):
        t_a, t_b = t_m + (tt - t_m) * k / order, t_m + (tt - t_m) * (k + 1) / order
        x_jump = x_jump - bcast(t_a - t_b, x_jump) * ema(x_jump.to(x_t.dtype), t_a, t_b, c).float()
    r_jump = (bcast(t - tt, F) * F - (x_prime - x_jump)) / d - target
    r = torch.where(bcast(t - tt < d, F), F - target, r_jump)
    return F - r.clamp(-1, 1)

def tan_weight(t, tt, fake):
    """Step 6: w = 1 + tan((1 - (t - tt)) pi / 2.5), large for short jumps; 1 on fake rows."""
    w = 1 + torch.tan((1 - (t - tt)) * math.pi / 2.5)
    return torch.where(fake, torch.ones_like(w), w)

@torch.no_grad()
def shifted_velocities(net, x_s, s, y, cfg: Config):
    """Step 7's (v_fake, v_real): both branches of the live network at tt = s, in one call.
    Studies swap in exact velocities (apex_loss's `velocities`)."""
    c = net.embed_class(y)
    fake = torch.arange(2 * len(y), device=x_s.device) < len(y)
    c2 = condition_shift(torch.cat([c, c]), fake, cfg.shift_a, cfg.shift_b)
    v_fake, v_real = net(torch.cat([x_s, x_s]), s.repeat(2), s.repeat(2), c2).float().chunk(2)
    return v_fake, v_real

def generator_term(net, F_one, z, y, cfg: Config, velocities=shifted_velocities):
    """Step 7: x_g = z - F_one noised to a random s; g = sg(clamp(v_fake - v_real, -1, 1)) is, by
    Eq. (5), -(s_fake - s_real) s / (1 - s): the reverse-KL (DMD) direction, toward the data
    (Eq. 8, 26-28). rho(F_one, sg(F_one - g)) moves x_g by +g. Returns (loss, gap), the gap
    mean (v_fake - v_real)^2 being ~0 while the branches stay coupled."""
    with torch.no_grad():
        x_g = z - F_one.detach()
        u = torch.rand(len(x_g), device=x_g.device)
        s = cfg.gen_s_min + (cfg.gen_s_max - cfg.gen_s_min) * u  # NOTE(deviation), option; released U(0, 1)
        x_s = interpolate(x_g, torch.randn_like(x_g), s)
        v_fake, v_real = velocities(net, x_s, s, y, cfg)
        gap = (v_fake - v_real).pow(2).mean()
        g = (v_fake - v_real).clamp(-1, 1)
        if cfg.gen_norm == "dmd":
            # NOTE(deviation), option: DMD's normalisation. x0 = x_s - s v, so x0_real - x0_fake
            # = s (v_fake - v_real), the same direction, here divided by mean |x_g - x0_real|
            scale = (x_g - x_s + bcast(s, x_s) * v_real).abs().flatten(1).mean(1).clamp_min(1e-4)
            g = bcast(s / scale, x_g) * (v_fake - v_real)
    if cfg.gen_norm == "dmd":   # plain MSE: the step is g itself, not g / rms(g)
        return 0.5 * mse(F_one, F_one.detach().float() - g).mean(), gap
    return robust_loss(F_one, F_one.detach().float() - g, cfg.robust_c).mean(), gap

def apex_loss(net, ema, x, y, cfg: Config, velocities=shifted_velocities):
    """The APEX objective: (loss, detached terms). `ema` is the network of the targets (steps 4-5);
    objective "consistency" turns the fake branch off (no fake rows, no step 7).
      1. times: one-step (t = 1, tt = 0), flow (tt ~ t), any-step (tt ~ U(0, t)) and fake rows
         (tt = t)                                                     row_groups, sample_times
      2. the fake rows' data: the generator's own one-step samples    onestep_samples
      3. one forward pass with gradient; fake rows see c_fake (Eq. 9) condition_shift
      4. training-time guidance on the flow and any-step rows         guided_target
      5. the consistency target on every row that is not fake         consistency_target
      6. per row: w rho(F, target)                                    tan_weight, robust_loss
      7. the generator term on the one-step rows, weight gen_weight   generator_term
      8. outside the loss: the EMA of the weights, with warm-up       EMA"""
    fake_branch = cfg.objective == "apex"
    B = x.shape[0]
    rows = row_groups(B, fake_branch, cfg.fake_share)
    onestep, guided = rows["onestep"], slice(rows["flow"].start, rows["anystep"].stop)
    real = slice(0, rows["fake"].start if fake_branch else B)
    fake = torch.arange(B, device=x.device) >= real.stop
    t, tt = sample_times(rows, B, x.device)                                             # step 1
    z = torch.randn_like(x)
    c = net.embed_class(y)
    if fake_branch:                                                                     # step 2
        z_gen = torch.randn_like(x[rows["fake"]])
        x_gen = onestep_samples(net, z_gen, c[rows["fake"]].detach()).to(x.dtype)
        x = torch.cat([x[real], x_gen])
    x_t = interpolate(x, z, t)
    target = (z - x).float()                                                            # Eq. (2)
    F = net(x_t, t, tt, condition_shift(c, fake, cfg.shift_a, cfg.shift_b))             # step 3
    if cfg.enr > 0:                                                                     # step 4
        target[guided] = guided_target(ema, x_t[guided], t[guided], y[guided], target[guided],
                                       cfg.enr)
    target[real] = consistency_target(ema, F[real], x_t[real], t[real], tt[real], y[real],
                                      target[real], cfg.cons_delta, cfg.cons_order)     # step 5
    per_row = tan_weight(t, tt, fake) * robust_loss(F, target, cfg.robust_c)            # step 6
    if cfg.onestep_weight != 1:   # the polish phase frees the one-step rows (see scheduled)
        per_row = per_row * torch.where(torch.arange(B, device=x.device) < onestep.stop,
                                        cfg.onestep_weight, 1.0)
    loss = per_row.mean()
    terms = {name: per_row[part].mean().detach() for name, part in rows.items()}
    if fake_branch:   # the generator's samples' mean pixel std: it falls when they flatten
        terms["contrast"] = x_gen.float().flatten(1).std(1).mean()
    if fake_branch and cfg.gen_weight > 0:                                              # step 7
        gen, terms["gap"] = generator_term(net, F[onestep], z[onestep], y[onestep], cfg,
                                           velocities)
        loss = loss + cfg.gen_weight * gen
        terms["gen"] = gen.detach()
    terms["loss"] = loss.detach()
    return loss, terms

def fm_loss(net, x, y):  # conditional flow matching, Eq. (2)
    t = torch.rand(x.shape[0], device=x.device)
    z = torch.randn_like(x)
    loss = mse(net(interpolate(x, z, t), t, t, net.embed_class(y)), z - x).mean()
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
    c_fake = condition_shift(c, torch.ones_like(y, dtype=torch.bool), cfg.shift_a, cfg.shift_b)
    x_t = interpolate(x, z, t)
    F_real = net(x_t, t, t, c)
    x_fake = x_t - bcast(t, x) * F_real       # Eq. (11): WITH gradient, the adversarial path
    loss_fake = mse(net(interpolate(x_fake, z2, t2), t2, t2, c_fake), z2 - x_fake).mean()  # (12)
    with torch.no_grad():
        v_fake = net(x_t, t, t, c_fake).float()
    mix = (1 - cfg.paper_lambda) * (z - x).float() + cfg.paper_lambda * v_fake  # Eq. (17)
    loss_mix = mse(F_real, mix).mean()        # Eq. (18) with w(t) = 1
    loss = loss_fake + loss_mix               # lambda_p = lambda_e = 1
    return loss, {"loss": loss.detach(), "fake": loss_fake.detach(), "mix": loss_mix.detach()}

def training_loss(net, ema, x, y, cfg: Config, velocities=shifted_velocities):  # train()'s loss
    y = drop_labels(y, cfg.label_dropout, net.num_classes)
    if cfg.objective == "fm":
        return fm_loss(net, x, y)
    if cfg.objective == "paper":
        return paper_loss(net, x, y, cfg)
    return apex_loss(net, ema, x, y, cfg, velocities)

# 5. Samplers (run them on the EMA weights)

def few_step_times(nfe: int) -> list:
    """The released grids for 1/2/4 NFE, else t = 1 - linspace(0.001, 0.5, n) and 0.
    NOTE(deviation): the grid for NFE other than 1, 2, 4 is ours."""
    released = {1: [0.999, 0.0], 2: [0.999, 0.6, 0.0], 4: [0.999, 0.833, 0.666, 0.5, 0.0]}
    if nfe < 1:
        raise ValueError("nfe must be >= 1")
    return released.get(nfe) or [1 - (0.001 + (0.5 - 0.001) * i / (nfe - 1)) for i in range(nfe)] + [0.0]

@torch.no_grad()
def sample_fewstep(net, z, y, nfe: int = 1, times=None, rho: float = 1.0, generator=None):
    """The released (UCGM) sampler: jump to the data endpoint with F(x, t, 0, c), re-noise it to
    the next time (fresh noise for rho = 1)."""
    times = few_step_times(nfe) if times is None else times
    x, c = z, net.embed_class(y)
    for t_cur, t_next in zip(times[:-1], times[1:]):
        t = torch.full((z.shape[0],), t_cur, device=z.device)
        F = net(x, t, torch.zeros_like(t), c)
        x_hat, z_hat = x - t_cur * F, x + (1 - t_cur) * F
        eps = torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype)
        x = (1 - t_next) * x_hat + t_next * (math.sqrt(1 - rho) * z_hat + math.sqrt(rho) * eps)
    return x

@torch.no_grad()
def sample_euler(net, z, y, steps: int = 50):  # diagnostic: a plain flow (tt = t)
    x, c = z, net.embed_class(y)
    ts = torch.linspace(1.0, 0.0, steps + 1).tolist()
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        t = torch.full((z.shape[0],), t_cur, device=z.device)
        x = x - (t_cur - t_next) * net(x, t, t, c)
    return x

# 6. Data

def load_cifar(data_dir: str, train: bool = True):
    """CIFAR-10 (uint8 (N,3,32,32), int64 (N,)) from the `cifar-10-batches-py` pickles; downloads
    them through torchvision only when missing."""
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    if not all(os.path.exists(os.path.join(folder, n)) for n in names):
        try:
            import torchvision
            torchvision.datasets.CIFAR10(data_dir, train=train, download=True)
        except Exception as e:
            raise SystemExit(f"error: CIFAR-10 not found in {folder} and could not be downloaded "
                             f"({type(e).__name__}); put the python-version pickles there "
                             f"(data_batch_1..5, test_batch)")
    xs, ys = [], []
    for n in names:
        with open(os.path.join(folder, n), "rb") as f:
            d = pickle.load(f, encoding="latin1")
        xs.append(torch.as_tensor(d["data"], dtype=torch.uint8).reshape(-1, 3, 32, 32))
        ys.append(torch.as_tensor(d["labels"], dtype=torch.int64))
    return torch.cat(xs), torch.cat(ys)

def make_shapes(n: int = 2048, size: int = 16, num_classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(num_classes, (n,), generator=g)
    hues = torch.arange(num_classes) / num_classes
    rgb = 0.5 + 0.5 * torch.stack([torch.cos(2 * math.pi * (hues + k / 3)) for k in range(3)], 1)
    x = torch.full((n, 3, size, size), 0.1)   # class k: a square of colour k, placed at random
    side = size // 3
    pos = torch.randint(size - side + 1, (n, 2), generator=g)
    for i in range(n):
        r, s = pos[i].tolist()
        x[i, :, r:r + side, s:s + side] = rgb[y[i]][:, None, None]
    return (x * 255).round().to(torch.uint8), y

class ImageData:
    """The training set on the device as uint8, so a batch (flips, [-1, 1]) needs no host work."""

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
        x = self.x[idx].float() / 127.5 - 1
        flip = torch.rand(n, device=x.device) < 0.5
        return torch.where(bcast(flip, x), x.flip(3), x), self.y[idx]

# 7. EMA, checkpoints and LoRA

class EMA:
    """EMA of the weights with the released warm-up (step 8), from decay 0 toward `target`."""

    def __init__(self, model: nn.Module, target: float = 0.99):
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.target, self.decay = target, 0.0

    @torch.no_grad()
    def update(self, model: nn.Module):
        self.decay = self.decay + (1 - self.decay) * (self.target - self.decay) / 2
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1 - self.decay)

def save_checkpoint(path: str, state: dict) -> None:
    """Atomic: a kill leaves the previous checkpoint whole (and at most a temp file)."""
    with open(path + ".tmp", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)

def current_fields(config: dict) -> dict:  # a saved config less the options older code had
    names = {f.name for f in dataclasses.fields(Config)}
    return {k: v for k, v in config.items() if k in names}

def load_checkpoint(path: str, device="cpu", cfg: Config = None) -> dict:
    """cfg: check that the checkpoint holds the same architecture."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:
        raise SystemExit(f"error: cannot read checkpoint {path}: {type(e).__name__}")
    config = ckpt.get("config", {}) if isinstance(ckpt, dict) else {}
    if len(kept := current_fields(config)) < len(config):
        print(f"note: {path}: options of older code ignored: {', '.join(sorted(set(config) - set(kept)))}",
              file=sys.stderr)
        ckpt["config"] = kept
    keys = ("image_size", "channels", "patch_size", "dim", "depth", "heads", "num_classes")
    differ = [f"{k} {ckpt['config'].get(k)} vs {getattr(cfg, k)}" for k in keys
              if cfg and ckpt["config"].get(k) != getattr(cfg, k)]
    if differ:
        raise SystemExit(f"error: {path} holds another architecture ({', '.join(differ)})")
    return ckpt

class LoRALinear(nn.Module):
    """A frozen linear layer plus a low-rank update, W x + B A x (alpha / r); B starts at 0."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float = None):
        super().__init__()
        self.base, self.scale = base.requires_grad_(False), (alpha or rank) / rank
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        low_rank = functional.linear(functional.linear(x, self.lora_A), self.lora_B)
        return self.base(x) + low_rank * self.scale

    def merged(self) -> nn.Linear:
        out = copy.deepcopy(self.base)
        out.weight.data += (self.lora_B @ self.lora_A) * self.scale
        return out.requires_grad_(True)

def add_lora(net: DiT, rank: int) -> DiT:
    """Freeze the network; adapters on every attention and MLP projection. emb_tt stays
    trainable: a flow checkpoint never used it (zero), the one-step jump needs it."""
    net.requires_grad_(False)
    for block in net.blocks:
        block.qkv, block.proj = LoRALinear(block.qkv, rank), LoRALinear(block.proj, rank)
        block.mlp[0], block.mlp[2] = LoRALinear(block.mlp[0], rank), LoRALinear(block.mlp[2], rank)
    net.tt_embed.requires_grad_(True)
    return net

def merge_lora(net: nn.Module) -> nn.Module:  # adapters folded into plain layers
    for module in list(net.modules()):
        for name, child in module.named_children():
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
    return net

def network_from_state(ckpt: dict, which: str = "ema") -> DiT:  # which: model | ema; merged
    cfg = Config(**ckpt["config"])
    net = add_lora(build_model(cfg), cfg.lora_rank) if cfg.tune == "lora" else build_model(cfg)
    net.load_state_dict(ckpt[which])
    return merge_lora(net)

def model_from_checkpoint(path: str, device="cpu", which: str = "ema"):  # (net, Config)
    ckpt = load_checkpoint(path, device)
    return network_from_state(ckpt, which).to(device).eval().requires_grad_(False), Config(**ckpt["config"])

def export_merged(path: str) -> str:
    """Write PATH's LoRA adapters folded into plain weights (model and EMA) to *_merged.pt."""
    ckpt = load_checkpoint(path)
    if ckpt["config"].get("tune") != "lora":
        raise SystemExit(f"error: {path} is not a LoRA checkpoint (its --tune is "
                         f"{ckpt['config'].get('tune')})")
    state = {"config": {**ckpt["config"], "tune": "full"}, "step": ckpt["step"], "merged_from": path,
             **{w: network_from_state(ckpt, w).state_dict() for w in ("model", "ema")}}
    out = path.removesuffix(".pt") + "_merged.pt"
    save_checkpoint(out, state)
    return out

# 8. Training: setup, the step, logging and checkpoints

def setup(cfg: Config) -> SimpleNamespace:
    """The process (torchrun sets RANK, WORLD_SIZE), the data, the network (new, or --init-from a
    flow checkpoint's EMA; adapters under --tune lora), its EMA, the optimiser, and --resume."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but CUDA is not available")
    device = torch.device("cpu")
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",   # a stuck rank: an
                                timeout=datetime.timedelta(minutes=10))  # error after 10 minutes
    if cfg.batch_size % world:
        raise SystemExit(f"error: --batch-size {cfg.batch_size} is not divisible by {world} processes")
    os.makedirs(cfg.out_dir, exist_ok=True)
    torch.manual_seed(cfg.seed + rank)
    data, net = ImageData(cfg, device), build_model(cfg)
    if cfg.init_from:
        base = load_checkpoint(cfg.init_from, "cpu", cfg)
        if base["config"].get("tune") == "lora":
            raise SystemExit(f"error: {cfg.init_from} is a LoRA run; merge it first (--merge-lora)")
        net.load_state_dict(base["ema"])
    net = (add_lora(net, cfg.lora_rank) if cfg.tune == "lora" else net).to(device)
    with torch.no_grad():  # the health check of the shift, before any step
        c = net.embed_class(torch.arange(cfg.num_classes, device=device))
        rms = (condition_shift(c, torch.ones(len(c), dtype=torch.bool, device=device), cfg.shift_a,
                               cfg.shift_b) - c).pow(2).mean().sqrt().item()
    if cfg.objective == "apex" and rank == 0 and rms < 0.1:
        print(f"warning: the condition shift moves the class embedding by {rms:.3f} RMS (< 0.1); the "
              f"branches start coupled, which diverged on CIFAR-10 (docs/results.md)", file=sys.stderr)
    if cfg.objective in ("apex", "consistency") and rank == 0 and cfg.enr >= 1:   # step 4's scale
        print(f"warning: --enr {cfg.enr} >= 1: guidance read from the EMA it trains has no fixed "
              f"point (scale 1 / (1 - enr)); at 1 it broke the shapes' samples (docs/results.md)",
              file=sys.stderr)
    trainable = [p for p in net.parameters() if p.requires_grad]
    run = SimpleNamespace(net=net, ema=EMA(net, cfg.ema_decay), trainable=trainable, step=0,
                          train_seconds=0.0, data=data, device=device, rank=rank, world=world, planned=0,
                          path=os.path.join(cfg.out_dir, "ckpt.pt"))
    run.opt = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, cfg.beta2),
                                weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    if cfg.resume:
        resume(run, cfg)
    elif os.path.exists(run.path):
        raise SystemExit(f"error: {run.path} exists; pass --resume, or another --out-dir")
    if rank == 0 and os.path.exists(run.path + ".tmp"):
        os.remove(run.path + ".tmp")          # a write cut off by a kill: never a whole checkpoint
    if world > 1:  # one set of weights everywhere, whatever each process drew
        for p in list(net.parameters()) + list(run.ema.model.parameters()):
            dist.broadcast(p.data, 0)
    return run

def training_state(run: SimpleNamespace, cfg: Config) -> dict:  # all that exact resume needs
    cuda = run.device.type == "cuda"
    return {"model": run.net.state_dict(), "ema": run.ema.model.state_dict(),
            "ema_decay": run.ema.decay, "opt": run.opt.state_dict(),
            "config": dataclasses.asdict(cfg), "step": run.step, "train_seconds": run.train_seconds,
            "rng": {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if cuda else None}}

def resume(run: SimpleNamespace, cfg: Config) -> None:
    ckpt = load_checkpoint(run.path, run.device, cfg)
    saved = (ckpt["config"].get("tune"), ckpt["config"].get("lora_rank"))
    if cfg.tune == "lora" and saved != ("lora", cfg.lora_rank):
        raise SystemExit(f"error: {run.path} was trained with another --tune/--lora-rank")
    run.net.load_state_dict(ckpt["model"])
    run.ema.model.load_state_dict(ckpt["ema"])
    run.opt.load_state_dict(ckpt["opt"])
    run.ema.decay, run.step = ckpt["ema_decay"], ckpt["step"]
    run.planned = ckpt["config"].get("max_steps", 0) if cfg.minutes and not cfg.max_steps else 0
    run.train_seconds = ckpt.get("train_seconds", 0.0)   # checkpoints before the field: 0
    if run.rank == 0:  # exact continuation on one process; other ranks get fresh, distinct streams
        torch.set_rng_state(ckpt["rng"]["cpu"].cpu())     # loaded onto the device: back as bytes
        if ckpt["rng"].get("cuda") is not None and run.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu())
    else:
        torch.manual_seed(cfg.seed + run.rank + 7919 * run.step)

def scheduled(cfg: Config, step: int, total: int) -> Config:
    """The objective's settings at a step. NOTE(deviation), option --polish-from f > 0: the
    generator term is off before step f * total; from then on it is on and the one-step rows carry
    no consistency loss, so only the correction moves the one-step output (with a decaying
    learning rate, the small late steps at which the exact correction was measured to help).
    total = 0: not planned yet (plan_steps), the term off."""
    if cfg.polish_from <= 0 or total == 0:
        return cfg
    on = step >= cfg.polish_from * total
    return dataclasses.replace(cfg, gen_weight=cfg.gen_weight if on else 0.0,
                               onestep_weight=0.0 if on else cfg.onestep_weight)

def train_step(run: SimpleNamespace, net_fn, targets_fn, x, y, cfg: Config, autocast):
    lr = cfg.lr * min(1.0, (run.step + 1) / max(1, cfg.warmup_steps))   # linear warm-up, then
    if cfg.lr_schedule == "cosine" and cfg.max_steps:  # constant (released); NOTE(deviation): cosine
        lr *= 0.5 * (1 + math.cos(math.pi * run.step / cfg.max_steps))
    for group in run.opt.param_groups:
        group["lr"] = lr
    with autocast:
        loss, terms = training_loss(net_fn, targets_fn, x, y, scheduled(cfg, run.step, cfg.max_steps))
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    if run.world > 1:  # one flat all-reduce: no DDP wrapper, a step calls the network several times
        grads = [p.grad for p in run.trainable if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g) / run.world)
    torch.nn.utils.clip_grad_norm_(run.trainable, cfg.grad_clip)
    run.opt.step()
    run.ema.update(run.net)
    run.step += 1
    return loss.detach(), terms

def plan_steps(run: SimpleNamespace, cfg: Config, seconds: float, timed: int, spent: float) -> Config:
    """--minutes without --max-steps: the cosine rate and --polish-from need a length. After
    `timed` steps taking `seconds` (`spent` trained in all), it becomes the steps that the rest of
    the budget holds at that speed (rank 0's estimate, on every rank), and that count, not the
    clock, ends the run; the checkpoint's config keeps it for --resume."""
    left = 60 * cfg.minutes - spent
    steps = torch.tensor(run.step + int(timed / seconds * left), device=run.device)
    if run.world > 1:
        dist.broadcast(steps, 0)
    return dataclasses.replace(cfg, max_steps=max(int(steps), run.step + 1))

def write_json(path: str, value: dict, append: bool = False) -> None:  # append: a JSON-lines log
    with open(path, "a" if append else "w") as f:
        f.write(json.dumps(value, indent=None if append else 2) + "\n")

def environment() -> dict:
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    try:   # the commit, "-dirty" when tracked Python files differ from it
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5).stdout.strip() or None
        if git and subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "*.py"],
                                  cwd=here, capture_output=True, text=True, timeout=5).stdout.strip():
            git += "-dirty"
    except Exception:   # no git, or not a checkout
        git = None
    return {"python": platform.python_version(), "torch": torch.__version__, "host": platform.node(),
            "cuda": torch.version.cuda, "git": git,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}

@torch.no_grad()
def save_outputs(run: SimpleNamespace, cfg: Config, grids: bool) -> None:  # rank 0
    """The checkpoint first (a late error in sampling must not cost the training), then grids."""
    save_checkpoint(run.path, training_state(run, cfg))
    if not grids:
        return
    from torchvision.utils import save_image
    y = torch.arange(cfg.num_classes, device=run.device).repeat_interleave(10)
    for nfe in (1, 2):
        g = torch.Generator(device=run.device).manual_seed(0)
        z = torch.randn(len(y), cfg.channels, cfg.image_size, cfg.image_size, device=run.device,
                        generator=g)
        x = sample_fewstep(run.ema.model, z, y, nfe=nfe, generator=g)
        save_image((x.clamp(-1, 1) + 1) / 2, f"{cfg.out_dir}/samples_{run.step:07d}_nfe{nfe}.png",
                   nrow=10)

def step_functions(run: SimpleNamespace, cfg: Config, mode: str = "default"):
    """(net_fn, targets_fn, autocast) for train_step: the network and the EMA (the targets of steps
    4-5), compiled on CUDA with --compile (static shapes: one graph per call shape); bf16 there."""
    net_fn, targets_fn, cuda = run.net, run.ema.model, run.device.type == "cuda"
    if cfg.compile and cuda:
        torch._dynamo.config.recompile_limit = max(32, torch._dynamo.config.recompile_limit)
        net_fn, targets_fn = (torch.compile(m, dynamic=False, mode=mode) for m in (net_fn, targets_fn))
    return net_fn, targets_fn, torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)

def train(cfg: Config) -> dict:
    """Train with cfg, as one process or under torchrun; returns the summary. Writes to
    cfg.out_dir: config.json, env.json, ckpt.pt (every ckpt_every steps), log.jsonl (every
    log_every steps: the terms, `gap` being the fake branch's health signal, and img/s), and at
    the end summary.json and sample grids. Clocks start after the first (compiling) step. Ctrl-C
    (SIGINT) ends the run with a checkpoint, as --minutes does; --resume continues it."""
    from tqdm import tqdm
    validate(cfg)
    run = setup(cfg)
    main = run.rank == 0
    if run.planned:   # a resumed run whose length plan_steps fixed: steps, not the clock, end it
        cfg = dataclasses.replace(cfg, max_steps=run.planned)
    by_clock = cfg.minutes > 0 and not run.planned
    schedules = cfg.lr_schedule == "cosine" or (cfg.polish_from > 0 and cfg.objective != "fm")
    plan = by_clock and not cfg.max_steps and schedules   # fm has no term for a polish to time
    if main:
        write_json(f"{cfg.out_dir}/config.json", dataclasses.asdict(cfg))
        write_json(f"{cfg.out_dir}/env.json", {**environment(), "world_size": run.world})
    net_fn, targets_fn, autocast = step_functions(run, cfg)
    size = sum(p.numel() for p in run.net.parameters())
    bar = tqdm(total=cfg.max_steps or None, initial=run.step, disable=not main, mininterval=2,
               desc=f"{cfg.objective} {size / 1e6:.1f}M")
    bad = torch.zeros((), dtype=torch.bool, device=run.device)  # non-finite loss: read at intervals
    stop, terms, img_per_s, warmup = "max-steps", {}, 0.0, 0.0
    first = last_step = run.step
    t_start = t0 = last_t = time.time()
    ctrl_c = []

    def on_ctrl_c(*_):   # the first Ctrl-C ends the run at the next log step, with a checkpoint;
        if ctrl_c and time.time() - ctrl_c[0] > 1:   # a second one, a second later: at once. Within
            raise KeyboardInterrupt                  # a second it is the same one, sent again to the
        ctrl_c.append(time.time())                   # process group (as `timeout` does)

    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        while cfg.max_steps == 0 or run.step < cfg.max_steps:
            x, y = run.data.batch(cfg.batch_size // run.world)
            loss, terms = train_step(run, net_fn, targets_fn, x, y, cfg, autocast)
            bad |= ~torch.isfinite(loss)
            bar.update(1)
            if run.step in (first + 1, first + 21) and run.device.type == "cuda":
                torch.cuda.synchronize()
            if run.step == first + 1:
                t0 = last_t = time.time()
                warmup, last_step = t0 - t_start, run.step
            if plan and run.step == first + 21:
                spent = run.train_seconds + time.time() - last_t
                cfg, plan, by_clock = plan_steps(run, cfg, time.time() - t0, 20, spent), False, False
                bar.total = cfg.max_steps
                if main:
                    write_json(f"{cfg.out_dir}/config.json", dataclasses.asdict(cfg))
            at_log, at_ckpt = run.step % cfg.log_every == 0, run.step % cfg.ckpt_every == 0
            if not (at_log or at_ckpt):
                continue
            time_up = by_clock and run.train_seconds + time.time() - last_t > 60 * cfg.minutes
            stops = torch.tensor([time_up, bool(ctrl_c)], dtype=torch.float, device=run.device)
            flags = torch.cat([bad.float()[None], stops])
            if run.world > 1:  # every rank stops together
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            if flags[0] > 0:
                raise FloatingPointError
            now = time.time()
            run.train_seconds += now - last_t
            img_per_s = (run.step - last_step) * cfg.batch_size / (now - last_t)
            last_t, last_step = now, run.step
            values = {k: round(v.item(), 5) for k, v in terms.items()}
            bar.set_postfix({k: f"{v:.4f}" for k, v in values.items()} | {"img/s": f"{img_per_s:.0f}"})
            if main and at_log:
                write_json(f"{cfg.out_dir}/log.jsonl", {"step": run.step, **values, "img_per_s": round(
                    img_per_s, 1), "train_seconds": round(run.train_seconds, 2)}, append=True)
            if main and at_ckpt:
                save_outputs(run, cfg, grids=False)
            if flags[1:].any():
                stop = "minutes" if flags[1] > 0 else "interrupted"
                break
    except KeyboardInterrupt:   # a second Ctrl-C: at once, mid-step
        stop = "interrupted"
    except FloatingPointError:
        stop = "non-finite loss"
    finally:
        signal.signal(signal.SIGINT, previous)
    bar.close()
    if stop == "non-finite loss" or bool(bad):
        raise SystemExit(f"error: non-finite loss before step {run.step}; stopped. The last good "
                         f"checkpoint ({run.path}) is untouched; lower --lr or resume from it.")
    now = time.time()
    run.train_seconds += now - last_t
    mean = max(run.step - first - 1, 0) * cfg.batch_size / max(now - t0, 1e-9)
    summary = {"step": run.step, "stop": stop, "train_seconds": round(run.train_seconds, 1),
               "img_per_s_last_window": round(img_per_s, 1), "img_per_s_mean": round(mean, 1),
               "warmup_seconds": round(warmup, 1), "params": size,
               "trainable_params": sum(p.numel() for p in run.trainable),
               "terms": {k: round(v.item(), 5) for k, v in terms.items()}}
    if main:
        save_outputs(run, cfg, grids=True)
        write_json(f"{cfg.out_dir}/summary.json", summary)
        print(json.dumps(summary))
    if run.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if stop == "interrupted":
        raise SystemExit(130)
    return summary

def train_stages(cfg: Config) -> dict:
    """--flow-share f: flow matching for f of the budget (--minutes and --max-steps alike) in
    out_dir/flow, then cfg's objective from its EMA for the rest in out_dir; both runs are kept.
    --resume continues whichever stage was cut off. A run of --objective fm, or one that starts from
    --init-from (the flow model is given), has one stage: a preset's share does not apply."""
    if not cfg.flow_share or cfg.init_from or cfg.objective == "fm":
        return train(cfg)
    def stage(share: float, **fields) -> Config:
        out = dataclasses.replace(cfg, minutes=cfg.minutes * share, flow_share=0.0, **fields,
                                  max_steps=round(cfg.max_steps * share))
        return dataclasses.replace(out, resume=cfg.resume and os.path.exists(f"{out.out_dir}/ckpt.pt"))
    flow = stage(cfg.flow_share, objective="fm", out_dir=os.path.join(cfg.out_dir, "flow"),
                 lr_schedule="constant", polish_from=0.0, tune="full")
    path = f"{flow.out_dir}/summary.json"
    first = json.load(open(path)) if cfg.resume and os.path.exists(path) else {"stop": "interrupted"}
    if first["stop"] == "interrupted":   # not run, or cut off (Ctrl-C)
        first = train(flow)
    summary = train(stage(1 - cfg.flow_share, init_from=f"{flow.out_dir}/ckpt.pt"))
    summary["train_seconds_total"] = round(first["train_seconds"] + summary["train_seconds"], 1)
    if int(os.environ.get("RANK", 0)) == 0:
        write_json(f"{cfg.out_dir}/summary.json", summary)
    return summary

# 9. Command line: argparse generated from the Config dataclass

def field_help(settings_class=Config) -> dict:  # field comments (also toy_2d's)
    import inspect
    import re
    src = inspect.getsource(settings_class)
    return {m[1]: m[2] for m in re.finditer(r"^\s+(\w+): \w+ = [^#\n]*#\s*(.*)$", src, re.M)}

class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one clear line and exit code 2, never a traceback
        self.exit(2, f"{self.prog}: error: {message}\n")

def parse_config(argv=None) -> Config:  # defaults < preset < flags
    p = OneLineParser(prog="apex_min.py", description="APEX one-step generation (arXiv "
                      "2604.12322), minimal reference. `--dataset cifar` uses the cifar preset.")
    helps, defaults, cifar = field_help(), Config(), PRESETS["cifar"]
    for field in dataclasses.fields(Config):
        default = getattr(defaults, field.name)
        preset = f"; cifar preset {cifar[field.name]!r}" if cifar.get(field.name, default) != default else ""
        text = f"{helps.get(field.name, '')} (default {default!r}{preset})"
        kind = {"bool": dict(action=argparse.BooleanOptionalAction), "int": dict(type=int),
                "float": dict(type=float), "str": dict(type=str)}[field.type]
        p.add_argument("--" + field.name.replace("_", "-"), help=text, **kind)
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    preset = args.get("preset") or ("cifar" if args.get("dataset") == "cifar" else "tiny")
    try:
        cfg = Config(**{**PRESETS.get(preset, {}), **args, "preset": preset})
        validate(cfg)
    except ValueError as e:
        p.error(str(e))
    if args.get("flow_share") and (cfg.init_from or cfg.objective == "fm"):
        p.error("--flow-share adds a flow stage to a run from scratch; not with --init-from, --objective fm")
    return cfg

if __name__ == "__main__":
    config = parse_config()
    if config.merge_lora:
        print(f"wrote {export_merged(config.merge_lora)}")
    else:
        train_stages(config)
