#!/usr/bin/env bash
# Installs everything sanreg's build, tests, benchmarks and tools need, from Debian's archive.
# Idempotent: runs `apt-get update` only when a package is missing. Fails loudly.
set -euo pipefail

packages=(
  bazel-bootstrap
  g++
  libabsl-dev
  libtbb-dev
  libibverbs-dev
  librdmacm-dev
  libfabric-dev
  libfabric-bin
  libgtest-dev
  libgmock-dev
  libbenchmark-dev
  libucx-dev
  ucx-utils
  iproute2
  procps
  gnuplot-nox
  clang
  libclang-rt-14-dev
  pkg-config
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#packages[@]} packages present"
  exit 0
fi

echo "setup: installing ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then
  SUDO=sudo
else
  SUDO=
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q || { echo "setup: apt-get update failed" >&2; exit 1; }
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" || {
  echo "setup: apt-get install failed for: ${missing[*]}" >&2
  exit 1
}
echo "setup: done"
