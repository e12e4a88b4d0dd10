#!/usr/bin/env bash
# CIFAR-10 against training time: train a run to a budget of training minutes (compilation not
# counted), then FID-10k of its EMA weights at 1 and 2 NFE without guidance (and 50 Euler steps
# for flow matching); FID50K=1 adds FID-50k (5,000 per class) at 1 and 2 NFE, TEACHER=1 the
# 50-step Euler FID-10k of the run's own flow stage (its teacher).
#   bash experiments/cifar_budget.sh run NAME MINUTES [FLAGS ...]   # apex_min.py --dataset cifar
# A run that exists is resumed; --minutes counts all of its training, so calling again with more
# minutes extends a flow-matching run of constant rate (`--objective fm --lr-schedule constant`),
# which is how one run gives every point of the flow-matching curve. The preset's recipe (flow
# stage, then APEX with the cosine rate and the term's polish) plans its steps for its own budget:
# each point of its curve is a run of its own, e.g. `run curveP 11`. The 330 s splits, with the
# released term, were `run splitF 5.5 --flow-share F --lr-schedule cosine` for F = 0.2-0.8 (today:
# add `--polish-from 0 --gen-s-min 0 --gen-s-max 1`).
# FLOW_FROM=runs/X/flow trains only the APEX stage, from that finished flow stage, for the rest of
# the budget (MINUTES minus its minutes): arms that differ in the APEX stage share one teacher,
# e.g. `FLOW_FROM=runs/stage330_preset/flow ... run stage330_gen0 5.5 --gen-weight 0`; the record
# carries that flow stage, so the run counts its time and share as a two-stage run's.
# CALL_SECONDS=s interrupts the training after s seconds (SIGINT: it saves a checkpoint); call
# again to resume. The record $OUT/NAME_MINUTESmin.json holds config, env, summary
# (train_seconds_total for two stages), the flow stage's summary, the FIDs and the log;
# `python experiments/cifar_budget.py collect DIR...` merges the records into
# results/cifar_budget.json; NAME_MINUTESmin_nfe1.png beside each is the run's final 1-NFE grid.
# TINY=1: CPU smoke test (see cifar_common.sh).
source "$(dirname "$0")/cifar_common.sh"
[ "${1:-}" = run ] && [ $# -ge 3 ] || {
  echo "usage: bash experiments/cifar_budget.sh run NAME MINUTES [FLAGS ...]" >&2; exit 2; }
name=$2 minutes=$3
shift 3
data
init=()
if [ -n "${FLOW_FROM:-}" ]; then   # the APEX stage alone, from a finished flow stage
  init=($(python - "$FLOW_FROM" "$minutes" <<'PY'
import json, os, sys
flow, minutes = sys.argv[1], float(sys.argv[2])
summary = f"{flow}/summary.json"
done = os.path.exists(summary) and json.load(open(summary))["stop"] != "interrupted"
left = minutes - json.load(open(f"{flow}/config.json"))["minutes"] if done else 0
if not done or not flow.rstrip("/").endswith("/flow") or left <= 0:
    sys.exit(f"FLOW_FROM={flow}: not a finished flow stage (NAME/flow) shorter than {minutes} minutes")
print(f"--init-from {flow.rstrip('/')}/ckpt.pt --minutes {left}")
PY
  ))
fi
eval_dir=runs/$name/eval_${minutes}min
if [ ! -f $eval_dir/fid_results.json ]; then
  resume=""
  [ -f runs/$name/ckpt.pt ] || [ -f runs/$name/flow/ckpt.pt ] && resume="--resume"
  rm -f runs/$name/summary.json
  set +e
  timeout -s INT ${CALL_SECONDS:-0} python apex_min.py --dataset cifar --minutes $minutes \
    --out-dir runs/$name $resume $TRAIN "${init[@]}" "$@" >> runs/$name.log 2>&1
  rc=$?
  set -e
  if [ $rc -eq 124 ] || [ $rc -eq 130 ]; then echo "$name: interrupted; call again to resume"; exit 0; fi
  if [ $rc -ne 0 ]; then echo "$name failed:"; tail -c 3000 runs/$name.log; exit 1; fi
  tail -n 1 runs/$name/log.jsonl
  euler=0
  grep -q '"objective": "fm"' runs/$name/config.json && euler=50
  python cifar_demo.py --ckpt runs/$name/ckpt.pt $FID $DEMO --nfe 1 2 --euler-steps $euler \
    --out $eval_dir | grep FID
fi
fids=($eval_dir)
if [ "${TEACHER:-0}" = 1 ] && [ -f runs/$name/flow/ckpt.pt ]; then
  teacher=$eval_dir/teacher
  [ -f $teacher/fid_results.json ] || python cifar_demo.py --ckpt runs/$name/flow/ckpt.pt $FID $DEMO \
    --nfe 1 --euler-steps 50 --out $teacher | grep FID
  fids+=($teacher)
fi
if [ "${FID50K:-0}" = 1 ]; then
  big=$eval_dir/fid50k
  [ -f $big/fid_results.json ] || python cifar_demo.py --ckpt runs/$name/ckpt.pt $FID $DEMO \
    --nfe 1 2 --euler-steps 0 --num-per-class ${PER_CLASS_50K:-5000} --out $big | grep FID
  fids+=($big)
fi
record runs/$name $OUT/${name}_${minutes}min.json "${fids[@]}"
grids=(runs/$name/samples_*_nfe1.png)   # the final 1-NFE grid beside it (experiments/grid_colour.py)
cp "${grids[-1]}" $OUT/${name}_${minutes}min_nfe1.png
