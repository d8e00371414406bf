#!/usr/bin/env bash
# The CI job (.ci/run): installs the packages, runs the README's test command, then every test
# again under AddressSanitizer, UndefinedBehaviorSanitizer and ThreadSanitizer, then each fuzzer
# for a bounded time on its committed corpus. Every stage runs even when an earlier one failed;
# the job fails when any did. Prints each stage's time at the end.
#
# Usage: tools/ci.sh [--fuzz-seconds N] [STAGE...]
#   STAGE: default, asan, ubsan, tsan, fuzz (default: all, in that order)
#   --fuzz-seconds N: how long each fuzzer runs (default 30)
set -uo pipefail
cd "$(dirname "$0")/.."

fuzz_seconds=30
stages=()
while [ $# -gt 0 ]; do
  case "$1" in
    --fuzz-seconds) fuzz_seconds="${2:?--fuzz-seconds needs a number}"; shift 2 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    default|asan|ubsan|tsan|fuzz) stages+=("$1"); shift ;;
    *) echo "ci.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ ${#stages[@]} -eq 0 ] && stages=(default asan ubsan tsan fuzz)

bash tools/setup.sh || { echo "ci.sh: setup failed" >&2; exit 1; }

summary=()
failed=0
run_stage() {
  local name="$1"
  shift
  echo "=== ci: ${name}: $*"
  local t0=$SECONDS
  "$@"
  local rc=$?
  local line
  line=$(printf '%-8s %-6s %5d s   %s' "$name" "$([ $rc -eq 0 ] && echo ok || echo FAILED)" \
    $((SECONDS - t0)) "$*")
  summary+=("$line")
  echo "=== ci: $line"
  [ $rc -eq 0 ] || failed=1
}

for s in "${stages[@]}"; do
  case "$s" in
    default) run_stage default bazel test //... ;;  # the README's test command
    asan|ubsan|tsan) run_stage "$s" bazel test --config="$s" //... ;;
    fuzz) run_stage fuzz bash tools/fuzz.sh -t "$fuzz_seconds" ;;
  esac
done

echo
echo "=== ci: summary (total $SECONDS s)"
printf '%s\n' "${summary[@]}"
exit $failed
