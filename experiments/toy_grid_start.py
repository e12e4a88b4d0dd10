"""The first time of the few-step grids on the toy: t = 0.999 (the released grids) against t = 1.

    python experiments/toy_grid_start.py                # 1,500 steps; results/toy_grid_start.json
    python experiments/toy_grid_start.py --steps 6000   # results/toy_grid_start_steps6000.json
    python experiments/toy_grid_start.py --fast         # test size, seconds; numbers are meaningless

The one-step rows of the objective train F(z, 1, 0, c) at t = 1 exactly, but the released grids
start at 0.999 (docs/method.md, samplers). This script fine-tunes toy_2d's one-step variants,
`consistency` and `apex`, as `python toy_2d.py` does (the same pretrained ensemble and draws, so
the 0.999 rows at 1 NFE are toy_2d's consistency@1 and apex@1), then samples each EMA from the
same noise with four grids: [0.999, 0] and [1, 0] (1 NFE), [0.999, 0.6, 0] and [1, 0.6, 0]
(2 NFE). It reports sliced W1 (mean +- std over seeds) and d, the paired difference of t = 1
minus t = 0.999 (negative: starting at t = 1 is better).
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

GRIDS = {"1 NFE from 0.999": [0.999, 0.0], "1 NFE from 1": [1.0, 0.0],
         "2 NFE from 0.999": [0.999, 0.6, 0.0], "2 NFE from 1": [1.0, 0.6, 0.0]}
VARIANTS = ("apex", "consistency")


def run_variant(variant: str, pretrained: bytes, settings) -> dict:  # sw1 per member and grid
    result = toy_2d.finetune(variant, pretrained, settings)
    names = toy_2d.member_names(settings)
    sw1 = {}
    for grid, times in GRIDS.items():
        z, y, rng = toy_2d.evaluation_noise(settings, len(names))   # the same noise for every grid
        x = am.sample_fewstep(result["ema"], z, y, times=times, generator=rng)
        sw1[grid] = [q["sw1"] for q in toy_2d.member_quality(x, y, names)]
    toy_row = [q["sw1"] for q in result["rows"][f"{variant}@1"]]   # toy_2d's own 1-NFE row
    return {"variant": variant, "sw1": sw1, "toy_2d_row": toy_row}


def main(argv=None) -> dict:
    settings = toy_2d.parse_settings(argv, prog="toy_grid_start.py")
    torch.set_num_threads(1)
    start = time.time()
    pretrained = toy_2d.pretrain(settings)
    done = toy_2d.run_jobs(run_variant, [(v, pretrained, settings) for v in VARIANTS], settings.workers)
    names = toy_2d.member_names(settings)
    def by_target(values):   # per target, its seeds' values
        return {t: [v for v, n in zip(values, names) if n == t] for t in dict.fromkeys(names)}
    rows = {r["variant"]: {grid: by_target(values) for grid, values in r["sw1"].items()} for r in done}
    same = all(r["sw1"]["1 NFE from 0.999"] == r["toy_2d_row"] for r in done)
    record = {"rows": rows, "same_as_toy_2d": same, "settings": dataclasses.asdict(settings),
              "env": am.environment(), "seconds_wall": round(time.time() - start, 1)}
    toy_ladder.write_record(record, settings, "toy_grid_start", table(record))
    return record


def table(record: dict) -> str:
    """Sliced W1 of each variant, target and grid; d: t = 1 minus t = 0.999 at the same NFE."""
    lines = [f"{'variant':12s} {'target':6s} {'NFE':>3s} {'from 0.999':>16s} {'from 1':>16s} {'d':>17s}"]
    for variant, grids in record["rows"].items():
        for t in grids["1 NFE from 0.999"]:
            for nfe in (1, 2):
                a, b = grids[f"{nfe} NFE from 0.999"][t], grids[f"{nfe} NFE from 1"][t]
                d = [q - p for p, q in zip(a, b)]
                cells = " ".join(f"{m:8.4f}+-{s:.4f}" for m, s in map(toy_2d.mean_std, (a, b, d)))
                lines.append(f"{variant:12s} {t:6s} {nfe:3d} {cells}")
    lines.append(f"the 1-NFE rows from 0.999 equal toy_2d's: {record['same_as_toy_2d']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
