#!/usr/bin/env python3
"""A stand-in payment gateway for the demo: Python standard library only.

    python3 examples/gateway/gateway.py [--port 0] [--rate 150] [--burst 150]

Listens on 127.0.0.1 (a free port by default) and prints one line,
``gateway listening on http://127.0.0.1:PORT``, once it accepts requests.

    POST /v1/charges   {"amount": 1500, "currency": "usd", "customer": "cus_1",
                        "card": "4242424242424242", "reference": "sub-000042"}
                       with an Idempotency-Key header (required)
    GET  /stats        the counters, as JSON
    GET  /ledger       every charge made, in order, as JSON
    POST /recover      the flaky behaviour stops (see below)

How it answers a charge, in this order:
- a key it has seen charged: the first charge again, with 200 and
  ``Idempotent-Replayed: true``; nothing is charged twice (``duplicates``);
- more than ``--rate`` charges per second (a token bucket of ``--burst``):
  429 with Retry-After (seconds, so at least 1) (``rate_limited``);
- a card ending 0002: 402 ``card_declined``, always (``declines``);
- until /recover: a card ending 9995: 402 ``insufficient_funds``
  (``insufficient_funds``), and a card ending 0119: the issuer does not
  answer, and after ``--slow`` seconds neither does the gateway: 504, nothing
  charged (``timeouts``);
- until /recover, about 1 in 60 idempotency keys on their first call: the
  charge is made but the answer comes ``--slow`` seconds late, after a
  caller's timeout (``timeouts``, ``slow_after_charge``): its retry with the
  same key gets the charge back (a duplicate refused);
- otherwise: charged, 200.

After /recover the 9995 and 0119 cards are charged; 0002 stays declined.
``double_charged`` in /stats counts references (items) charged more than once
under different keys: a processor that forgot its idempotency key would make
it grow; it should stay 0.
"""

import argparse
import hashlib
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DECLINED = "0002"
INSUFFICIENT_FUNDS = "9995"
ISSUER_TIMEOUT = "0119"


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up."""

    def __init__(self, rate, burst):
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self.last = time.monotonic()

    def take(self):
        """Returns 0 if a token was taken, else the seconds until one is there."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class Gateway:
    def __init__(self, rate, burst, slow_seconds, slow_one_in):
        self.lock = threading.Lock()
        self.bucket = TokenBucket(rate, burst) if rate > 0 else None
        self.slow_seconds = slow_seconds
        self.slow_one_in = slow_one_in
        self.recovered = False
        self.ledger = []  # every charge made, in order
        self.by_key = {}  # idempotency key -> charge
        self.by_reference = {}  # reference -> number of charges
        self.seen_keys = set()  # keys that have made a call (for the one-off slow answer)
        self.counts = {
            "requests": 0,
            "charges": 0,
            "duplicates": 0,
            "declines": 0,
            "insufficient_funds": 0,
            "rate_limited": 0,
            "timeouts": 0,
            "slow_after_charge": 0,
            "bad_requests": 0,
        }

    def stats(self):
        with self.lock:
            out = dict(self.counts)
            out["amount_cents"] = sum(c["amount"] for c in self.ledger)
            out["distinct_keys_charged"] = len(self.by_key)
            out["double_charged"] = sum(1 for n in self.by_reference.values() if n > 1)
            out["recovered"] = self.recovered
            return out

    def _slow_once(self, key):
        """About 1 in ``slow_one_in`` keys answer late on their first call."""
        if self.slow_one_in <= 0 or key in self.seen_keys:
            return False
        digest = hashlib.sha256(key.encode()).digest()
        return int.from_bytes(digest[:4], "big") % self.slow_one_in == 0

    def charge(self, key, body):
        """Returns (status, headers, answer, seconds to wait before answering)."""
        with self.lock:
            self.counts["requests"] += 1
            first = self.by_key.get(key)
            if first is not None:
                self.counts["duplicates"] += 1
                return 200, {"Idempotent-Replayed": "true"}, dict(first, replayed=True), 0
            if self.bucket is not None:
                wait = self.bucket.take()
                if wait > 0:
                    self.counts["rate_limited"] += 1
                    # HTTP's Retry-After is in whole seconds: at least 1.
                    headers = {"Retry-After": str(max(1, int(wait + 0.999)))}
                    return 429, headers, _error("rate_limited", "more than %g charges a second" % self.bucket.rate), 0
            card = str(body.get("card", ""))
            if card.endswith(DECLINED):
                self.counts["declines"] += 1
                return 402, {}, _error("card_declined", "the card was declined: do not honor"), 0
            if not self.recovered and card.endswith(INSUFFICIENT_FUNDS):
                self.counts["insufficient_funds"] += 1
                return 402, {}, _error("insufficient_funds", "the card has insufficient funds"), 0
            if not self.recovered and card.endswith(ISSUER_TIMEOUT):
                self.counts["timeouts"] += 1
                return 504, {}, _error("issuer_timeout", "the card issuer did not answer"), self.slow_seconds
            slow = not self.recovered and self._slow_once(key)
            self.seen_keys.add(key)
            charge = {
                "id": "ch_%06d" % (len(self.ledger) + 1),
                "amount": int(body["amount"]),
                "currency": body.get("currency", "usd"),
                "customer": body.get("customer"),
                "reference": body.get("reference"),
                "card_last4": card[-4:],
                "status": "succeeded",
                "created": round(time.time(), 3),
            }
            self.ledger.append(charge)
            self.by_key[key] = charge
            ref = charge["reference"]
            self.by_reference[ref] = self.by_reference.get(ref, 0) + 1
            self.counts["charges"] += 1
            if slow:
                self.counts["timeouts"] += 1
                self.counts["slow_after_charge"] += 1
                return 200, {}, dict(charge, replayed=False), self.slow_seconds
            return 200, {}, dict(charge, replayed=False), 0


def _error(code, message):
    return {"error": {"code": code, "message": message}}


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default 5 is too short a backlog for a pool of callers


def make_handler(gateway, quiet):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "StandInGateway/1.0"
        # Headers and body are two writes: without TCP_NODELAY, Nagle's
        # algorithm and the caller's delayed ACK add 40 ms to every answer.
        disable_nagle_algorithm = True

        def log_message(self, fmt, *args):  # noqa: A003 - BaseHTTPRequestHandler's name
            if not quiet:
                sys.stderr.write("gateway: " + (fmt % args) + "\n")

        def _send(self, status, answer, headers=None):
            data = (json.dumps(answer) + "\n").encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the caller gave up waiting (its timeout): nothing to tell it

        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path == "/stats":
                self._send(200, gateway.stats())
            elif self.path == "/ledger":
                with gateway.lock:
                    ledger = list(gateway.ledger)
                self._send(200, {"charges": ledger})
            else:
                self._send(404, _error("not_found", "no such path: GET %s" % self.path))

        def do_POST(self):  # noqa: N802 - http.server's name
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if self.path == "/recover":
                with gateway.lock:
                    gateway.recovered = True
                self._send(200, {"recovered": True})
                return
            if self.path != "/v1/charges":
                self._send(404, _error("not_found", "no such path: POST %s" % self.path))
                return
            key = self.headers.get("Idempotency-Key", "").strip()
            try:
                body = json.loads(raw or b"null")
                if not isinstance(body, dict) or not isinstance(body.get("amount"), int):
                    raise ValueError("a charge is a JSON object with an integer amount")
                if not key:
                    raise ValueError("the Idempotency-Key header is required")
            except ValueError as e:
                with gateway.lock:
                    gateway.counts["requests"] += 1
                    gateway.counts["bad_requests"] += 1
                self._send(400, _error("bad_request", str(e)))
                return
            status, headers, answer, delay = gateway.charge(key, body)
            if delay:
                time.sleep(delay)
            self._send(status, answer, headers)

    return Handler


def main():
    parser = argparse.ArgumentParser(description="A stand-in payment gateway (see the module's docstring).")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--rate", type=float, default=150, help="charges a second before 429 (0: no limit)")
    parser.add_argument("--burst", type=float, default=None, help="charges the token bucket saves up (default: a second's worth, --rate)")
    parser.add_argument("--slow", type=float, default=2.5, help="seconds a slow answer takes")
    parser.add_argument("--slow-one-in", type=int, default=60, help="1 in N keys answer late on their first call (0: none)")
    parser.add_argument("--verbose", action="store_true", help="log every request on stderr")
    args = parser.parse_args()

    burst = args.rate if args.burst is None else args.burst
    gateway = Gateway(args.rate, burst, args.slow, args.slow_one_in)
    server = Server(("127.0.0.1", args.port), make_handler(gateway, quiet=not args.verbose))
    print("gateway listening on http://127.0.0.1:%d" % server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
