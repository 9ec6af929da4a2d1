#!/usr/bin/env bash
# Runs every test: fetches the default model (the end-to-end tests use it), runs the Rust unit
# and integration tests, then the official `openai` Python client against a real server.
# Works from a clean clone; needs cargo, python3 with pip and venv, and curl.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --locked --bins
cargo run --locked --quiet -- fetch-model --quiet
cargo test --locked -- --test-threads 2
bash tests/python/run.sh
