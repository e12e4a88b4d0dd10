"""Counterfactuals on the 2-D toy: what happens to APEX when one piece of its objective changes.

    python experiments/toy_counterfactuals.py          # ~4 min on 2 cores; results/toy_counterfactuals.json
    python experiments/toy_counterfactuals.py --fast   # test size, seconds; numbers are meaningless

Every arm fine-tunes the same pretrained flow ensemble (toy_2d.pretrain) for the same steps, with
the same seeds, and is scored like toy_2d.py's table (1-NFE sliced W1 to the exact target, share
within 3 sigma, mode coverage; mean +- std over the seeds). Each arm swaps one named piece of
apex_min's objective (a function of the module) or one setting; none copies the objective:
  - released            the default APEX objective (the reference arm)
  - onestep_cons_x0.1   the one-step rows' loss (their consistency target) weighted 0.1
  - onestep_cons_x0.1_gen1   the same, generator weight 1
  - frozen_real         the same as onestep_cons_x0.1, with v_real read from the frozen
                        pretrained flow model instead of the live network's real branch
  - gen_per_sample      the generator term normalised per sample (robust c = 1e-3 in step 7 only)
  - robust_everywhere   robust c = 1e-3 in every row (the released value; the toy uses 3)
  - fake_weight_4       the fake rows' loss weighted 4
"""
import dataclasses
import io
import json
import os
import sys
import time
from contextlib import contextmanager

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import apex_min as am  # noqa: E402
import toy_2d  # noqa: E402


@contextmanager
def swapped(name: str, piece):
    """apex_min.<name> replaced by `piece` for the duration (apex_loss looks its pieces up by name)."""
    original = getattr(am, name)
    setattr(am, name, piece)
    try:
        yield original
    finally:
        setattr(am, name, original)


def onestep_weighted(factor: float, original_tan_weight):
    def tan_weight(t, tt, fake):           # one-step rows: t = 1, tt = 0
        return original_tan_weight(t, tt, fake) * torch.where((t == 1) & (tt == 0), factor, 1.0)
    return tan_weight


def fake_weighted(factor: float, original_tan_weight):
    def tan_weight(t, tt, fake):
        return original_tan_weight(t, tt, fake) * torch.where(fake, factor, 1.0)
    return tan_weight


class Arm:
    """A loss with apex_min.training_loss's signature; picklable, so it runs in worker processes."""

    def __init__(self, name: str, pretrained: bytes = None, settings=None):
        self.name, self.pretrained, self.settings, self.frozen = name, pretrained, settings, None

    def frozen_real(self, net, x_s, s, y, cfg):
        """(v_fake of the live network, v_real of the frozen pretrained flow model)."""
        if self.frozen is None:
            self.frozen, _ = toy_2d.build(self.settings, net.members)
            self.frozen.load_state_dict(torch.load(io.BytesIO(self.pretrained), weights_only=False)["ema"])
            self.frozen.requires_grad_(False)
        v_fake, _ = am.shifted_velocities(net, x_s, s, y, cfg)
        with torch.no_grad():
            v_real = self.frozen(x_s, s, s, self.frozen.embed_class(y)).float()
        return v_fake, v_real

    def __call__(self, net, ema, x, y, cfg):
        name = self.name
        if name == "robust_everywhere":
            return am.training_loss(net, ema, x, y, dataclasses.replace(cfg, robust_c=1e-3))
        if name == "gen_per_sample":
            generator_term = am.generator_term
            def per_sample(net, F_one, z, y, cfg, velocities):   # noqa: E306
                return generator_term(net, F_one, z, y, dataclasses.replace(cfg, robust_c=1e-3), velocities)
            with swapped("generator_term", per_sample):
                return am.training_loss(net, ema, x, y, cfg)
        if name == "fake_weight_4":
            with swapped("tan_weight", fake_weighted(4.0, am.tan_weight)):
                return am.training_loss(net, ema, x, y, cfg)
        if name.startswith("onestep_cons_x0.1") or name == "frozen_real":
            cfg = dataclasses.replace(cfg, gen_weight=1.0) if name.endswith("gen1") else cfg
            velocities = self.frozen_real if name == "frozen_real" else am.shifted_velocities
            with swapped("tan_weight", onestep_weighted(0.1, am.tan_weight)):
                return am.training_loss(net, ema, x, y, cfg, velocities)
        return am.training_loss(net, ema, x, y, cfg)          # released


ARMS = ("released", "onestep_cons_x0.1", "onestep_cons_x0.1_gen1", "frozen_real", "gen_per_sample",
        "robust_everywhere", "fake_weight_4")


def main(argv=None) -> dict:
    settings = toy_2d.parse_settings(argv, prog="toy_counterfactuals.py")
    torch.set_num_threads(1)
    start = time.time()
    pretrained = toy_2d.pretrain(settings)
    names = toy_2d.member_names(settings)
    jobs = [("apex", pretrained, settings, Arm(arm, pretrained, settings)) for arm in ARMS]
    results = toy_2d.run_jobs(toy_2d.finetune, jobs, settings.workers)
    arms = {}
    for arm, r in zip(ARMS, results):
        arms[arm] = {"summary": toy_2d.summarise_quality(r["rows"]["apex@1"], names),
                     "final_median_cos": [m["median_cos"] for m in r["alignment"][-1]["members"]]}
    record = {"settings": dataclasses.asdict(settings), "environment": am.environment(),
              "seconds_wall": round(time.time() - start, 1), "arms": arms}
    path = toy_2d.results_path(settings, "toy_counterfactuals.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    targets = list(dict.fromkeys(names))
    print(f"1-NFE sliced W1 | share within 3 sigma, mean +- std over {settings.seeds} seed(s)")
    print(f"{'arm':24s}" + "".join(f"| {t:^30s}" for t in targets))
    for arm, a in arms.items():
        cells = "".join(f"| {a['summary'][t]['sw1'][0]:.4f}+-{a['summary'][t]['sw1'][1]:.4f} "
                        f"{a['summary'][t]['within_3sigma'][0]:.3f}+-{a['summary'][t]['within_3sigma'][1]:.3f} "
                        for t in targets)
        print(f"{arm:24s}{cells}")
    print(f"\nwrote {path}; wall {record['seconds_wall']:.1f} s")
    return record


if __name__ == "__main__":
    main()
