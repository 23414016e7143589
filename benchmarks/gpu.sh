#!/usr/bin/env bash
# The GPU run: build the CUDA kernels in place for this GPU, run the CUDA and Triton tests
# natively, the GPU benchmarks (benchmarks/gpu_targets.py), the whole test suite, and
# compute-sanitizer over the CUDA kernels' tests. Logs go to $OUT (default ./gpu-out).
# Each stage has its own time limit so one slow stage cannot starve the others.
set -u
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
stage() { echo "=== $1 ($(date +%T))"; }

stage environment
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ -d .whl ]; then  # test-only packages missing on the machine
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi

stage build
arch=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=16 timeout 240 python3 setup.py build_ext --inplace \
  >"$out/build.log" 2>&1 || tail -40 "$out/build.log"
grep -A4 "build configuration" "$out/build.log"
python3 -c "import unet_fast; print(unet_fast.backends())"

stage "CUDA and Triton tests"
timeout 150 python3 -m pytest tests/test_cuda.py tests/test_triton.py -q -rfE 2>&1 | tee "$out/gpu_tests.log" | tail -25

stage "benchmarks: cuda backend, eager and torch.compile"
timeout 200 python3 benchmarks/gpu_targets.py --backends cuda --profile --json "$out/targets_cuda.json" 2>&1 | tail -120

stage "benchmarks: triton backend"
timeout 150 python3 benchmarks/gpu_targets.py --backends triton --no-compile --json "$out/targets_triton.json" 2>&1 | tail -40

stage "whole test suite"
timeout 150 python3 -m pytest -q -n 8 -rfE 2>&1 | tee "$out/suite.log" | tail -25

stage compute-sanitizer
timeout 90 compute-sanitizer --tool memcheck --error-exitcode 1 python3 -m pytest tests/test_cuda.py -q \
  -k "every_width or vector_and_scalar or crop_concat_on_cuda" 2>&1 | tail -15
stage done
