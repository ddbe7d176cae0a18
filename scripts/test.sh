#!/usr/bin/env bash
# Runs every test of the workspace: one build, then the test binaries.
# Tests that need /dev/kvm skip loudly without it, and fail instead when VCPU_REQUIRE_KVM=1.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast "$@"
