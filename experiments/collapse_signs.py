"""The shapes' sign of a collapse under the generator term, read from training logs.

    python experiments/collapse_signs.py            # the shapes study's runs and the CIFAR-10 records
    python experiments/collapse_signs.py --report   # the committed record's table

Every shapes run that the term drove to one blank image showed it first in its log: the fake loss
(how far the fake branch is from the generator's samples) fell far below the level of the healthy
runs, and the gap (v_fake - v_real)^2 towards 0. For each run with the term, from its log:
  term_steps  the steps with the term on (the last 1 - polish_from of the run's steps)
  onset       the term steps until the fake loss was first logged below FLOOR (none: never)
  min_fake    the lowest fake loss, and min_gap the lowest gap, logged while the term was on
  end_gap     the last gap logged (the CIFAR-10 run whose samples turned red ended higher)
  contrast_onset, max_contrast, end_contrast  in logs that hold apex_loss's `contrast` (the mean
              pixel std of the generator's one-step samples; the shapes' data: 0.324): the term
              steps until it was first logged below FLAT, its highest value while the term was on,
              and the last (a generator that leaves the flow stage's blurred one-step samples
              rises from near 0; a collapse falls back)
and, for a run whose control is here (the same flow stage, seed and guidance without the term:
the shapes' gen0 arm, CIFAR-10's record with `--gen-weight 0 --polish-from 0`), how far its fake
branch lags behind the generator:
  mean_gap    the mean gap logged while the term was on
  fake_lag    the mean fake loss logged while the term was on, over the control's at the same steps
              (1: the fake branch follows the generator the term moves as closely as without it)
  fid_gain    CIFAR-10: the run's 1-NFE FID-10k minus its control's (below 0: the term helps)
  control_end_contrast  the control's last logged contrast over the same steps
  d_contrast  CIFAR-10: the same difference in its 1-NFE samples' contrast, and d_spread in their
  d_spread    within-class spread (cifar_demo.sample_stats; below 0: flatter samples, more alike)
For the CIFAR-10 runs of one budget and one form of the term (polish_from and its `s` range), with
and without guidance, and for each guidance strength, the output ends with the correlations of
fid_gain with d_spread, d_contrast and fake_lag, and of d_spread with fake_lag.
FLOOR = 0.12: the shapes runs that drew a blank image fell to 0.02-0.05, and every other shapes
run with the term stayed above 0.23. The runs: every finished arm with the term under
runs/shapes_study (experiments/shapes_study.py writes them), and every record of
experiments/cifar_budget.sh in results/cifar_budget/ (their logs are in the records).
Record: results/collapse_signs.json. Its rows of runs whose logs are not here (runs/ is not in a
clone) are kept when it is written again.
"""
import glob
import json
import math
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

import apex_min as am  # noqa: E402
import cifar_budget as budget  # noqa: E402
import shapes_study as study  # noqa: E402

FLOOR = 0.12
FLAT = 0.1


def switch_on(config: dict) -> int:   # the step after which the term is on (`scheduled`)
    return math.ceil(config["polish_from"] * config["max_steps"])


def signs(config: dict, log: list) -> dict:
    """The signs of one run, from its config and its log (a list of logged dicts)."""
    start = switch_on(config)
    on = [r for r in log if r["step"] > start and "fake" in r]
    low = [r["step"] - start for r in on if r["fake"] < FLOOR]
    return {"term_steps": config["max_steps"] - start, "onset": low[0] if low else None,
            "min_fake": min((r["fake"] for r in on), default=None),   # None: nothing logged with
            "min_gap": min((r["gap"] for r in on if "gap" in r), default=None),   # the term on
            "end_gap": next((r["gap"] for r in reversed(on) if "gap" in r), None),
            **contrast_signs([r for r in on if "contrast" in r], start)}


def contrast_signs(logged: list, start: int) -> dict:   # none for logs from before it was logged
    if not logged:
        return {}
    flat = [r["step"] - start for r in logged if r["contrast"] < FLAT]
    return {"contrast_onset": flat[0] if flat else None,
            "max_contrast": max(r["contrast"] for r in logged),
            "end_contrast": logged[-1]["contrast"]}


def lag(record: dict, control: dict) -> dict:
    """A run's term steps against its control's at the same steps; each a dict of config, log and,
    for a cifar_budget record, fid."""
    start = switch_on(record["config"])
    on = [r for r in record["log"] if r["step"] > start and "gap" in r]
    steps = {r["step"] for r in on}
    theirs = [r["fake"] for r in control["log"] if r["step"] in steps]
    if not on or len(theirs) < len(on):
        return {}
    out = {"mean_gap": round(sum(r["gap"] for r in on) / len(on), 5),
           "fake_lag": round(sum(r["fake"] for r in on) / sum(theirs), 4)}
    their_contrast = [r["contrast"] for r in control["log"] if r["step"] in steps and "contrast" in r]
    if their_contrast:
        out["control_end_contrast"] = their_contrast[-1]
    if "fid" in record:   # a cifar_budget record
        ours, theirs = (r["fid"]["fid"]["1 NFE"] for r in (record, control))
        out["fid_gain"] = round(ours["fid"] - theirs["fid"], 2)
        out.update({f"d_{k}": round(ours[k] - theirs[k], 4) for k in ("contrast", "spread")
                    if k in ours and k in theirs})
    return out


def correlations(rows: list) -> str:
    """Pearson r over the CIFAR-10 rows of each group (`group`: budget and the term's form, with and
    without the guidance strength), each over the rows that have both quantities (3 at least)."""
    groups = {}
    for r in rows:
        if "group" in r:
            for name in (r["group"], r["group"] + f", enr {r['enr']}"):
                groups.setdefault(name, []).append(r)
    lines = []
    for name, group in sorted(groups.items()):
        cells = []
        for a, b in (("fid_gain", "d_spread"), ("fid_gain", "d_contrast"), ("fid_gain", "fake_lag"),
                     ("d_spread", "fake_lag")):
            both = [g for g in group if a in g and b in g]
            if len(both) >= 3:
                r = statistics.correlation([g[a] for g in both], [g[b] for g in both])
                cells.append(f"{a}~{b} {r:+.2f} ({len(both)})")
        if cells:
            lines.append(f"{name}: r " + ", ".join(cells))
    return "\n".join(lines)


def finished_run(folder: str):   # {config, log} of a finished apex_min run, else None
    if not study.finished(folder):
        return None
    path = os.path.join(folder, "log.jsonl")   # none in a run shorter than --log-every
    log = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    return {"config": json.load(open(os.path.join(folder, "config.json"))), "log": log}


def runs(out: str):   # (testbed, name, config, log, lag) of every finished run with the term
    arms = {study.run_dir("", arm): arm for arm in study.ARMS}   # folder name -> arm
    root = os.path.join(out, "runs", "shapes_study")
    for summary in sorted(glob.glob(os.path.join(root, "*", "*", "*", "summary.json"))):
        folder = os.path.dirname(summary)
        run = finished_run(folder)
        if run and run["config"]["objective"] == "apex" and run["config"]["gen_weight"] > 0:
            arm = arms.get(os.path.basename(folder))   # its no-term control: gen0 of the same variant
            control = next((b for a, b in study.PAIRS if a == arm and b.startswith("gen0")), "gen0")
            control = finished_run(study.run_dir(os.path.dirname(folder), control))
            name = os.path.relpath(folder, root)
            yield "shapes", name, run["config"], run["log"], lag(run, control) if control else {}
    paths = sorted(glob.glob(os.path.join(out, "results", "cifar_budget", "*.json")))
    records = [json.load(open(path)) for path in paths]
    for path, record in zip(paths, records):
        config = record["config"]
        if config["objective"] == "apex" and config["gen_weight"] > 0:
            control = budget.control_of(record, records)
            name = os.path.basename(path).removesuffix(".json")
            minutes = budget.budget_share(name, record)[0]
            group = {"group": f"{minutes:g}min, polish_from {config['polish_from']}, s in "
                              f"[{config['gen_s_min']}, {config['gen_s_max']}]", "enr": config["enr"]}
            yield "cifar10", name, config, record["log"], ({**group, **lag(record, control)}
                                                           if control else {})


def table(record: dict) -> str:
    lines = [f"fake loss floor {record['floor']}", "",
             "| testbed | run | term steps | onset | min fake | min gap | end gap | mean gap | fake lag "
             "| fid gain | d contrast | d spread | contrast onset | max contrast | end contrast "
             "| control's end |", "|---" * 16 + "|"]
    def cell(value, digits):
        return "-" if value is None else f"{value:.{digits}f}"
    lines += [f"| {r['testbed']} | {r['run']} | {r['term_steps']} | {r['onset'] or '-'} | "
              f"{cell(r['min_fake'], 3)} | {cell(r['min_gap'], 4)} | {cell(r.get('end_gap'), 4)} | "
              f"{cell(r.get('mean_gap'), 4)} | {cell(r.get('fake_lag'), 2)} | "
              f"{cell(r.get('fid_gain'), 2)} | {cell(r.get('d_contrast'), 4)} | "
              f"{cell(r.get('d_spread'), 4)} | {r.get('contrast_onset') or '-'} | "
              f"{cell(r.get('max_contrast'), 3)} | {cell(r.get('end_contrast'), 3)} | "
              f"{cell(r.get('control_end_contrast'), 3)} |"
              for r in record["rows"]]   # none in rows kept from before they were measured
    return "\n".join(lines) + "\n\n" + correlations(record["rows"])


def main(argv=None) -> dict:
    p = am.OneLineParser(prog="collapse_signs.py", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=ROOT, help="root of runs/ and results/ (default: the repository)")
    p.add_argument("--report", action="store_true", help="print the committed record's table")
    args = p.parse_args(argv)
    path = os.path.join(args.out, "results", "collapse_signs.json")
    if args.report:
        return study.print_record(p, path, table)
    rows = [{"testbed": testbed, "run": name, **signs(config, log), **lagging}
            for testbed, name, config, log, lagging in runs(args.out)]
    if not rows:
        p.error(f"no finished run with the term under {args.out}/runs/shapes_study or "
                f"{args.out}/results/cifar_budget")
    here = {(r["testbed"], r["run"]) for r in rows}
    kept = [r for r in (json.load(open(path))["rows"] if os.path.exists(path) else [])
            if (r["testbed"], r["run"]) not in here]
    rows = sorted(rows + kept, key=lambda r: (r["testbed"] == "cifar10", r["run"]))
    record = {"floor": FLOOR, "rows": rows, "env": am.environment()}
    study.write_record(path, record)
    print(table(record) + f"\n\nwrote {path}; kept from it: {len(kept)} row(s) whose logs are not here")
    return record


if __name__ == "__main__":
    main()
