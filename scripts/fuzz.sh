#!/usr/bin/env bash
# Builds and runs every cargo-fuzz target in turn, then prints one summary line per target.
#
#   scripts/fuzz.sh [seconds-per-target] [target ...]     (default: 600 s, every target)
#
# Each target runs alone (one after the other) under `nice -n 10`, starting from its seed corpus
# (real encoded values, written by each fuzz crate's `seeds` example) plus whatever earlier runs
# left in `<crate>/corpus/<target>`. Crashes land in `<crate>/artifacts/<target>/`; minimise one
# with `cargo +nightly fuzz tmin <target> <file>` and commit it as a regression test of the crate
# that owns the decoder. Needs the nightly toolchain and cargo-fuzz. Exit status: 1 if any target
# found something. Logs: $FUZZ_LOG_DIR (default target/fuzz-logs).
#
# The targets are built from a snapshot of HEAD (git archive), so uncommitted edits in a shared
# working tree neither break the build halfway through nor blur which commit was fuzzed; corpora
# and artifacts stay in the working tree. FUZZ_WORKTREE=1 fuzzes the working tree as it is.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
seconds="${1:-600}"
shift || true
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target/fuzz}"
log_dir="${FUZZ_LOG_DIR:-$root/target/fuzz-logs}"
mkdir -p "$log_dir"

# crate directory -> its targets, one target per decoder family.
declare -A crate_targets=(
  [core/fuzz]="frame_decoder event_batch firmware_link ledger_records shadow_sync"
  [cloud/fuzz]="http_bodies sqlite_segment"
)
crate_order=(core/fuzz cloud/fuzz)

wanted=("$@")
is_wanted() {
  [[ ${#wanted[@]} -eq 0 ]] && return 0
  local name
  for name in "${wanted[@]}"; do [[ "$name" == "$1" ]] && return 0; done
  return 1
}

# The commit the run builds (a working tree with uncommitted changes is marked "+dirty").
commit="$(git -C "$root" rev-parse --short HEAD)"
if [[ "${FUZZ_WORKTREE:-0}" == 1 ]]; then
  src="$root"
  git -C "$root" diff --quiet HEAD -- . 2>/dev/null || commit="$commit+dirty"
else
  src="$(mktemp -d "${TMPDIR:-/tmp}/tidesync-fuzz.XXXXXX")"
  trap 'rm -rf "$src"' EXIT
  git -C "$root" archive HEAD | tar -x -C "$src"
  for crate in "${crate_order[@]}"; do
    mkdir -p "$root/$crate/corpus" "$root/$crate/artifacts"
    ln -s "$root/$crate/corpus" "$src/$crate/corpus"
    ln -s "$root/$crate/artifacts" "$src/$crate/artifacts"
  done
fi
started="$(date -u +%F)"
summary=()
found=0
for crate in "${crate_order[@]}"; do
  targets=()
  for target in ${crate_targets[$crate]}; do
    is_wanted "$target" && targets+=("$target")
  done
  [[ ${#targets[@]} -eq 0 ]] && continue
  cd "$src/$crate"
  echo "== building $crate" >&2
  nice -n 10 cargo +nightly fuzz build -O --target-dir "$CARGO_TARGET_DIR" >&2
  nice -n 10 cargo +nightly run -q --example seeds -- corpus >&2
  for target in "${targets[@]}"; do
    mkdir -p "artifacts/$target" "corpus/$target"
    before="$(ls "artifacts/$target" | sort)"
    log="$log_dir/$target.log"
    echo "== $target: ${seconds} s, log $log" >&2
    start=$(date +%s)
    status=0
    nice -n 10 cargo +nightly fuzz run "$target" -O --target-dir "$CARGO_TARGET_DIR" "corpus/$target" -- \
      -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1 || status=$?
    elapsed=$(( $(date +%s) - start ))
    stat() { grep -m1 "^stat::$1:" "$log" | awk '{print $2}' || true; }
    execs="$(stat number_of_executed_units)"
    rate="$(stat average_exec_per_sec)"
    rss="$(stat peak_rss_mb)"
    new="$(comm -13 <(echo "$before") <(ls "artifacts/$target" | sort) | grep -v '^$' | tr '\n' ' ' || true)"
    if [[ $status -ne 0 || -n "$new" ]]; then
      found=1
      findings="FOUND (exit $status): ${new:-see log}"
    else
      findings="none"
    fi
    summary+=("$target: ${execs:-?} executions (${rate:-?}/s) in ${elapsed} s, peak RSS ${rss:-?} MB, crashes: $findings")
  done
done

echo
echo "fuzz summary ($started, commit $commit, ${seconds} s per target):"
printf '%s\n' "${summary[@]}"
exit $found
