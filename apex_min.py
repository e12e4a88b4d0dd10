"""apex_min: a minimal, single-file reference of APEX one-step generation.

"Self-Adversarial One Step Generation via Condition Shifting" (Liu et al., arXiv 2604.12322v1).
Equation numbers refer to v1. The method as implemented here is specified in METHOD.md of the
project (paper vs. released code); every departure from the paper is marked NOTE(deviation).

Conventions (stated once, used everywhere)
    x_t = t * z + (1 - t) * x,   z ~ N(0, I),   t = 1 is noise, t = 0 is data     Eq. (1)
    the network predicts a velocity F ~ z - x  (= d x_t / d t)                     Eq. (2)
    x_hat = x_t - t * F  (data endpoint),  z_hat = x_t + (1 - t) * F  (noise endpoint)
    score from velocity:  s_t(x_t) = -(x_t + (1 - t) * v) / t                      Eq. (5)
    any-step model F(x_t, t, tt, c), tt <= t: average velocity from t to tt, so
        x_tt = x_t - (t - tt) * F;  one step:  x = z - F(z, 1, 0, c).
    images live in [-1, 1]; 2-D toy data lives in about the same range.

Notation (paper -> code)
    x, z, x_t, t                      x, z, x_t, t
    target time of an any-step jump   tt
    F_theta(x_t, t, c)                net(x_t, t, tt, c)
    c, c_fake = A c + b  (Eq. 9)      c, condition_shift(c, fake, a, b)
    v_fake = F(., t, c_fake)          v_fake (fake branch of the same network)
    w(t)                              tan weight of METHOD.md Sec. 3 step 6
    lambda, lambda_p, lambda_e        paper_lambda (Sec. 4 of METHOD.md), weights = 1
    fake rows of the batch            boolean mask `fake` (never a sign trick on t)

Sections: 1 config, 2 model, 3 condition shift, 4 interpolant, 5 objectives, 6 samplers,
7 data, 8 utilities, 9 training loop, 10 command line. Importing this file has no side effects.
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

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
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
    out_dir: str = "runs/tiny"    # run folder: config.json, env.json, ckpt.pt, sample grids
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
    # --- objective (METHOD.md Sec. 3 and 4) ----------------------------------------------------
    objective: str = "apex"       # apex | consistency | fm | paper
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
    minutes: float = 0.0          # training minutes, counted from the end of the first (compiling) step; 0 = none
    compile: bool = False         # torch.compile the network (CUDA)
    # --- plug-in tuning from a flow checkpoint (Sec. 4 of the paper: APEX tunes a flow model) ----
    init_from: str = ""           # start from this checkpoint's EMA weights (e.g. an --objective fm run)
    tune: str = "full"            # full | lora: train every weight, or low-rank adapters only
    lora_rank: int = 16           # rank of the adapters with --tune lora
    lora_targets: str = "ema"     # ema | teacher: the network of the targets under LoRA (ema measured better)
    merge_lora: str = ""          # only export: fold the adapters of this LoRA checkpoint into plain weights
    # --- logging -------------------------------------------------------------------------------
    log_every: int = 25
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
        (cfg.tune in ("full", "lora") and cfg.lora_rank >= 1, "--tune must be full or lora, --lora-rank >= 1"),
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
        h = F.scaled_dot_product_attention(q, k, v)                          # (B, H, T, D/H)
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

    Conditioning (METHOD.md Sec. 1): cond = emb_t(t) + (t - tt) * emb_tt(tt) + c, where c is a
    class-embedding vector; the condition shift (Sec. 3) acts on c alone, so the same weights
    serve the real branch (c) and the fake branch (c_fake)."""

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
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

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


# ==================================================================================================
# 3. Condition shift (the APEX-specific part)
# ==================================================================================================


def condition_shift(c, fake, a: float, b: float):
    """Sec. 3.1, Eq. (9): c_fake = A c + b with A = a*I, b = b*1, on the rows where `fake` is True.

    The shifted condition turns the same network into a second, "fake" velocity field; trained by
    flow matching on the generator's own samples it becomes the velocity of p_theta (Sec. 3.2).

    NOTE(deviation): the paper shifts text-encoder features and the released code hard-codes
    a = -1, b = 0 on the projected text tokens; we shift the class-embedding vector with the best
    cell of the paper's Table 7 (a = -0.5, b = 1.0) as default (METHOD.md Sec. 2)."""
    return torch.where(fake[:, None], a * c + b, c)


# ==================================================================================================
# 4. Interpolant and per-sample losses
# ==================================================================================================


def bcast(t, x):  # (B,) -> (B, 1, ..., 1) to broadcast against x
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def interpolate(x, z, t):
    return bcast(t, x) * z + (1 - bcast(t, x)) * x          # Eq. (1); its d/dt is z - x


def robust_loss(p, q, c: float = 1e-3):
    """Per-sample robust loss of the released code (METHOD.md Sec. 3 step 6): m = mean((p-q)^2),
    rho = m * sg((m/c^2 + 1)^-1/2) / c, whose gradient is that of 2*sqrt(m + c^2): every sample's
    gradient is normalised by its own error, so a few large-error rows cannot dominate."""
    m = (p.float() - q.float()).pow(2).flatten(1).mean(1)                    # (B,)
    return m * (m / c**2 + 1).rsqrt().detach() / c


def mse(p, q):  # per-sample mean squared error (B,)
    return (p.float() - q.float()).pow(2).flatten(1).mean(1)


# ==================================================================================================
# 5. Objectives: apex (default), consistency, fm, paper
# ==================================================================================================


def row_groups(batch: int, objective: str) -> dict:
    """Contiguous row slices of the batch (METHOD.md Sec. 3 step 1). Static slices rather than
    random masks keep every shape fixed, so a step needs no host sync and compiles once."""
    # NOTE(deviation): `consistency` (our ablation, not in the paper) splits the batch in three
    # equal groups, so it spends the fake rows' share on the other three.
    parts = 4 if objective == "apex" else 3        # consistency: the same recipe, no fake rows
    q = batch // parts
    cuts = [0, q, 2 * q, 3 * q, batch] if parts == 4 else [0, q, 2 * q, batch, batch]
    names = ("onestep", "flow", "anystep", "fake")
    return {n: slice(cuts[i], cuts[i + 1]) for i, n in enumerate(names)}


def apex_loss(net, ema, x, y, cfg: Config):
    """One training loss on a batch (x, y) for cfg.objective; returns (loss, dict of detached terms).

    `net` is the live network, `ema` the EMA network (both callables F(x, t, tt, c) with an
    `embed_class(y)` method and `num_classes`); the same function trains the DiT, the 2-D MLP of
    toy_2d.py and the test stand-ins."""
    # NOTE(deviation): the null class comes from label dropout (10%); TwinFlow's MNIST tutorial
    # used shuffled labels for the unconditional branch.
    if cfg.label_dropout > 0:   # the null class trains the unconditional branch used by guidance
        drop = torch.rand(y.shape, device=y.device) < cfg.label_dropout
        y = torch.where(drop, torch.full_like(y, net.num_classes), y)
    if cfg.objective == "fm":
        return fm_loss(net, x, y)
    if cfg.objective == "paper":
        return paper_loss(net, x, y, cfg)
    return recipe_loss(net, ema, x, y, cfg)


def fm_loss(net, x, y):
    """Plain (conditional) flow matching, Eq. (2): F(x_t, t, t, c) regresses z - x."""
    t = torch.rand(x.shape[0], device=x.device)
    z = torch.randn_like(x)
    F_ = net(interpolate(x, z, t), t, t, net.embed_class(y))
    loss = mse(F_, z - x).mean()
    return loss, {"loss": loss.detach(), "flow": loss.detach()}


def recipe_loss(net, ema, x, y, cfg: Config):
    """The released recipe with the condition shift (METHOD.md Sec. 3); `consistency` drops the
    fake rows and the generator term."""
    B, dev = x.shape[0], x.device
    rows = row_groups(B, cfg.objective)
    O, Fk = rows["onestep"], rows["fake"]
    real = slice(0, Fk.start)                     # every row that is not fake
    fake = torch.zeros(B, dtype=torch.bool, device=dev)
    fake[Fk] = True                               # a boolean mask says which rows are fake

    # step 1: times. one-step rows jump 1 -> 0; flow rows are nearly instantaneous (tt ~ t);
    # any-step rows jump to tt ~ U(0, t); fake rows are plain flow matching (tt = t).
    t = torch.rand(B, device=dev)
    u = torch.rand(B, device=dev)
    t[O] = 1.0
    tt = t.clone()
    tt[O] = 0.0
    tt[rows["flow"]] = t[rows["flow"]] * (1 - 0.05 * u[rows["flow"]])
    tt[rows["anystep"]] = t[rows["anystep"]] * (1 - u[rows["anystep"]])

    z = torch.randn_like(x)
    c = net.embed_class(y)                                                     # (B, D)
    if Fk.stop > Fk.start:
        # step 2: the fake rows' data are the generator's own one-step samples. No gradient and
        # detached: the fake branch must learn the velocity of p_theta as it is, not change it.
        # (Drawn from the live network, the generator being trained, not from the EMA.)
        with torch.no_grad():
            z1 = torch.randn_like(x[Fk])
            ones = torch.ones(z1.shape[0], device=dev)
            x_gen = z1 - net(z1, ones, 0 * ones, c[Fk].detach())             # x = z - F(z, 1, 0, c)
        x = torch.cat([x[real], x_gen.to(x.dtype).detach()])
    x_t = interpolate(x, z, t)
    target = (z - x).float()                                                   # Eq. (2)

    # step 3: one forward pass with gradient; fake rows see c_fake (Eq. 9)
    F_ = net(x_t, t, tt, condition_shift(c, fake, cfg.shift_a, cfg.shift_b))  # (B, ...)

    with torch.no_grad():  # targets are constants: no gradient through guidance or consistency
        # step 4: training-time guidance from the EMA on the real rows with 0 < t < 1 (flow and
        # any-step rows; one-step rows have t = 1), so the model samples without CFG.
        G = slice(rows["flow"].start, rows["anystep"].stop)
        if cfg.enr > 0 and G.stop > G.start:
            xg, tg, yg = x_t[G], t[G], y[G]
            cg = torch.cat([ema.embed_class(yg), ema.embed_class(torch.full_like(yg, ema.num_classes))])
            v_cond, v_null = ema(torch.cat([xg, xg]), tg.repeat(2), tg.repeat(2), cg).float().chunk(2)
            target[G] += cfg.enr * (v_cond - v_null)

        # step 5: consistency target (RCGM, order N): one small step of size d along the target,
        # then N average-velocity jumps of the EMA from t_m to tt; `disp` is x' - x_tt.
        d, N = cfg.cons_delta, cfg.cons_order
        tr, ttr, Fr = t[real], tt[real], F_[real].detach().float()
        t_m = torch.maximum(tr - d, ttr)
        x_prime = x_t[real].float() - d * target[real]
        x_jump, c_ema = x_prime, ema.embed_class(y[real])
        for k in range(N):
            t_a, t_b = t_m + (ttr - t_m) * k / N, t_m + (ttr - t_m) * (k + 1) / N
            x_jump = x_jump - bcast(t_a - t_b, x_jump) * ema(x_jump.to(x.dtype), t_a, t_b, c_ema).float()
        disp = x_prime - x_jump
        r_cons = (bcast(tr - ttr, Fr) * Fr - disp) / d - target[real]        # residual of the jump
        r_flow = Fr - target[real]                                             # plain flow matching
        r = torch.where(bcast(tr - ttr < d, Fr), r_flow, r_cons)
        target[real] = Fr - r.clamp(-1, 1)     # clamp: a bounded step toward consistency

    # step 6: tan weight (w = 1 on fake rows) and per-sample robust loss
    w = 1 + torch.tan((1 - (t - tt)) * math.pi / 2.5)
    w = torch.where(fake, torch.ones_like(w), w)
    per_row = w * robust_loss(F_, target, cfg.robust_c)                        # (B,)
    loss = per_row.mean()
    terms = {n: per_row[s].mean().detach() for n, s in rows.items() if s.stop > s.start}

    if Fk.stop > Fk.start and cfg.gen_weight > 0:
        # step 7: generator term. x_g = z - F_onestep moves along +(v_fake - v_real), which is
        # -(s_fake - s_real) up to the positive factor t/(1-t) (Eq. 5): the reverse-KL direction.
        F_one = F_[O]
        with torch.no_grad():
            x_g = z[O] - F_one.detach()
            s = torch.rand(x_g.shape[0], device=dev)
            x_s = interpolate(x_g, torch.randn_like(x_g), s)
            c_one = c[O].detach()
            both = torch.ones(2 * x_g.shape[0], dtype=torch.bool, device=dev)
            both[x_g.shape[0]:] = False                        # first half fake, second half real
            v = net(torch.cat([x_s, x_s]), s.repeat(2), s.repeat(2),
                    condition_shift(torch.cat([c_one, c_one]), both, cfg.shift_a, cfg.shift_b))
            v_fake, v_real = v.float().chunk(2)
            g = (v_fake - v_real).clamp(-1, 1)                 # clamp bounds the correction
        # rho(F, sg(F - g)): its gradient moves F by -g, i.e. x_g = z - F by +g
        gen = robust_loss(F_one, (F_one.detach().float() - g), cfg.robust_c).mean()
        loss = loss + cfg.gen_weight * gen
        terms["gen"] = gen.detach()
    terms["loss"] = loss.detach()
    return loss, terms


def paper_loss(net, x, y, cfg: Config):
    """The paper-literal objective (METHOD.md Sec. 4; Eq. 11-12, 17-25), for comparison.

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
    """UCGM few-step sampler (METHOD.md Sec. 5). Each step jumps to the data endpoint with
    F(x, t, 0, c) and re-noises it to the next time with fresh noise (rho = 1)."""
    times = few_step_times(nfe) if times is None else times
    x, c = z, net.embed_class(y)
    for t_cur, t_next in zip(times[:-1], times[1:]):
        t = torch.full((z.shape[0],), t_cur, device=z.device)
        F_ = net(x, t, torch.zeros_like(t), c)
        x_hat, z_hat = x - t_cur * F_, x + (1 - t_cur) * F_        # data and noise endpoints
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


# 2-D Gaussian mixtures with closed-form densities, for toy_2d.py and the tests
def toy_mixture(name: str) -> dict:
    """means (K, 2), a shared std, the class of each mode, and the number of classes.
    ring: 8 modes on a circle of radius 1, two classes (alternate modes);
    grid: a 4x4 grid in [-0.75, 0.75]^2, two classes in a checkerboard pattern."""
    if name == "ring":
        ang = torch.arange(8) * (2 * math.pi / 8)
        means = torch.stack([torch.cos(ang), torch.sin(ang)], 1)
        classes = torch.arange(8) % 2
        std = 0.05
    elif name == "grid":
        v = torch.linspace(-0.75, 0.75, 4)
        gy, gx = torch.meshgrid(v, v, indexing="ij")
        means = torch.stack([gx.flatten(), gy.flatten()], 1)
        classes = (torch.arange(4)[:, None] + torch.arange(4)[None]).flatten() % 2
        std = 0.04
    else:
        raise ValueError(f"unknown toy mixture {name!r}: ring or grid")
    return {"means": means, "std": std, "classes": classes, "num_classes": int(classes.max()) + 1}


def sample_toy(name: str, n: int, generator=None, y=None):
    """n samples (x (n, 2), y (n,)) of a toy mixture; modes equally likely; y fixes the classes."""
    mix = toy_mixture(name)
    K, C = len(mix["means"]), mix["num_classes"]
    if y is None:
        y = torch.randint(C, (n,), generator=generator)
    per_class = torch.stack([(mix["classes"] == k).nonzero().flatten() for k in range(C)])  # (C, K/C)
    pick = torch.randint(K // C, (n,), generator=generator)
    mode = per_class[y, pick]
    x = mix["means"][mode] + mix["std"] * torch.randn(n, 2, generator=generator)
    return x, y


# ==================================================================================================
# 8. Utilities: EMA, checkpoints, grids, environment
# ==================================================================================================


class EMA:
    """EMA of the weights with the released warm-up (METHOD.md Sec. 3 step 8):
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
    """Atomic: write a temp file beside the target, then rename over it."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, device="cpu") -> dict:
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint at {path}")
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as e:
        raise SystemExit(f"error: cannot read checkpoint {path}: {type(e).__name__}")


def model_from_checkpoint(path: str, device="cpu", which: str = "ema"):
    """(network with the `which` weights, Config) from a checkpoint written by train()."""
    ckpt = load_checkpoint(path, device)
    cfg = Config(**ckpt["config"])
    net = build_model(cfg)
    if cfg.tune == "lora":      # adapters are merged for sampling: same outputs, plain DiT speed
        net = add_lora(net, cfg.lora_rank)
    net.load_state_dict(ckpt[which])
    return merge_lora(net).to(device).eval().requires_grad_(False), cfg


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


def export_merged(path: str) -> str:
    """Write PATH's LoRA adapters folded into plain DiT weights (model and EMA) to *_merged.pt."""
    ckpt = load_checkpoint(path)
    cfg = Config(**ckpt["config"])
    if cfg.tune != "lora":
        raise SystemExit(f"error: {path} is not a LoRA checkpoint (its --tune is {cfg.tune})")
    state = {"config": {**ckpt["config"], "tune": "full"}, "step": ckpt["step"], "merged_from": path}
    for which in ("model", "ema"):
        net = add_lora(build_model(cfg), cfg.lora_rank)
        net.load_state_dict(ckpt[which])
        state[which] = merge_lora(net).state_dict()
    out = path[:-3] + "_merged.pt" if path.endswith(".pt") else path + "_merged.pt"
    save_checkpoint(out, state)
    return out


def environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "host": platform.node(),
           "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    try:
        import subprocess
        here = os.path.dirname(os.path.abspath(__file__))
        env["git"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                    text=True, timeout=5).stdout.strip() or None
    except Exception:
        env["git"] = None
    return env


# ==================================================================================================
# 9. Training loop
# ==================================================================================================


def check_architecture(saved: dict, cfg: Config, path: str) -> None:
    arch = ("image_size", "channels", "patch_size", "dim", "depth", "heads", "num_classes")
    differ = [f"{k} {saved.get(k)} vs {getattr(cfg, k)}" for k in arch if saved.get(k) != getattr(cfg, k)]
    if differ:
        raise SystemExit(f"error: {path} holds another architecture ({', '.join(differ)})")


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


def train(cfg: Config) -> dict:
    """Train with cfg; returns a summary dict. Works as one process or under torchrun."""
    validate(cfg)
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if distributed else (0, 1)
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but CUDA is not available")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        torch.backends.cuda.matmul.allow_tf32 = True   # fp32 master weights; matmuls run in bf16 anyway
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    if distributed:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if cfg.batch_size % world:
        raise SystemExit(f"error: --batch-size {cfg.batch_size} is not divisible by {world} processes")
    main = rank == 0
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    os.makedirs(cfg.out_dir, exist_ok=True)

    torch.manual_seed(cfg.seed + rank)
    data = ImageData(cfg, device)
    net = build_model(cfg)
    if cfg.init_from:   # plug-in tuning: start from a flow checkpoint's EMA weights
        base = load_checkpoint(cfg.init_from, "cpu")
        check_architecture(base["config"], cfg, cfg.init_from)
        base_cfg = Config(**base["config"])
        if base_cfg.tune == "lora":
            raise SystemExit(f"error: {cfg.init_from} is a LoRA run; merge it first (--merge-lora)")
        net.load_state_dict(base["ema"])
    teacher = copy.deepcopy(net).requires_grad_(False).to(device) if cfg.tune == "lora" else None
    if cfg.tune == "lora":
        net = add_lora(net, cfg.lora_rank)
    net = net.to(device)
    ema = EMA(net, cfg.ema_decay)
    trainable = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, cfg.beta2),
                            weight_decay=cfg.weight_decay, fused=use_cuda)
    step, train_seconds = 0, 0.0
    if cfg.resume:
        ckpt = load_checkpoint(ckpt_path, device)
        check_architecture(ckpt["config"], cfg, ckpt_path)
        if (ckpt["config"].get("tune"), ckpt["config"].get("lora_rank")) != (cfg.tune, cfg.lora_rank) and cfg.tune == "lora":
            raise SystemExit(f"error: {ckpt_path} was trained with another --tune/--lora-rank")
        net.load_state_dict(ckpt["model"])
        ema.model.load_state_dict(ckpt["ema"])
        ema.decay = ckpt["ema_decay"]
        opt.load_state_dict(ckpt["opt"])
        step, train_seconds = ckpt["step"], ckpt.get("train_seconds", 0.0)
        if rank == 0:  # exact continuation on one process; other ranks get fresh, distinct streams
            torch.set_rng_state(ckpt["rng"]["cpu"])
            if use_cuda and ckpt["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        else:
            torch.manual_seed(cfg.seed + rank + 7919 * step)
    elif os.path.exists(ckpt_path):
        raise SystemExit(f"error: {ckpt_path} exists; pass --resume to continue it or choose another --out-dir")
    if distributed:  # one set of weights everywhere, whatever each process drew
        for p in list(net.parameters()) + list(ema.model.parameters()):
            dist.broadcast(p.data, 0)

    if main:
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
        with open(os.path.join(cfg.out_dir, "env.json"), "w") as f:
            json.dump({**environment(), "world_size": world}, f, indent=2)

    # under LoRA the guidance/consistency targets may come from the frozen base model instead
    target_net = teacher if (teacher is not None and cfg.lora_targets == "teacher") else ema.model
    net_fn, ema_fn = net, target_net
    if cfg.compile and use_cuda:
        # one graph per call shape and grad mode (the step calls the network at 4 batch sizes):
        # static shapes, and room for all of them in the recompile cache
        import torch._dynamo as dynamo
        dynamo.config.recompile_limit = max(32, dynamo.config.recompile_limit)
        net_fn, ema_fn = torch.compile(net, dynamic=False), torch.compile(target_net, dynamic=False)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_cuda)
    local_batch = cfg.batch_size // world
    n_params = sum(p.numel() for p in net.parameters())
    n_trainable = sum(p.numel() for p in trainable)

    def checkpoint():
        state = {"model": net.state_dict(), "ema": ema.model.state_dict(), "ema_decay": ema.decay,
                 "opt": opt.state_dict(), "config": dataclasses.asdict(cfg), "step": step,
                 "train_seconds": train_seconds,
                 "rng": {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if use_cuda else None}}
        save_checkpoint(ckpt_path, state)

    def grids():
        for nfe in (1, 2):
            save_grid(ema.model, os.path.join(cfg.out_dir, f"samples_{step:07d}_nfe{nfe}.png"), cfg, nfe)

    from tqdm import tqdm
    bar = tqdm(total=cfg.max_steps or None, initial=step, disable=not main, mininterval=2,
               desc=f"{cfg.objective} {n_params / 1e6:.1f}M")
    bad = torch.zeros((), dtype=torch.bool, device=device)   # any non-finite loss since the last check
    # The clocks (--minutes, train_seconds, img/s) start when the first step of this invocation
    # has finished: that step includes torch.compile's compilation, reported as warmup_seconds.
    t_start = time.time()
    t0 = last_t = t_start
    last_step, img_per_s, stop_reason, warmup_seconds = step, 0.0, "max-steps", 0.0
    first_step = step
    terms = {}
    try:
        while cfg.max_steps == 0 or step < cfg.max_steps:
            x, y = data.batch(local_batch)
            for group in opt.param_groups:   # linear warm-up, then constant (as the released code)
                group["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
            with autocast:
                loss, terms = apex_loss(net_fn, ema_fn, x, y, cfg)
            bad |= ~torch.isfinite(loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if distributed:
                allreduce_gradients(net, world)
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            opt.step()
            ema.update(net)
            step += 1
            bar.update(1)
            if step == first_step + 1:
                if use_cuda:
                    torch.cuda.synchronize()
                t0 = last_t = time.time()
                warmup_seconds, last_step = t0 - t_start, step

            at_log = step % cfg.log_every == 0
            at_ckpt = step % cfg.ckpt_every == 0
            if at_log or at_ckpt:
                flags = torch.stack([bad.float(), torch.tensor(
                    float(cfg.minutes > 0 and time.time() - t0 > 60 * cfg.minutes), device=device)])
                if distributed:
                    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                if flags[0] > 0:
                    raise FloatingPointError
                now = time.time()
                train_seconds += now - last_t
                img_per_s = (step - last_step) * cfg.batch_size / (now - last_t)
                last_t, last_step = now, step
                bar.set_postfix({k: f"{v.item():.4f}" for k, v in terms.items()} | {"img/s": f"{img_per_s:.0f}"})
                if at_ckpt and main:
                    checkpoint()
                if cfg.sample_every and step % cfg.sample_every == 0 and main:
                    grids()
                if flags[1] > 0:
                    stop_reason = "minutes"
                    break
    except FloatingPointError:
        bar.close()
        raise SystemExit(f"error: non-finite loss before step {step}; stopped. The last good "
                         f"checkpoint ({ckpt_path}) is untouched; lower --lr or resume from it.")
    except KeyboardInterrupt:
        stop_reason = "interrupted"
    bar.close()
    train_seconds += time.time() - last_t
    if bool(bad):
        raise SystemExit(f"error: non-finite loss before step {step}; stopped. The last good "
                         f"checkpoint ({ckpt_path}) is untouched.")
    steps_run = step - first_step
    summary = {"step": step, "stop": stop_reason, "train_seconds": round(train_seconds, 1),
               "img_per_s_last_window": round(img_per_s, 1),
               "img_per_s_mean": round((steps_run - 1) * cfg.batch_size / max(time.time() - t0, 1e-9), 1),
               "warmup_seconds": round(warmup_seconds, 1),
               "params": n_params, "trainable_params": n_trainable,
               "terms": {k: round(v.item(), 5) for k, v in terms.items()}}
    if main:
        checkpoint()          # save first: a late error in sampling must not cost the training
        grids()
        with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(json.dumps(summary))
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    if stop_reason == "interrupted":
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
