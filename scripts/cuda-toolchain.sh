#!/usr/bin/env bash
# Prepares a CUDA 13.0 build environment for `--features cuda` on any x86-64 Linux machine, GPU
# or not, from PyPI wheels alone, and prints the environment to use:
#
#     eval "$(scripts/cuda-toolchain.sh)"     # in scripts: env=$(…) first, so a failure stops them
#     cargo build --release -p mdeq --features cuda
#
# Why each piece (the long story: docs/gpu.md):
# - CUDA 13.0 wheels are the only pip-installable toolkit with the nvcc driver (the -cu12 nvcc
#   wheels hold ptxas alone). nvcc pulls the newest crt/nvvm unless pinned, and a newer cicc writes
#   PTX that a CUDA 13.0 driver (580.x) cannot load: every compiler wheel is pinned to 13.0.88.
# - cudarc links at build time (-lcuda -lcublas ...), but the wheels ship only versioned names
#   (libcublas.so.13): a small root of symlinks gives the unversioned ones, and a stub libcuda.so
#   (soname libcuda.so.1) stands in for the driver where there is none. At run time the real
#   driver's libcuda.so.1 is loaded; nothing of the stub is used or shipped.
# - candle-kernels cannot ask nvidia-smi for the compute capability without a GPU:
#   CUDA_COMPUTE_CAP (default 90: H100/H200) says it.
#
# Knobs: MDEQ_CUDA_DIR (where the venv and root live, default ~/.cache/mdeq-cuda; keep it stable:
# its path is part of cudarc's build fingerprint), CUDA_COMPUTE_CAP, WITH_NCCL=1 (NCCL 2.30 for
# `--features nccl`), WITH_CUDNN=1 (cuDNN 9 for `--features cudnn`). Everything but the export
# lines goes to stderr.
set -euo pipefail
DIR=${MDEQ_CUDA_DIR:-$HOME/.cache/mdeq-cuda}
CAP=${CUDA_COMPUTE_CAP:-90}
VENV=$DIR/venv-cu13
ROOT=$DIR/cuda-root
mkdir -p "$DIR"
log() { echo "cuda-toolchain: $*" >&2; }

PKGS=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
      nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88
      nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35)
if [ -n "${WITH_NCCL:-}" ]; then PKGS+=(nvidia-nccl-cu13==2.30.7); fi
if [ -n "${WITH_CUDNN:-}" ]; then PKGS+=(nvidia-cudnn-cu13); fi
STAMP=$DIR/.installed-$(printf '%s\n' "${PKGS[@]}" | sha256sum | cut -c1-16)
if [ ! -f "$STAMP" ]; then
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV" >&2 || { log "python3 -m venv failed (Debian: apt-get install python3-venv)"; exit 1; }
  fi
  log "installing ${#PKGS[@]} CUDA 13.0 wheels into $VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "${PKGS[@]}" >&2
  touch "$STAMP"
fi
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
CU=$SITE/nvidia/cu13
"$CU/bin/nvcc" --version | grep -q "release 13.0" || { log "$CU/bin/nvcc is not CUDA 13.0"; exit 1; }

mkdir -p "$ROOT/lib/stubs"
for d in bin include nvvm; do ln -sfn "$CU/$d" "$ROOT/$d"; done
for f in "$CU"/lib/*.so.* "$CU"/lib/*.a; do ln -sfn "$f" "$ROOT/lib/$(basename "$f")"; done
for n in cublas:13 cublasLt:13 curand:10 nvrtc:13 cudart:13; do
  ln -sfn "lib${n%%:*}.so.${n##*:}" "$ROOT/lib/lib${n%%:*}.so"
done
if [ -n "${WITH_NCCL:-}" ]; then
  ln -sfn "$SITE/nvidia/nccl/lib/libnccl.so.2" "$ROOT/lib/libnccl.so"
fi
if [ -n "${WITH_CUDNN:-}" ]; then
  for f in "$SITE"/nvidia/cudnn/lib/libcudnn*.so.*; do ln -sfn "$f" "$ROOT/lib/$(basename "$f")"; done
  ln -sfn libcudnn.so.9 "$ROOT/lib/libcudnn.so"
  ln -sfn "$SITE/nvidia/cudnn/include" "$ROOT/include-cudnn"
fi

# The driver stub: every cu* entry point cudarc binds, each returning CUDA_ERROR_UNKNOWN (999).
STUB=$ROOT/lib/stubs/libcuda.so
if [ ! -f "$STUB" ]; then
  REPO=$(cd "$(dirname "$0")/.." && pwd)
  (cd "$REPO" && cargo fetch --locked >/dev/null 2>&1) || true
  VER=$(awk '/^name = "cudarc"$/{getline; gsub(/"/,"",$3); print $3}' "$REPO/Cargo.lock")
  SRC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$VER" 2>/dev/null | head -1)
  [ -n "$SRC" ] || { log "cudarc $VER sources not found (run cargo fetch)"; exit 1; }
  grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$SRC/src/driver/sys/mod.rs" | awk '{print $4}' | sort -u \
    | awk '{print "int " $1 "(void) { return 999; }"}' > "$ROOT/lib/stubs/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUB" "$ROOT/lib/stubs/libcuda_stub.c"
fi
log "ready: nvcc $("$ROOT/bin/nvcc" --version | grep -o 'V[0-9][0-9.]*' | tail -1), compute capability $CAP"

echo "export CUDA_ROOT=$ROOT"
echo "export PATH=$ROOT/bin:\$PATH"
echo "export CUDA_COMPUTE_CAP=$CAP"
if [ -n "${WITH_CUDNN:-}" ]; then echo "export CUDNN_LIB=$ROOT/lib CUDNN_INCLUDE=$ROOT/include-cudnn"; fi
echo "unset CUDA_HOME CUDA_PATH CUDA_TOOLKIT_ROOT_DIR NVCC NVCC_CCBIN"
