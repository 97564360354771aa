#!/usr/bin/env bash
# The local AWS emulator (moto_server) with the default stack's queues and
# tables, for tests and `settle --backend aws` without an AWS account; with
# --deployed, also the stack's three Lambda functions, run for real.
#
#   eval "$(infra/emulator.sh up)"              start it (or find it running); prints only export lines
#   eval "$(infra/emulator.sh up --deployed)"   the offline stack: moto, plus the dispatcher, worker and
#                                               reducer binaries (as `cargo test --workspace` builds
#                                               them) behind the Lambda APIs of `cargo lambda watch`,
#                                               fed by infra/esm.py (event source mappings, schedule)
#   infra/emulator.sh down                      stop all of it and remove its state
#
# SETTLE_EMULATOR_DIR (default .settle/emulator) holds its state and logs,
# so that separate instances (a test's own stack) do not collide.
# The offline stack's settings, from the environment (template.yaml's values
# unless noted):
#   SETTLE_STACK_TICK_SECONDS          the dispatcher's schedule (default 60; 0: no ticks)
#   SETTLE_STACK_VISIBILITY            the work and results queues' visibility timeout
#                                      (default 10 s, not 180: a failed batch comes back in seconds)
#   SETTLE_STACK_WORKER_CONCURRENCY    worker instances, so invocations at once (default 2)
#   SETTLE_STACK_REDUCER_CONCURRENCY   reducer instances (default 1: moto, see docs/lambda.md)
#   SETTLE_STACK_INVOKE_TIMEOUT_SECONDS  how long the ESM waits for a worker's or reducer's answer
#                                      before it leaves the batch to its visibility (default 60)
#   SETTLE_STACK_READY_SECONDS         how long `up` waits, once built, for the functions to
#                                      answer (default 120)
#   SETTLE_ITEM_TIMEOUT_MS, SETTLE_RETRY_DELAY_MS, SETTLE_MAX_RECEIVES,
#   SETTLE_TOLERATED_FAILURE_PERCENT, SETTLE_DISPATCH_MARGIN_MS   the functions' settings
#   SETTLE_PROCESSOR, SETTLE_HTTP_URL, SETTLE_HTTP_SECRET, SETTLE_HTTP_SECRET_HEADER,
#   SETTLE_FUNCTION_NAME               passed through to the worker as they are
#   SETTLE_STACK_EXTRA_FUNCTIONS       more functions, "NAME=EXECUTABLE ...", one instance each
#                                      (e.g. a user's function for SETTLE_FUNCTION_NAME); the watch
#                                      serves only names of binary targets of this workspace
#
# Progress and errors go to stderr, so that stdout stays eval-able.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${SETTLE_EMULATOR_DIR:-$ROOT/.settle/emulator}"
VENV="$ROOT/.venv"
REGION=us-east-1

say() { echo "emulator: $*" >&2; }
die() { say "error: $*"; exit 1; }

alive() { [[ -f "$STATE/$1" ]] && kill -0 "$(cat "$STATE/$1")" 2>/dev/null; }

running() { [[ -f "$STATE/port" ]] && alive pid; }

# Whether process $1 still runs: an exited one whose parent (init, once this
# script is gone) has not reaped it yet does not.
runs() {
    local stat
    stat="$(ps -o stat= -p "$1" 2>/dev/null)" || return 1
    [[ -n "$stat" && "$stat" != Z* ]]
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
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
    echo "export AWS_REGION=$REGION"
    echo "export AWS_ACCESS_KEY_ID=testing"
    echo "export AWS_SECRET_ACCESS_KEY=testing"
    echo "export SETTLE_BACKEND=aws"
    if [[ -f "$STATE/lambda_port" ]]; then
        echo "export SETTLE_WORKERS=deployed"
        echo "export AWS_ENDPOINT_URL_LAMBDA=http://127.0.0.1:$(cat "$STATE/lambda_port")"
    else
        echo "export SETTLE_WORKERS=local"
    fi
    # moto loses concurrent writes when it cancels a transaction: the AWS
    # backend serialises its writes around transactions when told to.
    echo "export SETTLE_EMULATOR_WRITE_LOCK=1"
    while IFS= read -r line; do
        [[ -n "$line" ]] && echo "export $line"
    done < "$STATE/env"
}

start_moto() {
    local port visibility=()
    port="$(free_port)"
    [[ -n "${1:-}" ]] && visibility=(--visibility "$1")
    say "starting moto_server on 127.0.0.1:$port (log: $STATE/moto.log)"
    "$VENV/bin/moto_server" -H 127.0.0.1 -p "$port" >"$STATE/moto.log" 2>&1 &
    echo $! >"$STATE/pid"
    echo "$port" >"$STATE/port"
    for _ in $(seq 1 100); do
        answers "$port" && break
        alive pid || die "moto_server exited; see $STATE/moto.log"
        sleep 0.1
    done
    answers "$port" || { down; die "moto_server did not answer on port $port within 10 s"; }
    say "creating the default stack's queues and tables (infra/stack.json)"
    "$VENV/bin/python" "$ROOT/infra/provision.py" "http://127.0.0.1:$port" "${visibility[@]}" >"$STATE/env" \
        || { down; die "could not create the stack"; }
}

# One invoke through the Lambda Invoke API of `cargo lambda watch`; succeeds
# when the function answered without an error.
invoke() {
    python3 - "$1" "$2" "$3" <<'PY' 2>/dev/null
import sys, urllib.request
port, fn, payload = sys.argv[1:]
req = urllib.request.Request(f"http://127.0.0.1:{port}/2015-03-31/functions/{fn}/invocations",
                             data=payload.encode(), method="POST",
                             headers={"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=10) as r:
    body = r.read()
    if r.headers.get("X-Amz-Function-Error") or b"errorType" in body:
        sys.exit(1)
PY
}

# Variables cargo sets for a test or a build script. A cargo command that
# inherited them (this script started by a test) would see a changed
# CARGO_MANIFEST_DIR and rerun ring's build script, rebuilding the AWS SDK
# above it. The profile settings (CARGO_PROFILE_*), CARGO_HOME and
# CARGO_TARGET_DIR stay: they choose the build to reuse.
clean_cargo_env() {
    local v
    for v in $(compgen -e); do
        case "$v" in
            CARGO_MANIFEST_*|CARGO_PKG_*|CARGO_CRATE_NAME|CARGO_BIN_*|CARGO_PRIMARY_PACKAGE|\
            CARGO_TARGET_TMPDIR|CARGO_RUSTC_CURRENT_DIR) unset "$v" ;;
        esac
    done
}

# The function binaries as `cargo test --workspace` (what `make test` runs)
# builds them: the same invocation unifies the same features, so the stack
# reuses the tests' build instead of compiling the AWS SDK a second time
# (a plain `cargo build -p settle-lambda` would). Writes "NAME PATH" lines.
build_functions() {
    say "building the functions as make test does (cargo test --workspace --no-run; log: $STATE/build.log)"
    (
        clean_cargo_env
        cd "$ROOT"
        cargo test --workspace --no-run --message-format=json-render-diagnostics 2>"$STATE/build.log"
    ) | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    t = m.get("target", {})
    # The binaries themselves, not their unit-test executables.
    if (m.get("reason") == "compiler-artifact" and m.get("executable") and t.get("kind") == ["bin"]
            and not m.get("profile", {}).get("test")
            and t.get("name") in ("dispatcher", "worker", "reducer")
            and "settle-lambda" in m.get("package_id", "")):
        print(t["name"], m["executable"])
' >"$STATE/bins" || true
    [[ "$(wc -l <"$STATE/bins")" -eq 3 ]] || { down_keep_logs; die "could not build the functions; see $STATE/build.log"; }
}

# One execution environment of function $1 (binary $2): polls the watch's
# Runtime API for its invocations. Lambda starts a fresh environment when
# one dies; so does this, a second later.
start_instance() {
    local fn="$1" bin="$2" lport
    lport="$(cat "$STATE/lambda_port")"
    (
        export AWS_LAMBDA_RUNTIME_API="http://127.0.0.1:$lport/.rt/$fn"
        export AWS_LAMBDA_FUNCTION_NAME="$fn" AWS_LAMBDA_FUNCTION_VERSION=1
        # template.yaml's MemorySize.
        export AWS_LAMBDA_FUNCTION_MEMORY_SIZE=256
        exec setsid bash -c 'while :; do "$0"; sleep 1; done' "$bin"
    ) </dev/null >>"$STATE/$fn.log" 2>&1 &
    echo $! >>"$STATE/instance_pids"
    grep -qxF "$fn.log" "$STATE/logs" 2>/dev/null || echo "$fn.log" >>"$STATE/logs"
}

start_functions() {
    local visibility="$1" lport wc rc
    [[ -x "$VENV/bin/cargo-lambda" ]] || die "$VENV/bin/cargo-lambda not found: run make venv"
    wc="${SETTLE_STACK_WORKER_CONCURRENCY:-2}"
    rc="${SETTLE_STACK_REDUCER_CONCURRENCY:-1}"
    local extra
    for extra in ${SETTLE_STACK_EXTRA_FUNCTIONS:-}; do
        [[ "$extra" == ?*=* && -x "${extra#*=}" ]] || {
            down_keep_logs
            die "SETTLE_STACK_EXTRA_FUNCTIONS: want NAME=EXECUTABLE (an executable file), got $extra"
        }
    done
    build_functions

    lport="$(free_port)"
    echo "$lport" >"$STATE/lambda_port"
    say "starting the Lambda APIs (cargo lambda watch) on 127.0.0.1:$lport (log: $STATE/watch.log)"
    (
        cd "$ROOT"
        exec setsid "$VENV/bin/cargo-lambda" lambda watch --only-lambda-apis \
            --invoke-address 127.0.0.1 --invoke-port "$lport"
    ) </dev/null >"$STATE/watch.log" 2>&1 &
    echo $! >"$STATE/watch_pid"
    # A function started before the Runtime API listens would exit at once.
    local i
    for ((i = 0; i < 300; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$lport") 2>/dev/null && break
        alive watch_pid || { down_keep_logs; die "cargo lambda watch exited; see $STATE/watch.log"; }
        sleep 0.1
    done

    say "starting the functions: $wc worker, $rc reducer, 1 dispatcher (logs: $STATE/{worker,reducer,dispatcher}.log)"
    (
        # The functions get this environment, as Lambda hands a function its
        # Environment: the stack's (template.yaml Globals), each function's
        # own settings (only the function that reads one uses it), and the
        # worker's processor settings as the caller set them.
        while IFS= read -r line; do [[ -n "$line" ]] && export "${line?}"; done < "$STATE/env"
        clean_cargo_env
        for v in $(compgen -e); do [[ "$v" == AWS_ENDPOINT_URL_* ]] && unset "$v"; done
        export AWS_ENDPOINT_URL="http://127.0.0.1:$(cat "$STATE/port")"
        export AWS_ENDPOINT_URL_LAMBDA="http://127.0.0.1:$lport"
        export AWS_REGION=$REGION AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
        export SETTLE_EMULATOR_WRITE_LOCK=1
        export SETTLE_ITEM_TIMEOUT_MS="${SETTLE_ITEM_TIMEOUT_MS:-10000}"
        export SETTLE_RETRY_DELAY_MS="${SETTLE_RETRY_DELAY_MS:-1000}"
        # The worker extends its messages' visibility while it holds them:
        # with a short visibility, a slow attempt is not delivered twice.
        export SETTLE_WORK_VISIBILITY_MS="${SETTLE_WORK_VISIBILITY_MS:-$((visibility * 1000))}"
        export SETTLE_MAX_RECEIVES="${SETTLE_MAX_RECEIVES:-3}"
        export SETTLE_TOLERATED_FAILURE_PERCENT="${SETTLE_TOLERATED_FAILURE_PERCENT:-100}"
        export SETTLE_DISPATCH_MARGIN_MS="${SETTLE_DISPATCH_MARGIN_MS:-30000}"
        export RUST_LOG="${RUST_LOG:-info}"
        local fn bin i
        while read -r fn bin; do
            local n=1
            [[ "$fn" == worker ]] && n="$wc"
            [[ "$fn" == reducer ]] && n="$rc"
            for ((i = 0; i < n; i++)); do start_instance "$fn" "$bin"; done
        done <"$STATE/bins"
        # A user's function for the worker to invoke (SETTLE_FUNCTION_NAME).
        local extra
        for extra in ${SETTLE_STACK_EXTRA_FUNCTIONS:-}; do
            start_instance "${extra%%=*}" "${extra#*=}"
        done
    )

    # Each function answers once it has started (its cold start done).
    local ready="${SETTLE_STACK_READY_SECONDS:-120}" start=$SECONDS fn payload
    for fn in worker reducer dispatcher; do
        payload='{"Records": []}'
        # A manual invoke with nothing pending creates no run.
        [[ "$fn" == dispatcher ]] && payload='{}'
        until invoke "$lport" "$fn" "$payload"; do
            alive watch_pid || { down_keep_logs; die "cargo lambda watch exited; see $STATE/watch.log"; }
            if (( SECONDS - start > ready )); then
                down_keep_logs
                die "the $fn function did not answer within $ready s; see $STATE/$fn.log"
            fi
            sleep 0.5
        done
    done

    local tick="${SETTLE_STACK_TICK_SECONDS:-60}"
    "$VENV/bin/python" - "$STATE" "$ROOT" "$tick" "$wc" "$rc" "${SETTLE_STACK_INVOKE_TIMEOUT_SECONDS:-60}" \
        <<'PY' >"$STATE/esm.json"
import json, sys
state, root, tick, wc, rc, timeout = sys.argv[1:]
env = dict(l.strip().split("=", 1) for l in open(f"{state}/env") if "=" in l)
port = open(f"{state}/port").read().strip()
lport = open(f"{state}/lambda_port").read().strip()
print(json.dumps({
    "sqs_endpoint": f"http://127.0.0.1:{port}",
    "lambda_endpoint": f"http://127.0.0.1:{lport}",
    "region": "us-east-1",
    # template.yaml: the functions' Events; the wait for an answer is their
    # Timeout (30 s) with slack, since nothing here stops a late function.
    "mappings": [
        {"function": "worker", "queue_url": env["SETTLE_WORK_QUEUE_URL"], "batch_size": 10,
         "window_seconds": 0, "concurrency": int(wc), "timeout_seconds": float(timeout)},
        {"function": "reducer", "queue_url": env["SETTLE_RESULTS_QUEUE_URL"], "batch_size": 9,
         "window_seconds": 2, "concurrency": int(rc), "timeout_seconds": float(timeout)},
    ],
    "dispatcher": "dispatcher",
    "dispatcher_timeout_seconds": 930,
    "tick_seconds": float(tick),
    "tick_event": f"{root}/infra/events/dispatcher-schedule.json",
}, indent=1))
PY
    say "starting the event source mappings and the schedule (log: $STATE/esm.log)"
    AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing \
        setsid "$VENV/bin/python" "$ROOT/infra/esm.py" --config "$STATE/esm.json" --log "$STATE/esm.log" \
        </dev/null >>"$STATE/esm.log" 2>&1 &
    echo $! >"$STATE/esm_pid"
    sleep 0.5
    alive esm_pid || { down_keep_logs; die "infra/esm.py exited; see $STATE/esm.log"; }
}

up() {
    local deployed=
    [[ "${1:-}" == --deployed ]] && deployed=1
    if running; then
        if [[ -n "$deployed" && ! -f "$STATE/lambda_port" ]]; then
            die "already up without the functions; run infra/emulator.sh down first"
        fi
        say "already up on port $(cat "$STATE/port")"
        exports
        return
    fi
    if [[ ! -x "$VENV/bin/moto_server" ]]; then
        say "installing the Python tooling (make venv)"
        make -C "$ROOT" venv >&2
    fi
    mkdir -p "$STATE"
    if [[ -n "$deployed" ]]; then
        local visibility="${SETTLE_STACK_VISIBILITY:-10}"
        start_moto "$visibility"
        start_functions "$visibility"
    else
        start_moto
    fi
    exports
}

# Ends a process group (TERM, then KILL after 5 s).
stop_group() {
    local file="$STATE/$1" pid
    [[ -f "$file" ]] || return 0
    pid="$(cat "$file")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do runs "$pid" || break; sleep 0.1; done
        kill -KILL -- "-$pid" 2>/dev/null || true
        kill -KILL "$pid" 2>/dev/null || true
        say "stopped $1 ${pid}"
    fi
    rm -f "$file"
}

# Function processes still attached to this stack's Runtime API, should
# one have left its instance's process group.
stop_functions() {
    [[ -f "$STATE/lambda_port" ]] || return 0
    local api="AWS_LAMBDA_RUNTIME_API=http://127.0.0.1:$(cat "$STATE/lambda_port")/" f pid
    for f in /proc/[0-9]*/environ; do
        pid="${f#/proc/}"; pid="${pid%/environ}"
        if grep -qaF -- "$api" "$f" 2>/dev/null; then
            kill -KILL "$pid" 2>/dev/null && say "stopped function process $pid"
        fi
    done
}

# Stops everything but leaves the logs, for a failed `up` to point at.
down_keep_logs() {
    stop_group esm_pid
    if [[ -f "$STATE/instance_pids" ]]; then
        local pid
        while read -r pid; do
            echo "$pid" >"$STATE/instance_pid"
            stop_group instance_pid
        done <"$STATE/instance_pids"
        rm -f "$STATE/instance_pids"
    fi
    stop_group watch_pid
    stop_functions
    if [[ -f "$STATE/pid" ]]; then
        local pid; pid="$(cat "$STATE/pid")"
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 1 50); do runs "$pid" || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
            say "stopped (pid $pid)"
        fi
    fi
    rm -f "$STATE"/{pid,port,lambda_port,env,esm.json}
}

down() {
    down_keep_logs
    # Only what `up` wrote: SETTLE_EMULATOR_DIR may name a directory of the caller's.
    if [[ -f "$STATE/logs" ]]; then
        local log
        while read -r log; do rm -f "${STATE:?}/$log"; done <"$STATE/logs"
    fi
    rm -f "$STATE"/{moto.log,watch.log,build.log,bins,logs,esm.log}
    rmdir "$STATE" 2>/dev/null || true
}

case "${1:-}" in
    up) shift; up "$@" ;;
    down) down ;;
    *) echo "usage: $0 up [--deployed] | down" >&2; exit 2 ;;
esac
