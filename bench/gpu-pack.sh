#!/usr/bin/env bash
# Builds the CUDA binary here (no GPU needed) and packs what the GPU check needs into .gpu/, the
# folder to carry to a GPU machine (git ignores it; under 64 MiB):
#
#     bench/gpu-pack.sh            # then, on the GPU machine: bench/gpu-check.sh
#
# .gpu/mdeq.xz is the stripped release binary built with `--features cuda` (CUDA 13.0, sm_90a
# unless CUDA_COMPUTE_CAP says otherwise), .gpu/fashion-mnist/ the Fashion-MNIST IDX files of
# the training figure. A cold build took 16–26 minutes on two cores; the target folder
# (MDEQ_CUDA_TARGET, default ~/.cache/mdeq-cuda/target) makes later ones minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
toolchain=$(scripts/cuda-toolchain.sh)
eval "$toolchain"
export CARGO_TARGET_DIR=${MDEQ_CUDA_TARGET:-$HOME/.cache/mdeq-cuda/target}
CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-2} cargo build --release --locked -p mdeq --features cuda
mkdir -p .gpu/fashion-mnist
strip -o .gpu/mdeq "$CARGO_TARGET_DIR/release/mdeq"
xz -6 -T0 -f .gpu/mdeq
FMNIST=${FMNIST:-/usr/share/datasets/fashion-mnist}
if [ -d "$FMNIST" ]; then
  cp "$FMNIST"/*-ubyte.gz .gpu/fashion-mnist/
else
  echo "warning: no Fashion-MNIST at $FMNIST (apt-get install dataset-fashion-mnist): the check skips training" >&2
fi
du -sh .gpu .gpu/*
