#!/usr/bin/env bash
# Data-parallel training on this machine, side by side in one run: 1 rank x 2 threads against
# 2 ranks x 1 thread over shared memory and over TCP only (--mca btl tcp,self). Each run trains
# STEPS DEQ-mode steps of CONFIG (pretraining skipped) at global batch BATCH and prints the step
# time and the gradient all-reduce time from its metrics.jsonl. Needs OpenMPI
# (apt-get install libopenmpi-dev openmpi-bin libclang-dev); builds `--features mpi`.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-30}
BATCH=${BATCH:-128}
CONFIG=${CONFIG:-configs/fashion-mnist-tiny-plain.toml}
cargo build --release -q -p mdeq --features mpi
BIN=$PWD/target/release/mdeq
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
sed 's/^pretrain_steps = .*/pretrain_steps = 0/' "$CONFIG" > "$WORK/recipe.toml"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
MPIRUN=(mpirun --oversubscribe -np 2 -x RAYON_NUM_THREADS=1)

run() {
  local label=$1
  shift
  "$@" train --config "$WORK/recipe.toml" --out "$WORK/$label" --max-steps "$STEPS" \
    --batch-size "$BATCH" --log-every 1 --eval-limit 128 --device cpu >/dev/null 2>"$WORK/$label.log" \
    || { cat "$WORK/$label.log" >&2; exit 1; }
  python3 - "$WORK/$label/metrics.jsonl" "$label" "$BATCH" <<'PY'
import json, sys
path, label, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
steps = [j for j in map(json.loads, open(path)) if j["kind"] == "step"]
# images_per_s is cumulative since the start: the step time over the last half of the run,
# from the two rates, leaves start-up (data loading, the first allocations) out.
a, b = steps[len(steps) // 2], steps[-1]
t_a, t_b = a["step"] * batch / a["images_per_s"], b["step"] * batch / b["images_per_s"]
step_s = (t_b - t_a) / (b["step"] - a["step"])
reduce = [j["allreduce_s"] for j in steps[len(steps) // 2:] if "allreduce_s" in j]
line = {"run": label, "step_s": round(step_s, 4),
        "allreduce_s": round(sum(reduce) / len(reduce), 5) if reduce else None}
print(json.dumps(line))
PY
}

echo "# $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs);" \
  "avx512f: $(grep -c avx512f /proc/cpuinfo || true); $STEPS DEQ steps at batch $BATCH"
RAYON_NUM_THREADS=2 run "1x2-threads" "$BIN"
run "2x1-shared-memory" "${MPIRUN[@]}" "$BIN"
run "2x1-tcp" "${MPIRUN[@]}" --mca btl tcp,self "$BIN"
