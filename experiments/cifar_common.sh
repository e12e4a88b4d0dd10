# Sourced by experiments/cifar_ablation.sh and experiments/cifar_budget.sh: the staged data, the FID
# flags, the CPU smoke-test sizes (TINY=1) and the record of a run.
# STAGE holds default_1.pt, the reference statistics and the CIFAR-10 shards (or pickles in data/).
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${STAGE:?set STAGE to the folder of the Inception weights, statistics and shards}
OUT=${OUT:-runs/out}
mkdir -p "$OUT" runs
export PYTHONUNBUFFERED=1
FID="--fid-weights $STAGE/default_1.pt --ref-stats $STAGE/cifar10_train_inception_pool3.npz"
TRAIN="" DEMO="" TEACHER_MIN=2
if [ "${TINY:-0}" = 1 ]; then
  TRAIN="--device cpu --dim 32 --depth 1 --heads 2 --batch-size 16 --no-compile --log-every 2 --ckpt-every 4"
  DEMO="--device cpu --num-per-class 2 --grid-per-class 2 --batch-size 10"
  TEACHER_MIN=0.05
fi

data() {  # the training pickles, from the staged shards train_00..04.npz (x: N,32,32,3 uint8)
  [ -f data/cifar-10-batches-py/data_batch_5 ] || python - "$STAGE" <<'PY'
import os, pickle, sys
import numpy as np
os.makedirs("data/cifar-10-batches-py", exist_ok=True)
for i in range(5):
    d = np.load(os.path.join(sys.argv[1], f"train_{i:02d}.npz"))
    data = d["x"].transpose(0, 3, 1, 2).reshape(len(d["x"]), 3072)      # R, G, B planes
    with open(f"data/cifar-10-batches-py/data_batch_{i + 1}", "wb") as f:
        pickle.dump({"data": data, "labels": d["y"].tolist()}, f)
PY
}

record() {  # record RUN_DIR FILE [FID_DIR ...]: config, env, summary, log and the FIDs in one file
  python - "$@" <<'PY'
import json, os, sys
run, out, fids = sys.argv[1], sys.argv[2], sys.argv[3:] or [sys.argv[1]]
record = {k: json.load(open(f"{run}/{k}.json")) for k in ("config", "env", "summary")}
record["fid"] = json.load(open(f"{fids[0]}/fid_results.json"))
record.update({f"fid_{os.path.basename(f)}": json.load(open(f"{f}/fid_results.json")) for f in fids[1:]})
flow = f"{run}/flow" if os.path.exists(f"{run}/flow") else os.path.dirname(record["config"]["init_from"])
if os.path.basename(flow) == "flow" and os.path.exists(f"{flow}/summary.json"):   # two stages: the flow
    record["flow_stage"] = {k: json.load(open(f"{flow}/{k}.json")) for k in ("config", "summary")}
    record["flow_stage"]["dir"] = flow          # this run's own, or FLOW_FROM's (a shared teacher)
record["log"] = [json.loads(line) for line in open(f"{run}/log.jsonl")]
json.dump(record, open(out, "w"), indent=1)
PY
}
