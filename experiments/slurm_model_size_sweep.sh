#!/usr/bin/env bash
# model_size_sweep.sh on SLURM: one sbatch job (one GPU) per model, run in parallel (needs
# `pip install "ldm-users[launchers]"`). Run it from a login node in a shared filesystem; it waits for the jobs.
#   PARTITION=gpu experiments/slurm_model_size_sweep.sh hardware=h100_80gb
set -euo pipefail
SWEEP_DIR=${SWEEP_DIR:-outputs/multirun/model_size_sweep_$(date +%Y-%m-%d_%H-%M-%S)}
ldm-train -m experiment=model_size_sweep hydra/launcher=slurm hydra.launcher.partition="${PARTITION:?set PARTITION}" \
  hydra.sweep.dir="$SWEEP_DIR" "$@" || status=$?
ldm-report "$SWEEP_DIR"
exit "${status:-0}"
