#!/usr/bin/env bash
# Runs the openai-package client tests against `llmdoctor serve` with the real patient and a
# random test doctor. It builds the binary, installs `openai` into a virtual environment and
# starts the server on a free loopback port. After the tests it stops the server with SIGTERM
# and checks that it exits with status 0.
#
# Environment: CARGO_TARGET_DIR (default: target), LLMDOCTOR_PY_VENV (default: a folder under
# the target directory), LLMDOCTOR_MODEL (default: the fetched patient, fetched if missing).
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
venv="${LLMDOCTOR_PY_VENV:-$target/python-venv}"
work="$(mktemp -d)"
server_pid=""

cleanup() {
    if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

(cd "$root" && cargo build --bin llmdoctor)
# A copy, so that another build into a shared target directory cannot replace it mid-run.
binary="$work/llmdoctor"
cp "$target/debug/llmdoctor" "$binary"

if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade "openai>=1.40"

python3 "$root/tests/python/make_doctor.py" "$work/doctors" tester
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"

"$binary" serve --host 127.0.0.1 --port "$port" --doctors-dir "$work/doctors" \
    --served-model-name smollm2 >"$work/server.log" 2>&1 &
server_pid=$!

url="http://127.0.0.1:$port"
for _ in $(seq 1 600); do
    if curl -fsS "$url/health" >/dev/null 2>&1; then
        break
    fi
    if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "the server exited during start-up:" >&2
        cat "$work/server.log" >&2
        exit 1
    fi
    sleep 0.5
done

status=0
LLMDOCTOR_URL="$url" LLMDOCTOR_DOCTOR=tester "$venv/bin/python" "$root/tests/python/test_openai_client.py" || status=$?

kill -TERM "$server_pid"
server_status=0
wait "$server_pid" || server_status=$?
server_pid=""
if [[ "$server_status" -ne 0 ]]; then
    echo "the server exited with status $server_status after SIGTERM:" >&2
    tail -n 40 "$work/server.log" >&2
    exit 1
fi
exit "$status"
