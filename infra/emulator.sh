#!/usr/bin/env bash
# The local AWS emulator (moto_server) with the default stack's queues and
# tables, for tests and `settle --backend aws` without an AWS account.
#
#   eval "$(infra/emulator.sh up)"   start it (or find it running); prints only export lines
#   infra/emulator.sh down           stop it and remove its state
#
# Progress and errors go to stderr, so that stdout stays eval-able.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="$ROOT/.settle/emulator"
VENV="$ROOT/.venv"

say() { echo "emulator: $*" >&2; }
die() { say "error: $*"; exit 1; }

running() {
    [[ -f "$STATE/pid" && -f "$STATE/port" ]] && kill -0 "$(cat "$STATE/pid")" 2>/dev/null
}

answers() {
    python3 - "$1" <<'PY' 2>/dev/null
import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/moto-api/", timeout=1).read()
PY
}

exports() {
    local port; port="$(cat "$STATE/port")"
    echo "export AWS_ENDPOINT_URL=http://127.0.0.1:$port"
    echo "export AWS_REGION=us-east-1"
    echo "export AWS_ACCESS_KEY_ID=testing"
    echo "export AWS_SECRET_ACCESS_KEY=testing"
    echo "export SETTLE_BACKEND=aws"
    echo "export SETTLE_WORKERS=local"
    # moto loses concurrent writes when it cancels a transaction: the AWS
    # backend serialises its writes around transactions when told to.
    echo "export SETTLE_EMULATOR_WRITE_LOCK=1"
    while IFS= read -r line; do
        [[ -n "$line" ]] && echo "export $line"
    done < "$STATE/env"
}

up() {
    if running; then
        say "already up on port $(cat "$STATE/port")"
        exports
        return
    fi
    if [[ ! -x "$VENV/bin/moto_server" ]]; then
        say "installing the Python tooling (make venv)"
        make -C "$ROOT" venv >&2
    fi
    mkdir -p "$STATE"
    local port
    port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
    say "starting moto_server on 127.0.0.1:$port (log: $STATE/moto.log)"
    "$VENV/bin/moto_server" -H 127.0.0.1 -p "$port" >"$STATE/moto.log" 2>&1 &
    echo $! >"$STATE/pid"
    echo "$port" >"$STATE/port"
    for _ in $(seq 1 100); do
        answers "$port" && break
        kill -0 "$(cat "$STATE/pid")" 2>/dev/null || die "moto_server exited; see $STATE/moto.log"
        sleep 0.1
    done
    answers "$port" || { down; die "moto_server did not answer on port $port within 10 s"; }
    say "creating the default stack's queues and tables (infra/stack.json)"
    "$VENV/bin/python" "$ROOT/infra/provision.py" "http://127.0.0.1:$port" >"$STATE/env" \
        || { down; die "could not create the stack"; }
    exports
}

down() {
    if [[ -f "$STATE/pid" ]]; then
        local pid; pid="$(cat "$STATE/pid")"
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
            say "stopped (pid $pid)"
        fi
    fi
    rm -rf "$STATE"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
