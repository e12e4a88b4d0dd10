"""Speed of one training step of the cifar preset: img/s, MFU, and a torch.profiler table.

    python experiments/profile_step.py                       # the default objective (apex), on a GPU
    python experiments/profile_step.py --objective fm --steps 50
    python experiments/profile_step.py --device cpu --tiny   # smoke test: seconds, numbers meaningless
    python experiments/profile_step.py --sdpa flash --tuning --profile 0   # candidate changes, timed

--compile-mode, --sdpa (one attention kernel), --tuning (inductor's coordinate-descent tuning),
--batch-size, --plain-mlp (the step before MLP.fused) and --bf16-stream try changes against the
default step; the record's name carries the variant.

The data are the synthetic shapes at 32x32 (no download): a step costs the same whatever the images
show. After the compiling first step and `--warmup` more, `--steps` steps are timed (img/s), their
FLOPs counted as cifar_demo.step_flops counts them (MFU against the bf16 peak measured here, or
against --peak-tflops: one peak for all the runs of a comparison), and `--profile` further steps
are recorded by torch.profiler: the table of the kernels (CPU: operators) by their own time is
printed with each category's share (matmul, attention, memset and copy, compiled elementwise,
other) and, with --out, written with the numbers and the operator table to a JSON record.
"""
import contextlib
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import apex_min as am  # noqa: E402
import cifar_demo  # noqa: E402


# what a kernel (CUDA) or operator (CPU) does, from its name; the first pattern that matches wins
CATEGORIES = (("matmul", r"gemm|nvjet|cutlass|xmma|cublas|aten::(add)?mm$|aten::bmm$"),
              ("attention", r"sdpa|attention|fmha|flash"),
              ("memset and copy", r"(?i)memset|memcpy|aten::copy_$|aten::fill_$|aten::zero_$"),
              ("compiled elementwise and reductions", r"^triton_"))


def time_shares(events, cuda: bool) -> dict:
    """Each category's share of the device time (CUDA: kernels' self time) or of the CPU time
    (operators' self time), from profiler events; "other" is the rest."""
    import re
    totals = dict.fromkeys([name for name, _ in CATEGORIES] + ["other"], 0.0)
    for e in events:
        if cuda != (e.device_type != torch.autograd.DeviceType.CPU):
            continue
        spent = e.self_device_time_total if cuda else e.self_cpu_time_total
        totals[next((n for n, pattern in CATEGORIES if re.search(pattern, e.key)), "other")] += spent
    whole = sum(totals.values())
    return {k: round(v / whole, 4) for k, v in totals.items()} if whole else {}


def fused_mlp_error(device, dim: int) -> dict:
    """apex_min.MLP.fused (the path without gradient on a GPU) against Linear, GELU, Linear with
    GELU's tanh form (the model's) and its erf form, in fp32 without TF32: on CUDA the first is at
    rounding level and the second is not, which shows the fused call uses the model's GELU."""
    torch.manual_seed(0)
    layers = torch.nn.Linear(dim, 4 * dim), torch.nn.GELU("tanh"), torch.nn.Linear(4 * dim, dim)
    mlp = am.MLP(*layers).to(device)
    x = torch.randn(4096, dim, device=device)
    with torch.no_grad(), cifar_demo.tf32(False):
        fused = mlp.fused(x)
        return {form: (fused - mlp[2](torch.nn.functional.gelu(mlp[0](x), approximate=form))).abs().max().item()
                for form in ("tanh", "none")}


def main(argv=None) -> dict:
    p = am.OneLineParser(prog="profile_step.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--objective", default="apex", choices=am.OBJECTIVES[:3])
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--profile", type=int, default=8)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--tiny", action="store_true", help="a tiny model (smoke test)")
    p.add_argument("--compile-mode", default="default",
                   choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"))
    p.add_argument("--sdpa", default="default", choices=("default", "flash", "cudnn", "efficient"),
                   help="restrict attention to one kernel (default: PyTorch's choice)")
    p.add_argument("--tuning", action="store_true",
                   help="inductor's coordinate-descent tuning of its generated kernels")
    p.add_argument("--batch-size", type=int, default=0, help="another global batch (0: the preset's)")
    p.add_argument("--plain-mlp", action="store_true",
                   help="the MLP's GELU as a kernel of its own without gradient too (no MLP.fused)")
    p.add_argument("--bf16-stream", action="store_true",
                   help="the residual stream in bf16 (the position embedding cast; default fp32)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="MFU against this bf16 peak (0: the peak measured here, which varies by a few %%)")
    p.add_argument("--out", default="", help="write profile_<objective>[_variant].json here")
    args = p.parse_args(argv)
    if args.peak_tflops < 0:
        p.error("--peak-tflops must be >= 0")
    size = dict(dim=32, depth=1, heads=2, batch_size=16) if args.tiny else {}
    if args.batch_size:
        size["batch_size"] = args.batch_size
    if args.sdpa != "default" and (args.device == "cpu" or not torch.cuda.is_available()):
        p.error("--sdpa chooses among GPU attention kernels; it needs a GPU")
    if args.tuning:
        from torch._inductor import config as inductor_config
        inductor_config.coordinate_descent_tuning = True
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    def attention():   # a fresh context each time: one from sdpa_kernel can be entered only once
        return sdpa_kernel(backends[args.sdpa]) if args.sdpa != "default" else contextlib.nullcontext()
    if args.plain_mlp:
        am.MLP.forward = torch.nn.Sequential.forward
    with tempfile.TemporaryDirectory() as tmp:
        cfg = am.Config(**{**am.PRESETS["cifar"], **size, "preset": "cifar", "dataset": "shapes",
                           "objective": args.objective, "device": args.device, "out_dir": tmp,
                           "max_steps": 10 ** 6, "minutes": 0.0, "polish_from": 0.0,    # the term on
                           "bf16_stream": args.bf16_stream})
        cfg.compile = cfg.compile and not args.tiny
        am.validate(cfg)
        run = am.setup(cfg)
    cuda = run.device.type == "cuda"
    net_fn, targets_fn, autocast = am.step_functions(run, cfg, args.compile_mode)   # as train()
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def steps(n):
        with attention():
            for _ in range(n):
                batch = run.data.batch(cfg.batch_size)
                loss, _ = am.train_step(run, net_fn, targets_fn, *batch, cfg, autocast)
        return loss

    start = time.time()
    steps(1 + args.warmup)
    sync()
    warm = time.time() - start
    start = time.time()
    loss = steps(args.steps)
    sync()
    seconds = time.time() - start
    img_per_s = args.steps * cfg.batch_size / seconds
    flops = cifar_demo.step_flops(cfg) * img_per_s
    peak = args.peak_tflops * 1e12 or (cifar_demo.measured_bf16_peak() if cuda else None)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    table, kernels, shares = "", "", {}
    if args.profile:
        with torch.profiler.profile(activities=activities) as prof:
            steps(args.profile)
            sync()
        key = "cuda_time_total" if cuda else "cpu_time_total"
        events = prof.key_averages()
        table = events.table(sort_by=key, row_limit=30, max_name_column_width=60)
        kernels = events.table(sort_by="self_" + key, row_limit=40, max_name_column_width=60)
        shares = time_shares(events, cuda)
    variant = [name for name, on in ((args.compile_mode, args.compile_mode != "default"),
                                     (f"sdpa-{args.sdpa}", args.sdpa != "default"), ("tuning", args.tuning),
                                     (f"batch{args.batch_size}", args.batch_size),
                                     ("plain-mlp", args.plain_mlp), ("bf16-stream", args.bf16_stream)) if on]
    gelu_error = fused_mlp_error(run.device, cfg.dim)
    record = {"objective": cfg.objective, "compile_mode": args.compile_mode, "sdpa": args.sdpa,
              "tuning": args.tuning, "batch_size": cfg.batch_size, "steps": args.steps,
              "warmup_seconds": round(warm, 1), "seconds": round(seconds, 2), "img_per_s": round(img_per_s, 1),
              "step_gflops_per_image": round(cifar_demo.step_flops(cfg) / 1e9, 3),
              "model_tflops": round(flops / 1e12, 1), "peak_bf16_tflops": round(peak / 1e12, 1) if peak else None,
              "mfu": round(flops / peak, 4) if peak else None, "final_loss": round(loss.item(), 4),
              "variant": variant, "mlp_fused_max_diff": gelu_error,
              "env": am.environment(), "time_shares": shares, "profile_table": table,
              "self_time_table": kernels}
    print("MLP.fused against the plain MLP, fp32, max |difference|:",
          ", ".join(f"GELU {form} {err:.2e}" for form, err in gelu_error.items()))
    if shares:
        print(kernels)
        print("share of the profiled time:", ", ".join(f"{k} {100 * v:.1f}%" for k, v in shares.items()))
    print(f"{cfg.objective}: {img_per_s:.0f} img/s, {flops / 1e12:.1f} TFLOP/s"
          + (f", MFU {100 * flops / peak:.1f}% of {peak / 1e12:.0f}" if peak else "") + f" ({record['env']['gpu']})")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        name = "_".join(["profile", cfg.objective, *variant]) + ".json"
        with open(os.path.join(args.out, name), "w") as f:
            json.dump(record, f, indent=1)
    return record


if __name__ == "__main__":
    main()
