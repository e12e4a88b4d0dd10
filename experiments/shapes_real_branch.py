"""The shapes' collapse with another real branch: is the learned v_real's blindness the cause?

    python experiments/shapes_study.py --steps 12000 --seeds 1 2 --arms small_s   # the control
    python experiments/shapes_real_branch.py --steps 12000 --seeds 1 2            # ~30 min, 2 cores
    python experiments/shapes_real_branch.py --steps 12000 --report                # the record's table
    python experiments/shapes_real_branch.py --fast                                # test size

The small-s term (shapes_study.py's arm small_s: --gen-s-min 0.02 --gen-s-max 0.25) drives the
shapes' one-step generator to one blank image. There the learned real branch ignores the class,
while the exact velocity of the data is large and class dependent (shapes_probe.py). This trains,
from the study's flow stage of each seed, small_s with the generator term's v_real taken elsewhere
(v_fake still the network's shifted branch; everything else small_s's: the same flags, and the
flow and any-step rows still learn their guided targets):
  small_s/exact    the exact velocity of the seed's data (its training set and flips),
                   v* = (x_s - E[x | x_s, y]) / s
  small_s/teacher  the flow stage's EMA network, frozen (as DMD's real score): a learned velocity
                   that the APEX stage does not move
The runs go in the study's folders (runs/shapes_study/stepsN/seedK/small_s_exact, ...), trained here
with apex_min's train (the loss given apex_loss's `velocities`), a run at a time per worker. Every
arm and small_s are scored as the study scores them, with the contrast and spread of their one-step
samples (shapes_probe.py; 0: a blank). Record: results/shapes_real_branch_steps{N}.json.
"""
import contextlib
import functools
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

import torch  # noqa: E402

import apex_min as am  # noqa: E402
import cifar_demo  # noqa: E402
import shapes_probe as probe  # noqa: E402
import shapes_study as study  # noqa: E402
import toy_2d  # noqa: E402

ARMS = {"small_s/exact": "small_s, the generator term's v_real the exact velocity of the data",
        "small_s/teacher": "small_s, the generator term's v_real the frozen flow stage's (its EMA)"}
TRAINING_LOSS = am.training_loss


def with_real(real):
    """apex_loss's `velocities`: v_fake from the network's shifted branch, v_real = real(x_s, s, y)."""
    def velocities(net, x_s, s, y, cfg):
        fake = torch.ones_like(y, dtype=torch.bool)
        v_fake = net(x_s, s, s, am.condition_shift(net.embed_class(y), fake, cfg.shift_a, cfg.shift_b))
        return v_fake.float(), real(x_s.float(), s, y)
    return velocities


def exact_real(data_x, data_y):   # the data's v*
    return with_real(lambda x_s, s, y: probe.exact_velocity(x_s, s, y, data_x, data_y))


def teacher_real(teacher):   # a frozen network's conditional velocity
    return with_real(lambda x_s, s, y: teacher(x_s, s, s, teacher.embed_class(y)).float())


def train_arm(where: str, seed: int, flags: list, arm: str) -> str:
    """One arm of one seed, in this process (one thread); a finished run is reused."""
    out_dir = study.run_dir(where, arm)
    if not study.finished(out_dir):
        torch.set_num_threads(1)
        resume = ["--resume"] if os.path.exists(os.path.join(out_dir, "ckpt.pt")) else []
        cfg = am.parse_config([*flags, "--device", "cpu", "--out-dir", out_dir, *resume])
        os.makedirs(out_dir, exist_ok=True)
        velocities = (exact_real(*study.data_distribution(seed)) if arm == "small_s/exact" else
                      teacher_real(am.model_from_checkpoint(cfg.init_from)[0]))
        am.training_loss = functools.partial(TRAINING_LOSS, velocities=velocities)
        try:   # train's step calls apex_min.training_loss: this run's loss, then the default again
            with open(os.path.join(out_dir, "train.log"), "a") as log:
                with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                    am.train_stages(cfg)
        finally:
            am.training_loss = TRAINING_LOSS
    return os.path.join(out_dir, "ckpt.pt")


def score(ckpt: str, seed: int, n_per_class: int) -> dict:
    """The study's scores at 1 and 2 NFE, and the contrast and spread of the one-step samples."""
    out = study.evaluate(ckpt, False, seed, n_per_class, euler_steps=0)   # no Euler sampler here
    net, _ = am.model_from_checkpoint(ckpt)
    z, y, g = study.evaluation_noise(n_per_class)
    x = am.sample_fewstep(net, z, y, nfe=1, generator=g).clamp(-1, 1)
    return {**out, **cifar_demo.sample_stats(x, y)}


def table(record: dict) -> str:
    lines = [f"{record['steps']} steps, seeds {record['seeds']}; sliced W1 (1 / 2 NFE), contrast, spread",
             "", "| seed | arm | sw1, 1 NFE | sw1, 2 NFE | contrast | spread |", "|---|---|---|---|---|---|"]
    for seed, arms in record["rows"].items():
        lines += [f"| {seed} | {arm} | {r['1']['sw1']} | {r['2']['sw1']} | {r['contrast']} | {r['spread']} |"
                  for arm, r in arms.items()]
    lines.append("")
    for arm in record["arms"]:
        d = [arms[arm]["1"]["sw1"] - arms["small_s"]["1"]["sw1"] for arms in record["rows"].values()]
        mean, std = toy_2d.mean_std(d)
        lines.append(f"{arm} - small_s, sw1 at 1 NFE: {mean:+.4f} +- {std:.4f} "
                     f"({sum(v < 0 for v in d)}/{len(d)} seeds better)")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = am.OneLineParser(prog="shapes_real_branch.py", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=12000, help="the study's length, steps in all")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS),
                   help="the real branches to try (default: both)")
    p.add_argument("--n-per-class", type=int, default=500, help="samples per class for the metrics")
    p.add_argument("--workers", type=int, default=2, help="runs at a time (one CPU thread each)")
    p.add_argument("--out", default="", help="root of runs/ and results/ (default: the repository)")
    p.add_argument("--fast", action="store_true", help="test size: 20 steps, seed 0, 20 per class")
    p.add_argument("--report", action="store_true", help="print the committed record's table, no run")
    args = p.parse_args(argv)
    if args.fast:
        args.steps, args.seeds, args.n_per_class = 20, [0], 20
    args.out = args.out or (os.path.join(ROOT, "runs", "fast") if args.fast else ROOT)
    path = os.path.join(args.out, "results", f"shapes_real_branch_steps{args.steps}.json")
    if args.report:
        return study.print_record(p, path, table)
    where = {seed: os.path.join(args.out, "runs", "shapes_study", f"steps{args.steps}", f"seed{seed}")
             for seed in args.seeds}
    missing = [w for w in where.values() if not study.finished(study.run_dir(w, "small_s"))]
    if missing:
        p.error(f"no finished small_s run at {missing[0]}; run `python experiments/shapes_study.py "
                f"--steps {args.steps} --seeds {' '.join(map(str, args.seeds))} --arms small_s` first")
    flags = {seed: study.apex_flags(w, args.steps, seed, study.NET, study.BATCH, "small_s")
             for seed, w in where.items()}
    arms = list(dict.fromkeys(args.arms))
    toy_2d.run_jobs(train_arm, [(where[k], k, flags[k], arm) for arm in arms for k in args.seeds],
                    args.workers)
    scored_arms = ["small_s", *arms]
    jobs = [(f"{study.run_dir(where[k], arm)}/ckpt.pt", k, args.n_per_class)
            for k in args.seeds for arm in scored_arms]
    scored = iter(toy_2d.run_jobs(score, jobs, args.workers))
    rows = {str(k): {arm: next(scored) for arm in scored_arms} for k in args.seeds}
    record = {"steps": args.steps, "seeds": args.seeds, "control": study.ARMS["small_s"],
              "arms": {arm: ARMS[arm] for arm in arms}, "n_per_class": args.n_per_class, "rows": rows,
              "env": am.environment()}
    study.write_record(path, record)
    print(table(record) + f"\n\nwrote {path}")
    return record


if __name__ == "__main__":
    main()
