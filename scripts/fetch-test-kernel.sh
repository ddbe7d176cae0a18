#!/usr/bin/env bash
# Unpacks Debian's current amd64 kernel into a folder for the Linux boot test, WITHOUT
# installing it as this machine's kernel: `apt-get download` fetches the .deb that the
# `linux-image-amd64` metapackage depends on, and `dpkg-deb -x` unpacks it.
#
# Usage: scripts/fetch-test-kernel.sh [DIR]     (default: target/test-kernel in the workspace)
# Prints the path of the unpacked vmlinuz on stdout (and nothing else there). Idempotent: if
# DIR already holds a vmlinuz, nothing is downloaded.
# The boot test (integration/tests/linux_boot.rs) looks in the same default folder, or takes
# the kernel's path from the environment variable VCPU_TEST_KERNEL.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${1:-$root/target/test-kernel}"

find_vmlinuz() {
    if [ -d "$dir/boot" ]; then
        find "$dir/boot" -maxdepth 1 -type f -name 'vmlinuz-*' | sort | tail -n 1
    fi
}

existing="$(find_vmlinuz)"
if [ -n "$existing" ]; then
    echo "fetch-test-kernel: already unpacked, nothing to do" >&2
    echo "$existing"
    exit 0
fi

# The versioned image package the metapackage depends on, e.g. linux-image-6.1.0-56-amd64.
resolve() {
    apt-cache depends linux-image-amd64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }'
}
pkg="$(resolve || true)"
if [ -z "$pkg" ]; then
    echo "fetch-test-kernel: linux-image-amd64 unknown to apt-cache, running apt-get update" >&2
    apt-get update -qq >&2
    pkg="$(resolve || true)"
fi
if [ -z "$pkg" ]; then
    echo "fetch-test-kernel: cannot resolve the package linux-image-amd64 depends on;" \
        "is this a Debian amd64 system with an amd64 apt source?" >&2
    exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "fetch-test-kernel: downloading $pkg" >&2
(cd "$work" && apt-get download -q "$pkg" >&2) || {
    echo "fetch-test-kernel: apt-get download $pkg failed, running apt-get update" >&2
    apt-get update -qq >&2
    (cd "$work" && apt-get download -q "$pkg" >&2)
}
deb="$(find "$work" -maxdepth 1 -name '*.deb' | head -n 1)"
if [ -z "$deb" ]; then
    echo "fetch-test-kernel: apt-get download $pkg produced no .deb" >&2
    exit 1
fi

# Unpack next to the final folder, then move it into place, so that an interrupted run
# never leaves a half-unpacked folder that looks complete.
mkdir -p "$(dirname "$dir")"
staging="$(mktemp -d "$(dirname "$dir")/.test-kernel.XXXXXX")"
dpkg-deb -x "$deb" "$staging"
# The boot test needs only boot/; the module tree is most of the 400 MiB.
rm -rf "$staging/lib" "$staging/usr"
rm -rf "$dir"
mv "$staging" "$dir"

vmlinuz="$(find_vmlinuz)"
if [ -z "$vmlinuz" ]; then
    echo "fetch-test-kernel: $deb holds no boot/vmlinuz-*" >&2
    exit 1
fi
echo "fetch-test-kernel: unpacked $pkg into $dir" >&2
echo "$vmlinuz"
