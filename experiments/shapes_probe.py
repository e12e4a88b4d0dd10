"""What the generator term sees at the shapes study's one-step samples: the gap and the class.

    python experiments/shapes_probe.py --steps 24000 --seeds 0 1 2 3   # the study's checkpoints
    python experiments/shapes_probe.py --steps 24000 --report          # the committed record's table
    python experiments/shapes_probe.py --steps 12000 --seeds 1 2 --net 128x2   # the study's --net runs
    python experiments/shapes_probe.py --steps 12000 --seeds 1 2 --batch 256   # and its --batch runs

For each trained arm of experiments/shapes_study.py (its checkpoints under runs/shapes_study), the
EMA network draws one-step samples from the study's evaluation noise, and this measures:
  contrast   the mean pixel std within a sample (a square on the ground; 0 = a blank image)
  spread     the pixel std across a class's samples, mean over pixels and classes (0 = one image)
and, with the samples noised to s (x_s = (1 - s) x + s z, fixed z), as the generator term does:
  gap        mean (v_fake - v_real)^2: the size of the correction before its clamp
  class      mean (v_real(c_y) - v_real(c_other))^2: how much the real branch depends on the class
             at these samples (c_other: class y + 3, mod 10); class_data: the same at the data
  real_err   mean (v_real - v*)^2, v* the exact velocity of the seed's data (a finite set, flips
             included: v* = (x_s - E[x | x_s, y]) / s); exact: mean v*^2, for scale; class_exact:
             the exact velocity's class dependence, as `class`
The `data` row: the contrast and spread of draws of the seed's data. Arms still training are left out.
Record: results/shapes_probe_steps{N}.json (--net, --batch: the study's suffix, e.g. ..._net128x2).
A record already there, of the same --n-per-class, keeps its rows of the arms not probed this time.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

import torch  # noqa: E402

import apex_min as am  # noqa: E402
import cifar_demo  # noqa: E402
import shapes_study as study  # noqa: E402

S = (0.02, 0.1, 0.25, 0.5, 0.75)
FAKE_ARMS = [arm for arm in study.ARMS if arm != "consistency"]   # consistency never trains c_fake


def data_draws(seed: int, n_per_class: int):  # the first n images of each class of the seed's data
    data_x, data_y = study.data_distribution(seed)
    pick = torch.cat([torch.nonzero(data_y == k)[:n_per_class, 0] for k in range(study.CLASSES)])
    return data_x[pick], data_y[pick]


def exact_velocity(x_s, s, y, data_x, data_y):
    """v* = (x_s - E[x | x_s, y]) / s for the data (data_x, data_y) as the distribution: the
    posterior over its images of class y, x_s ~ N((1 - s) x, s^2 I). s: a float or one per row."""
    s = torch.as_tensor(s, dtype=torch.float64, device=x_s.device).expand(len(x_s))
    out = torch.empty_like(x_s)
    for k in y.unique():
        rows, images = y == k, data_x[data_y == k].flatten(1).double().to(x_s.device)
        x, a = x_s[rows].flatten(1).double(), 1 - s[rows, None]   # |x - a X|^2, row by row
        d2 = x.pow(2).sum(1, keepdim=True) - 2 * a * (x @ images.T) + a * a * images.pow(2).sum(1)
        x0 = torch.softmax(-d2 / (2 * s[rows, None] ** 2), 1) @ images
        out[rows] = ((x - x0) / s[rows, None]).to(x_s.dtype).view(-1, *x_s.shape[1:])
    return out


@torch.no_grad()
def branch_stats(net, cfg, x, y, data=None) -> dict:
    """gap and class by s at samples x of classes y (one fixed noise draw per s); with data
    (data_x, data_y) also real_err, exact and class_exact."""
    g, out = torch.Generator().manual_seed(99), {}
    y_other = (y + 3) % study.CLASSES
    c, c_other = net.embed_class(y), net.embed_class(y_other)
    c_fake = am.condition_shift(c, torch.ones(len(y), dtype=torch.bool), cfg.shift_a, cfg.shift_b)
    for s in S:
        sv = torch.full((len(y),), s)
        x_s = am.interpolate(x, torch.randn(x.shape, generator=g), sv)
        v_real, v_fake, v_other = (net(x_s, sv, sv, cond).float() for cond in (c, c_fake, c_other))
        r = {"gap": (v_fake - v_real).pow(2).mean(), "class": (v_real - v_other).pow(2).mean()}
        if data is not None:
            v_star = exact_velocity(x_s, s, y, *data)
            r.update(real_err=(v_real - v_star).pow(2).mean(), exact=v_star.pow(2).mean(),
                     class_exact=(v_star - exact_velocity(x_s, s, y_other, *data)).pow(2).mean())
        out[str(s)] = {k: round(v.item(), 4) for k, v in r.items()}
    return out


def probe(where: str, arm: str, seed: int, n_per_class: int) -> dict:
    torch.set_num_threads(1)
    net, cfg = am.model_from_checkpoint(f"{study.run_dir(where, arm)}/ckpt.pt")
    z, y, g = study.evaluation_noise(n_per_class)
    x = am.sample_fewstep(net, z, y, nfe=1, generator=g).clamp(-1, 1)
    by_s = branch_stats(net, cfg, x, y, study.data_distribution(seed))
    on_data = branch_stats(net, cfg, *data_draws(seed, n_per_class))
    for s in S:
        by_s[str(s)]["class_data"] = on_data[str(s)]["class"]
    return {**cifar_demo.sample_stats(x, y), "by_s": by_s}


def table(record: dict) -> str:
    lines = [f"{record['steps']} steps, one-step samples ({record['n_per_class']} per class)"]
    for keys in (("gap", "class", "class_data"), ("real_err", "exact", "class_exact")):
        heads = " | ".join(f"{' / '.join(keys)}, s = {s}" for s in S)
        lines += ["", f"| seed | arm | contrast | spread | {heads} |", "|---" * (4 + len(S)) + "|"]
        for seed, arms in record["rows"].items():
            for arm, r in arms.items():
                cells = [" / ".join(str(r["by_s"][str(s)][k]) for k in keys) if "by_s" in r else ""
                         for s in S]
                lines.append(f"| {seed} | {arm} | {r['contrast']} | {r['spread']} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = am.OneLineParser(prog="shapes_probe.py", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, required=True, help="the study's length, steps in all")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--arms", nargs="+", choices=list(study.ARMS), default=FAKE_ARMS,
                   help="the arms to probe (default: those with a fake branch; untrained ones left out)")
    p.add_argument("--n-per-class", type=int, default=100)
    p.add_argument("--net", default=study.NET, help=f"the study's --net (default {study.NET})")
    p.add_argument("--batch", type=int, default=study.BATCH,
                   help=f"the study's --batch (default {study.BATCH})")
    p.add_argument("--out", default=ROOT, help="root of runs/ and results/ (default: the repository)")
    p.add_argument("--report", action="store_true", help="print the committed record's table, no probe")
    args = p.parse_args(argv)
    suffix = study.run_suffix(p, args.net, args.batch)
    path = os.path.join(args.out, "results", f"shapes_probe_steps{args.steps}{suffix}.json")
    if args.report:
        return study.print_record(p, path, table)
    if args.n_per_class < 2:
        p.error("--n-per-class must be >= 2")
    rows = {}
    for seed in args.seeds:
        where = os.path.join(args.out, "runs", "shapes_study", f"steps{args.steps}{suffix}", f"seed{seed}")
        done = [arm for arm in args.arms if study.finished(study.run_dir(where, arm))]
        if not done:
            continue
        rows[str(seed)] = {arm: probe(where, arm, seed, args.n_per_class) for arm in done}
        rows[str(seed)]["data"] = cifar_demo.sample_stats(*data_draws(seed, args.n_per_class))
    if not rows:
        p.error(f"no trained arm of {', '.join(args.arms)} under "
                f"{args.out}/runs/shapes_study/steps{args.steps}{suffix}; run shapes_study.py first")
    old = json.load(open(path)) if os.path.exists(path) else None
    if old and old["n_per_class"] == args.n_per_class:   # arms probed before and not now stay
        for seed, arms in old["rows"].items():
            new = rows.get(seed, {})
            kept = {arm: r for arm, r in arms.items() if arm != "data" and arm not in new}
            rows[seed] = {**kept, **new} if new else arms
        rows = dict(sorted(rows.items(), key=lambda item: int(item[0])))
    record = {"steps": args.steps, "net": args.net, "batch": args.batch, "n_per_class": args.n_per_class,
              "s": list(S), "rows": rows, "env": am.environment()}
    study.write_record(path, record)
    print(table(record) + f"\n\nwrote {path}")
    return record


if __name__ == "__main__":
    main()
