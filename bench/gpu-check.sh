#!/usr/bin/env bash
# The GPU check: what only a GPU can show, in one run of under 8 minutes. Given the CUDA build
# (bench/gpu-pack.sh puts it and the data into .gpu/), on a machine with an NVIDIA GPU, its
# driver and the CUDA 13 libraries (a PyTorch cu13 environment has them), from the repository
# root:
#
#     bench/gpu-check.sh [BINARY]          # default .gpu/mdeq.xz, or .gpu/mdeq
#
# It prints and writes to $OUT (default /tmp/gpu-check):
#   1. the device found (nvidia-smi, and mdeq's own "computing on cuda:0" line);
#   2. `mdeq parity` on cls-tiny and seg-tiny in f32 and f64 on CUDA (the CPU's tolerances);
#   3. `mdeq bench` on CUDA at batch 32 and 128 (cell forward, VJP, forward+backward, forward
#      solve, training step), side by side with bench/torch_cell.py on the same GPU;
#   4. 300 steps of the Fashion-MNIST recipe on CUDA, with images/s;
#   5. peak GPU memory of DEQ-mode training steps at F_THRES 10 and 40 (nvidia-smi, sampled);
# and gpu-check.json, the summary. Exit 0 when every parity check passed and every step ran.
#
# A rehearsal of the script itself on a CPU (its plumbing, not its figures):
#     DEVICE=cpu BATCHES=8 TRAIN_STEPS=20 MEMORY_STEPS=2 bench/gpu-check.sh target/release/mdeq
set -u
DEVICE=${DEVICE:-cuda}
BATCHES=${BATCHES:-32 128}
TRAIN_STEPS=${TRAIN_STEPS:-300}
MEMORY_STEPS=${MEMORY_STEPS:-20}
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT" /tmp/mdeq-gpu
START=$(date +%s)
BIN_SRC=${1:-}
if [ -z "$BIN_SRC" ]; then
  for c in .gpu/mdeq.xz .gpu/mdeq; do [ -f "$c" ] && BIN_SRC=$c && break; done
fi
[ -n "$BIN_SRC" ] && [ -f "$BIN_SRC" ] || { echo "no mdeq binary (run bench/gpu-pack.sh first)" >&2; exit 2; }
BIN=/tmp/mdeq-gpu/mdeq
case "$BIN_SRC" in
  *.xz) python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],"wb"))' "$BIN_SRC" "$BIN" ;;
  *) cp "$BIN_SRC" "$BIN" ;;
esac
chmod +x "$BIN"
export CUDA_CACHE_PATH=/tmp/mdeq-gpu/nvcache   # the driver's PTX JIT cache: the first run compiles

# The CUDA 13 libraries: the driver's libcuda.so.1 is on the loader path already; cuBLAS,
# cuRAND and the runtime come from the Python environment's nvidia wheels or a toolkit.
LIBS=$(python3 - <<'PY' 2>/dev/null
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except Exception:
    roots = []
dirs = []
for r in roots:
    dirs += sorted(glob.glob(os.path.join(r, "cu13", "lib"))) + sorted(glob.glob(os.path.join(r, "*", "lib")))
print(":".join(d for d in dirs if os.path.isdir(d)))
PY
)
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do [ -d "$d" ] && LIBS="$LIBS:$d"; done
export LD_LIBRARY_PATH="${LIBS#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
{
  echo "== device"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader
  ldd "$BIN" | grep -E 'libcuda|cublas|curand|cudart|not found'
} 2>&1 | tee "$OUT/device.txt"
if ldd "$BIN" | grep -q 'not found'; then echo "missing libraries (above)" >&2; exit 3; fi

status=0
step() { # name timeout command...: runs one part, its output into $OUT/name.log
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s, $(( $(date +%s) - START ))s elapsed)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -4 "$OUT/$name.log"
  echo "$name rc=$rc" >> "$OUT/rcs.txt"
  [ $rc -eq 0 ] || status=1
  return $rc
}
: > "$OUT/rcs.txt"

for fx in cls-tiny seg-tiny; do
  for p in f32 f64; do
    io=fixtures/$fx/io.safetensors; [ $p = f64 ] && io=fixtures/$fx/io_f64.safetensors
    step "parity-$fx-$p" 120 "$BIN" parity --device $DEVICE --dtype $p --config fixtures/$fx/config.yaml \
      --weights fixtures/$fx/weights.safetensors --io "$io"
  done
done

TORCH=()
if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
  TORCH=(--compare-torch python3)
fi
FIGS=cell_forward,vjp,forward_backward,train_step,forward_solve,train_step_ift
for b in $BATCHES; do
  step "bench-b$b" 150 "$BIN" bench --device $DEVICE --batch $b --only $FIGS --repeats 10 "${TORCH[@]}" --json
done

DATA=.gpu/fashion-mnist
if [ -f "$DATA/train-images-idx3-ubyte.gz" ]; then
  rm -rf /tmp/mdeq-gpu/run300 /tmp/mdeq-gpu/mem*
  step train-300 200 "$BIN" train --device $DEVICE --config configs/fashion-mnist-tiny.toml --data "$DATA" \
    --out /tmp/mdeq-gpu/run300 --max-steps "$TRAIN_STEPS" --log-every 50 --eval-limit 2000
  cp /tmp/mdeq-gpu/run300/metrics.jsonl "$OUT/train-300-metrics.jsonl" 2>/dev/null
  for t in 10 40; do
    # DEQ mode from the first step, at this threshold: the memory the solver's history needs.
    sed -e "s/^f_thres = .*/f_thres = $t/" -e "s/^b_thres = .*/b_thres = $t/" \
        -e "s/^pretrain_steps = .*/pretrain_steps = 0/" -e "s/^eps = .*/eps = 1e-9/" \
        configs/fashion-mnist-tiny-plain.toml > /tmp/mdeq-gpu/thres$t.toml
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$OUT/memory-f$t.csv" &
    SMI=$!
    step "memory-f$t" 90 "$BIN" train --device $DEVICE --config /tmp/mdeq-gpu/thres$t.toml --data "$DATA" \
      --out /tmp/mdeq-gpu/mem$t --max-steps "$MEMORY_STEPS" --log-every 5 --eval-limit 256
    kill $SMI 2>/dev/null; wait $SMI 2>/dev/null
  done
else
  echo "no Fashion-MNIST under $DATA: training and memory figures skipped" | tee "$OUT/train-skipped.txt"
  status=1
fi

python3 - "$OUT" <<'PY' | tee "$OUT/gpu-check.json"
import json, os, re, sys
out = sys.argv[1]
def read(name):
    try:
        return open(os.path.join(out, name)).read()
    except OSError:
        return ""
rcs = dict(l.split(" rc=") for l in read("rcs.txt").split("\n") if " rc=" in l)
summary = {"device": read("device.txt").split("\n")[1].strip() if "\n" in read("device.txt") else "",
           "exit_codes": {k: int(v) for k, v in rcs.items()}, "parity": {}, "bench": {}}
for k in rcs:
    if k.startswith("parity-"):
        m = re.search(r"parity: [^\n]*", read(k + ".log"))
        summary["parity"][k[7:]] = m.group(0) if m else "no summary line"
    if k.startswith("bench-"):
        lines = [l for l in read(k + ".log").split("\n") if l.startswith("{")]
        summary["bench"][k[6:]] = json.loads(lines[-1]) if lines else None
recs = [json.loads(l) for l in read("train-300-metrics.jsonl").split("\n") if l.startswith("{")]
steps = [r for r in recs if "images_per_s" in r]
if steps:
    summary["train_300"] = {"steps": steps[-1].get("step"), "images_per_s": steps[-1]["images_per_s"],
                            "last_loss": steps[-1].get("loss"),
                            "eval": [r for r in recs if "images_per_s" not in r][-1:]}
for t in (10, 40):
    vals = [int(v) for v in read(f"memory-f{t}.csv").split() if v.strip().isdigit()]
    if vals:
        summary[f"gpu_memory_mib_f_thres_{t}"] = {"peak": max(vals), "before": vals[0],
                                                  "peak_minus_before": max(vals) - vals[0]}
print(json.dumps(summary, indent=1))
PY
echo "== done in $(( $(date +%s) - START ))s, status $status"
exit $status
