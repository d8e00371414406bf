#!/usr/bin/env bash
# Builds sanreg's libFuzzer fuzzers (fuzz/*_fuzzer.cc) with clang, AddressSanitizer and
# UndefinedBehaviorSanitizer, and runs each in turn, one at a time, on its committed seed corpus
# fuzz/corpus/<name>/. No Bazel: the few sources a fuzzer needs are compiled here, Abseil comes
# from Debian through pkg-config. Needs the packages tools/setup.sh installs (clang,
# libclang-rt-14-dev).
#
# Usage: tools/fuzz.sh [-t SECONDS | -r RUNS | --replay] [NAME...]
#   -t SECONDS  fuzz each for SECONDS (libFuzzer -max_total_time; default 60)
#   -r RUNS     fuzz each for RUNS executions (libFuzzer -runs)
#   --replay    only run every committed corpus input once (the regression check)
#   NAME        remote_region, interval_tree, cache, spi (default: all)
# Environment: SANREG_FUZZ_DIR, where objects, binaries, the growing work corpora and any crash
# inputs go (default /tmp/sanreg-fuzz); CXX (default clang++).
#
# Exit status: 0 when no fuzzer found anything; 1 on a finding (the input is saved under
# $SANREG_FUZZ_DIR/artifacts/, and the line to reproduce it is printed); 2 on a usage or build
# error. A finding, once fixed, stays fixed by committing its input to fuzz/corpus/<name>/ (every
# run replays the committed corpus first) or by turning it into a unit test.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=time
budget=60
names=()
while [ $# -gt 0 ]; do
  case "$1" in
    -t) mode=time; budget="${2:?-t needs seconds}"; shift 2 ;;
    -r) mode=runs; budget="${2:?-r needs a count}"; shift 2 ;;
    --replay) mode=replay; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
    *) names+=("$1"); shift ;;
  esac
done

# The sources each fuzzer links besides fuzz/<name>_fuzzer.cc.
declare -A sources=(
  [remote_region]="datapath/remote_region.cc"
  [interval_tree]=""
  [cache]="regcache/cache.cc regcache/internal/hazard.cc regcache/stats_segment.cc
           regcache/memory_monitor.cc regcache/uffd_monitor.cc regcache/memory_events.cc
           regcache/fake_registrar.cc"
)
# The SPI fuzzer links the whole library but the memory hooks (the cache watches memory with
# userfaultfd instead: interposing mmap and munmap under libFuzzer and ASan is not worth the risk).
sources[spi]="spi/spi.cc spi/internal/errors.cc
  datapath/fabric.cc datapath/internal/socket.cc datapath/remote_region.cc
  datapath/libfabric/data_path.cc datapath/libfabric/registrar.cc datapath/libfabric/setup.cc
  datapath/libfabric/liveness.cc
  datapath/verbs/data_path.cc datapath/verbs/setup.cc datapath/verbs/verbs_api.cc
  datapath/verbs/verbs_registrar.cc
  regcache/cache.cc regcache/internal/hazard.cc regcache/stats_segment.cc regcache/memory_monitor.cc
  regcache/uffd_monitor.cc regcache/memory_events.cc regcache/pin_registrar.cc"
all=(remote_region interval_tree cache spi)
# Libraries each fuzzer links besides Abseil and pthread.
declare -A libs=([spi]="-lfabric -libverbs -lrdmacm")
[ ${#names[@]} -eq 0 ] && names=("${all[@]}")
for n in "${names[@]}"; do
  [ -v "sources[$n]" ] || { echo "fuzz.sh: no fuzzer named $n (have: ${all[*]})" >&2; exit 2; }
done

CXX="${CXX:-clang++}"
command -v "$CXX" >/dev/null || { echo "fuzz.sh: $CXX not found: run tools/setup.sh" >&2; exit 2; }
absl_modules="absl_status absl_statusor absl_strings absl_time absl_synchronization"
absl_cflags=$(pkg-config --cflags $absl_modules) || { echo "fuzz.sh: Abseil not found" >&2; exit 2; }
absl_libs=$(pkg-config --libs $absl_modules)

dir="${SANREG_FUZZ_DIR:-/tmp/sanreg-fuzz}"
mkdir -p "$dir/obj" "$dir/bin" "$dir/artifacts"
# The project's warning flags (bazel/copts.bzl), plus the sanitizers.
cxxflags=(-std=c++20 -Wall -Wextra -Werror -Wno-unused-parameter -fno-strict-aliasing
          -O1 -g -fno-omit-frame-pointer -fno-sanitize-recover=undefined -I. $absl_cflags
          -DSANREG_SPI_BUILD)
san=address,undefined

# True when $1 is missing or older than any source or header it may depend on.
stale() {
  [ ! -e "$1" ] && return 0
  [ -n "$(find fuzz regcache datapath spi -name '*.h' -newer "$1" -print -quit)" ] && return 0
  for s in "${@:2}"; do [ "$s" -nt "$1" ] && return 0; done
  return 1
}

build() {
  local n=$1 objs=() src obj bin="$dir/bin/${n}_fuzzer"
  for src in ${sources[$n]}; do
    obj="$dir/obj/${src//\//_}.o"
    if stale "$obj" "$src"; then
      echo "fuzz.sh: compiling $src"
      "$CXX" "${cxxflags[@]}" -fsanitize=fuzzer-no-link,$san -c "$src" -o "$obj"
    fi
    objs+=("$obj")
  done
  if stale "$bin" "fuzz/${n}_fuzzer.cc" "${objs[@]}" "$0"; then
    echo "fuzz.sh: linking ${n}_fuzzer"
    "$CXX" "${cxxflags[@]}" -fsanitize=fuzzer,$san "fuzz/${n}_fuzzer.cc" "${objs[@]}" \
      $absl_libs ${libs[$n]:-} -lpthread -o "$bin"
  fi
}

for n in "${names[@]}"; do
  build "$n" || { echo "fuzz.sh: building ${n}_fuzzer failed" >&2; exit 2; }
done

export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1}"
status=0
summary=()
for n in "${names[@]}"; do
  bin="$dir/bin/${n}_fuzzer"
  seeds="fuzz/corpus/$n"
  log="$dir/${n}.log"
  case $mode in
    time) limit=(-max_total_time="$budget") ;;
    runs) limit=(-runs="$budget") ;;
  esac
  start=$(date +%s)
  if [ "$mode" = replay ]; then
    echo "fuzz.sh: ${n}: replaying $(ls "$seeds" | wc -l) inputs of $seeds"
    set +e
    "$bin" "$seeds"/* >"$log" 2>&1
  else
    work="$dir/corpus/$n"  # new inputs go here; the committed seeds are only read
    mkdir -p "$work"
    echo "fuzz.sh: ${n}: ${limit[*]} on $seeds (log: $log)"
    set +e
    "$bin" "${limit[@]}" -timeout=60 -print_final_stats=1 \
      -artifact_prefix="$dir/artifacts/${n}-" "$work" "$seeds" >"$log" 2>&1
  fi
  rc=$?
  set -e
  secs=$(( $(date +%s) - start ))
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
  if [ $rc -ne 0 ]; then
    status=1
    echo "fuzz.sh: ${n}: FINDING (exit $rc); the end of $log:" >&2
    tail -n 40 "$log" >&2
    artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
    [ -n "$artifact" ] && echo "fuzz.sh: reproduce with: $bin $artifact" >&2
    summary+=("$n: FINDING after ${secs}s")
  elif [ "$mode" = replay ]; then
    summary+=("$n: $(ls "$seeds" | wc -l) inputs replayed in ${secs}s")
  else
    summary+=("$n: ${execs:-?} executions, ${rate:-?} exec/s, ${secs}s")
  fi
done
printf 'fuzz.sh: %s\n' "${summary[@]}"
exit $status
