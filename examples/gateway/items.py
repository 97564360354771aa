#!/usr/bin/env python3
"""Writes N subscription renewals as Settle items (JSON Lines) to stdout.

    python3 examples/gateway/items.py 2000 [--seed 7] > items.jsonl

Deterministic for a given count and seed. The mix, in exact counts (rounded),
shuffled, for the stand-in gateway (examples/gateway/gateway.py):

    3%   a card ending 0002: declined, for good
    2%   a card ending 9995: insufficient funds until the gateway recovers
    1%   a card ending 0119: the issuer times out until the gateway recovers
    94%  a good card: charged (some after a late answer or a 429)

A payload: {"customer": "cus_...", "plan": "pro", "amount_cents": 1500,
"currency": "usd", "card": "4242424242424242"}. A summary of the mix goes to
stderr.
"""

import argparse
import json
import random
import sys

PLANS = [("basic", 500, 50), ("pro", 1500, 35), ("team", 4900, 15)]  # name, cents, weight
GOOD_CARDS = ["4242424242424242", "5555555555554444", "378282246310005", "6011111111111117", "3566002020360505"]
MIX = [  # (kind, card, share)
    ("declined", "4000000000000002", 0.03),
    ("insufficient_funds", "4000000000009995", 0.02),
    ("issuer_timeout", "4000000000000119", 0.01),
]


def main():
    parser = argparse.ArgumentParser(description="Write N renewal items as JSONL (see the docstring).")
    parser.add_argument("count", type=int)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    if args.count < 1:
        parser.error("count must be at least 1")

    rng = random.Random(args.seed)
    kinds = []
    for kind, card, share in MIX:
        kinds += [(kind, card)] * round(args.count * share)
    kinds += [("ok", None)] * (args.count - len(kinds))
    rng.shuffle(kinds)

    tally = {}
    out = sys.stdout
    for n, (kind, card) in enumerate(kinds, start=1):
        plan, cents, _ = rng.choices(PLANS, weights=[w for _, _, w in PLANS])[0]
        payload = {
            "customer": "cus_%06d" % rng.randrange(1, 1_000_000),
            "plan": plan,
            "amount_cents": cents,
            "currency": "usd",
            "card": card or rng.choice(GOOD_CARDS),
        }
        out.write(json.dumps({"id": "sub-%06d" % n, "payload": payload}) + "\n")
        tally[kind] = tally.get(kind, 0) + 1
    out.flush()
    print(
        "items: %d renewals (%s)" % (args.count, ", ".join("%s %d" % (k, tally.get(k, 0)) for k in ["ok"] + [m[0] for m in MIX])),
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
