#!/usr/bin/env bash
# Unpacks Debian's current amd64 kernel into a folder for the Linux boot test, WITHOUT
# installing it as this machine's kernel: `apt-get download` fetches the .deb that the
# `linux-image-amd64` metapackage depends on, and `dpkg-deb -x` unpacks it.
#
# It also extracts the uncompressed ELF vmlinux from the bzImage's payload, next to it, as
# boot/vmlinux-VERSION: on hosts where KVM emulates guest kernel code (PVM, see
# docs/host-notes.md) the bzImage's self-decompression alone takes many minutes, while
# the ELF starts at once.
#
# Usage: scripts/fetch-test-kernel.sh [DIR]     (default: target/test-kernel in the workspace)
# Prints the path of the unpacked vmlinuz on stdout (and nothing else there). Idempotent: if
# DIR already holds a vmlinuz (and its vmlinux), nothing is downloaded.
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

# Writes boot/vmlinux-VERSION from boot/vmlinuz-VERSION ($1): the payload's offset and length
# are in the setup header (payload_offset at 0x248, payload_length at 0x24c, both from the
# start of the protected-mode code, which follows (setup_sects + 1) * 512 bytes).
extract_vmlinux() {
    local vmlinuz="$1" vmlinux setup_sects setup offset length magic tmp
    vmlinux="${vmlinuz/vmlinuz-/vmlinux-}"
    [ -s "$vmlinux" ] && return 0
    setup_sects=$(od -An -tu1 -j $((0x1f1)) -N1 "$vmlinuz" | tr -d ' ')
    [ "$setup_sects" = 0 ] && setup_sects=4
    setup=$(( (setup_sects + 1) * 512 ))
    offset=$(od -An -tu4 -j $((0x248)) -N4 "$vmlinuz" | tr -d ' ')
    length=$(od -An -tu4 -j $((0x24c)) -N4 "$vmlinuz" | tr -d ' ')
    payload() {
        dd if="$vmlinuz" bs=64K iflag=skip_bytes,count_bytes skip=$((setup + offset)) \
            count="$length" status=none
    }
    magic=$(od -An -tx1 -j $((setup + offset)) -N6 "$vmlinuz" | tr -d ' \n')
    tmp="$vmlinux.partial"
    case "$magic" in
        fd377a585a00) payload | xz -dc --single-stream >"$tmp" ;;
        28b52ffd*) payload | zstd -dcq >"$tmp" ;;
        1f8b*) { payload | gzip -dc >"$tmp"; } 2>/dev/null || true ;;
        *)
            echo "fetch-test-kernel: unknown payload compression (magic $magic);" \
                "no vmlinux extracted" >&2
            return 0
            ;;
    esac
    if [ "$(od -An -tx1 -N4 "$tmp" | tr -d ' \n')" != 7f454c46 ]; then
        echo "fetch-test-kernel: the payload of $vmlinuz is not an ELF; no vmlinux" >&2
        rm -f "$tmp"
        return 0
    fi
    mv "$tmp" "$vmlinux"
    echo "fetch-test-kernel: extracted $vmlinux" >&2
}

existing="$(find_vmlinuz)"
if [ -n "$existing" ]; then
    extract_vmlinux "$existing"
    echo "fetch-test-kernel: already unpacked, nothing to download" >&2
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
extract_vmlinux "$vmlinuz"
echo "$vmlinuz"
