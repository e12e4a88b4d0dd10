"""Where the learned correction's samples go on the toy: mass between modes, spread within them.

    python experiments/toy_modes.py                 # 5 rungs, 1,500 steps; results/toy_modes.json
    python experiments/toy_modes.py --steps 6000    # results/toy_modes_steps6000.json
    python experiments/toy_modes.py --fast          # test size, seconds; numbers are meaningless

The oracle ladder (experiments/toy_ladder.py) found that `apex_best` puts more samples within 3
sigma of a mode than `consistency` while its sliced W1 is no better, or worse. This script reruns
rungs of the ladder (same pretrained ensemble, same draws: the sliced W1 and share equal the
ladder's records) and splits each member's 1-NFE samples three ways:
  bridge   the share of samples farther than 3 sigma from every mode of their class
  mass_tv  among the others, the total variation between their shares per mode and the fair share
           (each mode of a class equally likely), mean over classes; 0 = balanced
  offset   the RMS over modes of the distance from the mean of a mode's samples to the mode's
           centre, in units of the mixture's std
  spread   the RMS distance of those samples to the mean of their mode's samples, in units of the
           mixture's std (exact samples: about 1.38, a 2-D Gaussian cut at 3 sigma)
The `target` row scores exact samples of the same size. Rows NAME@2 score the same rung's 2-NFE
samples (apex_min.sample_fewstep from the same noise; d against consistency@2): the one-step rows
are where the generator term acts, and a second step reads the any-step map at t = 0.6.
"""
import dataclasses
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import torch  # noqa: E402

import apex_min as am  # noqa: E402
import toy_2d  # noqa: E402
import toy_ladder  # noqa: E402

RUNGS = ("consistency", "apex_released", "polish/gen0", "apex_best", "oracle_both")
METRICS = ("sw1", "share3", "bridge", "mass_tv", "offset", "spread")


def mode_metrics(x, y, name: str) -> dict:
    mix = toy_2d.toy_mixture(name)
    nearest, near = toy_2d.nearest_own_mode(x, y, name)
    tv = []
    for k in range(mix["num_classes"]):
        modes = (mix["classes"] == k).nonzero().flatten().tolist()
        counts = torch.tensor([((nearest == j) & near & (y == k)).sum().item() for j in modes],
                              dtype=torch.float64)
        tv.append(0.5 * (counts / counts.sum().clamp_min(1) - 1 / len(modes)).abs().sum().item())
    xn, modes = x[near].double(), nearest[near]
    centres = torch.stack([xn[modes == j].mean(0) if (modes == j).any() else mix["means"][j].double()
                           for j in range(len(mix["means"]))])            # a mode without samples: 0
    offset = (centres - mix["means"].double()).norm(dim=1)
    radius = (xn - centres[modes]).norm(dim=1)
    return {"sw1": toy_2d.sliced_w1(x, y, name), "share3": near.double().mean().item(),
            "bridge": 1 - near.double().mean().item(), "mass_tv": sum(tv) / len(tv),
            "offset": (offset.pow(2).mean().sqrt() / mix["std"]).item(),
            "spread": (radius.pow(2).mean().sqrt() / mix["std"]).item()}


def run_rung(name: str, pretrained: bytes, settings) -> dict:  # per member: mode_metrics, 1 and 2 NFE
    objective = toy_ladder.RUNGS[name][0]
    result = toy_2d.finetune(objective, pretrained, settings, loss=toy_ladder.Rung(name, settings))
    x, names = result["samples"][f"{objective}@1"], toy_2d.member_names(settings)   # (n, M, 2)
    z, y_rows, rng = toy_2d.evaluation_noise(settings, len(names))    # the 1-NFE row's noise again
    x2 = am.sample_fewstep(result["ema"], z, y_rows, nfe=2, generator=rng).view(-1, len(names), 2)
    y = torch.arange(x.shape[0]) % 2                                  # one member's labels
    return {"name": name, "members": [mode_metrics(x[:, m], y, t) for m, t in enumerate(names)],
            "members2": [mode_metrics(x2[:, m], y, t) for m, t in enumerate(names)]}


def target_row(settings) -> list:  # exact samples, as many per member as the rungs have
    rng, y = torch.Generator().manual_seed(settings.seed + 4), torch.arange(settings.n_eval) % 2
    return [mode_metrics(toy_2d.sample_toy(t, len(y), generator=rng, y=y)[0], y, t)
            for t in toy_2d.member_names(settings)]


def main(argv=None) -> dict:
    settings = toy_2d.parse_settings(argv, prog="toy_modes.py")
    settings = toy_ladder.ladder_settings(settings)   # the ladder's draws, so its numbers recur
    torch.set_num_threads(1)
    start = time.time()
    pretrained = toy_2d.pretrain(settings)
    jobs = [(n, pretrained, settings) for n in sorted(RUNGS, key=toy_ladder.cost, reverse=True)]
    done = {r["name"]: r for r in toy_2d.run_jobs(run_rung, jobs, settings.workers)}
    members = {"target": target_row(settings), **{n: done[n]["members"] for n in RUNGS},
               **{f"{n}@2": done[n]["members2"] for n in RUNGS}}                 # 2 NFE: row NAME@2
    names = toy_2d.member_names(settings)
    rows = {row: {t: {k: [q[k] for q, n in zip(qs, names) if n == t] for k in METRICS}
                  for t in dict.fromkeys(names)} for row, qs in members.items()}
    record = {"rows": rows, "settings": dataclasses.asdict(settings), "env": am.environment(),
              "seconds_wall": round(time.time() - start, 1)}
    toy_ladder.write_record(record, settings, "toy_modes", table(record))
    return record


def table(record: dict) -> str:
    """Mean +- std over seeds; d: the paired difference to consistency (mass_tv, offset, spread)."""
    rows = record["rows"]
    lines = [f"{'row':14s} {'target':6s} " + " ".join(f"{k:>15s}" for k in METRICS)
             + "".join(f" {'d ' + k:>15s}" for k in ("mass_tv", "offset", "spread"))]
    for row, by_target in rows.items():
        for t, q in by_target.items():
            cells = [toy_2d.mean_std(q[k]) for k in METRICS]
            if row != "target":   # against consistency at the same NFE
                base = rows["consistency@2" if row.endswith("@2") else "consistency"][t]
                cells += [toy_2d.mean_std([a - b for a, b in zip(q[k], base[k])])
                          for k in ("mass_tv", "offset", "spread")]
            lines.append(f"{row:14s} {t:6s} " + " ".join(f"{m:8.4f}+-{s:.4f}" for m, s in cells))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
