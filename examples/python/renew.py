"""Renews a subscription per item, in the style of a payment gateway.

    settle run items.jsonl --exec "python3 examples/python/renew.py" --protocol jsonl

An item's payload: {"user": "u-1", "plan": "pro", "card": "4242424242424242"}.
Cards ending 0002 are declined (permanent: retrying will not help), 9995 have
insufficient funds (retried in a minute), 0119 time out at the gateway
(retried); the rest are charged, once per run thanks to the idempotency key.
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "sdk", "python"))
import settle  # noqa: E402

PRICES_CENTS = {"basic": 500, "pro": 1500, "team": 4900}


def renew(item, ctx):
    payload = item["payload"] or {}
    user, plan, card = payload.get("user"), payload.get("plan"), str(payload.get("card", ""))
    if plan not in PRICES_CENTS:
        raise settle.PermanentError("unknown plan %r" % plan)
    amount = PRICES_CENTS[plan]
    print("renewing %s on %s: charging %d cents to card ...%s (attempt %d)" % (user, plan, amount, card[-4:], ctx.attempt))
    # A real gateway takes the idempotency key, so a duplicate delivery of
    # this item in this run cannot charge twice.
    time.sleep(0.01)
    if card.endswith("0002"):
        raise settle.PermanentError("card ...0002 declined: do not honor")
    if card.endswith("9995"):
        raise settle.RetryError("insufficient funds", retry_after_ms=60_000)
    if card.endswith("0119"):
        raise settle.RetryError("gateway timeout")
    charge = "ch_" + ctx.idempotency_key.replace(":", "_")
    print("charged: %s" % charge)
    return {"user": user, "plan": plan, "amount_cents": amount, "charge": charge}


if __name__ == "__main__":
    settle.serve(renew)
