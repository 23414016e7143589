#!/usr/bin/env bash
# ISBI 2012 settings side by side on one GPU: the README's recommended command with --epochs in
# place of --time-limit (32 epochs = the 2560 steps that 14 minutes give on the 2-core CPU), and
# larger models or longer runs. Every run trains concurrently (reference backend, bfloat16); the
# summary gives each run's best validation epoch and its last.
#   bash benchmarks/isbi_sweep.sh [DATA] [RUN...]    (DATA default ../shared/data/isbi2012)
set -u
data=${1:-../shared/data/isbi2012}; shift $(( $# > 0 ))
out=${OUT:-isbi-sweep}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
recommended="--data $data --foreground 0 --crop 256 --no-resize --elastic-p 0 --intensity-p 0
  --precision bf16 --lr 6e-3 --schedule cosine --ema 0.99 --tta --learn-offset --epoch-samples 320
  --patience 1000 --device cuda --backend reference --workers 1 --quiet"
declare -A runs=(
  [base16]="--base-features 16 --epochs 32"
  [base16_seed1]="--base-features 16 --epochs 32 --seed 1"
  [base16_seed2]="--base-features 16 --epochs 32 --seed 2"
  [base16_bce]="--base-features 16 --epochs 32 --loss bce"
  [base16_crop512]="--base-features 16 --epochs 32 --crop 512"
  [resunet16]="--model resunet --base-features 16 --epochs 32"
  [attention16]="--model attention_unet --base-features 16 --epochs 32"
  [unetpp16]="--model unet++ --base-features 16 --epochs 32"
  [base32]="--base-features 32 --epochs 32"
  [base16_x3_elastic]="--base-features 16 --epochs 96 --elastic-p 0.5"
  [base32_x3_elastic]="--base-features 32 --epochs 96 --elastic-p 0.5"
  [base32_x3_elastic_seed1]="--base-features 32 --epochs 96 --elastic-p 0.5 --seed 1"
  [base32_x3_elastic_intensity]="--base-features 32 --epochs 96 --elastic-p 0.5 --intensity-p 0.5"
  [base64_x2]="--base-features 64 --epochs 64 --elastic-p 0.3 --intensity-p 0.3 --lr 3e-3"
)
names=("$@"); [ ${#names[@]} -gt 0 ] || names=("${!runs[@]}")
for name in "${names[@]}"; do
  [ -n "${runs[$name]:-}" ] || { echo "unknown run '$name'; runs: ${!runs[*]}" >&2; exit 2; }
done
mkdir -p "$out"
for name in "${names[@]}"; do
  timeout ${RUN_S:-900} python3 -m unet_fast train $recommended ${runs[$name]} --out "$out/$name" \
    >"$out/$name.log" 2>&1 &
done
wait
for name in "${names[@]}"; do
  python3 - "$name" "$out/$name/log.csv" "${runs[$name]}" <<'PY'
import csv, sys
name, path, args = sys.argv[1:]
try:
    rows = list(csv.DictReader(open(path)))
except OSError:
    sys.exit(print(f"{name}: no log ({args})"))
best = min(rows, key=lambda r: float(r["val_pixel_error"]))
print(f"{name} ({args}): {len(rows)} epochs; best epoch {best['epoch']}: Dice "
      f"{float(best['val_dice']):.4f}, pixel error {float(best['val_pixel_error']):.4f}; last: "
      f"{float(rows[-1]['val_dice']):.4f} / {float(rows[-1]['val_pixel_error']):.4f}")
PY
done | tee "$out/summary.txt"
