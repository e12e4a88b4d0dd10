"""t2i_bridge: APEX on a diffusers text-to-image flow transformer (optional: needs diffusers).

It presents SD3Transformer2DModel, FluxTransformer2DModel, SanaTransformer2DModel or
QwenImageTransformer2DModel as the project's network F(x_t, t, tt, c), with `embed_class` and
`num_classes`, so that apex_min.apex_loss, EMA and the samplers run on it unchanged: the bridge
adapts the model, never the objective. docs/t2i.md shows it on a real checkpoint.

    class label y     a row of a PromptTable: one prompt's precomputed text-encoder features;
                      label num_classes is the empty prompt, the null class of the training-time
                      guidance (step 4) and of label dropout
    c = embed_class(y)  the prompt's tokens after the model's own text projection, (B, T, D);
                      SD3 and Flux append their pooled vector, projected, as a last token
    c_fake = a c + b  apex_min.condition_shift on whole rows of c (Sec. 3.1, Eq. 9); a forward
                      hook on the text projection puts c in place of the projection's output
    tt                a forward hook on the timestep embedding adds (t - tt) emb_tt(tt), emb_tt new
                      and zero-initialised as in apex_min.DiT: at tt = t this is the stock model
    time              the project's t in [0, 1], t = 1 noise; all four kinds predict noise minus
                      data, z - x, as F does; SD3 and Sana count their timestep in thousandths

The hooks are bound methods, not closures, so that the EMA's deepcopy binds the copy's hooks to
the copy (a closure would keep serving the live bridge).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as functional
from einops import rearrange

import apex_min

# ==================================================================================================
# 1. Model kinds: where the hooks go, the timestep unit, the latent layout
# ==================================================================================================


@dataclasses.dataclass(frozen=True)
class Kind:
    text: tuple          # the text projection's modules, in call order; the hook is on the last
    time: str            # the timestep embedding (B, D) that the target-time hook adds to
    pooled: str | None   # SD3, Flux: the pooled-text projection, carried as c's last token
    time_scale: float    # the model's timestep at t = 1
    packed: bool         # Flux, Qwen-Image: the caller packs 2x2 latent patches into tokens
    layernorm: bool      # every block LayerNorms the text tokens: b and the size of a vanish


KINDS = {
    "sd3": Kind(("context_embedder",), "time_text_embed.timestep_embedder",
                "time_text_embed.text_embedder", 1000.0, packed=False, layernorm=True),
    "flux": Kind(("context_embedder",), "time_text_embed.timestep_embedder",
                 "time_text_embed.text_embedder", 1.0, packed=True, layernorm=True),
    "sana": Kind(("caption_projection", "caption_norm"), "time_embed.emb.timestep_embedder",
                 None, 1000.0, packed=False, layernorm=False),
    "qwen-image": Kind(("txt_norm", "txt_in"), "time_text_embed.timestep_embedder",
                       None, 1.0, packed=True, layernorm=True),
}
CLASS_KINDS = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux",
               "SanaTransformer2DModel": "sana", "QwenImageTransformer2DModel": "qwen-image"}
# LoRA targets: the attention projections. Never the hooked text projection: merging an
# apex_min.LoRALinear deep-copies its layer with the hook, bound to a copy of the bridge, and the
# merged model then ignores c (its outputs moved by 4e-2 on a tiny SD3)
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
             "to_add_out")


def check_kind(name: str | None, model_class: str = "") -> str:
    if name not in KINDS:
        raise ValueError(f"unknown model kind {name or model_class!r}: the bridge knows "
                         f"{', '.join(KINDS)}")
    return name


# ==================================================================================================
# 2. The prompt table: the class labels of a text-to-image model
# ==================================================================================================


class PromptTable:
    """Precomputed text-encoder features, one row per prompt, the empty prompt "" last (class
    `num_classes`, the null class). features: (P + 1, T, F), every prompt padded to T tokens;
    pooled: (P + 1, F_pooled), for SD3 and Flux. Data, not weights: the EMA's deepcopy shares it."""

    def __init__(self, features: torch.Tensor, pooled: torch.Tensor | None = None):
        if features.dim() != 3 or (pooled is not None and pooled.shape[0] != features.shape[0]):
            raise ValueError("the prompt table needs features (P + 1, T, F) and pooled (P + 1, F)")
        self.features, self.pooled = features, pooled
        self.num_classes = features.shape[0] - 1

    def __deepcopy__(self, memo):
        return self


# ==================================================================================================
# 3. The bridge: F(x_t, t, tt, c) over a diffusers transformer
# ==================================================================================================


class T2IBridge(nn.Module):
    """F(x_t, t, tt, c): the model's velocity at latents x_t (B, C, H, W), with c's tokens as its
    text and (t - tt) emb_tt(tt) added to its time embedding."""

    def __init__(self, model: nn.Module, table: PromptTable, kind: str | None = None,
                 guidance: float = 3.5):
        super().__init__()
        model_class = type(model).__name__
        self.kind_name = check_kind(kind or CLASS_KINDS.get(model_class), model_class)
        self.kind = KINDS[self.kind_name]
        self.model, self.table, self.num_classes = model, table, table.num_classes
        self.guidance = guidance   # the fixed guidance input of a guidance-distilled Flux
        width = next(m.in_features for name in self.kind.text for m in self.module(name).modules()
                     if isinstance(m, nn.Linear))                # the text encoder's width
        if table.features.shape[-1] != width:
            raise ValueError(f"the prompt table's features are {table.features.shape[-1]} wide, "
                             f"but this {self.kind_name} model's text projection takes {width}")
        if self.kind.pooled:
            pooled_width = self.module(self.kind.pooled).linear_1.in_features
            if table.pooled is None or table.pooled.shape[-1] != pooled_width:
                raise ValueError(f"{self.kind_name} needs the prompt table's pooled features, "
                                 f"{pooled_width} wide")
        self.tokens = table.features.shape[1]
        time_embedding = self.module(self.kind.time)
        self.tt_embed = apex_min.TimeEmbedding(time_embedding.linear_2.out_features,
                                               zero_init=True)
        self._condition, self._times = None, None   # set for the length of one forward
        self.module(self.kind.text[-1]).register_forward_hook(self.text_hook)
        time_embedding.register_forward_hook(self.time_hook)
        if self.kind.pooled:
            self.module(self.kind.pooled).register_forward_hook(self.pooled_hook)

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def embed_class(self, y):  # (B,) int -> c: (B, T, D), or (B, T + 1, D) with the pooled token
        weight = next(self.model.parameters())
        rows = y.to(self.table.features.device)
        c = self.table.features[rows].to(weight.device, weight.dtype)          # (B, T, F)
        for name in self.kind.text:                      # the model's own projection (and norm)
            c = self.module(name)(c)                                           # (B, T, D)
        if self.kind.pooled:
            pooled = self.table.pooled[rows].to(weight.device, weight.dtype)
            pooled = self.module(self.kind.pooled)(pooled)                     # (B, D)
            c = torch.cat([c, pooled[:, None]], dim=1)                         # (B, T + 1, D)
        return c

    # the hooks act only inside forward; in embed_class the modules run as they are
    def text_hook(self, module, args, output):
        """The text projection's output (of placeholder zeros) becomes c's tokens: the prompt on
        real rows, c_fake = a c + b on the rows that apex_loss shifted (Eq. 9)."""
        if self._condition is not None:
            return self._condition[:, :self.tokens].to(output.dtype)          # (B, T, D)

    def pooled_hook(self, module, args, output):
        """SD3, Flux: the pooled projection's output becomes c's last token, shifted with it."""
        if self._condition is not None:
            return self._condition[:, self.tokens].to(output.dtype)           # (B, D)

    def time_hook(self, module, args, output):
        """emb(t) + (t - tt) emb_tt(tt), as in apex_min.DiT (the released Qwen-Image wrapper's
        any-step input). At tt = t it adds exact zeros: the stock model, bit for bit."""
        if self._times is not None:
            t, tt = self._times
            return output + ((t - tt)[:, None] * self.tt_embed(tt)).to(output.dtype)

    def forward(self, x, t, tt, c):  # x: (B, C, H, W), t, tt: (B,) in [0, 1], c from embed_class
        B, _, H, W = x.shape
        text = c.new_zeros(B, self.tokens, self.table.features.shape[-1])   # replaced by c
        inputs = dict(encoder_hidden_states=text, timestep=t * self.kind.time_scale,
                      return_dict=False)
        if self.kind.pooled:
            inputs["pooled_projections"] = c.new_zeros(B, self.table.pooled.shape[-1])
        if self.kind.packed:
            inputs.update(self.packed_inputs(x))
            x = rearrange(x, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=2, p2=2)  # (B, N, 4C)
        self._condition, self._times = c, (t, tt)
        try:
            out = self.model(x, **inputs)[0]
        finally:
            self._condition, self._times = None, None
        if self.kind.packed:
            out = rearrange(out, "b (h w) (c p1 p2) -> b c (h p1) (w p2)", h=H // 2, p1=2, p2=2)
        return out                                                             # (B, C, H, W)

    def packed_inputs(self, x) -> dict:
        """Flux: each 2x2 patch's position (0, row, col), zeros for the text; Qwen-Image: the
        patch grid's shape."""
        B, _, H, W = x.shape
        if self.kind_name == "qwen-image":
            return {"img_shapes": [(1, H // 2, W // 2)] * B}
        rows, cols = torch.meshgrid(torch.arange(H // 2), torch.arange(W // 2), indexing="ij")
        ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).flatten(0, 1)  # (N, 3)
        inputs = {"img_ids": ids.to(x), "txt_ids": x.new_zeros(self.tokens, 3)}
        if self.model.config.guidance_embeds:
            inputs["guidance"] = x.new_full((B,), self.guidance)
        return inputs

    def check_shift(self, a: float, b: float, threshold: float = 0.01) -> float:
        """The relative change of the text tokens under c_fake = a c + b, as the blocks see them
        (after the LayerNorm of SD3, Flux and Qwen-Image, which removes b and the size of a);
        ValueError under 1%: the fake branch would stay the real one."""
        with torch.no_grad():
            tokens = self.embed_class(torch.arange(min(self.num_classes + 1, 64)))
            tokens = tokens[:, :self.tokens].float()                          # (P, T, D)
            def seen(v):   # the tokens as the blocks see them
                return functional.layer_norm(v, v.shape[-1:], eps=1e-6) if self.kind.layernorm else v
            change = ((seen(a * tokens + b) - seen(tokens)).norm() / seen(tokens).norm()).item()
        if change < threshold:
            after = " after their LayerNorm, which removes b and the size of a" if (
                self.kind.layernorm) else ""
            raise ValueError(f"the shift a={a:g}, b={b:g} moves {self.kind_name}'s text tokens "
                             f"by {change:.2%}{after}, so the fake branch would see the real "
                             f"condition; use a < 0 (the released shift is a=-1, b=0)")
        return change

    def check(self, cfg: apex_min.Config) -> apex_min.Config:
        """The Config that apex_loss will use on this bridge, checked; returned as it is."""
        apex_min.validate(cfg)
        if cfg.objective in ("apex", "paper"):
            self.check_shift(cfg.shift_a, cfg.shift_b)
        return cfg


# ==================================================================================================
# 4. Training: apex_min's objective on the bridge; LoRA
# ==================================================================================================


def build_training(bridge: T2IBridge, cfg: apex_min.Config) -> SimpleNamespace:
    """The bridge (its Config checked), its EMA (the network of the targets of steps 4-5) and the
    optimiser of its trainable weights."""
    bridge.check(cfg)
    ema = apex_min.EMA(bridge, cfg.ema_decay)
    trainable = [p for p in bridge.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, cfg.beta2),
                            weight_decay=cfg.weight_decay)
    return SimpleNamespace(net=bridge, ema=ema, opt=opt, trainable=trainable, step=0, world=1)


def apex_step(run: SimpleNamespace, x, y, cfg: apex_min.Config):  # (loss, terms)
    """One step of apex_min.train_step: training_loss (label dropout, then apex_loss) on the bridge
    with the EMA's targets, clipped AdamW, then the EMA (step 8). Autocast is the caller's."""
    return apex_min.train_step(run, run.net, run.ema.model, x, y, cfg, contextlib.nullcontext())


def add_lora(bridge: T2IBridge, rank: int, use_peft: bool | None = None) -> T2IBridge:
    """Freeze the model; low-rank adapters on the attention projections (ATTENTION); emb_tt stays
    trainable, as in apex_min.add_lora. peft's LoRA where it is installed, else the project's
    apex_min.LoRALinear."""
    bridge.requires_grad_(False)
    names = [name for name, m in bridge.model.named_modules()
             if isinstance(m, nn.Linear) and name.endswith(tuple("." + a for a in ATTENTION))]
    if use_peft is None:
        use_peft = importlib.util.find_spec("peft") is not None
    if use_peft:
        import peft
        config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=names)
        peft.inject_adapter_in_model(config, bridge.model)
    else:
        for name in names:
            parent, _, child = name.rpartition(".")
            owner = bridge.model.get_submodule(parent)
            setattr(owner, child, apex_min.LoRALinear(getattr(owner, child), rank))
    bridge.tt_embed.requires_grad_(True)
    return bridge


def merge_lora(bridge: T2IBridge) -> T2IBridge:
    """Fold every adapter, peft's or the project's, into its layer: the same outputs from plain
    layers."""
    for module in list(bridge.modules()):
        for name, child in module.named_children():
            if hasattr(child, "get_base_layer") and hasattr(child, "merge"):   # a peft layer
                child.merge()
                setattr(module, name, child.get_base_layer())
    return apex_min.merge_lora(bridge)

