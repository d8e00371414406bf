#!/bin/sh
# Installs the SPI for providers built outside Bazel: bazel run //spi:install -- PREFIX
#   PREFIX/include/sanreg/ws2san.h, PREFIX/lib/libsanreg.so, PREFIX/lib/pkgconfig/sanreg.pc
set -eu
prefix="${1:?usage: install PREFIX}"
here="$(dirname "$0")"
runfiles="${RUNFILES_DIR:-$0.runfiles}/sanreg/spi"
[ -d "$runfiles" ] || runfiles="$here"
mkdir -p "$prefix/include/sanreg" "$prefix/lib/pkgconfig"
install -m 0644 "$runfiles/ws2san.h" "$prefix/include/sanreg/ws2san.h"
install -m 0755 "$runfiles/libsanreg.so" "$prefix/lib/libsanreg.so"
sed "s|@PREFIX@|$prefix|" "$runfiles/sanreg.pc.in" > "$prefix/lib/pkgconfig/sanreg.pc"
echo "installed sanreg into $prefix"
