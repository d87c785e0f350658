#!/usr/bin/env bash
# Reproduces docs/cpu_reference/{label,subtype}/report.md: configs/cpu_reference.yaml (a 0.36M
# MaxViT trained from scratch at 128 px, 3 patient-grouped folds on the whole shared Kermany
# pool) once per target, the two runs side by side with one torch thread each on a 2-core
# machine, then `xraycls compare`, which tests each run's pooled out-of-fold predictions against
# the 32x32 logistic-regression floor fitted on the same folds (paired DeLong).
set -euo pipefail
cd "$(dirname "$0")/../.."
XRAYCLS=${XRAYCLS:-.venv/bin/xraycls}
RUNS=${RUNS:-runs/cpu_reference}
"$XRAYCLS" train --config configs/cpu_reference.yaml --out "$RUNS/label/maxvit_pico" &
label_pid=$!
"$XRAYCLS" train --config configs/cpu_reference.yaml --out "$RUNS/subtype/maxvit_pico" \
  --set data.label_column=subtype &
subtype_pid=$!
rc=0
wait "$label_pid" || rc=$?
wait "$subtype_pid" || rc=$?   # both finish before a failure is reported
[ "$rc" -eq 0 ] || exit "$rc"
for task in label subtype; do   # label: NORMAL / PNEUMONIA; subtype: normal / bacteria / virus
  "$XRAYCLS" compare "$RUNS/$task/maxvit_pico" --out "docs/cpu_reference/$task"
done
