#!/usr/bin/env bash
# The CIFAR-10 ablation of the generator term: one flow teacher, then every arm tuned from it for
# the same number of steps with the same seed, FID-10k at 1 and 2 NFE (EMA weights, no guidance).
#   bash experiments/cifar_ablation.sh teacher SEED         # flow matching, 120 s, and its FID
#   bash experiments/cifar_ablation.sh arms SEED STEPS [ARM ...]   # the arms (default: all), at once
# A seed is one whole pipeline (teacher and tuning). The arms run side by side on the GPU, so their
# budget is a step count, not seconds; img/s in their records is measured under that sharing.
# CALL_SECONDS=s interrupts the arms after s seconds (SIGINT: each saves its checkpoint at its next
# log step); calling `arms` again resumes them (exactly: one process each); an arm is evaluated
# once it has all steps, in the same call (about 30 s an arm), so leave room: 480 in a 600-s call.
# TAG names a schedule and its own teacher (runs/ARM$TAG_sSEED and runs/teacher$TAG_sSEED, e.g.
# TAG=-2k for 2000 steps); EULER=0 skips the teacher's 50-step FID. Every arm gives its budget as
# steps alone (--minutes 0: the cifar preset's 330 s would stop it first).
# Every arm uses the cosine learning-rate decay over its steps (the polish schedule of apex_best
# relies on it), so the arms differ only in the objective.
# STAGE holds default_1.pt, the reference statistics and the CIFAR-10 shards (or pickles in
# data/); each run leaves NAME.json (config, env, summary, FID) in $OUT. TINY=1: CPU smoke test.
# `python experiments/cifar_ablation.py collect DIR...` merges the records into
# results/cifar_ablation.json.
source "$(dirname "$0")/cifar_common.sh"
# the released objective's settings, whatever the cifar preset sets; each arm then changes some
RELEASED="--flow-share 0 --polish-from 0 --gen-s-min 0 --gen-s-max 1 --gen-norm clamp --gen-weight 0.5"
declare -A ARMS=(
  [consistency]="--objective consistency"
  [gen0]="--gen-weight 0"
  [apex_released]=""
  [apex_best]="--polish-from 0.8 --gen-s-min 0.02 --gen-s-max 0.25"
  [shift_released]="--shift-a -1 --shift-b 0"
  [polish_gen0]="--polish-from 0.8 --gen-weight 0"   # apex_best's schedule without the correction
)

case "${1:-}" in
  teacher)
    data
    name=teacher${TAG:-}_s$2
    python apex_min.py --dataset cifar --objective fm --minutes $TEACHER_MIN --seed $2 \
      --flow-share 0 --lr-schedule constant --out-dir runs/$name $TRAIN > runs/$name.log 2>&1 \
      || { tail -c 3000 runs/$name.log; exit 1; }
    python cifar_demo.py --ckpt runs/$name/ckpt.pt $FID $DEMO --nfe 1 2 --euler-steps ${EULER:-50} | grep FID
    record runs/$name $OUT/$name.json ;;
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
        --init-from runs/teacher${TAG:-}_s$seed/ckpt.pt --max-steps $steps --minutes 0 --ckpt-every 200 \
        --lr-schedule cosine --out-dir runs/$name $RELEASED $TRAIN ${ARMS[$arm]} \
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
      record runs/$name $OUT/$name.json
    done ;;
  *) echo "usage: bash experiments/cifar_ablation.sh teacher SEED | arms SEED STEPS [ARM ...]" >&2
     exit 2 ;;
esac
