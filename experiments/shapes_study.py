"""The generator term on 16x16 images whose every valid image is known: the tiny preset's shapes.

    python experiments/shapes_study.py              # 1,500 and 6,000 steps, 3 seeds: ~1 hour, 2 cores
    python experiments/shapes_study.py --report     # the table of the committed record
    python experiments/shapes_study.py --steps 6000 --seeds 3 4   # its own record: ..._steps6000_seeds3-4
    python experiments/shapes_study.py --pool results/shapes_study*.json   # every record, seeds joined
                                                    # (of one network and batch: --net, --batch;
                                                    # a seed's other flow stage: left out, named)
    python experiments/shapes_study.py --pool results/shapes_study*.json --figure assets/shapes_lengths.png
    python experiments/shapes_study.py --steps 24000 --seeds 0 1 --arms gen0 apex consistency
                                                    # some arms only, trained in the order given
    python experiments/shapes_study.py --steps 12000 --seeds 1 2 --arms small_s gen0 --net 128x2
                                                    # a wider network than the tiny preset's 64x2
    python experiments/shapes_study.py --steps 12000 --seeds 1 2 --arms small_s --batch 256
                                                    # the APEX stages at 4 times the batch
    python experiments/shapes_study.py --fast       # test size, a minute; numbers are meaningless

Between the 2-D toy (exact densities, 2 dimensions) and CIFAR-10 (FID only) lie the synthetic
shapes of apex_min's tiny preset: class k is a 5x5 square of colour k at one of 12 x 12 places on
a grey ground (make_shapes), flipped at random in training. A seed's training set (2,048 images)
with its flips is the data distribution, and the 144 images of each class are every valid image.

Each seed trains, with `python apex_min.py` and the tiny preset's network, a flow stage (flow
matching for 60% of the steps, as the cifar preset, at rate 3e-3) and from its EMA five APEX stages
(40% of the steps each, with the cifar preset's cosine rate from 1e-3), the arms:
  consistency  --objective consistency: no fake branch
  gen0         --gen-weight 0: the fake branch trained, no generator term (the control of apex)
  apex         the default objective
  polish/gen0  --polish-from 0.8 --gen-weight 0 (the control of apex_best)
  apex_best    --polish-from 0.8 --gen-s-min 0.02 --gen-s-max 0.25
and, on request (--arms), two that each keep one part of apex_best's form:
  polish       --polish-from 0.8: the late term with the released s ~ U(0, 1)
  small_s      --gen-s-min 0.02 --gen-s-max 0.25: the small-s term on throughout, one-step rows kept
and small_s/lr3e-4 with its control gen0/lr3e-4: the same from rate 3e-4 (the cifar preset's);
small_s/enr0 with its control gen0/enr0: the same with no training-time guidance (--enr 0),
and apex/enr0 and apex/enr1 with gen0/enr0 and gen0/enr1: the default term and its control at the
guidance strengths 0 and 1 (the default is 0.5).
Every model is sampled from the same noise (EMA weights; 1 and 2 NFE, the flow stage with 50 Euler
steps and with 1) and scored per class against the seed's data, then averaged over the classes:
  sw1        sliced W1 in pixel space (256 fixed directions, images in [-1, 1]): the headline
  atom_rmse  the RMS distance to the nearest valid image of the class: sharpness
  place_tv   the total variation between the places of those nearest images and the data's
             places: coverage (0 = the data's proportions)
  colour     the share whose nearest valid image over all classes is of the class asked for
The `data` row scores draws of the data distribution of the same size (the metrics' floor).
Runs go to OUT/runs/shapes_study (a finished run is reused); the record to
OUT/results/shapes_study.json (OUT: the repository; --fast: runs/fast). --net DIMxDEPTH trains
every stage with another network (DIM / 32 heads, as the tiny preset's 64x2 has 2): its runs and
its record carry `_netDIMxDEPTH` in their names. --batch B trains the APEX stages at batch B (the
flow stage keeps the tiny preset's 64, trained as the batch-64 runs' teacher is): `_bB` in the names.
"""
import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

import torch  # noqa: E402

import apex_min as am  # noqa: E402
import toy_2d  # noqa: E402

ARMS = {"consistency": ["--objective", "consistency"], "gen0": ["--gen-weight", "0"], "apex": [],
        "polish/gen0": ["--polish-from", "0.8", "--gen-weight", "0"],
        "apex_best": ["--polish-from", "0.8", "--gen-s-min", "0.02", "--gen-s-max", "0.25"],
        "polish": ["--polish-from", "0.8"], "small_s": ["--gen-s-min", "0.02", "--gen-s-max", "0.25"],
        "small_s/lr3e-4": ["--gen-s-min", "0.02", "--gen-s-max", "0.25", "--lr", "3e-4"],
        "gen0/lr3e-4": ["--gen-weight", "0", "--lr", "3e-4"],
        "small_s/enr0": ["--gen-s-min", "0.02", "--gen-s-max", "0.25", "--enr", "0"],
        "gen0/enr0": ["--gen-weight", "0", "--enr", "0"],
        "apex/enr0": ["--enr", "0"], "apex/enr1": ["--enr", "1"],
        "gen0/enr1": ["--gen-weight", "0", "--enr", "1"]}
FIVE = list(ARMS)[:5]   # the default arms
PAIRS = (("apex", "gen0"), ("apex_best", "polish/gen0"), ("apex_best", "gen0"),
         ("gen0", "consistency"), ("apex", "consistency"), ("apex_best", "consistency"),
         ("polish", "polish/gen0"), ("small_s", "gen0"), ("small_s/lr3e-4", "gen0/lr3e-4"),
         ("small_s/enr0", "gen0/enr0"), ("apex/enr0", "gen0/enr0"),
         ("apex/enr1", "gen0/enr1"))   # d = first - second, per seed
METRICS = ("sw1", "atom_rmse", "place_tv", "colour")
FLOW_SHARE, SIDE, SIZE, CLASSES = 0.6, 16 // 3, 16, 10
NET, BATCH = "64x2", 64   # the tiny preset's dim and depth, and its batch
LR = {"flow": "3e-3", "apex": "1e-3"}   # the tiny preset's 2e-4 left the flow stage drawing speckles


# 1. The data and every valid image ===============================================================
def valid_images() -> torch.Tensor:
    """(classes, places, 3, 16, 16) in [-1, 1]: every image make_shapes can draw, place r * 12 + s."""
    hues = torch.arange(CLASSES) / CLASSES
    rgb = 0.5 + 0.5 * torch.stack([torch.cos(2 * torch.pi * (hues + k / 3)) for k in range(3)], 1)
    places = SIZE - SIDE + 1
    out = torch.full((CLASSES, places * places, 3, SIZE, SIZE), 0.1)
    for r in range(places):
        for s in range(places):
            out[:, r * places + s, :, r:r + SIDE, s:s + SIDE] = rgb[:, :, None, None]
    return (out * 255).round() / 127.5 - 1


def data_distribution(seed: int):
    """The seed's training set and its flips (equal weight) in [-1, 1], and the labels."""
    x, y = am.make_shapes(size=SIZE, num_classes=CLASSES, seed=seed)
    x = x.float() / 127.5 - 1
    return torch.cat([x, x.flip(3)]), torch.cat([y, y])


# 2. Metrics ======================================================================================
def nearest(x, atoms):  # index of the nearest atom and the RMS distance to it, per row
    d = torch.cdist(x.flatten(1).double(), atoms.flatten(1).double())
    dist, idx = d.min(1)
    return idx, dist / x[0].numel() ** 0.5


def quantiles(p, levels: int = 1000):  # (n, L) -> (levels, L): the empirical quantile function
    idx = ((torch.arange(levels, dtype=torch.float64) + 0.5) / levels * len(p)).long()
    return p.sort(0).values[idx]


def directions(dim: int) -> torch.Tensor:   # the sliced W1's 256 fixed unit directions
    dirs = torch.randn(dim, 256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return dirs / dirs.norm(dim=0)


def scores(x, y, data_x, data_y, atoms) -> dict:
    """The four metrics of samples x (labels y) against the data, mean over classes."""
    dirs = directions(x[0].numel())
    flat_atoms = atoms.flatten(0, 1)
    out = {m: 0.0 for m in METRICS}
    for k in range(CLASSES):
        xk, dk = x[y == k], data_x[data_y == k]
        pk = quantiles(xk.flatten(1).double() @ dirs)
        qk = quantiles(dk.flatten(1).double() @ dirs)
        out["sw1"] += (pk - qk).abs().mean().item() / CLASSES
        idx, dist = nearest(xk, atoms[k])
        out["atom_rmse"] += dist.pow(2).mean().sqrt().item() / CLASSES
        data_idx, data_dist = nearest(dk, atoms[k])
        assert data_dist.max() < 1e-6, "a training image that is no valid image"
        places = len(atoms[k])
        p_gen = torch.bincount(idx, minlength=places) / len(idx)
        p_data = torch.bincount(data_idx, minlength=places) / len(data_idx)
        out["place_tv"] += 0.5 * (p_gen - p_data).abs().sum().item() / CLASSES
        out["colour"] += (nearest(xk, flat_atoms)[0] // places == k).double().mean().item() / CLASSES
    return {m: round(v, 5) for m, v in out.items()}


def evaluation_noise(n_per_class: int, size: int = SIZE):  # the same z, labels and sampler stream
    g = torch.Generator().manual_seed(1234)                   # for every model
    y = torch.arange(CLASSES).repeat_interleave(n_per_class)
    return torch.randn(len(y), 3, size, size, generator=g), y, g


def samples(net, flow: bool, n_per_class: int, euler_steps: int, size: int = SIZE) -> dict:
    """{sampler: (images in [-1, 1], labels)}: 1 and 2 NFE, or for a flow stage Euler and 1 step."""
    samplers = ({"euler": lambda z, y, g: am.sample_euler(net, z, y, euler_steps),
                 "1": lambda z, y, g: am.sample_euler(net, z, y, 1)} if flow else
                {str(n): (lambda z, y, g, n=n: am.sample_fewstep(net, z, y, nfe=n, generator=g))
                 for n in (1, 2)})
    out = {}
    for name, sample in samplers.items():
        z, y, g = evaluation_noise(n_per_class, size)
        out[name] = (sample(z, y, g).clamp(-1, 1), y)
    return out


def evaluate(path: str, flow: bool, seed: int, n_per_class: int, euler_steps: int) -> dict:
    """Scores of a checkpoint's EMA: 1 and 2 NFE, or for the flow stage Euler 50 and 1 step."""
    torch.set_num_threads(1)
    net, _ = am.model_from_checkpoint(path)
    data_x, data_y = data_distribution(seed)
    atoms = valid_images()
    return {name: scores(x, y, data_x, data_y, atoms)
            for name, (x, y) in samples(net, flow, n_per_class, euler_steps).items()}


def data_row(seed: int, n_per_class: int) -> dict:  # draws of the data distribution, scored alike
    data_x, data_y = data_distribution(seed)
    g = torch.Generator().manual_seed(4321)
    picks = [torch.nonzero(data_y == k)[:, 0] for k in range(CLASSES)]
    idx = torch.cat([p[torch.randint(len(p), (n_per_class,), generator=g)] for p in picks])
    return scores(data_x[idx], data_y[idx], data_x, data_y, valid_images())


# 3. Training, through apex_min's command line ====================================================
def run_dir(where: str, arm: str) -> str:  # a seed's folder, then one per arm ("flow" included)
    return os.path.join(where, arm.replace("/", "_"))


def run_suffix(parser, net: str, batch: int) -> str:
    """--net, --batch: "" for the tiny preset's network and batch, else _netDxL and _bB."""
    parts = net.split("x")
    if len(parts) != 2 or not all(n.isdigit() and int(n) > 0 for n in parts) or int(parts[0]) % 32:
        parser.error(f"--net {net}: DIMxDEPTH, DIM a multiple of 32, e.g. 128x2")
    return ("" if net == NET else f"_net{net}") + ("" if batch == BATCH else f"_b{batch}")


def finished(out_dir: str) -> bool:  # the run reached its --max-steps
    summary = os.path.join(out_dir, "summary.json")
    return os.path.exists(summary) and json.load(open(summary))["stop"] == "max-steps"


def write_record(path: str, record: dict) -> None:   # also the probe's and collapse_signs'
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)


def print_record(parser, path: str, table) -> dict:   # --report of the shapes scripts: no run
    if not os.path.exists(path):
        parser.error(f"no record at {path}; run the command without --report first")
    print(table(json.load(open(path))))
    return {}


def train(out_dir: str, flags: list) -> str:
    """One `python apex_min.py` run (one CPU thread); a finished run is reused. Returns its ckpt."""
    if finished(out_dir):
        return os.path.join(out_dir, "ckpt.pt")
    os.makedirs(out_dir, exist_ok=True)
    resume = ["--resume"] if os.path.exists(os.path.join(out_dir, "ckpt.pt")) else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(os.path.join(out_dir, "train.log"), "a") as log:
        done = subprocess.run([sys.executable, os.path.join(ROOT, "apex_min.py"), "--device", "cpu",
                               "--out-dir", out_dir, *resume, *flags], stdout=log, stderr=subprocess.STDOUT,
                              env=env)
    if done.returncode:
        raise SystemExit(f"error: training failed (exit {done.returncode}); see {out_dir}/train.log")
    return os.path.join(out_dir, "ckpt.pt")


def run_all(jobs: list, workers: int) -> list:  # (out_dir, flags) pairs, `workers` at a time
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda job: train(*job), jobs))


def common_flags(net: str) -> list:   # every stage's: logging, checkpoints, the network
    dim, depth = map(int, net.split("x"))
    return ["--log-every", "100", "--ckpt-every", "500", "--dim", str(dim), "--depth", str(depth),
            "--heads", str(dim // 32)]


def apex_flags(where: str, steps: int, seed: int, net: str, batch: int, arm: str) -> list:
    """An APEX stage's flags: from the seed's flow stage, the rest of the steps, the arm's own."""
    return ["--init-from", f"{where}/flow/ckpt.pt", "--seed", str(seed), "--max-steps",
            str(steps - round(FLOW_SHARE * steps)), "--lr", LR["apex"], "--lr-schedule", "cosine",
            *common_flags(net), "--batch-size", str(batch), *ARMS[arm]]


def study(args) -> dict:
    start, root = time.time(), os.path.join(args.out, "runs", "shapes_study")
    common = common_flags(args.net)
    where = {(s, seed): os.path.join(root, f"steps{s}{args.suffix}", f"seed{seed}")
             for s in args.steps for seed in args.seeds}
    order = sorted(where, key=lambda key: -key[0])                              # longest first
    flow_steps = {s: round(FLOW_SHARE * s) for s in args.steps}
    run_all([(f"{where[k]}/flow", ["--objective", "fm", "--lr", LR["flow"], "--seed", str(k[1]),
                                   "--max-steps", str(flow_steps[k[0]]), *common]) for k in order],
            args.workers)
    run_all([(run_dir(where[k], arm), apex_flags(where[k], k[0], k[1], args.net, args.batch, arm))
             for arm in args.arms for k in order], args.workers)   # an arm's seeds together
    jobs = [(f"{run_dir(where[k], arm)}/ckpt.pt", arm == "flow", k[1], args.n_per_class,
             args.euler_steps) for k in order for arm in ("flow", *args.arms)]
    scored = iter(toy_2d.run_jobs(evaluate, jobs, args.workers))
    rows = {s: {arm: {} for arm in ("flow", *args.arms, "data")} for s in args.steps}
    for k in order:
        for arm in ("flow", *args.arms):
            rows[k[0]][arm][k[1]] = next(scored)
        rows[k[0]]["data"][k[1]] = {"1": data_row(k[1], args.n_per_class)}
    return {"rows": {str(s): r for s, r in rows.items()}, "steps": args.steps, "seeds": args.seeds,
            "flow_share": FLOW_SHARE, "lr": LR,
            "arms": {arm: ARMS[arm] for arm in args.arms}, "n_per_class": args.n_per_class,
            "euler_steps": args.euler_steps, "net": args.net, "batch": args.batch, "env": am.environment(),
            "seconds_wall": round(time.time() - start, 1)}


def figure(path: str, where: str, seed: int, arms: list) -> None:
    """Four 1-NFE samples per class of each arm (the flow stage: 50 Euler steps) and of the data."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid
    z, y, g = evaluation_noise(4)
    panels = {}
    for arm in ("flow", *arms):
        net, _ = am.model_from_checkpoint(f"{run_dir(where, arm)}/ckpt.pt")
        panels[arm + (" (Euler 50)" if arm == "flow" else "")] = (
            am.sample_euler(net, z, y, 50) if arm == "flow" else am.sample_fewstep(net, z, y, generator=g))
    data_x, data_y = data_distribution(seed)
    panels["data"] = torch.cat([data_x[data_y == k][:4] for k in range(CLASSES)])
    fig, axes = plt.subplots(len(panels), 1, figsize=(6.4, 0.9 * len(panels)))
    for ax, (name, x) in zip(axes, panels.items()):
        grid = make_grid((x.clamp(-1, 1) + 1) / 2, nrow=CLASSES * 2, padding=1, pad_value=1)
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"shapes, seed {seed}: one-step samples (4 per class)", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# 4. Report =======================================================================================
def mean_std(values: list) -> str:  # toy_2d's mean and std, as a table cell
    mean, std = toy_2d.mean_std(values)
    return f"{mean:.4f} +- {std:.4f}" if len(values) > 1 else f"{mean:.4f}"


def pooled(records: list) -> dict:
    """The rows of several records (e.g. a replication on other seeds, or other arms of the same
    seeds, whose flow stage and data rows then repeat, equal), their seeds joined per length."""
    rows = {}
    for record in records:
        for s, by_arm in record["rows"].items():
            for arm, by_seed in by_arm.items():
                mine = rows.setdefault(s, {}).setdefault(arm, {})
                if twice := sorted(k for k in set(mine) & set(by_seed) if mine[k] != by_seed[k]):
                    raise ValueError(f"seeds {', '.join(twice)} of {s} steps are in two records "
                                     f"that differ ({arm})")
                mine.update(by_seed)
    order = ["flow", *ARMS, "data"]   # the rows of a record, in the order a whole record has them
    return {"rows": {s: {arm: rows[s][arm] for arm in sorted(rows[s], key=order.index)}
                     for s in sorted(rows, key=int)}}


def other_teachers(records: dict) -> list:
    """The records (in the order given) with a seed's flow stage unlike an earlier record's: their arms
    learnt from another teacher, so they do not pair with the earlier records' arms of that seed."""
    seen, found = {}, []
    for name, record in records.items():
        flows = {(s, seed): row for s, arms in record["rows"].items()
                 for seed, row in arms.get("flow", {}).items()}
        if any(seen.get(key, row) != row for key, row in flows.items()):
            found.append(name)
        else:
            seen.update(flows)
    return found


def paired(rows: dict, a: str, b: str, sampler: str, metric: str = "sw1") -> list:
    """d = a - b per seed that ran both arms (rows: one length's arms)."""
    return [rows[a][seed][sampler][metric] - rows[b][seed][sampler][metric]
            for seed in rows[a] if seed in rows[b]]


def lengths_figure(rows: dict, path: str) -> None:
    """sliced W1 of apex - gen0 and of apex - consistency against the length: seeds and mean +- std."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharey=True, layout="constrained")
    for ax, sampler in zip(axes, ("1", "2")):
        for (a, b), colour, nudge in ((("apex", "gen0"), "C0", 0.96), (("apex", "consistency"), "C1", 1.04)):
            points = [(int(s) * nudge, paired(arms, a, b, sampler)) for s, arms in rows.items()
                      if a in arms and b in arms]
            for x, d in points:
                ax.scatter([x] * len(d), d, s=8, color=colour, alpha=0.4)
            stats = [toy_2d.mean_std(d) for _, d in points]
            ax.errorbar([x for x, _ in points], [m for m, _ in stats], [sd for _, sd in stats], color=colour,
                        marker="o", capsize=3, label=f"{a} - {b}")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xticks([int(s) for s in rows], [f"{int(s):,}" for s in rows])
        ax.minorticks_off()
        ax.set_title(f"{sampler} NFE: below 0, the generator term helps", fontsize=9)
    axes[0].set_ylabel("paired difference of sliced W1")
    fig.supxlabel("training steps in all (60% flow stage, then the APEX stage)", fontsize=9)
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def table(record: dict) -> str:
    lines = []
    for s, rows in record["rows"].items():
        seeds = sorted(int(seed) for seed in rows["flow"])
        lines += [f"\n{s} steps ({round(FLOW_SHARE * int(s))} flow + {int(s) - round(FLOW_SHARE * int(s))} "
                  f"APEX stage), mean +- std over seeds {seeds}",
                  "| arm | sampler | " + " | ".join(METRICS) + " |", "|---" * (2 + len(METRICS)) + "|"]
        for arm, by_seed in rows.items():
            for sampler in next(iter(by_seed.values())):
                cells = [mean_std([v[sampler][m] for v in by_seed.values()]) for m in METRICS]
                lines.append(f"| {arm} | {sampler} | " + " | ".join(cells) + " |")
        lines += ["", "paired d = first - second (per seed), and how many seeds have d < 0",
                  "| d | sampler | " + " | ".join(METRICS) + " |", "|---" * (2 + len(METRICS)) + "|"]
        for a, b in [(a, b) for a, b in PAIRS if a in rows and b in rows]:   # the arms that ran
            for sampler in ("1", "2"):
                cells = []
                for m in METRICS:
                    d = paired(rows, a, b, sampler, m)
                    cells.append(f"{mean_std(d)} ({sum(v < 0 for v in d)}/{len(d)})")
                lines.append(f"| {a} - {b} | {sampler} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = am.OneLineParser(prog="shapes_study.py", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, nargs="+", default=[1500, 6000],
                   help="training lengths, steps in all")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n-per-class", type=int, default=500, help="samples per class for the metrics")
    p.add_argument("--euler-steps", type=int, default=50, help="Euler steps of the flow stage's sampler")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=FIVE,
                   help="the APEX stages to train, in this order (default: the first five)")
    p.add_argument("--workers", type=int, default=2, help="runs at a time (one CPU thread each)")
    p.add_argument("--net", default=NET, help=f"the network, DIMxDEPTH with DIM / 32 heads (default {NET})")
    p.add_argument("--batch", type=int, default=BATCH,
                   help=f"the APEX stages' batch (default {BATCH}; the flow stage keeps {BATCH})")
    p.add_argument("--out", default="", help="root of runs/ and results/ (default: the repository)")
    p.add_argument("--fast", action="store_true", help="test size: 20 steps, one seed, 20 per class")
    p.add_argument("--report", action="store_true", help="print the committed record's table, no run")
    p.add_argument("--pool", nargs="+", metavar="RECORD",
                   help="print the table of these records with their seeds joined per length, no run")
    p.add_argument("--figure", metavar="PATH", help="with --pool: also plot the paired sliced W1 by length")
    args = p.parse_args(argv)
    if args.fast:
        args.steps, args.seeds, args.n_per_class, args.euler_steps = [20], [0], 20, 5
    sizes = (args.n_per_class, args.euler_steps, args.workers)
    if min(args.steps) < 10 or min(sizes) < 1 or min(args.seeds) < 0 or args.batch < 8:
        p.error("--steps >= 10, --n-per-class, --euler-steps and --workers >= 1, --seeds >= 0, --batch >= 8")
    args.suffix = run_suffix(p, args.net, args.batch)
    args.out = args.out or (os.path.join(ROOT, "runs", "fast") if args.fast else ROOT)
    stem = "shapes_study"   # other lengths or seeds: their own record, e.g. shapes_study_steps6000_seeds3-4
    if not args.fast and (args.steps, args.seeds) != ([1500, 6000], [0, 1, 2]):
        stem += "_steps" + "-".join(map(str, args.steps)) + "_seeds" + "-".join(map(str, args.seeds))
    args.arms = list(dict.fromkeys(args.arms))
    if args.arms != FIVE:   # e.g. shapes_study_steps24000_seeds0-1_arms-gen0-apex-consistency
        stem += "_arms-" + "-".join(arm.replace("/", "_") for arm in args.arms)
    stem += args.suffix
    path = os.path.join(args.out, "results", stem + ".json")
    if args.figure and not args.pool:
        p.error("--figure goes with --pool")
    if args.pool:
        missing = [f for f in args.pool if not os.path.exists(f)]
        if missing:
            p.error(f"no record at {missing[0]}")
        # the records of one network and batch only (--net, --batch); older records: NET, BATCH
        records = {f: json.load(open(f)) for f in args.pool}
        kind = f"network {args.net}, batch {args.batch}"
        other = [f for f, r in records.items()
                 if (r.get("net", NET), r.get("batch", BATCH)) != (args.net, args.batch)]
        if len(other) == len(records):
            p.error(f"no record of the {kind} among them; --net and --batch pick another")
        if other:
            print(f"left out, of another network or batch than the {kind} (--net, --batch pick them): "
                  f"{', '.join(other)}\n")
        if again := other_teachers({f: r for f, r in records.items() if f not in other}):
            print(f"left out, from other flow stages of seeds an earlier record has: {', '.join(again)}\n")
            other += again
        try:
            rows = pooled([r for f, r in records.items() if f not in other])
        except ValueError as e:
            p.error(str(e))
        print(table(rows))
        if args.figure:
            lengths_figure(rows["rows"], args.figure)
            print(f"\nwrote {args.figure}")
        return {}
    if args.report:
        return print_record(p, path, table)
    record = study(args)
    write_record(path, record)
    steps, seed = max(args.steps), args.seeds[0]
    figure_path = os.path.join(args.out, "assets", stem + ".png")
    os.makedirs(os.path.dirname(figure_path), exist_ok=True)
    figure(figure_path, os.path.join(args.out, "runs", "shapes_study", f"steps{steps}{args.suffix}",
                                     f"seed{seed}"), seed, args.arms)
    print(table(record))
    print(f"\nwrote {path} and {figure_path}; wall {record['seconds_wall']:.1f} s")
    return record


if __name__ == "__main__":
    main()
