#!/usr/bin/env bash
# The GPU run: build the CUDA kernels in place for this GPU, then the stages named in $STAGES
# (default: all): tests (CUDA and Triton tests natively), bench (benchmarks/gpu_targets.py on the
# cuda backend against eager and torch.compile, with a profile), triton (the same on the triton
# backend), networks (`unet-fast bench --model` of nnU-Net's and MONAI's networks in bf16, fused on
# the cuda backend, against eager and torch.compile), suite (the whole test suite), sanitizer
# (compute-sanitizer over the CUDA kernels' tests), train (`unet-fast train` on CUDA in fp16 with
# loss scaling and in bf16, then `unet-fast predict` on CUDA). Logs go to $OUT (default ./gpu-out);
# each stage has its own time limit (SIGINT, so pytest still prints what failed).
set -u
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
stages=${STAGES:-tests bench triton networks suite sanitizer train}
stage() { echo "=== $1 ($(date +%T))"; }
wanted() { [[ " $stages " == *" $1 "* ]]; }

stage environment
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ -d .whl ]; then  # test-only packages missing on the machine
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

stage build
arch=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=16 timeout 240 python3 setup.py build_ext --inplace \
  >"$out/build.log" 2>&1 || tail -40 "$out/build.log"
grep -A4 "build configuration" "$out/build.log"
python3 -c "import unet_fast; print(unet_fast.backends())"

if wanted tests; then
  stage "CUDA and Triton tests"
  timeout -s INT ${TESTS_S:-150} python3 -m pytest tests/ops tests/models/test_unet_backends.py -k "cuda or triton" -n 4 -v --tb=line \
    -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log" | grep -E "FAILED|ERROR|passed|failed|^/|Error" | head -60
fi
if wanted bench; then
  stage "benchmarks: cuda backend, eager and torch.compile"
  timeout ${BENCH_S:-200} python3 benchmarks/gpu_targets.py --backends cuda --profile ${BENCH_ARGS:-} \
    --json "$out/targets_cuda.json" 2>&1 | tee "$out/bench_cuda.log" | tail -150
fi
if wanted triton; then
  stage "benchmarks: triton backend"
  timeout ${TRITON_S:-150} python3 benchmarks/gpu_targets.py --backends triton --no-compile \
    --json "$out/targets_triton.json" 2>&1 | tail -40
fi
if wanted networks; then
  stage "nnU-Net and MONAI networks: fuse() on the cuda backend against eager and torch.compile, bf16"
  for model in nnunet-3d nnunet-2d monai-basicunet-3d; do
    timeout ${NETWORKS_S:-100} python3 -m unet_fast bench --model $model --device cuda --backend cuda \
      --dtype bfloat16 --compile default --rounds 10 --warmup 3 --json "$out/$model.json" 2>&1 \
      | tee "$out/$model.log" | tail -14
  done
fi
if wanted suite; then
  stage "whole test suite"
  timeout -s INT ${SUITE_S:-300} python3 -m pytest -q -n 8 -rfE --tb=line --durations=15 \
    -p no:cacheprovider 2>&1 \
    | tee "$out/suite.log" | grep -E "FAILED|ERROR|passed|failed|Fatal|^/|s call" | head -60
fi
if wanted sanitizer; then
  stage compute-sanitizer
  timeout ${SANITIZER_S:-90} compute-sanitizer --tool memcheck --error-exitcode 1 python3 -m pytest \
    tests/ops -q -k "cuda and (vector or precision or nan or crop_concat)" 2>&1 | tail -15
fi
if wanted train; then
  stage "training and prediction on CUDA (generated cells)"
  runs=$(mktemp -d)
  for precision in fp16 bf16; do
    timeout ${TRAIN_S:-90} python3 -m unet_fast train --device cuda --precision $precision \
      --base-features 16 --epochs 2 --epoch-samples 64 --workers 4 --quiet --out "$runs/$precision" \
      2>&1 | tee "$out/train_$precision.log" | tail -3
  done
  python3 -c "from unet_fast.train.data import SyntheticCells; from PIL import Image
image, _ = SyntheticCells(1, 300, seed=5).load(0)
Image.fromarray((image[..., 0] * 255).astype('uint8')).save('$runs/cells.png')"
  timeout 60 python3 -m unet_fast predict "$runs/bf16/best.pt" "$runs/cells.png" --device cuda \
    --tile 128 --out "$runs/predicted" --quiet 2>&1 | tail -3
  ls "$runs/predicted"
fi
stage done
