#!/usr/bin/env bash
# Issue 14's comparison on a CPU: UNet vs DiT vs Flux at matched parameters (0.79M / 0.83M / 0.84M denoiser
# parameters) and matched training time (BUDGET seconds of LDM steps each, constant LR after warmup so that no
# schedule depends on a step count), on one shared VAE, each with its family's objective and sampler (UNet, DiT:
# v-prediction diffusion + DPM-Solver++ 20 steps; Flux: flow matching + flow_euler 28 steps), snapshots judged by
# ldm-eval at EVAL_AT seconds. Writes experiments/results/time_to_quality_$NAME.{md,json,png}.
#   experiments/backbones_demo.sh                          # make demo's data, 60 s each
#   NAME=backbones_fonts BASE="'experiment=small_data_cpu','data=fonts','data.images_per_user=10'" BUDGET=300 \
#     EVAL_AT=150,300 EVAL="'eval.images_per_user=16'" experiments/backbones_demo.sh   # few-shot fonts, 5 min each
set -euo pipefail
LDM_BENCH=${LDM_BENCH:-ldm-bench}
NAME=${NAME:-backbones_demo}
BASE=${BASE:-"'experiment=demo'"}
BUDGET=${BUDGET:-60}
EVAL_AT=${EVAL_AT:-15,30,60}
EVAL=${EVAL:-"'eval.images_per_user=32'"}   # ldm-eval overrides for every snapshot
$LDM_BENCH bench.mode=time_to_quality bench.time_to_quality.name="$NAME" \
  "bench.time_to_quality.base=[$BASE,'train.lr_scheduler=constant']" \
  bench.time_to_quality.budget_s="$BUDGET" "bench.time_to_quality.eval_at_s=[$EVAL_AT]" \
  "bench.time_to_quality.eval=[$EVAL]" \
  '~bench.time_to_quality.recipes.current' '~bench.time_to_quality.recipes.old' \
  '~bench.time_to_quality.recipes.diffusers_example' \
  "+bench.time_to_quality.recipes.unet_tiny=['model=unet_tiny']" \
  "+bench.time_to_quality.recipes.dit_08M=['model=dit_small']" \
  "+bench.time_to_quality.recipes.flux_08M=['model=flux_tiny','model.embed_dim=96','model.denoiser.num_layers=1','model.denoiser.num_single_layers=3','model.denoiser.num_attention_heads=4','model.denoiser.attention_head_dim=24','model.denoiser.axes_dims_rope=[8,8,8]']" \
  logger=none "$@"
