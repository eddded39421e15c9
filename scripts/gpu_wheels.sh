#!/usr/bin/env bash
# Fetch, on a machine with network, the wheels the GPU machine lacks into .whl/ (.gitignore keeps it out of git).
# The GPU image (Python 3.12, x86-64, torch 2.11 + CUDA 13, transformers, peft, accelerate, pyarrow, pandas,
# xxhash, fsspec, huggingface-hub ...) has no bitsandbytes, gguf or datasets, and no network. --no-deps:
# nothing the image already has (its torch above all) is fetched or replaced; datasets' own missing needs
# (dill, multiprocess) are named here. The GPU check's setup phase installs them offline:
#   python3 -m benchmarks.gpu --phase setup --out DIR   (pip install --no-index --no-deps --target ...)
# Usage: bash scripts/gpu_wheels.sh [EXTRA_NAME==VERSION ...]
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
mkdir -p .whl
pkgs=(bitsandbytes==0.50.2 gguf==0.19.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 "$@")
for p in "${pkgs[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "$p"
done
du -sh .whl
ls .whl
