#!/usr/bin/env bash
# `make demo`: 2,000 subscription renewals charged through a stand-in payment
# gateway by a Python processor (jsonl protocol), then a redrive once the
# gateway recovers. Needs only the settle binary and python3 (standard
# library). See docs/demo.md.
#
#   scripts/demo.sh [SETTLE_BINARY]     (default: $SETTLE, else target/release/settle)
#
# Environment: DEMO_ITEMS (2000), DEMO_SEED (7), DEMO_DIR (.settle/demo; wiped).
set -euo pipefail

cd "$(dirname "$0")/.."
SETTLE=${1:-${SETTLE:-target/release/settle}}
COUNT=${DEMO_ITEMS:-2000}
SEED=${DEMO_SEED:-7}
DIR=${DEMO_DIR:-.settle/demo}
DB=$DIR/settle.db
ITEMS=$DIR/items.jsonl
PROCESSOR="python3 examples/python/renew_gateway.py"
# A slow gateway answer holds its whole worker batch: batches of one, and 16
# processes, keep the other items moving while a few calls time out.
PROCESSING=(--concurrency 16 --batch-size 1)

if [[ -t 1 ]]; then
  say() { printf '\n\033[1m== %s ==\033[0m\n' "$*"; }
else
  say() { printf '\n== %s ==\n' "$*"; }
fi
die() { echo "demo: $*" >&2; exit 1; }

[[ -x $SETTLE ]] || die "no settle binary at $SETTLE (run \`make build-cli\`, or pass its path)"
command -v python3 >/dev/null || die "python3 is needed (standard library only)"

started=$(date +%s.%N)
rm -rf "$DIR"
mkdir -p "$DIR"

# --- the gateway, in the background, on a free port; stopped on any exit ---
gateway_pid=
stop_gateway() {
  if [[ -n $gateway_pid ]] && kill -0 "$gateway_pid" 2>/dev/null; then
    kill "$gateway_pid" 2>/dev/null || true
    wait "$gateway_pid" 2>/dev/null || true
  fi
  gateway_pid=
}
trap stop_gateway EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

python3 examples/gateway/gateway.py --port 0 >"$DIR/gateway.log" 2>&1 &
gateway_pid=$!
GATEWAY_URL=
for _ in $(seq 100); do
  GATEWAY_URL=$(sed -n 's/^gateway listening on //p' "$DIR/gateway.log")
  [[ -n $GATEWAY_URL ]] && break
  kill -0 "$gateway_pid" 2>/dev/null || die "the gateway did not start: $(cat "$DIR/gateway.log")"
  sleep 0.1
done
[[ -n $GATEWAY_URL ]] || die "the gateway did not say its port within 10 s (log: $DIR/gateway.log)"
export GATEWAY_URL

gateway() { # gateway GET|POST PATH: prints the JSON answer
  python3 - "$1" "$GATEWAY_URL$2" <<'EOF'
import sys, urllib.request
method, url = sys.argv[1], sys.argv[2]
with urllib.request.urlopen(urllib.request.Request(url, data=b"" if method == "POST" else None, method=method), timeout=10) as r:
    print(r.read().decode().strip())
EOF
}

say "A stand-in payment gateway at $GATEWAY_URL"
echo "150 charges a second (then 429 + Retry-After); cards ...0002 declined; until it recovers:"
echo "cards ...9995 have insufficient funds, ...0119 time out, and 1 key in 60 is answered late"
python3 examples/gateway/items.py "$COUNT" --seed "$SEED" >"$ITEMS"

say "settle run: $COUNT renewals, processor \`$PROCESSOR\` (jsonl)"
"$SETTLE" --db "$DB" run --items "$ITEMS" --exec "$PROCESSOR" --protocol jsonl "${PROCESSING[@]}"
RUN=$("$SETTLE" --db "$DB" status --json | tail -n 1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["run_id"])')

say "settle failures $RUN (first 8 lines)"
"$SETTLE" --db "$DB" failures "$RUN" >"$DIR/failures.txt"
head -n 8 "$DIR/failures.txt"
echo "... (the whole list: $DIR/failures.txt)"

# One item that timed out: its history shows each attempt with its own log.
"$SETTLE" --db "$DB" failures "$RUN" --json | tail -n 1 >"$DIR/failures.json"
SHOW=$(python3 - "$DIR/failures.json" <<'EOF'
import json, sys
failures = json.load(open(sys.argv[1]))["failures"]
timeouts = [f["item_id"] for f in failures if "timeout" in f["error"]]
print((timeouts or [f["item_id"] for f in failures] or [""])[0])
EOF
)
if [[ -n $SHOW ]]; then
  say "settle show $RUN $SHOW"
  "$SETTLE" --db "$DB" show "$RUN" "$SHOW"
fi

say "The gateway recovers (POST /recover); settle redrive $RUN"
gateway POST /recover >/dev/null
set +e
"$SETTLE" --db "$DB" redrive "$RUN" "${PROCESSING[@]}"
code=$?
set -e
# 3: part of the failures had no message to move yet (see the README).
[[ $code -eq 0 || $code -eq 3 ]] || die "settle redrive exited with $code"

if [[ -n $SHOW ]]; then
  say "settle show $RUN $SHOW (after the redrive)"
  "$SETTLE" --db "$DB" show "$RUN" "$SHOW"
fi

# One item whose first charge was answered late: the retry with the same
# idempotency key got the charge back instead of charging again.
"$SETTLE" --db "$DB" results "$RUN" >"$DIR/results.jsonl"
REPLAYED=$(python3 - "$DIR/results.jsonl" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if isinstance(r.get("output"), dict) and r["output"].get("replayed"):
        print(r["id"])
        break
EOF
)
if [[ -n $REPLAYED ]]; then
  say "settle show $RUN $REPLAYED (answered late, charged once)"
  "$SETTLE" --db "$DB" show "$RUN" "$REPLAYED"
fi

say "settle status $RUN"
"$SETTLE" --db "$DB" status "$RUN"
"$SETTLE" --db "$DB" status "$RUN" --json | tail -n 1 >"$DIR/status.json"
"$SETTLE" --db "$DB" failures "$RUN" --json | tail -n 1 >"$DIR/failures.json"
gateway GET /stats >"$DIR/stats.json"
stop_gateway

say "The gateway's /stats"
python3 -m json.tool "$DIR/stats.json"

say "Checks"
elapsed=$(python3 -c "import time; print('%.1f' % (time.time() - $started))")
python3 - "$ITEMS" "$DIR/status.json" "$DIR/failures.json" "$DIR/stats.json" "$elapsed" <<'EOF'
import json, sys
items_path, status_path, failures_path, stats_path, elapsed = sys.argv[1:]
items = [json.loads(line) for line in open(items_path)]
status = json.load(open(status_path))
failed = {f["item_id"] for f in json.load(open(failures_path))["failures"]}
stats = json.load(open(stats_path))
declined = {i["id"] for i in items if i["payload"]["card"].endswith("0002")}
checks = [
    ("succeeded + failed = items", "%d + %d = %d" % (status["succeeded"], status["failed"], len(items)),
     status["succeeded"] + status["failed"] == len(items) and status["pending"] == 0),
    ("the failed items are exactly the declined cards", "%d failed, %d declined" % (len(failed), len(declined)),
     failed == declined),
    ("gateway charges = succeeded items", "%d = %d" % (stats["charges"], status["succeeded"]),
     stats["charges"] == status["succeeded"]),
    ("no item charged twice", "double_charged %d; %d retries refused by idempotency key" % (stats["double_charged"], stats["duplicates"]),
     stats["double_charged"] == 0 and stats["distinct_keys_charged"] == stats["charges"]),
]
bad = 0
for name, detail, ok in checks:
    print("%s %s: %s" % ("ok  " if ok else "FAIL", name, detail))
    bad += not ok
print("demo took %s s" % elapsed)
sys.exit(1 if bad else 0)
EOF
echo "The database stays in $DB: settle --db $DB status | failures $RUN | show $RUN ITEM | logs $RUN ITEM"
