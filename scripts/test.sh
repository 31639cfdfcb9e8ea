#!/usr/bin/env bash
# The test command: sets up the Python reference tools and the real assets (both cached),
# then runs every Rust test, conformance and real-model tests included.
#   scripts/test.sh [extra cargo test args]
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
bash scripts/setup-python.sh
bash scripts/fetch-assets.sh all
cargo test --workspace --all-targets --no-fail-fast "$@"
# --all-targets leaves out the examples in the docs.
cargo test --workspace --doc "$@"
