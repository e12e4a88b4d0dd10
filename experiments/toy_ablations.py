"""The generator term's weight and the consistency step d, ablated on the toy.

    python experiments/toy_ablations.py                 # all three, ~90 s each on 2 idle cores
    python experiments/toy_ablations.py gen_weight_0    # one or more of them, by name
    python experiments/toy_ablations.py --report        # print the comparison of the records only
    python experiments/toy_ablations.py --fast          # test size, seconds; numbers meaningless

Each ablation is toy_2d.py's whole experiment (same seeds) with one setting changed, and writes
results/toy_2d_<name>.json, with toy_2d.json's layout:
    gen_weight_0      gen_weight 0: the fake rows still train, the generator term is off
    cons_delta_0.05   d = 0.05 in the consistency target (default 0.01)
    cons_delta_0.1    d = 0.1
Printed, for toy_2d.json (the defaults) and each ablation record found under results/: the 1-NFE
sliced W1 of APEX and of the consistency ablation, and consistency minus APEX (> 0: APEX is
better) beside the seed spread (the larger of the two stds).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402

import torch  # noqa: E402

import apex_min as am  # noqa: E402
import toy_2d  # noqa: E402

ABLATIONS = {"gen_weight_0": dict(gen_weight=0.0), "cons_delta_0.05": dict(cons_delta=0.05),
             "cons_delta_0.1": dict(cons_delta=0.1)}


def record_name(ablation: str) -> str:
    return "toy_2d.json" if ablation == "default" else f"toy_2d_{ablation}.json"


def run_ablation(ablation: str, settings: toy_2d.ToySettings) -> str:
    """toy_2d's experiment with the ablation's settings; returns the path of its record."""
    ablated = toy_2d.ToySettings(**{**vars(settings), **ABLATIONS[ablation]})
    result = toy_2d.run(ablated)
    path = toy_2d.results_path(ablated, record_name(ablation))
    with open(path, "w") as f:   # as toy_2d.main: all but the figure's data (the "_" keys)
        json.dump({k: v for k, v in result.items() if not k.startswith("_")}, f, indent=1)
    print(f"{ablation}: wrote {path}; wall {result['seconds']['wall']:.1f} s", flush=True)
    return path


def comparison_table(settings: toy_2d.ToySettings) -> str:
    """One row per record found: its settings and, per target, APEX, consistency, their gap."""
    records = {}
    for ablation in ("default", *ABLATIONS):
        path = toy_2d.results_path(settings, record_name(ablation))
        if os.path.isfile(path):
            with open(path) as f:
                records[ablation] = json.load(f)
    if not records:
        return "no records yet: run toy_2d.py and this script"
    names = list(dict.fromkeys(next(iter(records.values()))["settings"]["targets"].split(",")))
    lines = ["1-NFE sliced W1, mean over the seeds: apex | consistency | consistency - apex "
             "(> 0: apex better; spread: the larger seed std)",
             f"{'record':16s} {'gen_weight':>10s} {'d':>5s} {'seeds x steps':>13s}  "
             + "".join(f"| {name:^42s}" for name in names)]
    for ablation, record in records.items():
        cfg, run = record["configs"]["apex"], record["settings"]
        cells = ""
        for name in names:
            (apex, apex_std), (cons, cons_std) = (record["summary"][row][name]["sw1"]
                                                  for row in ("apex@1", "consistency@1"))
            spread = max(apex_std, cons_std)
            cells += f"| {apex:.4f} | {cons:.4f} | {cons - apex:+.4f} (spread {spread:.4f}) "
        lines.append(f"{ablation:16s} {cfg['gen_weight']:>10g} {cfg['cons_delta']:>5g} "
                     f"{str(run['seeds']) + ' x ' + str(run['steps']):>13s}  {cells}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = am.OneLineParser(prog="experiments/toy_ablations.py",
                         description="The generator weight and d ablations of the toy.")
    p.add_argument("ablations", nargs="*",
                   help=f"names to run (default: all): {', '.join(ABLATIONS)}")
    p.add_argument("--fast", action="store_true", help="test-size runs (toy_2d.py --fast)")
    p.add_argument("--report", action="store_true", help="run nothing; print the comparison")
    p.add_argument("--workers", type=int, help="processes per run (default: one per core; 1 with --fast)")
    p.add_argument("--out", default="", help="folder holding results/ (default: the repository)")
    args = p.parse_args(argv)
    unknown = [a for a in args.ablations if a not in ABLATIONS]
    if unknown:
        p.error(f"unknown ablation {unknown[0]!r}: choose from {', '.join(ABLATIONS)}")
    if args.workers is not None and args.workers < 1:
        p.error("--workers must be >= 1")
    workers = {} if args.workers is None else {"workers": args.workers}
    settings = toy_2d.ToySettings(**{**(toy_2d.FAST if args.fast else {}), **workers,
                                     "fast": args.fast, "out": args.out})
    torch.set_num_threads(1)      # tiny matmuls: threads cost more than they give on 2 cores
    if not args.report:
        for ablation in args.ablations or ABLATIONS:
            run_ablation(ablation, settings)
    print(comparison_table(settings))


if __name__ == "__main__":
    main()
