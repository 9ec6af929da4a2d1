#!/usr/bin/env bash
# Runs every test: fetches the default model (the end-to-end tests use it), then the Rust unit
# and integration tests. Works from a clean clone; needs cargo, python3 and pip.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --locked --bins
cargo run --locked --quiet -- fetch-model --quiet
cargo test --locked -- --test-threads 2
