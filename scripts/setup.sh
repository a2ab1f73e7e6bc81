#!/usr/bin/env bash
# Sets up everything pylb needs on Debian 12, as root, from a fresh clone:
# Debian packages, the virtual environment, the C shim (CMake), the cffi
# module, and hugepages where the machine allows. Idempotent: steps whose
# inputs did not change are skipped, so a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
say() { printf 'setup: %s\n' "$*"; }

APT_PACKAGES=(libdpdk-dev dpdk pkg-config libpcap-dev cmake gcc make python3 python3-dev python3-venv
              iproute2 procps nftables tcpdump)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.pylb-deps
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing Python packages"
  if ! .venv/bin/pip install -q -e ".[test]" > .venv/pip.log 2>&1; then
    cat .venv/pip.log; say "pip install failed"; exit 1
  fi
  echo "$want" > "$stamp"
fi

say "building native/ (CMake)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$(nproc)" 2>&1 | grep -Ev '^\[|^Consolidate|^-- ' || true
test -f build/libpylb_native.so || { say "native build failed"; exit 1; }

ffi_stamp=build/.ffi-stamp
ffi_want=$(cat native/pylb.h pylb/_build_ffi.py | sha256sum | cut -d' ' -f1)
if [ "$(cat "$ffi_stamp" 2>/dev/null)" != "$ffi_want" ] || [ ! -f pylb/_native.so ]; then
  say "building the cffi module"
  .venv/bin/python pylb/_build_ffi.py build
  echo "$ffi_want" > "$ffi_stamp"
fi

# Hugepages: 2 MiB pages, mounted at /dev/hugepages. Where the kernel refuses
# (containers), pylb runs DPDK with --no-huge and says so once at start.
# 4 GiB by default: `pylb bench` holds 10M flows in a 2 GiB flow cache
# (bench/README.md) while tests and balancers take their own.
HUGEPAGES=${PYLB_HUGEPAGES:-2048}
if [ -w /proc/sys/vm/nr_hugepages ]; then
  have=$(cat /proc/sys/vm/nr_hugepages)
  if [ "$have" -lt "$HUGEPAGES" ]; then
    echo "$HUGEPAGES" > /proc/sys/vm/nr_hugepages 2>/dev/null || true
  fi
  mountpoint -q /dev/hugepages 2>/dev/null || {
    mkdir -p /dev/hugepages
    mount -t hugetlbfs nodev /dev/hugepages 2>/dev/null || true
  }
fi
got=$(awk '/HugePages_Total/ {print $2}' /proc/meminfo)
if [ "${got:-0}" -gt 0 ] && mountpoint -q /dev/hugepages 2>/dev/null; then
  say "hugepages: $got x 2 MiB reserved"
else
  say "hugepages: none could be reserved; DPDK will run with --no-huge"
fi
say "ready"
