#!/usr/bin/env bash
# The fuzzing campaign: every target (or those in TARGETS) for RUNS executions each, under
# memory and time limits, seeded from the repository's fixtures and configs. A crash leaves
# its input in artifacts/<target>/ and fails the script; turn each into a regression test.
#
#   fuzz/run.sh                       # 1,000,000 executions of every target
#   RUNS=20000 TARGETS=pickle fuzz/run.sh
#   SECONDS_EACH=30 fuzz/run.sh       # a time budget instead of a count (CI's smoke run)
#   FUZZ_TARGET_DIR=~/.cache/x fuzz/run.sh   # build outside the checkout (CI keeps it between runs)
#
# Needs the nightly toolchain and cargo-fuzz (`cargo +nightly install cargo-fuzz --locked`).
set -euo pipefail
cd "$(dirname "$0")"
runs=${RUNS:-1000000}
targets=${TARGETS:-"pickle state_dict checkpoint toml_config yaml_config idx cifar image label_map transforms"}
limits=(-rss_limit_mb=2048 -timeout=10 -max_len="${MAX_LEN:-8192}")
if [ -n "${SECONDS_EACH:-}" ]; then budget=(-max_total_time="$SECONDS_EACH"); else budget=(-runs="$runs"); fi

seed() { # seed TARGET FILE...
  mkdir -p "corpus/$1"
  shift_target=$1; shift
  for f in "$@"; do [ -f "$f" ] && cp "$f" "corpus/$shift_target/seed-$(basename "$(dirname "$f")")-$(basename "$f")"; done
  return 0
}
seed pickle ../fixtures/*/state_dict_legacy.pth
seed state_dict ../fixtures/*/state_dict.pth ../fixtures/*/state_dict_legacy.pth ../fixtures/*/weights.safetensors
seed checkpoint ../fixtures/cls-tiny/weights.safetensors ${CHECKPOINT_SEED:-}
seed toml_config ../configs/*.toml ../configs/presets/*.toml
seed yaml_config ../fixtures/*/config.yaml
mkdir -p corpus/idx
# A raw (first byte even) 2×2×2 IDX image file.
printf '\x00\x00\x00\x08\x03\x00\x00\x00\x02\x00\x00\x00\x02\x00\x00\x00\x02\x01\x02\x03\x04\x05\x06\x07\x08' > corpus/idx/seed-raw

# Images and label maps: the small PNG/JPEG files in seeds/ (a first byte of 0 asks for grey).
mkdir -p corpus/image corpus/label_map corpus/cifar corpus/transforms
for f in seeds/*.png seeds/*.jpg; do { printf '\x01'; cat "$f"; } > "corpus/image/seed-$(basename "$f")"; done
cp seeds/labelids-*.png corpus/label_map/
# One CIFAR-10 record (label 3, a gradient) and one CIFAR-100 record (coarse 1, fine 42).
python3 -c 'import sys; sys.stdout.buffer.write(bytes([0, 3]) + bytes(i % 256 for i in range(3072)))' > corpus/cifar/seed-cifar10
python3 -c 'import sys; sys.stdout.buffer.write(bytes([1, 1, 42]) + bytes(i % 251 for i in range(3072)))' > corpus/cifar/seed-cifar100
# Every transform on a 12x10 RGB image with a mask, parameters mid-range.
for k in 0 1 2 3 4 5; do
  python3 -c "import sys; sys.stdout.buffer.write(bytes([$k, 12, 10, 3, 20, 16, 12, 0, 7]) + bytes(range(200)))" > "corpus/transforms/seed-$k"
done

mkdir -p logs
status=0
for t in $targets; do
  mkdir -p "artifacts/$t"
  echo "== $t"
  if cargo +nightly fuzz run ${FUZZ_TARGET_DIR:+--target-dir "$FUZZ_TARGET_DIR"} "$t" "corpus/$t" -- "${limits[@]}" "${budget[@]}" \
      -artifact_prefix="artifacts/$t/" > "logs/$t.log" 2>&1; then
    grep -E "^(#[0-9]+: *DONE|Done [0-9]+ runs)" "logs/$t.log" | tail -1
  else
    status=1
    echo "$t: FAILED (logs/$t.log, artifacts/$t/)"; tail -20 "logs/$t.log"
  fi
done
exit $status
