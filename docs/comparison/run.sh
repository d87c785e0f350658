#!/usr/bin/env bash
# Reproduces docs/comparison/{label,subtype}/report.md: the demo protocol (configs/demo.yaml:
# 5-fold patient-grouped CV, up to 10 epochs with early stopping, from scratch) for each of the
# four backbone families, with two changes so that all eight runs fit on 2 CPU cores (61 min in
# all here, on CPU cores shared with other jobs):
#   - the tiny *_test variant of each family (same code path as the real backbone), at 128 px;
#   - no refit model (cv.refit=false): the comparison uses the pooled out-of-fold predictions,
#     and `xraycls predict` serves the fold ensemble from these bundles.
set -euo pipefail
cd "$(dirname "$0")/../.."
XRAYCLS=${XRAYCLS:-.venv/bin/xraycls}
RUNS=${RUNS:-runs/comparison}
BACKBONES=(resnet50_test swin_test maxvit_test vit_test)
for task in label subtype; do   # label: NORMAL / PNEUMONIA; subtype: normal / bacteria / virus
  for backbone in "${BACKBONES[@]}"; do
    "$XRAYCLS" train --config configs/demo.yaml --out "$RUNS/$task/$backbone" \
      --set model.name="$backbone" --set data.label_column="$task" \
      --set model.image_size=128 --set cv.refit=false
  done
  "$XRAYCLS" compare "${BACKBONES[@]/#/$RUNS/$task/}" --baseline resnet50_test \
    --out "docs/comparison/$task"
done
