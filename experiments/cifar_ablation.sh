#!/usr/bin/env bash
# The CIFAR-10 ablation of the generator term: one flow teacher, then every arm tuned from it for
# the same number of steps with the same seed, FID-10k at 1 and 2 NFE (EMA weights, no guidance).
#   bash experiments/cifar_ablation.sh teacher SEED         # flow matching, 120 s, and its FID
#   bash experiments/cifar_ablation.sh arms SEED STEPS [ARM ...]   # the arms (default: all), at once
# A seed is one whole pipeline (teacher and tuning). The arms run side by side on the GPU, so their
# budget is a step count, not seconds; img/s in their records is measured under that sharing.
# CALL_SECONDS=s interrupts the arms after s seconds (SIGINT: each saves its checkpoint); calling
# `arms` again resumes them (exactly: one process each); an arm is evaluated once it has all steps. TAG names a schedule
# (runs/ARM$TAG_sSEED, e.g. TAG=-2k for 2000 steps); EULER=0 skips the teacher's 50-step FID.
# Every arm uses the cosine learning-rate decay over its steps (the polish schedule of apex_best
# relies on it), so the arms differ only in the objective.
# STAGE holds default_1.pt, the reference statistics and the CIFAR-10 shards (or pickles in
# data/); each run leaves NAME.json (config, env, summary, FID) in $OUT. TINY=1: CPU smoke test.
# `python experiments/cifar_ablation.py collect DIR...` merges the records into
# results/cifar_ablation.json.
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
declare -A ARMS=(
  [consistency]="--objective consistency"
  [gen0]="--gen-weight 0"
  [apex_released]=""
  [apex_best]="--polish-from 0.8 --gen-s-min 0.02 --gen-s-max 0.25"
  [shift_released]="--shift-a -1 --shift-b 0"
  [polish_gen0]="--polish-from 0.8 --gen-weight 0"   # apex_best's schedule without the correction
)

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
record() {  # record NAME: config, env, summary and FID of runs/NAME in one file
  python - "runs/$1" "$OUT/$1.json" <<'PY'
import json, sys
run = sys.argv[1]
record = {k: json.load(open(f"{run}/{f}.json")) for k, f in (("config", "config"), ("env", "env"),
          ("summary", "summary"), ("fid", "fid_results"))}
record["log"] = [json.loads(line) for line in open(f"{run}/log.jsonl")]
json.dump(record, open(sys.argv[2], "w"), indent=1)
PY
}

case "${1:-}" in
  teacher)
    data
    name=teacher_s$2
    python apex_min.py --dataset cifar --objective fm --minutes $TEACHER_MIN --seed $2 \
      --out-dir runs/$name $TRAIN > runs/$name.log 2>&1 || { tail -c 3000 runs/$name.log; exit 1; }
    python cifar_demo.py --ckpt runs/$name/ckpt.pt $FID $DEMO --nfe 1 2 --euler-steps ${EULER:-50} | grep FID
    record $name ;;
  arms)
    data
    seed=$2 steps=$3
    shift 3
    if [ $# -eq 0 ]; then chosen=("${!ARMS[@]}"); else chosen=("$@"); fi
    for arm in "${chosen[@]}"; do
      [ -n "${ARMS[$arm]+set}" ] || { echo "unknown arm $arm: one of ${!ARMS[*]}" >&2; exit 2; }
    done
    for arm in "${chosen[@]}"; do
      name=$arm${TAG:-}_s$seed
      [ -f runs/$name/fid_results.json ] && continue          # evaluated in an earlier call
      more=""
      [ -f runs/$name/ckpt.pt ] && more="--resume"
      rm -f runs/$name/summary.json
      timeout -s INT ${CALL_SECONDS:-0} python apex_min.py --dataset cifar $more --seed $seed \
        --init-from runs/teacher_s$seed/ckpt.pt --max-steps $steps --ckpt-every 200 \
        --lr-schedule cosine --out-dir runs/$name $TRAIN ${ARMS[$arm]} \
        >> runs/$name.log 2>&1 &
    done
    wait
    for arm in "${chosen[@]}"; do
      name=$arm${TAG:-}_s$seed
      [ -f runs/$name/fid_results.json ] && { echo "$arm: evaluated in an earlier call"; continue; }
      if [ ! -f runs/$name/summary.json ]; then
        echo "$arm failed:"; tail -c 2000 runs/$name.log; continue
      fi
      echo "$arm: $(tail -n 1 runs/$name/log.jsonl)"
      if [ "$(python -c "import json; print(json.load(open('runs/$name/summary.json'))['step'])")" \
           -lt "$steps" ]; then
        echo "$arm: not all $steps steps yet; call arms again to resume"; continue
      fi
      python cifar_demo.py --ckpt runs/$name/ckpt.pt $FID $DEMO --nfe 1 2 --euler-steps 0 | grep FID
      record $name
    done ;;
  *) echo "usage: bash experiments/cifar_ablation.sh teacher SEED | arms SEED STEPS [ARM ...]" >&2
     exit 2 ;;
esac
