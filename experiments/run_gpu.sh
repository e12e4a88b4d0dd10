#!/usr/bin/env bash
# The GPU runs behind the README's CIFAR-10 tables (one H200 of the device tool, one phase per
# call of at most 10 minutes; checkpoints stay in runs/ between calls):
#   bash experiments/run_gpu.sh PHASE      PHASE = data | teacher | tune | tune_cons | tune_gen0 |
#                                                  apex | lora RANK | consistency
# STAGE (required) is a folder on the machine that holds the CIFAR-10 pickles or shards,
# default_1.pt and the reference statistics; each run leaves three files in $OUT: NAME.json
# (config, env, summary, FID), NAME.log, NAME.grid_compare.png. TINY=1 runs the same commands at
# toy size on a CPU (a smoke test).
# What results/h200/ holds was run at commit 657ed1e, when this script was results/run_gpu.sh:
# data, teacher, tune, lora 8, lora 64 (the data phase then ended on a broken pipe after the peak,
# fixed since; env.json's "git" field shows the checkout's older HEAD, not 657ed1e). apex and
# consistency did not fit the 30-minute budget.
# results/h200_ablation/ was run at commit 51f0989 (env.json again names an older HEAD, f035b57,
# whose apex_min.py and cifar_demo.py are the same): data, teacher, tune, tune_cons, tune_gen0,
# and two seed-1 runs by direct command (their records say which).
set -euo pipefail
cd "$(dirname "$0")/.."   # the repository root: runs/, data/ and the python files are there
if [ -z "${STAGE:-}" ]; then
  echo "error: set STAGE to the folder with the CIFAR-10 data, default_1.pt and the statistics" >&2
  exit 2
fi
OUT=${OUT:-runs/out}
mkdir -p "$OUT" runs
export PYTHONUNBUFFERED=1
FID="--fid-weights $STAGE/default_1.pt --ref-stats $STAGE/cifar10_train_inception_pool3.npz"
MIN_APEX=${MIN_APEX:-5.5} MIN_TEACHER=${MIN_TEACHER:-2} MIN_TUNE=${MIN_TUNE:-2}
TRAIN="" DEMO=""
if [ "${TINY:-0}" = 1 ]; then   # toy sizes: the same code paths, on a CPU, in seconds
  TRAIN="--device cpu --dim 32 --depth 1 --heads 2 --batch-size 16 --no-compile --log-every 2 --ckpt-every 4"
  MIN_APEX=0.05 MIN_TEACHER=0.05 MIN_TUNE=0.05
  DEMO="--device cpu --num-per-class 2 --grid-per-class 2 --batch-size 10"
fi

train() {  # train NAME ARGS...: a run folder runs/NAME; its log goes to $OUT/NAME.log
  local name=$1; shift   # one stage, constant rate, released term: the cifar preset when these ran
  python apex_min.py --dataset cifar --out-dir runs/$name --flow-share 0 --lr-schedule constant \
    --polish-from 0 --gen-s-min 0 --gen-s-max 1 $TRAIN "$@" > runs/$name.log 2>&1 \
    || { tr '\r' '\n' < runs/$name.log | tail -n 20; exit 1; }
  tr '\r' '\n' < runs/$name.log | grep -v '^\s*$' | tail -n 40 > "$OUT/$name.log"
  tail -n 2 "$OUT/$name.log"
}
score() {  # score NAME ARGS...: FID-10k of runs/NAME/ckpt.pt (EMA weights); one record $OUT/NAME.json
  local name=$1; shift
  python cifar_demo.py --ckpt runs/$name/ckpt.pt $FID $DEMO "$@" > runs/$name.fid.log 2>&1 \
    || { tail -n 20 runs/$name.fid.log; exit 1; }
  grep "FID" runs/$name.fid.log | head -n 8 | tee -a "$OUT/$name.log"
  python - "$name" "$OUT/$name.json" <<'PY'
import json, sys
run = f"runs/{sys.argv[1]}"
record = {k: json.load(open(f"{run}/{f}.json")) for k, f in
          (("config", "config"), ("env", "env"), ("summary", "summary"), ("fid", "fid_results"))}
json.dump(record, open(sys.argv[2], "w"), indent=1)
PY
  cp runs/$name/grid_compare.png "$OUT/$name.grid_compare.png"
}

case "${1:-}" in
  data)         # CIFAR-10 pickles (staged as pickles, or made from the shards); FID check; bf16 peak
    if [ ! -d data/cifar-10-batches-py ]; then
      if [ -f "$STAGE/data_batch_1" ]; then mkdir -p data/cifar-10-batches-py && cp "$STAGE"/*_batch* data/cifar-10-batches-py/
      else python "$STAGE/to_torchvision.py" data --src "$STAGE" > /dev/null; fi
    fi
    if [ -f data/cifar-10-batches-py/test_batch ]; then   # the check needs the test split
      python cifar_demo.py --check-fid $FID --data-dir data --out "$OUT" $([ "${TINY:-0}" = 1 ] && echo "--limit 40 --device cpu") \
        | grep -v '^wrote'
    fi
    [ "${TINY:-0}" = 1 ] || python cifar_demo.py --speed --out "$OUT" ;;
  teacher)      # a flow model trained in the first half of the budget
    train teacher --objective fm --minutes $MIN_TEACHER
    score teacher --nfe 1 2 --euler-steps 50 ;;
  tune)         # then APEX on all of its weights for the other half
    train tune_full --init-from runs/teacher/ckpt.pt --minutes $MIN_TUNE
    score tune_full --nfe 1 2 --euler-steps 0 ;;
  tune_cons)    # the tuning ablation: the same tuning without fake rows and generator term
    train tune_cons --init-from runs/teacher/ckpt.pt --objective consistency --minutes $MIN_TUNE
    score tune_cons --nfe 1 2 --euler-steps 0 ;;
  tune_gen0)    # the tuning with fake rows but the generator term off: what that term adds
    train tune_gen0 --init-from runs/teacher/ckpt.pt --gen-weight 0 --minutes $MIN_TUNE
    score tune_gen0 --nfe 1 2 --euler-steps 0 ;;
  apex)         # the headline run: the default objective from scratch, the whole budget
    train apex --minutes $MIN_APEX
    score apex --nfe 1 2 --euler-steps 0 ;;
  lora)         # the same tuning with LoRA adapters of rank $2 (released LoRA lr: 10x full)
    train tune_lora$2 --init-from runs/teacher/ckpt.pt --tune lora --lora-rank $2 --lr 1e-3 --minutes $MIN_TUNE
    score tune_lora$2 --nfe 1 2 --euler-steps 0 ;;
  consistency)  # the ablation beside the headline: no fake rows, no generator term
    train consistency --objective consistency --minutes $MIN_APEX
    score consistency --nfe 1 2 --euler-steps 0 ;;
  *) echo "usage: bash experiments/run_gpu.sh data|teacher|tune|tune_cons|tune_gen0|apex|lora RANK|consistency" >&2
     exit 2 ;;
esac
