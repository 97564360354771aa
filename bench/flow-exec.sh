#!/bin/sh
# The --exec (a process per item) processor of `make bench-flow`, also the
# job that GNU parallel runs there: POSTs the item on stdin to URL with curl.
# Usage: settle run ... --exec "sh bench/flow-exec.sh URL"
#   200         exit 0, the API's answer on stdout (the item's output)
#   429 or 503  exit 75 (EX_TEMPFAIL): throttled, slow down; stdout
#               {"retry_after_ms": N} from a Retry-After in seconds
#   other 4xx   exit 65 (EX_DATAERR): fails for good
#   else        exit 1 (retried)
url=${1:?usage: flow-exec.sh URL}
out=$(curl -sS -H 'content-type: application/json' --data-binary @- \
  -w '\n%{http_code} %header{retry-after}' "$url") || exit 1
status=${out##*
}
code=${status%% *}
retry_after=${status#* }
body=${out%
*}
case "$code" in
  2??) printf '%s\n' "$body"; exit 0 ;;
  429|503)
    echo "HTTP $code: throttled" >&2
    case "$retry_after" in
      ''|*[!0-9]*) ;;
      *) printf '{"retry_after_ms": %d}\n' "$((retry_after * 1000))" ;;
    esac
    exit 75 ;;
  408|425) echo "HTTP $code" >&2; exit 1 ;;
  4??) echo "HTTP $code" >&2; exit 65 ;;
  *) echo "HTTP $code" >&2; exit 1 ;;
esac
