#!/usr/bin/env bash
# The autoencoder's recipe levers, measured: each recipe trains the VAE stage only (stage=vae) on the same data with
# the same seed and steps, single-threaded (OMP_NUM_THREADS=1, so CPU seconds compare across recipes even on a busy
# machine), and ends with the stage's reconstruction line (PSNR, SSIM and the judge's FD of reconstructed real
# images). Usage:  experiments/vae_recipes.sh demo|fonts64 [recipe ...]   (default: every recipe)
# SEEDS="0 1 2" runs each recipe at each of those seeds (default: 0); on the demo data the seed moves the FD more
# than any recipe does, so compare recipes there over several.
# Each run's CPU seconds and its reconstruction line are appended to $OUT (default experiments/results/vae_recipes.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:?usage: experiments/vae_recipes.sh demo|fonts64 [recipe ...]}; shift
# Every recipe is one lever on the L1 + KL VAE, so the base turns off the spectral and SSIM terms the presets now use.
plain=(vae_train.fft_weight=0 vae_train.ssim_weight=0)
case "$data" in
  demo)    base=(experiment=demo "${plain[@]}") ;;
  fonts64) base=(experiment=small_data_cpu data=fonts data.images_per_user=10 data.resolution=64 vae_train.max_steps=200
                 vae_train.warmup_steps=20 "${plain[@]}") ;;
  *) echo "unknown data set $data: use demo or fonts64" >&2; exit 2 ;;
esac
disc="vae_train.disc.channels=32"                  # the discriminator's width in every disc recipe
shifted="vae_train.disc.augment_shift=0.125"          # its inputs shifted (DiffAugment's translation)
declare -A recipes=(
  [base]=""
  [long2x]="vae_train.max_steps=DOUBLE"
  [disc]="$disc vae_train.disc.weight=0.5 vae_train.disc.start=STARTQ"
  [disc_aug]="$disc vae_train.disc.weight=0.5 vae_train.disc.start=STARTQ $shifted"
  [disc_small]="$disc vae_train.disc.weight=0.1 vae_train.disc.start=STARTH $shifted"
  [fft]="vae_train.fft_weight=0.5"
  [ssim]="vae_train.ssim_weight=0.2"
  [fft_ssim]="vae_train.fft_weight=0.5 vae_train.ssim_weight=0.2"
  [ema]="vae_train.ema.enabled=true vae_train.ema.decay=0.99"
  [lc8]="vae.autoencoder.latent_channels=8"
  [lc16]="vae.autoencoder.latent_channels=16"
  [wide]="vae.autoencoder.block_out_channels=[64,64,128]"
  [f2]="vae.autoencoder.down_block_types=[DownEncoderBlock2D,DownEncoderBlock2D] vae.autoencoder.up_block_types=[UpDecoderBlock2D,UpDecoderBlock2D] vae.autoencoder.block_out_channels=[32,64]"
)
order=(base long2x disc disc_aug disc_small fft ssim fft_ssim ema lc8 lc16 wide f2)
[ $# -gt 0 ] && order=("$@")
out=${OUT:-experiments/results/vae_recipes.txt}
mkdir -p "$(dirname "$out")"
steps=$(.venv/bin/python -c "import sys; from ldm_users.config import compose; print(compose(sys.argv[1:], 'config').vae_train.max_steps)" "${base[@]}")
for seed in ${SEEDS:-0}; do
for name in "${order[@]}"; do
  args=${recipes[$name]}
  args=${args//DOUBLE/$((steps * 2))}; args=${args//STARTQ/$((steps / 4))}; args=${args//STARTH/$((steps / 2))}
  run=${ROOT:-outputs/vae_recipes}/$data-$name-seed$seed
  rm -rf "$run"
  start=$(date +%s)
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=1 /usr/bin/time -f "%U %S" -o "$run.cpu" .venv/bin/ldm-train "${base[@]}" stage=vae logger=none \
    vae_train.share=false seed="$seed" $args hydra.run.dir="$run" > "$run.log" 2>&1 || { echo "$data $name seed $seed FAILED (see $run.log)"; continue; }
  cpu=$(awk '{printf "%.0f", $1 + $2}' "$run.cpu")
  line=$(grep -o "VAE reconstructions of.*" "$run/train.log" | tail -1)
  echo "$data $name seed $seed: cpu ${cpu}s wall $(( $(date +%s) - start ))s | $line" | tee -a "$out"
done
done
