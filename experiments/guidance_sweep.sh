#!/usr/bin/env bash
# Classifier-free guidance scale against user accuracy and FD, on one trained export (ldm-eval per scale):
#   experiments/guidance_sweep.sh outputs/runs/<run>        # the run dir or its export/
set -euo pipefail
EXPORT=${1:?usage: guidance_sweep.sh RUN_DIR_OR_EXPORT [ldm-eval overrides]}
shift
SWEEP_DIR=${SWEEP_DIR:-outputs/multirun/guidance_sweep_$(date +%Y-%m-%d_%H-%M-%S)}
ldm-eval -m export_path="$EXPORT" sampler.guidance_scale=1,1.25,1.5,2,3,5,7.5 hydra.sweep.dir="$SWEEP_DIR" "$@" || status=$?
ldm-report "$SWEEP_DIR"   # accuracy and FD per scale (report.md) and eval.png
exit "${status:-0}"
