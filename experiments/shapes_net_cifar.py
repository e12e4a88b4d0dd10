"""The shapes study's network and recipe on CIFAR-10's images: does the small-s term still collapse?

    python experiments/shapes_net_cifar.py --data-dir DIR           # seeds 1 2, 12,000 steps
    python experiments/shapes_net_cifar.py --data-dir DIR --seeds 3 4
    python experiments/shapes_net_cifar.py --data-dir DIR --seeds 1 2 3 4 --arms apex
                                                    # the released s range, beside the same gen0
    python experiments/shapes_net_cifar.py --data-dir DIR --net 128x2   # 3.6 times the parameters
    python experiments/shapes_net_cifar.py --pool RECORD...   # seeds joined, one length and network
    python experiments/shapes_net_cifar.py --report                 # the committed record's table
    python experiments/shapes_net_cifar.py --data-dir DIR --fast    # test size; meaningless numbers

On the 16x16 shapes the term with s < 0.25 (`small_s`) drives most seeds to one blank image,
whatever the rate, a 3.6 times wider network or 8 times the batch (docs/results.md); on CIFAR-10
the preset's form of it pays and draws no blank. Left to separate the two: the data (no blank near
natural images) and CIFAR-10's 110 times larger network. This trains the shapes study's runs, the
same network (64x2), batch, rates, split and arms (experiments/shapes_study.py), on CIFAR-10's
32x32 training images cut in 4x4 patches (64 tokens, as the shapes' 16x16 in 2x2): a flow stage per
seed, then from its EMA the arms, by default `small_s` and its control `gen0`. DIR holds
cifar-10-batches-py/ (apex_min downloads it there when missing). Each model draws 500 samples per
class from the same noise (1 and 2 NFE; the flow stage with 50 Euler steps and with 1), scored per
class against that class's training images and their flips, then averaged over the classes:
  sw1        sliced W1 in pixel space (256 fixed directions, images in [-1, 1])
  contrast   the mean pixel std within a sample (0: a blank image), spread the pixel std across a
             class's samples (0: one image), saturation (cifar_demo.sample_stats)
and from each APEX stage's log the shapes' collapse signs (experiments/collapse_signs.py): the term
steps until the fake loss fell below 0.12, the lowest fake loss and gap, the last logged contrast.
Runs: runs/shapes_net_cifar/steps{N}/seed{k}/{flow,ARM}, a finished run reused, a stopped one
resumed (steps{N}_net{DxL} for another network, --net).
Record: results/shapes_net_cifar_steps{N}_seeds{...}.json, with _arms-... for arms other than the
default and _net... for another network (--fast: under runs/fast). --pool joins records of other
seeds or arms of one length and network.
"""
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

import torch  # noqa: E402

import apex_min as am  # noqa: E402
import cifar_demo  # noqa: E402
import collapse_signs  # noqa: E402
import shapes_study as study  # noqa: E402

CLASSES, SIZE = 10, 32
STATS = ("sw1", "contrast", "spread", "saturation")
ARMS = ["small_s", "gen0"]   # the default arms; others (--arms) get their own record


def data_flags(data_dir: str) -> list:   # CIFAR-10 at the shapes' 64 tokens (32x32 in 4x4 patches),
    # the tiny preset named, since --dataset cifar alone brings the cifar preset
    return ["--preset", "tiny", "--dataset", "cifar", "--data-dir", data_dir, "--image-size", str(SIZE),
            "--patch-size", "4"]


def class_images(data_dir: str) -> list:   # per class: its training images, uint8
    x, y = am.load_cifar(data_dir, train=True)
    return [x[y == k] for k in range(CLASSES)]


def data_quantiles(images: list) -> list:   # per class: the quantiles of its images and their flips
    dirs, out = study.directions(3 * SIZE * SIZE), []   # one class in float64 at a time
    for xk in images:
        xk = xk.double() / 127.5 - 1
        out.append(study.quantiles(torch.cat([xk, xk.flip(3)]).flatten(1) @ dirs))
    return out


def scores(x, y, data_q: list) -> dict:
    """sliced W1 per class against the class's data (its quantiles), and the samples' statistics."""
    dirs = study.directions(3 * SIZE * SIZE)
    sw1 = sum((study.quantiles(x[y == k].flatten(1).double() @ dirs) - data_q[k]).abs().mean().item()
              for k in range(CLASSES)) / CLASSES
    return {"sw1": round(sw1, 5), **cifar_demo.sample_stats(x, y)}


def evaluate(path: str, flow: bool, data_dir: str, n_per_class: int, euler_steps: int) -> dict:
    torch.set_num_threads(1)   # the shapes study's samplers and noise, at 32x32
    net, _ = am.model_from_checkpoint(path)
    data_q = data_quantiles(class_images(data_dir))
    return {name: scores(x, y, data_q)
            for name, (x, y) in study.samples(net, flow, n_per_class, euler_steps, SIZE).items()}


def data_row(data_dir: str, n_per_class: int) -> dict:   # draws of the data, scored alike (the floor)
    images, g = class_images(data_dir), torch.Generator().manual_seed(4321)
    x = torch.cat([xk[torch.randint(len(xk), (n_per_class,), generator=g)] for xk in images])
    x = torch.where(torch.rand(len(x), 1, 1, 1, generator=g) < 0.5, x.flip(3), x).float() / 127.5 - 1
    return scores(x, torch.arange(CLASSES).repeat_interleave(n_per_class), data_quantiles(images))


def log_signs(folder: str, control: str) -> dict:   # collapse_signs' reading of a finished run's log
    run, theirs = collapse_signs.finished_run(folder), collapse_signs.finished_run(control)
    if run["config"]["gen_weight"] == 0:
        return {}
    return {**collapse_signs.signs(run["config"], run["log"]),
            **(collapse_signs.lag(run, theirs) if theirs else {})}


def study_cifar(args) -> dict:
    start = time.time()
    root = os.path.join(args.out, "runs", "shapes_net_cifar", f"steps{args.steps}{args.suffix}")
    where = {seed: os.path.join(root, f"seed{seed}") for seed in args.seeds}
    flow_steps, extra = round(study.FLOW_SHARE * args.steps), data_flags(args.data_dir)
    study.run_all([(f"{where[k]}/flow", ["--objective", "fm", "--lr", study.LR["flow"], "--seed", str(k),
                                         "--max-steps", str(flow_steps), *study.common_flags(args.net),
                                         *extra]) for k in args.seeds], args.workers)
    study.run_all([(study.run_dir(where[k], arm),
                    study.apex_flags(where[k], args.steps, k, args.net, study.BATCH, arm) + extra)
                   for arm in args.arms for k in args.seeds], args.workers)
    jobs = [(f"{study.run_dir(where[k], arm)}/ckpt.pt", arm == "flow", args.data_dir, args.n_per_class,
             args.euler_steps) for k in args.seeds for arm in ("flow", *args.arms)]
    scored = iter(study.toy_2d.run_jobs(evaluate, jobs, args.workers))
    rows = {arm: {} for arm in ("flow", *args.arms, "data")}
    signs, floor = {arm: {} for arm in args.arms}, data_row(args.data_dir, args.n_per_class)
    for k in args.seeds:   # the data row is the same for every seed (one training set)
        for arm in ("flow", *args.arms):
            rows[arm][str(k)] = next(scored)
        for arm in args.arms:
            signs[arm][str(k)] = log_signs(study.run_dir(where[k], arm), study.run_dir(where[k], "gen0"))
        rows["data"][str(k)] = {"1": floor}
    return {"rows": {str(args.steps): rows}, "signs": signs, "steps": args.steps, "seeds": args.seeds,
            "flow_share": study.FLOW_SHARE, "lr": study.LR, "net": args.net, "batch": study.BATCH,
            "patch": 4, "arms": {arm: study.ARMS[arm] for arm in args.arms},
            "n_per_class": args.n_per_class, "euler_steps": args.euler_steps, "env": am.environment(),
            "seconds_wall": round(time.time() - start, 1)}


def table(record: dict) -> str:
    (steps, rows), = record["rows"].items()
    lines = [f"{steps} steps, CIFAR-10 32x32 in 4x4 patches, network {record['net']}, "
             f"batch {record['batch']}; per seed {', '.join(next(iter(rows.values())))}",
             "| arm | sampler | " + " | ".join(STATS) + " |", "|---" * (2 + len(STATS)) + "|"]
    for arm, by_seed in rows.items():
        for sampler in next(iter(by_seed.values())):
            cells = [" / ".join(f"{v[sampler][m]:.4f}" for v in by_seed.values()) for m in STATS]
            lines.append(f"| {arm} | {sampler} | " + " | ".join(cells) + " |")
    for arm in [a for a in rows if "gen0" in rows and a not in ("flow", "gen0", "data")]:
        lines.append("")
        for sampler in ("1", "2"):
            d = study.paired(rows, arm, "gen0", sampler)
            lines.append(f"{arm} - gen0, sliced W1 at {sampler} NFE: {study.mean_std(d)} "
                         f"({sum(v < 0 for v in d)}/{len(d)} seeds below 0)")
    keys = ("term_steps", "onset", "min_fake", "min_gap", "end_contrast", "fake_lag")
    lines += ["", "collapse signs (fake loss floor 0.12), per seed",
              "| arm | seed | " + " | ".join(keys) + " |", "|---" * (2 + len(keys)) + "|"]
    lines += [f"| {arm} | {seed} | " + " | ".join("-" if s.get(k) is None else str(s[k]) for k in keys)
              + " |" for arm, by_seed in record["signs"].items() for seed, s in by_seed.items()]
    return "\n".join(lines)


def pooled(records: list) -> dict:   # records of one length and network, their seeds joined
    if len({(tuple(r["rows"]), r["net"]) for r in records}) > 1:
        raise ValueError("the records are of different lengths or networks")
    rows, signs = {}, {}
    for r in records:   # the flow and data rows of a seed repeat across records of other arms
        for arm, by_seed in next(iter(r["rows"].values())).items():
            rows.setdefault(arm, {}).update(by_seed)
        for arm, by_seed in r["signs"].items():
            signs.setdefault(arm, {}).update(by_seed)
    rows["data"] = rows.pop("data")   # last, as in one record
    return {"rows": {next(iter(records[0]["rows"])): rows}, "signs": signs,
            "net": records[0]["net"], "batch": records[0]["batch"]}


def main(argv=None) -> dict:
    p = am.OneLineParser(prog="shapes_net_cifar.py", description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py/")
    p.add_argument("--steps", type=int, default=12000, help="training length, steps in all")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--arms", nargs="+", choices=list(study.ARMS), default=ARMS,
                   help="the APEX stages to train, in this order")
    p.add_argument("--net", default=study.NET,
                   help=f"the network, DIMxDEPTH with DIM / 32 heads (default {study.NET})")
    p.add_argument("--n-per-class", type=int, default=500, help="samples per class for the metrics")
    p.add_argument("--euler-steps", type=int, default=50, help="Euler steps of the flow stage's sampler")
    p.add_argument("--workers", type=int, default=2, help="runs at a time (one CPU thread each)")
    p.add_argument("--out", default="", help="root of runs/ and results/ (default: the repository)")
    p.add_argument("--fast", action="store_true", help="test size: 20 steps, one seed, 20 per class")
    p.add_argument("--report", action="store_true", help="print the committed record's table, no run")
    p.add_argument("--pool", nargs="+", metavar="RECORD", help="print these records' table, seeds joined")
    args = p.parse_args(argv)
    if args.fast:
        args.steps, args.seeds, args.n_per_class, args.euler_steps = 20, [0], 20, 5
    if args.steps < 10 or min(args.n_per_class, args.euler_steps, args.workers) < 1 or min(args.seeds) < 0:
        p.error("--steps >= 10, --n-per-class, --euler-steps and --workers >= 1, --seeds >= 0")
    args.suffix = study.run_suffix(p, args.net, study.BATCH)
    if args.pool:
        if missing := [f for f in args.pool if not os.path.exists(f)]:
            p.error(f"no record at {missing[0]}")
        try:
            print(table(pooled([json.load(open(f)) for f in args.pool])))
        except ValueError as e:
            p.error(str(e))
        return {}
    args.out = args.out or (os.path.join(ROOT, "runs", "fast") if args.fast else ROOT)
    args.arms = list(dict.fromkeys(args.arms))
    stem = f"shapes_net_cifar_steps{args.steps}_seeds" + "-".join(map(str, args.seeds))
    if args.arms != ARMS:   # e.g. shapes_net_cifar_steps12000_seeds1-2_arms-apex
        stem += "_arms-" + "-".join(arm.replace("/", "_") for arm in args.arms)
    stem += args.suffix   # e.g. _net128x2
    path = os.path.join(args.out, "results", stem + ".json")
    if args.report:
        return study.print_record(p, path, table)
    if not os.path.isdir(os.path.join(args.data_dir, "cifar-10-batches-py")):
        am.load_cifar(args.data_dir)   # downloads, or ends with apex_min's one-line error
    record = study_cifar(args)
    study.write_record(path, record)
    print(table(record) + f"\n\nwrote {path}; wall {record['seconds_wall']:.1f} s")
    return record


if __name__ == "__main__":
    main()
