#!/usr/bin/env bash
# Reproduces docs/comparison/{label,subtype}/report.md: configs/comparison.yaml (the
# 1,000-image sample, 5-fold patient-grouped CV, up to 10 epochs with early stopping, from
# scratch, the tiny *_test variant of each family at 128 px, no refit model: the comparison uses
# the pooled out-of-fold predictions, and `xraycls predict` serves the fold ensemble from these
# bundles) for each of the four backbone families; 61 min for all eight runs here, on 2 CPU
# cores shared with other jobs.
set -euo pipefail
cd "$(dirname "$0")/../.."
XRAYCLS=${XRAYCLS:-.venv/bin/xraycls}
RUNS=${RUNS:-runs/comparison}
BACKBONES=(resnet50_test swin_test maxvit_test vit_test)
for task in label subtype; do   # label: NORMAL / PNEUMONIA; subtype: normal / bacteria / virus
  for backbone in "${BACKBONES[@]}"; do
    "$XRAYCLS" train --config configs/comparison.yaml --out "$RUNS/$task/$backbone" \
      --set model.name="$backbone" --set data.label_column="$task"
  done
  "$XRAYCLS" compare "${BACKBONES[@]/#/$RUNS/$task/}" --baseline resnet50_test \
    --out "docs/comparison/$task"
done
