"""Merge the records of experiments/cifar_ablation.sh into results/cifar_ablation.json.

    python experiments/cifar_ablation.py collect DIR [DIR ...]   # folders holding NAME_sS.json
    python experiments/cifar_ablation.py table                   # the table of the merged record
                                                                 # and the arms' paired differences

Each record is copied to results/cifar_ablation/NAME_sS.json (config, env, summary, FID, log);
the merged record lists every arm per seed, and the table gives mean +- std over the seeds.
A schedule's tag is part of the name (consistency-2k_s0: 2,000 steps); its teacher is named with
the same tag (teacher-2k_s0), since each schedule's seed trains its own teacher.
"""
import json
import math
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDS = os.path.join(ROOT, "results", "cifar_ablation")
MERGED = os.path.join(ROOT, "results", "cifar_ablation.json")


def row(record: dict) -> dict:
    fid, summary, cfg = record["fid"]["fid"], record["summary"], record["config"]
    out = {"seed": cfg["seed"], "fid10k_nfe1": round(fid["1 NFE"]["fid"], 2),
           "fid10k_nfe2": round(fid["2 NFE"]["fid"], 2), "steps": summary["step"],
           "train_seconds": summary["train_seconds"], "img_per_s": summary["img_per_s_mean"]}
    if "Euler 50" in fid:
        out["fid10k_euler50"] = round(fid["Euler 50"]["fid"], 2)
    return out


PAIRS = (("apex_released", "gen0"), ("apex_best", "gen0"), ("apex_best", "consistency"),
         ("consistency", "gen0"))


def merge() -> dict:
    merged = {"teacher": {"recipe": "apex_min.py --dataset cifar --objective fm --minutes 2", "per_seed": []},
              "gpu": None, "arms": {}}
    for name in sorted(os.listdir(RECORDS)):
        record = json.load(open(os.path.join(RECORDS, name)))
        arm = name.rsplit("_s", 1)[0]
        merged["gpu"] = merged["gpu"] or record["env"]["gpu"]
        if arm.startswith("teacher"):  # teacher, teacher-2k, ...: each schedule's own teachers
            merged.setdefault(arm, {"recipe": merged["teacher"]["recipe"], "per_seed": []})
            merged[arm]["per_seed"].append(row(record))
        else:
            flags = {k: v for k, v in record["config"].items() if k in ("objective", "gen_weight")}
            merged["arms"].setdefault(arm, []).append({**row(record), "config": flags})
    return merged


def mean_std(values):
    m = sum(values) / len(values)
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0)


def table(merged: dict) -> str:
    lines = [f"FID-10k (EMA, no guidance), mean +- std over seeds; {merged['gpu']}",
             f"{'arm':16s} {'seeds':>5s} {'1 NFE':>14s} {'2 NFE':>14s} {'steps':>6s} {'img/s':>7s}"]
    teachers = [(k, v["per_seed"]) for k, v in sorted(merged.items()) if k.startswith("teacher")]
    for arm, rows in teachers + sorted(merged["arms"].items()):
        cells = [mean_std([r[k] for r in rows]) for k in ("fid10k_nfe1", "fid10k_nfe2")]
        lines.append(f"{arm:16s} {len(rows):5d} " + " ".join(f"{m:7.2f}+-{s:5.2f}" for m, s in cells)
                     + f" {rows[0]['steps']:6d} {mean_std([r['img_per_s'] for r in rows])[0]:7.0f}")
    lines += ["", "paired by seed (same teacher): d = first - second, mean +- std (seeds with d < 0)",
              f"{'d':34s} {'1 NFE':>19s} {'2 NFE':>19s}"]
    for a, b in PAIRS:
        for tag in ("", "-2k"):   # 1,000 and 2,000 steps
            first, second = ({r["seed"]: r for r in merged["arms"].get(arm + tag, [])} for arm in (a, b))
            seeds = sorted(set(first) & set(second))
            if len(seeds) > 1:
                cells = []
                for k in ("fid10k_nfe1", "fid10k_nfe2"):
                    d = [first[seed][k] - second[seed][k] for seed in seeds]
                    (m, sd), wins = mean_std(d), sum(v < 0 for v in d)
                    cells.append(f"{m:+6.2f}+-{sd:5.2f} ({wins}/{len(d)})")
                lines.append(f"{a + tag + ' - ' + b + tag:34s} " + " ".join(cells))
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("collect", "table") or (argv[0] == "collect" and len(argv) < 2):
        raise SystemExit("usage: python experiments/cifar_ablation.py collect DIR... | table")
    if argv[0] == "collect":
        os.makedirs(RECORDS, exist_ok=True)
        for folder in argv[1:]:
            for name in sorted(os.listdir(folder)):
                if name.endswith(".json") and "_s" in name:
                    shutil.copy(os.path.join(folder, name), os.path.join(RECORDS, name))
        with open(MERGED, "w") as f:
            json.dump(merge(), f, indent=1)
        print(f"wrote {MERGED}")
    print(table(json.load(open(MERGED))))


if __name__ == "__main__":
    main()
