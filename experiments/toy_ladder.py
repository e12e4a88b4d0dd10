"""The oracle ladder on the 2-D toy: does a correct adversarial signal help, and where is it lost?

    python experiments/toy_ladder.py            # 13 rungs, ~9 min on 2 cores; results/toy_ladder.json
    python experiments/toy_ladder.py --rungs all  # 17: also the scan's EXTRA rungs (~12 min)
    python experiments/toy_ladder.py --rungs fake   # the fake rows as half the batch, FAKE rungs
                                                # (~3 min), results/toy_fake_share.json
    python experiments/toy_ladder.py --rungs ahead  # the fake branch kept ahead, AHEAD rungs
                                                # (~13 min), results/toy_fake_ahead.json
    python experiments/toy_ladder.py --rungs separate   # a separate fake network, SEPARATE rungs
                                                # (~8 min), results/toy_fake_separate.json
    python experiments/toy_ladder.py --rungs core --steps 3000   # CORE at twice the length (~9 min),
                                                # results/toy_ladder_steps3000.json
    python experiments/toy_ladder.py --fast     # test size, seconds; numbers are meaningless
    python experiments/toy_ladder.py --report   # the table of the committed record only (also
                                                # with --rungs fake and --steps N: those records)

Every rung fine-tunes the same pretrained flow ensemble (toy_2d.pretrain: 3 seeds x {ring, grid})
for the same steps with the same draws, and is scored as toy_2d.py scores (1-NFE sliced W1, share
within 3 sigma of a mode of the sample's class, mode coverage), with each learned branch's error
against the exact velocities by s at the last step. The rungs swap only the generator term's
velocity estimate (apex_min.apex_loss's `velocities`) or set options of apex_min.Config:
  consistency     no fake rows, no generator term
  gen0            fake rows, generator term off
  oracle_both     the term with the exact v_real (the data mixture noised to s) and the exact
                  v_fake (the empirical mixture of the live generator's one-step samples, a fresh
                  reference set of 4096 per class every 16 steps): a correct correction
  oracle_real     exact v_real, learned v_fake;   oracle_fake: learned v_real, exact v_fake
  apex            both learned (the released estimator)
The oracle rungs run under two recipes: `released/...` (the term on all along) and `polish`
(--polish-from 0.8: the term only in the last 20% of the steps, when the cosine-decayed learning
rate is small, and the one-step rows then free of their consistency loss), each with the released
normalisation (clamp) and the DMD one (dmd), at the weights in RUNGS. The plain names oracle_both,
oracle_real and oracle_fake are the polish recipe with clamp at weight 8 (the best oracle_both of
the scan); apex_best is the polish recipe with the learned term drawn at s < 0.25 (where the
learned difference is aligned) at weight 0.5. A rung NAME/ahead4 is NAME with its fake branch kept
ahead of the generator: before each step, 4 optimiser steps on the fake rows' loss alone (a batch
of the generator's one-step samples, flow matching under c_fake; fake_rows_loss), with an AdamW of
their own at the step's learning rate; the generator's steps stay 1 per step. NAME/ahead1 takes 1
such step, NAME/ahead4/lr0.25 takes 4 at a quarter of the rate (AHEAD_TAGS). NAME/sepK takes the
term's v_fake from a separate network trained K times per step on the generator's samples
(SeparateFake); its by_s measures the shared network's branches, and at the end, on other draws,
by_s_shared them again and by_s_separate the term's velocities (the separate v_fake, the live
v_real) on the same draws. Record keys per target:
sw1, share3 (the share within 3 sigma), coverage, per seed; by_s: cosine and each branch's error
at the last step.
"""
import dataclasses
import io
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import apex_min as am  # noqa: E402
import toy_2d  # noqa: E402

POLISH = {"polish_from": 0.8}
S_FULL = {"gen_s_min": 0.05, "gen_s_max": 0.98}   # the oracle is unreliable at s -> 0 and 1
BEST = {**POLISH, "gen_s_min": 0.02, "gen_s_max": 0.25, "gen_weight": 0.5}   # apex_best's settings
HALF = {"fake_share": 0.5}
RUNGS = {  # name: (objective, Config overrides, oracle)
    "consistency": ("consistency", {}, None),
    "gen0": ("apex", {"gen_weight": 0.0}, None),
    "apex_released": ("apex", {}, None),
    "released/oracle_both/clamp/w0.5": ("apex", {**S_FULL, "gen_weight": 0.5}, "both"),
    "released/oracle_both/clamp/w2": ("apex", {**S_FULL, "gen_weight": 2.0}, "both"),
    "released/oracle_both/dmd/w0.5": ("apex", {**S_FULL, "gen_weight": 0.5, "gen_norm": "dmd"}, "both"),
    "released/oracle_both/dmd/w2": ("apex", {**S_FULL, "gen_weight": 2.0, "gen_norm": "dmd"}, "both"),
    "polish/gen0": ("apex", {**POLISH, "gen_weight": 0.0}, None),
    "oracle_both": ("apex", {**POLISH, **S_FULL, "gen_weight": 8.0}, "both"),
    "polish/oracle_both/dmd/w2": ("apex", {**POLISH, **S_FULL, "gen_weight": 2.0, "gen_norm": "dmd"}, "both"),
    "oracle_real": ("apex", {**POLISH, **S_FULL, "gen_weight": 8.0}, "real"),
    "polish/oracle_real/dmd/w2": ("apex", {**POLISH, **S_FULL, "gen_weight": 2.0, "gen_norm": "dmd"}, "real"),
    "oracle_fake": ("apex", {**POLISH, **S_FULL, "gen_weight": 8.0}, "fake"),
    "polish/oracle_fake/dmd/w2": ("apex", {**POLISH, **S_FULL, "gen_weight": 2.0, "gen_norm": "dmd"}, "fake"),
    "polish/apex/clamp/w8": ("apex", {**POLISH, **S_FULL, "gen_weight": 8.0}, None),
    "polish/apex/dmd/w2": ("apex", {**POLISH, **S_FULL, "gen_weight": 2.0, "gen_norm": "dmd"}, None),
    "apex_best": ("apex", BEST, None),
    # the fake rows as half the batch (a quarter by default): a fake branch trained on twice the rows
    "polish/gen0/fake0.5": ("apex", {**POLISH, "gen_weight": 0.0, **HALF}, None),
    "apex_best/fake0.5": ("apex", {**BEST, **HALF}, None),
}
# the fake branch kept ahead (Rung.update_fake_branch): NAME/TAG is NAME with, before each step,
# `updates` fake-only optimiser steps at `scale` times the step's learning rate
AHEAD_TAGS = {"ahead4": (4, 1.0), "ahead1": (1, 1.0), "ahead4/lr0.25": (4, 0.25)}
AHEAD_RUNGS = {f"{base}/{tag}": (base, *AHEAD_TAGS[tag]) for tag in AHEAD_TAGS
               for base in ("gen0", "apex_released", "polish/gen0", "apex_best")}
RUNGS.update({name: RUNGS[base] for name, (base, _, _) in AHEAD_RUNGS.items()})
# a separate fake network (SeparateFake): NAME/sepK takes the term's v_fake from a second network,
# started from the pretrained flow model and trained on the generator's samples K times per step
SEPARATE_RUNGS = {f"{base}/sep{k}": (base, k) for k in (4, 1) for base in ("apex_released", "apex_best")}
RUNGS.update({name: RUNGS[base] for name, (base, _) in SEPARATE_RUNGS.items()})


CORE = ("consistency", "gen0", "apex_released", "polish/gen0", "oracle_both", "oracle_real", "oracle_fake",
        "apex_best")
EXTRA = ("released/oracle_both/clamp/w2", "released/oracle_both/dmd/w2",  # --rungs all only
         "polish/oracle_real/dmd/w2", "polish/oracle_fake/dmd/w2")
FAKE_ONLY = ("polish/gen0/fake0.5", "apex_best/fake0.5")                  # --rungs fake only
FAKE = ("consistency", "polish/gen0", "apex_best") + FAKE_ONLY
AHEAD_ONLY = tuple(AHEAD_RUNGS)                                              # --rungs ahead only
AHEAD = ("consistency", "gen0", "apex_released", "polish/gen0", "apex_best") + AHEAD_ONLY
SEPARATE_ONLY = tuple(SEPARATE_RUNGS)                                        # --rungs separate only
SEPARATE = ("consistency", "gen0", "apex_released", "polish/gen0", "apex_best") + SEPARATE_ONLY
OTHERS = FAKE_ONLY + AHEAD_ONLY + SEPARATE_ONLY
RUNG_SETS = {"default": [n for n in RUNGS if n not in EXTRA + OTHERS],        # --rungs: in RUNGS' order
             "all": [n for n in RUNGS if n not in OTHERS], "core": [n for n in RUNGS if n in CORE],
             "ahead": [n for n in RUNGS if n in AHEAD], "separate": [n for n in RUNGS if n in SEPARATE],
             "fake": [n for n in RUNGS if n in FAKE]}


def cost(name: str) -> int:  # the relative CPU time of a rung: the oracle on every step is dear
    oracle, polish = RUNGS[name][2], RUNGS[name][1].get("polish_from", 0) > 0
    extra = AHEAD_RUNGS.get(name, (0, 0))[1] // 2 + SEPARATE_RUNGS.get(name, (0, 0))[1] // 2
    return 1 + (0 if oracle is None else 1 if polish else 4) + extra


class Oracle:
    """Exact (v_fake, v_real) at x_s for the generator term, float64 closed forms of toy_2d."""

    def __init__(self, names: list, mode: str, n_ref: int = 4096, every: int = 16):
        self.names, self.mode, self.n_ref, self.every = names, mode, n_ref, every
        self.calls, self.ref = 0, None

    @torch.no_grad()
    def __call__(self, net, x_s, s, y, cfg):
        M = len(self.names)
        if self.calls % self.every == 0:    # the live generator's samples: n_ref per member and class
            y_ref = (torch.arange(2 * self.n_ref) % 2).repeat_interleave(M)
            z = torch.randn(len(y_ref), 2)
            self.ref = am.onestep_samples(net, z, net.embed_class(y_ref)).double()   # (2 n_ref M, 2)
        self.calls += 1
        refs = self.ref.view(self.n_ref, 2, M, 2).permute(1, 2, 0, 3)    # (class, member, J, 2)
        member = torch.arange(len(x_s)) % M
        sd = s.double()
        means = refs[y, member].mul_((1 - sd)[:, None, None])              # each row's own samples
        score = toy_2d.mixture_log_density_and_score(x_s, means, (sd ** 2)[:, None])[1]
        v_fake = toy_2d.velocity_from_score(score, x_s, s)
        v_real = torch.empty_like(v_fake)
        for name in dict.fromkeys(self.names):                            # the exact data field
            rows = torch.isin(member, torch.tensor([m for m in range(M) if self.names[m] == name]))
            score = toy_2d.data_density(x_s[rows], y[rows], s[rows], name)[1]
            v_real[rows] = toy_2d.velocity_from_score(score, x_s[rows], s[rows])
        if self.mode == "both":
            return v_fake.float(), v_real.float()
        learned_fake, learned_real = am.shifted_velocities(net, x_s, s, y, cfg)
        return (learned_fake, v_real.float()) if self.mode == "real" else (v_fake.float(), learned_real)


def fake_rows_loss(generator, y, cfg, field=None):
    """apex_min.apex_loss's fake rows on a batch of their own: the generator's one-step samples
    without gradient (step 2), noised to t ~ U(0, 1), flow matching with the robust loss at weight 1
    (steps 3 and 6) of the fake field: the generator under c_fake, or a separate network `field`
    under its own class embedding."""
    c = generator.embed_class(y)
    x_gen = am.onestep_samples(generator, torch.randn(len(y), 2), c.detach())
    t, z = torch.rand(len(y)), torch.randn(len(y), 2)
    if field is None:   # the generator's own fake branch
        field, c = generator, am.condition_shift(c, torch.ones_like(y, dtype=torch.bool), cfg.shift_a,
                                                 cfg.shift_b)
    else:
        c = field.embed_class(y)
    return am.robust_loss(field(am.interpolate(x_gen, z, t), t, t, c), z - x_gen, cfg.robust_c).mean()


def fake_updates(net, opt, lr: float, updates: int, loss_fn, grad_clip: float) -> None:
    """`updates` steps of `opt` on loss_fn() at rate lr, as toy_2d.train_steps takes a step (the
    loss times the members, the clip per member)."""
    opt.param_groups[0]["lr"] = lr
    for _ in range(updates):
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        (loss * net.members).backward()
        toy_2d.clip_per_member_(net, grad_clip)
        opt.step()


class SeparateFake:
    """v_fake from a separate network (as DMD's fake score), v_real from the live network's real
    branch: the term's velocities. The network starts from the pretrained flow model and takes
    `updates` optimiser steps per step on the generator's one-step samples (fake_rows_loss's data
    and loss, under its own class embedding), with an AdamW of its own at the step's rate."""

    def __init__(self, pretrained: bytes, settings, updates: int):
        self.net, self.opt = toy_2d.build(settings, len(toy_2d.member_names(settings)))
        self.net.load_state_dict(torch.load(io.BytesIO(pretrained), weights_only=False)["model"])
        self.settings, self.updates = settings, updates

    def update(self, generator, y, cfg, step: int):
        fake_updates(self.net, self.opt, toy_2d.cosine_lr(self.settings)(step), self.updates,
                     lambda: fake_rows_loss(generator, y, cfg, field=self.net), self.settings.grad_clip)

    @torch.no_grad()
    def __call__(self, net, x_s, s, y, cfg):
        v_fake = self.net(x_s, s, s, self.net.embed_class(y)).float()
        return v_fake, net(x_s, s, s, net.embed_class(y)).float()


class Rung:
    """A loss with apex_min.training_loss's signature for one rung (picklable for the workers):
    the rung's options, the polish schedule by step, the oracle where the rung has one, the
    fake-only updates of the AHEAD_RUNGS and the separate fake network of the SEPARATE_RUNGS."""

    def __init__(self, name: str, settings, pretrained: bytes = None):
        self.name, self.settings, self.step, self.oracle, self.fake_opt = name, settings, 0, None, None
        self.live = None                       # the network being trained, once called
        self.separate = None
        if name in SEPARATE_RUNGS:
            self.separate = SeparateFake(pretrained, settings, SEPARATE_RUNGS[name][1])

    def __call__(self, net, ema, x, y, cfg):
        self.live = net
        objective, overrides, oracle = RUNGS[self.name]
        if oracle and self.oracle is None:
            self.oracle = Oracle(toy_2d.member_names(self.settings), oracle)
        cfg = am.scheduled(dataclasses.replace(cfg, **overrides), self.step, self.settings.steps)
        if self.name in AHEAD_RUNGS:
            self.update_fake_branch(net, y, cfg, *AHEAD_RUNGS[self.name][1:])
        if self.separate is not None:
            self.separate.update(net, y, cfg, self.step)
        self.step += 1
        return am.training_loss(net, ema, x, y, cfg, self.oracle or self.separate or am.shifted_velocities)

    def update_fake_branch(self, net, y, cfg, updates: int, scale: float):
        """fake_updates on the shared fake branch at `scale` times the step's rate, with an AdamW
        of their own (the released betas)."""
        if self.fake_opt is None:
            self.fake_opt = torch.optim.AdamW(net.parameters(), betas=(0.9, 0.99), weight_decay=0.0)
        fake_updates(net, self.fake_opt, scale * toy_2d.cosine_lr(self.settings)(self.step), updates,
                     lambda: fake_rows_loss(net, y, cfg), self.settings.grad_clip)


@torch.no_grad()
def separate_alignment(rung, settings) -> dict:
    """toy_2d.measure_alignment of the live generator at the end, twice with the same draws: with
    the shared branches ("shared") and with the term's velocities ("separate": the separate
    network's v_fake, the live real branch)."""
    cfg = toy_2d.toy_config(RUNGS[rung.name][0], settings.gen_weight, settings.cons_delta)
    def measure(velocities):
        raw = toy_2d.measure_alignment(rung.live, toy_2d.member_names(settings), cfg, settings,
                                       torch.Generator().manual_seed(settings.seed + 5), velocities)
        return [toy_2d.summarise_alignment(r, settings.low_s) for r in raw]
    def term_velocities(net, x_s, s, y, c):   # float64, as toy_2d.branch_velocities
        return tuple(v.double() for v in rung.separate(net, x_s, s, y, c))
    return {"shared": measure(toy_2d.branch_velocities), "separate": measure(term_velocities)}


def finetune_rung(name: str, pretrained: bytes, settings) -> dict:
    objective, rung = RUNGS[name][0], Rung(name, settings, pretrained)
    result = toy_2d.finetune(objective, pretrained, settings, loss=rung)
    names, x = toy_2d.member_names(settings), result["samples"][f"{objective}@1"]
    first = {t: x[:1500, names.index(t)] for t in dict.fromkeys(names)}   # the first seed's samples
    return {"name": name, "rows": result["rows"][f"{objective}@1"], "alignment": result["alignment"],
            "samples": first if name in FIGURE else None,
            "separate": separate_alignment(rung, settings) if rung.separate else None}


FIGURE = ("consistency", "apex_released", "oracle_both", "oracle_real", "oracle_fake", "apex_best",
          "apex_best/fake0.5", "apex_released/ahead4", "apex_best/ahead4", "apex_best/ahead1",
          "apex_best/ahead4/lr0.25", "apex_released/sep4", "apex_best/sep4")


def figure(samples: dict, record: dict, path: str) -> None:
    """1-NFE samples of the first seed: the target, then the rungs of FIGURE, per mixture."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    targets, shown = list(next(iter(samples.values()))), [n for n in FIGURE if n in samples]
    cols = 1 + len(shown)
    fig, ax = plt.subplots(len(targets), cols, figsize=(1.6 * cols, 1.7 * len(targets)), squeeze=False,
                           layout="tight")
    for i, t in enumerate(targets):
        columns = [("target", toy_2d.sample_toy(t, 1500, generator=torch.Generator().manual_seed(0))[0])]
        for j, (title, x) in enumerate(columns + [(n, samples[n][t]) for n in shown]):
            sw1 = "" if title == "target" else f"\nsw1 {record['rungs'][title][t]['sw1'][0]:.4f}"
            ax[i, j].scatter(*x.T, s=0.4, c=torch.arange(len(x)) % 2, cmap="coolwarm", lw=0)
            ax[i, j].set(xlim=(-1.35, 1.35), ylim=(-1.35, 1.35), xticks=[], yticks=[], aspect="equal")
            ax[i, j].set_title(title + sw1, fontsize=6)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def record_name(settings, stem: str = "toy_ladder") -> str:  # stem, or stem_stepsN at another length
    default = toy_2d.FAST["steps"] if settings.fast else toy_2d.ToySettings.steps
    return stem + ("" if settings.steps == default else f"_steps{settings.steps}")


def write_record(record: dict, settings, stem: str, text: str) -> str:
    """results/STEM[_stepsN].json (record_name), then the table `text` and where it went."""
    path = toy_2d.results_path(settings, record_name(settings, stem) + ".json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(text)
    print(f"\nwrote {path}; wall {record['seconds_wall']:.1f} s")
    return path


def ladder_settings(settings):  # one alignment measurement, at the end, against 4096 per class
    return dataclasses.replace(settings, checkpoints=1, n_ref=settings.n_ref if settings.fast else 8192)


def main(argv=None) -> dict:
    p = am.OneLineParser(prog="toy_ladder.py", add_help=False)   # the rest: toy_2d's flags
    p.add_argument("--rungs", choices=tuple(RUNG_SETS), default="default")
    p.add_argument("--report", action="store_true")
    args, argv = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    stem = {"fake": "toy_fake_share", "ahead": "toy_fake_ahead", "separate": "toy_fake_separate"}.get(
        args.rungs, "toy_ladder")
    if args.report:   # the table of a committed record (--steps N: that length's), without running
        name = record_name(toy_2d.parse_settings(argv, prog="toy_ladder.py"), stem)
        with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results",
                               name + ".json")) as f:
            record = json.load(f)
        print(table(record))
        return record
    settings = toy_2d.parse_settings(argv, prog="toy_ladder.py")
    chosen = RUNG_SETS[args.rungs]
    settings = ladder_settings(settings)
    torch.set_num_threads(1)
    start = time.time()
    pretrained = toy_2d.pretrain(settings)
    names = toy_2d.member_names(settings)
    jobs = [(name, pretrained, settings) for name in sorted(chosen, key=cost, reverse=True)]
    rungs, samples = {}, {}
    for r in toy_2d.run_jobs(finetune_rung, jobs, settings.workers):
        if r["samples"] is not None:
            samples[r["name"]] = r["samples"]
        objective, overrides, oracle = RUNGS[r["name"]]
        entry = {"settings": {"objective": objective, **overrides, "oracle": oracle}}
        for target in dict.fromkeys(names):
            members = [m for m in range(len(names)) if names[m] == target]
            entry[target] = {key: [r["rows"][m][row_key] for m in members] for key, row_key in
                             (("sw1", "sw1"), ("share3", "within_3sigma"), ("coverage", "coverage"))}
            separate = r["separate"] or {}   # a /sepK rung: the term's velocities, and the shared
            measured = [("by_s", r["alignment"][-1]["members"] if r["alignment"] else None),   # ones
                        ("by_s_shared", separate.get("shared")), ("by_s_separate", separate.get("separate"))]
            for key, last in measured:   # the last measurement: medians by s, per seed
                if last:
                    entry[target][key] = {b: {k: [last[m]["by_s"][b][k] for m in members] for k in
                                              ("cos", "err_real", "err_fake", "signal")}
                                          for b in last[members[0]]["by_s"]}
        rungs[r["name"]] = entry
    rungs = {name: rungs[name] for name in chosen}                       # in the order of RUNGS
    record = {"rungs": rungs, "settings": dataclasses.asdict(settings), "env": am.environment(),
              "seconds_wall": round(time.time() - start, 1)}
    write_record(record, settings, stem, table(record))   # the record first: a figure error keeps it
    png = toy_2d.results_path(settings, record_name(settings, stem) + ".png", "assets")
    figure(samples, record, png)
    print(f"wrote {png} ({os.path.getsize(png) / 1024:.0f} KB)")
    return record


def paired_sw1(first: dict, second: dict, target: str) -> tuple:  # mean, std of the per-seed d
    return toy_2d.mean_std([a - b for a, b in zip(first[target]["sw1"], second[target]["sw1"])])


def table(record: dict) -> str:
    """Mean +- std over seeds; d: the paired (same seed) difference to consistency, mean +- std."""
    targets = [t for t in ("ring", "grid") if t in record["rungs"]["consistency"]]
    lines = ["1-NFE sliced W1 | share within 3 sigma | coverage; d = paired difference to consistency",
             f"{'rung':34s}" + "".join(f"| {t:^52s}" for t in targets)]
    base = record["rungs"]["consistency"]
    for name, rung in record["rungs"].items():
        cells = ""
        for t in targets:
            q = {k: toy_2d.mean_std(rung[t][k]) for k in ("sw1", "share3", "coverage")}
            d = paired_sw1(rung, base, t)
            cells += (f"| {q['sw1'][0]:.4f}+-{q['sw1'][1]:.4f} {q['share3'][0]:.3f}+-"
                      f"{q['share3'][1]:.3f} {q['coverage'][0]:.2f} d {d[0]:+.4f}+-{d[1]:.4f} ")
        lines.append(f"{name:34s}{cells}")
    term, control = record["rungs"].get("apex_released"), record["rungs"].get("gen0")
    if term and control:   # the generator term alone: the same rung with it and without it
        d = {t: paired_sw1(term, control, t) for t in targets}
        lines.append("apex_released - gen0, paired sliced W1: "
                     + ", ".join(f"{t} {m:+.4f}+-{sd:.4f}" for t, (m, sd) in d.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
