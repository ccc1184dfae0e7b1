#!/usr/bin/env bash
# The four denoisers of the planning notes (unet_light, unet_medium, unet_sd, dit) at matched settings on one
# hardware profile (conf/experiment/model_size_sweep.yaml), one job after the other on this machine's GPU:
#   experiments/model_size_sweep.sh                        # hardware=p100_16gb (the notes' GPU)
#   experiments/model_size_sweep.sh hardware=h100_80gb     # any override goes to every job
# On a SLURM cluster use experiments/slurm_model_size_sweep.sh instead.
set -euo pipefail
SWEEP_DIR=${SWEEP_DIR:-outputs/multirun/model_size_sweep_$(date +%Y-%m-%d_%H-%M-%S)}
ldm-train -m experiment=model_size_sweep hydra.sweep.dir="$SWEEP_DIR" "$@" || status=$?
ldm-report "$SWEEP_DIR"   # also when a job failed: the report lists it with its error
exit "${status:-0}"
