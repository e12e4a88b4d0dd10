"""Merge the records of experiments/cifar_budget.sh into results/cifar_budget.json, and plot it.

    python experiments/cifar_budget.py collect DIR [DIR ...]   # folders holding NAME_Mmin.json
    python experiments/cifar_budget.py plot                      # assets/cifar_fid_vs_time.png
    python experiments/cifar_budget.py pairs                     # each run with the term - its controls

Every record is a run (`runs`). The curve joins, at each budget, the runs of the cifar preset's
recipe (what `python apex_min.py --dataset cifar` trains: their mean FID-10k, each run's under
`runs`; `run` and `gpu` name the first by name) with the flow-matching run at the same minutes (its
Euler-50 and 1-NFE FID) and, as `gen0`, the mean FID-10k of the runs of that budget without the term
(`--gen-weight 0 --polish-from 0`, the preset's flow share): the term's control against time. A
record's budget is the MINUTES of its name; its recipe names the flow share, the APEX stage's
schedule and term, and every other training setting off the preset's (e.g. `enr=0.0`). `pairs` sets
each run with the term against the runs of its flow stage, seed and guidance without it (no term;
and the term's schedule alone), as d = run - control. A run's `teacher_euler50` is its own flow
stage's 50-step Euler FID-10k (TEACHER=1 puts it in the record; teachers/NAME_flow.json holds one
measured by hand), else null. MFU is the step's analytic FLOPs (cifar_demo.step_flops) times the
mean img/s of the run's last stage, over the bf16 peak measured on the same kind of GPU
(--peak-tflops, default the peak in results/speed/profile_apex.json); a run on another kind of GPU
gets none. Each curve point names its GPU and that of its flow matching (the same where a run of
that GPU exists).
"""
import dataclasses
import json
import os
import shutil
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import apex_min  # noqa: E402
import cifar_demo  # noqa: E402

RECORDS = os.path.join(ROOT, "results", "cifar_budget")
MERGED = os.path.join(ROOT, "results", "cifar_budget.json")
FIGURE = os.path.join(ROOT, "assets", "cifar_fid_vs_time.png")


KEYS = ("objective", "lr_schedule", "polish_from", "gen_s_min", "gen_s_max", "gen_weight")
BOOKKEEPING = {"preset", "data_dir", "out_dir", "resume", "seed", "device", "max_steps", "minutes",
               "flow_share", "init_from", "merge_lora", "log_every", "ckpt_every"}


def recipe(cfg: dict, flow_share: float) -> str:  # the settings that tell the runs apart
    if cfg["objective"] == "fm":
        return "fm"
    preset = apex_min.PRESETS["cifar"]                 # any other training setting off the preset
    other = [k for k, v in dataclasses.asdict(apex_min.Config(**preset)).items()
             if k in cfg and cfg[k] != v and k not in KEYS and k not in BOOKKEEPING]
    return f"flow_share={flow_share:g} " + " ".join(f"{k}={cfg[k]}" for k in KEYS + tuple(other))


def load_records() -> dict:   # NAME_Mmin -> record, every record in RECORDS by name
    return {name.removesuffix(".json"): json.load(open(os.path.join(RECORDS, name)))
            for name in sorted(os.listdir(RECORDS)) if name.endswith(".json")}


def budget_share(name: str, record: dict) -> tuple:   # the command's MINUTES, the flow stage's share
    minutes = float(name.rsplit("_", 1)[1].removesuffix("min"))
    flow = record["flow_stage"]["config"]["minutes"] if "flow_stage" in record else 0.0
    return minutes, flow / minutes


def teacher_euler50(name: str, record: dict):  # the run's own flow stage with 50 Euler steps
    path = os.path.join(RECORDS, "teachers", f"{name.rsplit('_', 1)[0]}_flow.json")
    result = record.get("fid_teacher") or (json.load(open(path)) if os.path.exists(path) else None)
    return round(result["fid"]["Euler 50"]["fid"], 2) if result else None


def fids(result: dict, key: str = "fid") -> dict:
    return {nfe: round(result[key]["fid"][f"{nfe} NFE"]["fid"], 2) for nfe in ("1", "2")}


def run_row(name: str, record: dict, peak: float, peak_gpu=None) -> dict:
    cfg, summary = record["config"], record["summary"]
    gpu = record["env"]["gpu"]
    minutes, share = budget_share(name, record)
    img_s = summary["img_per_s_mean"]
    mfu = cifar_demo.step_flops(apex_min.Config(**cfg)) * img_s / (peak * 1e12)
    return {"name": name, "recipe": recipe(cfg, share), "minutes": minutes,
            "train_seconds_total": summary.get("train_seconds_total", round(summary["train_seconds"] + (
                record["flow_stage"]["summary"]["train_seconds"] if "flow_stage" in record else 0), 1)),
            "steps": summary["step"], "fid10k": fids(record),
            "fid50k": fids(record, "fid_fid50k") if "fid_fid50k" in record else None,
            "fm_euler50": round(euler["fid"], 2) if (euler := record["fid"]["fid"].get("Euler 50")) else None,
            "teacher_euler50": teacher_euler50(name, record),
            "img_per_s": img_s, "mfu": round(mfu, 4) if peak_gpu in (None, gpu) else None, "gpu": gpu}


def preset_recipe() -> str:  # the recipe of `python apex_min.py --dataset cifar`
    cfg = apex_min.Config(**apex_min.PRESETS["cifar"])
    return recipe(dataclasses.asdict(cfg), cfg.flow_share)


def no_term(runs: list, minutes: float):  # the mean of the runs without the term at that budget
    head = preset_recipe().split(" polish_from=")[0] + " polish_from=0.0 "
    found = [r for r in runs if r["minutes"] == minutes and r["recipe"].startswith(head)
             and r["recipe"].endswith(" gen_weight=0.0")]
    if not found:
        return None
    return {**mean(found), "runs": [r["name"] for r in found]}


def control_of(record: dict, records: list, schedule: bool = False):
    """The record of the same flow stage, seed and guidance without the term: `--gen-weight 0
    --polish-from 0`, or with schedule=True the term's schedule alone (`--gen-weight 0`, the run's
    polish_from). None if it is not among `records`."""
    def stage(r):
        flow = r.get("flow_stage")
        return flow and (flow["config"]["out_dir"], flow["summary"]["step"], r["config"]["seed"],
                         r["config"].get("enr"))
    polish = record["config"]["polish_from"] if schedule else 0.0
    return next((r for r in records if stage(record) and stage(r) == stage(record)
                 and r["config"]["gen_weight"] == 0 and r["config"]["polish_from"] == polish), None)


def pairs(records: dict) -> list:
    """Every run with the term against its controls of the same flow stage and seed (control_of):
    one row per budget, recipe and control, with d = run - control in FID-10k at 1 and 2 NFE."""
    rows = {}
    for name, record in sorted(records.items()):
        cfg = record["config"]
        if cfg["objective"] != "apex" or cfg["gen_weight"] == 0:
            continue
        minutes, share = budget_share(name, record)
        kinds = [("gen0", False)] + ([("polish_gen0", True)] if cfg["polish_from"] else [])
        for kind, schedule in kinds:
            control = control_of(record, list(records.values()), schedule)
            if control is None:
                continue
            ours, theirs = fids(record), fids(control)
            row = rows.setdefault((minutes, recipe(cfg, share), kind), [])
            row.append({"run": name, **{k: round(ours[k] - theirs[k], 2) for k in ours}})
    return [{"minutes": m, "recipe": r, "control": kind, "pairs": found}
            for (m, r, kind), found in sorted(rows.items())]


def pairs_table(rows: list) -> str:   # d = run - control: mean +- std (runs with d < 0 / runs)
    def cell(values):
        spread = f" +- {statistics.stdev(values):5.2f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):+7.2f}{spread} ({sum(v < 0 for v in values)}/{len(values)})"
    lines = ["d = run - control, FID-10k: mean +- std (runs with d < 0)"]
    for row in rows:
        d = [[p[k] for p in row["pairs"]] for k in ("1", "2")]
        lines += [f"{row['minutes']:5g} min  - {row['control']:11s} 1 NFE {cell(d[0])}  "
                  f"2 NFE {cell(d[1])}  {row['recipe'].split(' objective=')[1]}",
                  " " * 11 + ", ".join(f"{p['run']} {p['1']:+.2f} / {p['2']:+.2f}"
                                       for p in row["pairs"])]
    return "\n".join(lines)


def mean(runs: list) -> dict:   # the mean FID-10k of runs at 1 and 2 NFE
    return {k: round(sum(r["fid10k"][k] for r in runs) / len(runs), 2) for k in ("1", "2")}


def merge(peak: float, peak_gpu=None) -> dict:  # peak_gpu: the GPU of the peak (None: all)
    runs = [run_row(name, record, peak, peak_gpu) for name, record in load_records().items()]
    chosen, preset = {}, preset_recipe()
    for r in runs:
        if r["recipe"] == preset:
            chosen.setdefault(r["minutes"], []).append(r)
    curve = []
    for m, rs in sorted(chosen.items()):   # flow matching of the same minutes, on the same GPU if any
        r = rs[0]
        fm = [x for x in runs if x["recipe"] == "fm" and x["minutes"] == m]   # sorted by name
        f = min(fm, key=lambda x: x["gpu"] != r["gpu"]) if fm else None     # same GPU first
        curve.append({"minutes": m, "recipe": r["recipe"], "run": r["name"], "gpu": r["gpu"],
                      "fid10k": mean(rs), "runs": {x["name"]: x["fid10k"] for x in rs},
                      "fm_euler50": f and f["fm_euler50"], "fm_nfe1": f and f["fid10k"]["1"],
                      "fm_gpu": f and f["gpu"], "gen0": no_term(runs, m)})
    return {"runs": runs, "curve": curve, "peak_bf16_tflops": peak, "peak_gpu": peak_gpu}


def plot(merged: dict, path: str = FIGURE) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8.5, 4))
    curve = merged["curve"]
    minutes = [p["minutes"] for p in curve]
    for label, values, style in (("APEX, 1 NFE (mean of its runs)", [p["fid10k"]["1"] for p in curve],
                                  "o-"),
                                 ("APEX, 2 NFE (mean)", [p["fid10k"]["2"] for p in curve], "s-"),
                                 ("APEX without the term, 1 NFE",
                                  [p["gen0"] and p["gen0"]["1"] for p in curve], "o:"),
                                 ("flow matching, Euler 50", [p["fm_euler50"] for p in curve], "^--"),
                                 ("flow matching, 1 NFE", [p["fm_nfe1"] for p in curve], "v:")):
        points = [(m, v) for m, v in zip(minutes, values) if v is not None]
        if points:
            ax.plot(*zip(*points), style, label=label)
    each = [(p["minutes"], f["1"]) for p in curve if len(p["runs"]) > 1 for f in p["runs"].values()]
    if each:   # where several runs make a point: each of them
        ax.plot(*zip(*each), "o", color="C0", alpha=0.35, markersize=4, label="APEX, 1 NFE, each run")
    ax.set(xscale="log", yscale="log", xlabel="training minutes (compilation not counted)",
           ylabel="FID-10k", title="CIFAR-10, one " + " or ".join(sorted(
               {g.removeprefix("NVIDIA ").split()[0] for p in curve for g in (p["gpu"], p["fm_gpu"]) if g})))
    ax.set_xticks(minutes, [f"{m:g}" for m in minutes])
    ax.set_yticks([10, 20, 30, 50, 100, 200, 300], ["10", "20", "30", "50", "100", "200", "300"])
    ax.tick_params(which="minor", labelbottom=False, labelleft=False)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    peak = None
    if "--peak-tflops" in argv:
        i = argv.index("--peak-tflops")
        peak, argv = float(argv[i + 1]), argv[:i] + argv[i + 2:]
    if not argv or argv[0] not in ("collect", "plot", "pairs") or (argv[0] == "collect" and len(argv) < 2):
        raise SystemExit("usage: python experiments/cifar_budget.py collect DIR... | plot [--peak-tflops P]"
                         " | pairs")
    if argv[0] == "pairs":
        print(pairs_table(pairs(load_records())))
        return
    if argv[0] == "collect":
        speed = json.load(open(os.path.join(ROOT, "results", "speed", "profile_apex.json")))
        peak, peak_gpu = peak or speed["peak_bf16_tflops"], speed["env"]["gpu"]
        os.makedirs(RECORDS, exist_ok=True)
        for folder in argv[1:]:
            for name in sorted(os.listdir(folder)):
                if name.endswith("min.json"):
                    shutil.copy(os.path.join(folder, name), os.path.join(RECORDS, name))
        with open(MERGED, "w") as f:
            json.dump(merge(peak, peak_gpu), f, indent=1)
        print(f"wrote {MERGED}")
    merged = json.load(open(MERGED))
    for r in merged["runs"]:
        print(f"{r['name']:24s} {r['train_seconds_total']:7.1f} s  FID-10k {r['fid10k']['1']:7.2f} / "
              f"{r['fid10k']['2']:7.2f}  {r['img_per_s']:7.0f} img/s  "
              + (f"MFU {100 * r['mfu']:4.1f}%  " if r["mfu"] is not None else "MFU   n/a  ")
              + f"{r['gpu'].removeprefix('NVIDIA '):11s} {r['recipe']}")
    if argv[0] == "plot":
        plot(merged)


if __name__ == "__main__":
    main()
