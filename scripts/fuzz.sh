#!/usr/bin/env bash
# Coverage-guided fuzzing of the fuzz/ targets (cargo-fuzz, libFuzzer), one target or all:
#   scripts/fuzz.sh [TARGET|all] [SECONDS]      (defaults: all, 600 s per target)
# Targets: the [[bin]]s of fuzz/Cargo.toml. Each runs from its seeds (fuzz/seeds/TARGET, if
# any) and its growing corpus (fuzz/corpus/TARGET, git-ignored) with `--sanitizer none`, so a
# stable toolchain will do (the address sanitizer needs a nightly compiler); a crash leaves its
# input in fuzz/artifacts/TARGET/. cargo-fuzz is installed into ~/.cargo/bin if missing
# (`cargo install cargo-fuzz --locked`). Not part of scripts/test.sh: a long run of its own.
# Ends with one line per target: `fuzz TARGET: N executions, cov C, ft F, corpus K, crashes X`
# (libFuzzer's final stats), then exits non-zero if any target crashed.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

TARGET=${1:-all}
SECONDS_EACH=${2:-600}
[[ "$SECONDS_EACH" =~ ^[0-9]+$ ]] || { echo "usage: $0 [TARGET|all] [SECONDS]" >&2; exit 2; }

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz into ~/.cargo/bin" >&2
  cargo install --quiet --locked cargo-fuzz
fi

mapfile -t all < <(sed -n '/^\[\[bin\]\]/,/^name/ s/^name = "\(.*\)"/\1/p' Cargo.toml)
if [ "$TARGET" = all ]; then
  targets=("${all[@]}")
else
  printf '%s\n' "${all[@]}" | grep -qx "$TARGET" ||
    { echo "fuzz: no target $TARGET (targets: ${all[*]})" >&2; exit 2; }
  targets=("$TARGET")
fi

log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT
summary=()
crashed=0
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  dirs=("corpus/$t")
  [ -d "seeds/$t" ] && dirs+=("seeds/$t")
  echo "== fuzz $t for ${SECONDS_EACH} s" >&2
  status=0
  # libFuzzer's own bound: -max_total_time; the build before it is not counted. Inputs up to
  # 64 KiB (past the largest bounded read the targets model, 16 KiB).
  cargo fuzz run --sanitizer none "$t" "${dirs[@]}" -- -max_total_time="$SECONDS_EACH" \
    -max_len=65536 -print_final_stats=1 2>&1 | tee "$log/$t" >&2 || status=$?
  stat() { awk -v k="$1" '$1 == "stat::"k":" { v = $2 } END { print v + 0 }' "$log/$t"; }
  last=$(grep -E '^#[0-9]+' "$log/$t" | tail -n 1 || true)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corpus=$(sed -n 's/.* corp: \([0-9]*\)\/.*/\1/p' <<<"$last")
  crashes=0
  if [ "$status" -ne 0 ]; then
    crashes=1
    crashed=1
    grep -E 'Test unit written to|panicked at' "$log/$t" >&2 || true
  fi
  summary+=("fuzz $t: $(stat number_of_executed_units) executions, cov ${cov:-?}, ft ${ft:-?},\
 corpus ${corpus:-?}, crashes $crashes")
done
printf '%s\n' "${summary[@]}"
exit "$crashed"
