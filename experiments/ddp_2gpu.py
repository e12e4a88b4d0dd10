"""torchrun with 2 processes, measured: speed against 1 process, identical ranks, resume, a killed rank.

    python experiments/ddp_2gpu.py               # 2 GPUs of one host: results/ddp_2gpu.json
    python experiments/ddp_2gpu.py --cpu --tiny  # 2 CPU processes (gloo), a tiny model: a smoke test

All runs use the cifar preset's model and global batch (512) on synthetic 32x32 shapes (no download:
a step costs the same whatever the images show), without compilation.
  1. speed: `--steps` steps on 1 process, then on 2 (`torchrun --standalone --nproc_per_node 2`),
     one after the other in this call; img/s is the summary's mean (global batch / step time);
  2. identical ranks: every rank saves its final model and EMA weights (RANK_HELPER); the largest
     absolute difference between rank 0 and rank 1 over all of them;
  3. resume: 2 * `--steps` steps straight, and `--steps` then --resume to 2 * `--steps`, both on 2
     ranks; rank 0 continues its random streams exactly, rank 1 draws fresh ones (apex_min.resume),
     so the second half of the two loss curves agrees within noise: resume_ok when their mean
     losses differ by less than 3 standard errors of the straight run's per-step losses;
  4. a killed rank: SIGKILL to rank 1 mid-run; the seconds until torchrun has stopped the job.
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs apex_min's command line under torchrun and saves this rank's final weights to RANK_OUT.
RANK_HELPER = """
import os, sys
import torch
import apex_min

made = {}
build = apex_min.build_model
def build_and_keep(cfg):
    made["net"] = build(cfg)
    return made["net"]
class KeptEMA(apex_min.EMA):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        made["ema"] = self
apex_min.build_model, apex_min.EMA = build_and_keep, KeptEMA
apex_min.train(apex_min.parse_config(sys.argv[1:]))
rank = os.environ["RANK"]
torch.save({"model": made["net"].state_dict(), "ema": made["ema"].model.state_dict()},
           os.path.join(os.environ["RANK_OUT"], f"rank{rank}.pt"))
"""


def rank_pid(rank: int, marker: str):  # the pid of torchrun's worker `rank` whose command names marker
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            args = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        worker = b"torch.distributed.run" not in args
        if f"RANK={rank}".encode() in env and marker.encode() in args and worker:
            return pid
    return None


def logged(path: str) -> list:  # log.jsonl rows (a torn last line skipped)
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.endswith("}\n")]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--cpu", action="store_true", help="gloo on CPU processes")
    p.add_argument("--tiny", action="store_true", help="a tiny model (smoke test)")
    p.add_argument("--out", default=os.path.join(ROOT, "results"))
    args = p.parse_args(argv)
    size = ["--dim", "32", "--depth", "1", "--heads", "2", "--batch-size", "16"] if args.tiny else []
    common = ["--preset", "cifar", "--dataset", "shapes", "--image-size", "32", "--no-compile",
              "--minutes", "0", "--flow-share", "0", "--lr-schedule", "constant",   # one APEX stage,
              "--polish-from", "0",                                                  # the term on
              "--log-every", "10", "--ckpt-every", "100000", "--device", "cpu" if args.cpu else "cuda", *size]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    apex = os.path.join(ROOT, "apex_min.py")
    work = tempfile.mkdtemp(prefix="ddp_")
    helper = os.path.join(work, "rank_helper.py")
    with open(helper, "w") as f:
        f.write(RANK_HELPER)

    def run(cmd, out, steps, *more, extra_env=None):
        done = subprocess.run([*cmd, "--out-dir", out, "--max-steps", str(steps), *common, *more], cwd=ROOT,
                              env={**env, **(extra_env or {})}, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"error: {' '.join(cmd[-2:])} failed: {done.stderr[-1500:]}")
        return json.load(open(os.path.join(out, "summary.json")))

    record = {}
    one = run([sys.executable, apex], f"{work}/g1", args.steps)
    two = run([*torchrun, helper], f"{work}/g2", args.steps, extra_env={"RANK_OUT": work})
    record["img_per_s_1gpu"], record["img_per_s_2gpu"] = one["img_per_s_mean"], two["img_per_s_mean"]
    record["scaling"] = round(two["img_per_s_mean"] / one["img_per_s_mean"], 3)
    import torch
    ranks = [torch.load(f"{work}/rank{r}.pt") for r in (0, 1)]
    record["max_weight_diff"] = max((ranks[0][w][k].float() - ranks[1][w][k].float()).abs().max().item()
                                    for w in ("model", "ema") for k in ranks[0][w])
    run([*torchrun, apex], f"{work}/straight", 2 * args.steps)
    run([*torchrun, apex], f"{work}/split", args.steps)
    run([*torchrun, apex], f"{work}/split", 2 * args.steps, "--resume")
    half = [[r["loss"] for r in logged(f"{work}/{name}/log.jsonl") if r["step"] > args.steps]
            for name in ("straight", "split")]
    gap = abs(statistics.mean(half[0]) - statistics.mean(half[1]))
    noise = statistics.stdev(half[0]) / len(half[0]) ** 0.5
    record["resume"] = {"mean_loss_straight": statistics.mean(half[0]), "standard_error": noise,
                        "mean_loss_resumed": statistics.mean(half[1]), "logs_compared": len(half[0])}
    record["resume_ok"] = gap < 3 * noise
    long_run = ["--out-dir", f"{work}/killed", "--max-steps", "100000000", *common]
    job = subprocess.Popen([*torchrun, apex, *long_run], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while len(logged(f"{work}/killed/log.jsonl")) < 2:
        if job.poll() is not None or time.time() > deadline:
            raise SystemExit("error: the run to be killed did not start")
        time.sleep(0.1)
    pid = rank_pid(1, f"{work}/killed")
    if pid is None:
        raise SystemExit("error: no process of rank 1 found")
    start = time.time()
    os.kill(pid, signal.SIGKILL)
    _, err = job.communicate(timeout=1200)
    record["killed_rank_exit_seconds"] = round(time.time() - start, 2)
    record["killed_rank_exit_code"] = job.returncode
    record["killed_rank_message"] = [line.strip() for line in err.splitlines()   # torchrun's root cause
                                     if line.strip().startswith(("rank ", "exitcode ", "traceback "))][-3:]
    device = "cpu (gloo)" if args.cpu else torch.cuda.get_device_name()
    record["gpu"] = device + (", tiny model" if args.tiny else "")
    record["steps"] = args.steps
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "ddp_2gpu.json" if not args.cpu else "ddp_2cpu.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps(record, indent=1))
    print(f"wrote {path}")
    return record


if __name__ == "__main__":
    main()
