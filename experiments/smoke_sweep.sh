#!/usr/bin/env bash
# The sweep machinery end to end on a CPU in a few minutes: the two tiny denoisers (UNet vs DiT), one W&B run
# each in one group, then the side-by-side report. Extra arguments go to ldm-train (e.g. hydra/launcher=parallel).
set -euo pipefail
SWEEP_DIR=${SWEEP_DIR:-outputs/multirun/smoke_sweep_$(date +%Y-%m-%d_%H-%M-%S)}
ldm-train -m experiment=smoke model=unet_tiny,dit_tiny,flux_tiny hydra.sweep.dir="$SWEEP_DIR" "$@"
ldm-report "$SWEEP_DIR"
