#!/usr/bin/env bash
# Issue 12's recipe comparison at `make demo`'s size: the current recipe, the one before issue 12 (`old`: epsilon,
# plain MSE, leading spacing, DDIM) and diffusers' train_text_to_image.py defaults (`diffusers_example`), each
# trained for the same 50 s of LDM training time on one shared VAE (demo's cosine schedule over 1,300 steps, so
# the LR has decayed by the end), snapshots judged by ldm-eval at 15, 30 and 50 s. Writes
# experiments/results/time_to_quality_recipes_demo.{md,json,png}. Extra arguments go to ldm-bench.
set -euo pipefail
LDM_BENCH=${LDM_BENCH:-ldm-bench}
$LDM_BENCH bench.mode=time_to_quality bench.time_to_quality.name=recipes_demo \
  "bench.time_to_quality.base=['experiment=demo','train.max_steps=1300']" \
  bench.time_to_quality.budget_s=50 "bench.time_to_quality.eval_at_s=[15,30,50]" \
  "bench.time_to_quality.eval=['eval.images_per_user=32']" logger=none "$@"
