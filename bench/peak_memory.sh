#!/usr/bin/env bash
# Peak resident memory of DEQ training against the solver thresholds (issue: Performance, item 5).
# Trains the Fashion-MNIST recipe without its Jacobian penalty (-plain) straight in DEQ mode (no pretraining) for a few steps, once per
# F_THRES = B_THRES value, each in its own process, and prints the peak RSS that GNU time reports.
# Usage: bench/peak_memory.sh [steps] [thresholds...]   (defaults: 6 steps; 10 40)
# MAX_PAIRS=N caps Broyden's history at N update pairs (f_solver/b_solver = { kind = "broyden", max_pairs = N }).
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-6}
shift || true
thresholds=("$@")
[ ${#thresholds[@]} -eq 0 ] && thresholds=(10 40)
cargo build --release -q -p mdeq
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf '%-8s %-14s %s\n' thres peak_rss_MiB seconds
for t in "${thresholds[@]}"; do
  sed -e "s/^f_thres = .*/f_thres = $t/" -e "s/^b_thres = .*/b_thres = $t/" \
      -e "s/^pretrain_steps = .*/pretrain_steps = 0/" -e 's/^eps = .*/eps = 1e-12/' \
      ${MAX_PAIRS:+-e "s/^\([fb]_solver\) = .*/\1 = { kind = \"broyden\", max_pairs = $MAX_PAIRS }/"} \
      configs/fashion-mnist-tiny-plain.toml > "$tmp/recipe.toml"
  start=$(date +%s.%N)
  /usr/bin/time -f '%M' -o "$tmp/rss" ./target/release/mdeq train --config "$tmp/recipe.toml" \
      --out "$tmp/run-$t" --max-steps "$steps" --eval-limit 128 --log-every 1000 >/dev/null 2>&1
  end=$(date +%s.%N)
  printf '%-8s %-14s %.1f\n' "$t" "$(( $(cat "$tmp/rss") / 1024 ))" "$(echo "$end - $start" | bc)"
done
