#!/usr/bin/env bash
# Every check that needs a GPU, in one command, on one H100-class GPU in under 8 minutes:
#   experiments/gpu_check.sh             # writes experiments/results/gpu_check_<device>.{md,json}
#   experiments/gpu_check.sh --dry-run   # (or DRY_RUN=1) composes every command without running it: no GPU needed
# The checks and their time limits are in src/ldm_users/perf/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE="${WANDB_MODE:-offline}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
exec "${PYTHON:-.venv/bin/python}" -m ldm_users.perf.gpu_check "$@"
