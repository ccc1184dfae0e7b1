#!/usr/bin/env bash
# The few-shot fonts benchmark on a CPU (issue 12's target): experiment=small_data_cpu (unet_tiny, kl_tiny, 1,500 VAE
# and 20,000 LDM steps, about 20 minutes on 2 cores) on data=fonts, all 21 fonts with 10 images each at 32 px, then
# ldm-eval on the export.
# Extra arguments are overrides, so one script measures every recipe, before and after:
#   experiments/fonts_recipe.sh                                   # the defaults
#   experiments/fonts_recipe.sh train.max_steps=4000 sampler.guidance_scale=2
#   RUN_DIR=outputs/fonts_recipe/minsnr experiments/fonts_recipe.sh <overrides>   # rerun the same RUN_DIR: resumes
# Every argument goes to ldm-train; `sampler`, `eval`, `logger` and `paths` ones also go to ldm-eval (it reads the data
# settings from the run), and EVAL_ARGS adds ldm-eval-only overrides (e.g. EVAL_ARGS="eval.images_per_user=32").
# metrics.json and grid.png land in $RUN_DIR/eval; the run's samples in $RUN_DIR/ldm/samples.
set -euo pipefail
PYTHON=${PYTHON:-python}
RUN_DIR=${RUN_DIR:-outputs/fonts_recipe/$(date +%Y-%m-%d_%H-%M-%S)}
eval_args=()
for arg in "$@"; do
  if [[ $arg =~ ^[+~]?(sampler|eval|logger|paths)([./=]) ]]; then eval_args+=("$arg"); fi
done
# shellcheck disable=SC2206  # EVAL_ARGS is a space-separated list of overrides
eval_args+=(${EVAL_ARGS:-})
start=$SECONDS
"$PYTHON" -m ldm_users.cli.train experiment=small_data_cpu data=fonts data.num_users=21 data.images_per_user=10 \
  data.resolution=32 eval.enabled=false hydra.run.dir="$RUN_DIR" "$@"
train_s=$((SECONDS - start))
"$PYTHON" -m ldm_users.cli.eval export_path="$RUN_DIR" hydra.run.dir="$RUN_DIR/eval" "${eval_args[@]}"
echo "fonts_recipe: trained in ${train_s} s; metrics: $RUN_DIR/eval/metrics.json"
"$PYTHON" - "$RUN_DIR/eval/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
keys = ["user_acc/top1", "user_acc/chance", "classifier/holdout_top1", "fd/classifier", "fd/classifier_real_holdout",
        "kid/classifier", "diversity/ratio", "memorization/ratio"]
print("  " + ", ".join(f"{k} {m[k]:.3g}" if isinstance(m.get(k), (int, float)) else f"{k} {m.get(k)}" for k in keys))
PY
