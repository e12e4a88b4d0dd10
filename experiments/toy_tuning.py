"""APEX tuning of the toy's flow model: all weights against LoRA adapters.

    python experiments/toy_tuning.py          # ~100 s on 2 idle cores; results/toy_2d_tuning.json
    python experiments/toy_tuning.py --fast   # test size, seconds; its numbers are meaningless

The CIFAR-10 comparison of the README at CPU scale. toy_2d.py's shared flow-matching pre-training
is the checkpoint; APEX then tunes every weight, or only low-rank adapters on the input and hidden
layers (zero-initialised, so tuning starts exactly at the checkpoint) plus the target-time
embedding, as apex_min.add_lora does for the DiT. Under LoRA the guidance and consistency targets
come from the EMA of the adapted model or from the frozen teacher (apex_min.py uses the EMA).
Every row has the same steps, seeds and learning-rate schedule; toy_2d.py's flags apply (--help).
"""
import copy
import dataclasses
import io
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import apex_min as am  # noqa: E402
import toy_2d  # noqa: E402

TUNING_ROWS = (("full", 0, "ema"), ("lora", 4, "ema"), ("lora", 4, "teacher"),
               ("lora", 16, "ema"), ("lora", 16, "teacher"))      # (tune, rank, targets)


class EnsembleLoRA(nn.Module):
    """A frozen toy_2d.EnsembleLinear plus a trainable low-rank update per member:
    h W + b + (h A) B, with B = 0 at the start."""

    def __init__(self, base: toy_2d.EnsembleLinear, rank: int):
        super().__init__()
        self.base = base.requires_grad_(False)
        M, d_in, d_out = base.weight.shape
        self.lora_A = nn.Parameter(torch.randn(M, d_in, rank) / math.sqrt(d_in))
        self.lora_B = nn.Parameter(torch.zeros(M, rank, d_out))          # zero: starts as the base

    def forward(self, h):  # (M, n, d_in) -> (M, n, d_out)
        return self.base(h) + torch.bmm(torch.bmm(h, self.lora_A), self.lora_B)


def add_lora_toy(net: toy_2d.ToyMLP, rank: int) -> toy_2d.ToyMLP:
    """Adapters on the input and hidden layers; everything else frozen but the target-time
    embedding, which the flow model never used (its last layer is zero) and APEX must learn."""
    net.requires_grad_(False)
    net.inp = EnsembleLoRA(net.inp, rank)
    net.hidden = nn.ModuleList([EnsembleLoRA(layer, rank) for layer in net.hidden])
    net.tt_embed.requires_grad_(True)
    return net


def tune(row: tuple, pretrained: bytes, settings: toy_2d.ToySettings) -> dict:
    """APEX from the pretrained flow ensemble with one (tune, rank, targets) row; 1-NFE quality.
    Runs in a worker process."""
    mode, rank, targets = row
    torch.set_num_threads(1)
    names = toy_2d.member_names(settings)
    M = len(names)
    state = torch.load(io.BytesIO(pretrained), weights_only=False)
    net, _ = toy_2d.build(settings, M)
    net.load_state_dict(state["model"])
    teacher = None
    if mode == "lora":
        teacher = copy.deepcopy(net).requires_grad_(False)
        teacher.load_state_dict(state["ema"])                      # the checkpoint's EMA weights
        # NOTE: lora_A comes from the global generator, not seeded here: after an earlier job of
        # this worker its state is fixed, in a fresh worker torch seeds it at random, so row
        # ("lora", 4, "ema") does not reproduce (docs/results.md). Seeding here would
        # change every LoRA row of results/toy_2d_tuning.json.
        net = add_lora_toy(net, rank)
    trainable = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=settings.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = am.EMA(net, settings.ema_decay)
    if mode == "full":
        ema.model.load_state_dict(state["ema"])
        ema.decay = state["ema_decay"]
    cfg = toy_2d.toy_config("apex", settings.gen_weight, settings.cons_delta)
    torch.manual_seed(settings.seed + 1)
    start = time.process_time()
    lr_at = toy_2d.cosine_lr(settings)
    toy_2d.train_steps(net, ema, opt, names, cfg, settings, settings.steps, lr_at,
                       targets=teacher if targets == "teacher" else None)
    seconds = time.process_time() - start
    z, y, eval_rng = toy_2d.evaluation_noise(settings, M)
    x = am.sample_fewstep(ema.model, z, y, nfe=1, generator=eval_rng)
    return {"row": row, "trainable_per_member": sum(p.numel() for p in trainable) // M,
            "params_per_member": sum(p.numel() for p in net.parameters()) // M,
            "quality": toy_2d.member_quality(x, y, names), "train_cpu_seconds": round(seconds, 1)}


def run_tuning(settings: toy_2d.ToySettings) -> dict:
    names = toy_2d.member_names(settings)
    start = time.time()
    pretrained = toy_2d.pretrain(settings)
    results = toy_2d.run_jobs(tune, [(row, pretrained, settings) for row in TUNING_ROWS],
                              settings.workers)
    rows = [{**{k: r[k] for k in ("row", "trainable_per_member", "params_per_member",
                                  "train_cpu_seconds")},
             "summary": toy_2d.summarise_quality(r["quality"], names)} for r in results]
    return {"settings": dataclasses.asdict(settings), "environment": am.environment(),
            "seconds_wall": round(time.time() - start, 1), "rows": rows}


def tuning_table(result: dict) -> str:
    names = result["settings"]["targets"].split(",")
    lines = [f"APEX tuning of the flow model, {result['settings']['steps']} steps, 1-NFE sliced W1 "
             f"(mean +- std over {result['settings']['seeds']} seeds; lower is better)",
             f"{'tune':6s} {'rank':>4s} {'targets':8s} {'trainable':>9s}  "
             + "  ".join(f"{n:^16s}" for n in names)]
    for r in result["rows"]:
        mode, rank, targets = r["row"]
        cells = "  ".join(f"{r['summary'][n]['sw1'][0]:.4f}+-{r['summary'][n]['sw1'][1]:.4f}"
                          for n in names)
        trainable = r["trainable_per_member"]
        lines.append(f"{mode:6s} {rank or '':>4} {targets:8s} {trainable:>9,}  {cells}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    settings = toy_2d.parse_settings(argv, prog="experiments/toy_tuning.py", description="APEX "
                                     "tuning of the toy's flow model: all weights against LoRA.")
    torch.set_num_threads(1)      # tiny matmuls: threads cost more than they give on 2 cores
    result = run_tuning(settings)
    path = toy_2d.results_path(settings, "toy_2d_tuning.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(tuning_table(result))
    print(f"\nwrote {path}; wall {result['seconds_wall']:.1f} s")
    return result


if __name__ == "__main__":
    main()
