"""A user's own Lambda function (Python) that Settle's worker invokes once
per batch: the renewals of examples/python/renew.py, through the SDK's
Lambda adapter. Deploy sdk/python/settle.py beside this file.

Handler: ``handler.handler``; worker stack parameters: ``Processor=function``,
``ProcessorFunction=<this function's name>``.
"""

import settle

PRICES = {"basic": 500, "pro": 1500, "team": 4900}


def renew(item, ctx):
    payload = item["payload"]
    cents = PRICES.get(payload.get("plan"))
    if cents is None:
        raise settle.PermanentError("unknown plan %r" % payload.get("plan"))
    last4 = str(payload.get("card", ""))[-4:]
    print("renewing %s on %s: %d cents to card ...%s (attempt %s)"
          % (payload.get("user"), payload["plan"], cents, last4, ctx.attempt))
    if last4 == "0002":
        raise settle.PermanentError("card ...%s declined" % last4)
    if last4 == "0119":
        raise settle.RetryError("gateway timeout", retry_after_ms=5000)
    if last4 == "0429":
        # The gateway's rate limit: no failure, the run slows down.
        raise settle.ThrottledError("gateway rate limit (429)", retry_after_ms=1000)
    # A real gateway takes the key, so a duplicate cannot charge twice.
    return {"user": payload.get("user"), "amount_cents": cents,
            "charge": "ch_" + ctx.idempotency_key.replace(":", "_")}


handler = settle.lambda_handler(renew)
