#!/bin/sh
# Installs the SPI into a temporary prefix, builds switch_test.c with a plain cc command through
# pkg-config, and runs it.
set -eu
root="${TEST_SRCDIR:?}/sanreg/spi"
prefix="${TEST_TMPDIR:?}/prefix"
"$root/install" "$prefix"
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
# A sanitizer build of the library (bazel --config=asan/ubsan/tsan) needs the same runtime in the
# program.
san=""
if ldd "$prefix/lib/libsanreg.so" | grep -q libasan; then san="-fsanitize=address"; fi
if ldd "$prefix/lib/libsanreg.so" | grep -q libubsan; then san="$san -fsanitize=undefined"; fi
# Under ThreadSanitizer the program also needs the suppressions every Bazel binary of that config
# gets (libfabric is not instrumented; see bazel/tsan_suppressions.cc), in the executable.
extra=""
if ldd "$prefix/lib/libsanreg.so" | grep -q libtsan; then
  san="$san -fsanitize=thread"
  c++ -c -fsanitize=thread "${TEST_SRCDIR:?}/sanreg/bazel/tsan_suppressions.cc" \
    -o "$TEST_TMPDIR/tsan_suppressions.o"
  extra="$TEST_TMPDIR/tsan_suppressions.o"
fi
cc -std=c99 -Wall -Wextra -Werror $san $(pkg-config --cflags sanreg) "$root/switch_test.c" $extra \
  -o "$TEST_TMPDIR/switch" $(pkg-config --libs sanreg)
# Only the SPI is exported.
exported="$(nm -D --defined-only "$prefix/lib/libsanreg.so" | awk '{print $3}' | grep -v '^_' | sort | tr '\n' ' ')"
echo "exported: $exported"
case "$exported" in
  *sanreg*|*absl*|*fi_*) echo "libsanreg.so exports internals"; exit 1 ;;
esac
echo "$exported" | grep -q WSPStartupEx
"$TEST_TMPDIR/switch"
