"""Renews a subscription per item by charging a payment gateway over HTTP.

    GATEWAY_URL=http://127.0.0.1:PORT \\
      settle run --items items.jsonl --exec "python3 examples/python/renew_gateway.py" --protocol jsonl

The gateway is the demo's stand-in (examples/gateway/gateway.py, `make demo`),
or anything that speaks its small API: POST /v1/charges with an
Idempotency-Key header. Standard library only, plus sdk/python/settle.py.

An item's payload: {"customer": "cus_1", "plan": "pro", "amount_cents": 1500,
"currency": "usd", "card": "4242424242424242"} (examples/gateway/items.py).
What the gateway says decides the item:

    200                       succeeded; the output is the charge
    402 card_declined         failed for good (PermanentError): retrying will not help
    402 insufficient_funds    retryable, in 2 s (RetryError)
    429 + Retry-After         throttled (ThrottledError): not a failure, no
                              attempt used; the run slows down and waits
                              that long, and so does this process before
                              its next call
    5xx, no answer in time    retryable
    any other 4xx             failed for good

Every call carries the item's idempotency key (run id : item id), so a retry
after a late answer, or a duplicate delivery, gets the first charge back
instead of charging twice.
"""

import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "sdk", "python"))
import settle  # noqa: E402

GATEWAY_URL = os.environ.get("GATEWAY_URL", "").rstrip("/")
# Our own limit on a charge call: a gateway slower than this is taken as a
# timeout (retried with the same idempotency key), however long Settle's
# own deadline for the attempt is.
REQUEST_TIMEOUT_S = float(os.environ.get("GATEWAY_TIMEOUT_S", "1.0"))
INSUFFICIENT_FUNDS_RETRY_MS = 2000


def _error_code(body):
    try:
        return json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


# When the gateway last answered 429, the time (monotonic) it asked this
# process to wait until: its next call waits that long first, so that a pool
# of processes backs off instead of trading one 429 for the next.
_backoff_until = 0.0


def _retry_after_ms(headers):
    try:
        return int(float(headers.get("Retry-After")) * 1000)
    except (TypeError, ValueError):  # absent, or an HTTP date: a second
        return 1000


def renew(item, ctx):
    global _backoff_until
    if not GATEWAY_URL:
        raise settle.PermanentError("GATEWAY_URL is not set: where is the payment gateway?")
    payload = item["payload"] or {}
    amount, card = payload.get("amount_cents"), str(payload.get("card", ""))
    if not isinstance(amount, int) or amount <= 0 or not card:
        raise settle.PermanentError("the payload has no amount_cents or card: %r" % (payload,))
    charge = {
        "amount": amount,
        "currency": payload.get("currency", "usd"),
        "customer": payload.get("customer"),
        "card": card,
        "reference": item["id"],
    }
    wait = _backoff_until - time.monotonic()
    if wait > 0:
        print("waiting %d ms first: the gateway asked to slow down (429)" % (wait * 1000))
        time.sleep(wait)
    timeout = REQUEST_TIMEOUT_S
    remaining = ctx.remaining_ms()
    if remaining is not None:
        timeout = max(0.05, min(timeout, remaining / 1000 - 0.1))
    print(
        "attempt %d: charging %s %d.%02d %s to card ...%s (%s plan), idempotency key %s"
        % (ctx.attempt, charge["customer"], amount // 100, amount % 100, charge["currency"].upper(),
           card[-4:], payload.get("plan"), ctx.idempotency_key)
    )
    request = urllib.request.Request(
        GATEWAY_URL + "/v1/charges",
        data=json.dumps(charge).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Idempotency-Key": ctx.idempotency_key},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read())
            replayed = response.headers.get("Idempotent-Replayed") == "true"
    except urllib.error.HTTPError as e:
        body = e.read()
        code = _error_code(body)
        print("gateway: %d %s" % (e.code, code or body[:200].decode(errors="replace").strip()))
        if e.code == 402 and code == "insufficient_funds":
            raise settle.RetryError("insufficient funds (402)", retry_after_ms=INSUFFICIENT_FUNDS_RETRY_MS)
        if e.code == 429:
            after_ms = _retry_after_ms(e.headers)
            _backoff_until = time.monotonic() + after_ms / 1000
            raise settle.ThrottledError("rate limited by the gateway (429)", retry_after_ms=after_ms)
        if e.code >= 500:
            raise settle.RetryError("gateway error %d %s" % (e.code, code or ""))
        raise settle.PermanentError("%s (%d)" % (code or "refused", e.code))
    except (socket.timeout, TimeoutError):
        print("gateway: no answer within %.1f s" % timeout)
        raise settle.RetryError("gateway timeout: no answer within %.1f s" % timeout)
    except urllib.error.URLError as e:
        if isinstance(e.reason, (socket.timeout, TimeoutError)):
            print("gateway: no answer within %.1f s" % timeout)
            raise settle.RetryError("gateway timeout: no answer within %.1f s" % timeout)
        print("gateway: unreachable: %s" % (e.reason,))
        raise settle.RetryError("gateway unreachable: %s" % (e.reason,))
    print(
        "gateway: 200 %s %s%s"
        % (answer["status"], answer["id"], " (replayed: charged by an earlier attempt, not again)" if replayed else "")
    )
    return {"charge": answer["id"], "amount_cents": answer["amount"], "replayed": replayed}


if __name__ == "__main__":
    settle.serve(renew)
