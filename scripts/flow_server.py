#!/usr/bin/env python3
"""A rate-limited HTTP API on 127.0.0.1 for flow-control tests and benchmarks.

Python standard library only. Used by `make bench-flow` (scripts/bench_flow.py)
and by the CLI's tests (spawned with python3); the command line below is
stable: options are only ever added.

    python3 scripts/flow_server.py [--port 0] [--rate 100] [--burst B]
        [--retry-after 1] [--throttle-status 429] [--outage SECONDS]
        [--service-ms 0] [--key-rate N] [--stats FILE]

  --port P             listen on 127.0.0.1:P; 0 (the default) takes a free port
  --rate R             requests a second let through: a token bucket refilled at
                       R a second (default 100; may be fractional)
  --burst B            the bucket's size, the most requests let through at once
                       after a quiet spell (default: R/10 rounded up, at least 1)
  --retry-after S      the Retry-After header of a throttled answer, whole
                       seconds (default 1)
  --throttle-status C  the status of a throttled answer: 429 (default) or 503
  --outage SECONDS     throttle every request for the first SECONDS after the
                       server starts listening, then recover (default 0)
  --service-ms MS      a let-through request is answered MS milliseconds after
                       it arrived (default 0); a throttled one at once
  --key-rate N         also a bucket per key (see below) of N a second and
                       burst max(1, ceil(N/10)): a request needs a token from
                       both its key's bucket and the global one
  --stats FILE         on SIGTERM, write the statistics there (default: stdout)

Once it accepts connections it prints one line on stdout: the port number.

Every request except `GET /stats` is an API call: any method, any path. Its
body may be JSON; its key is the body's `payload.key`, else its `key`
(absent: no key; not a string: its JSON text), and its id the body's `id`.
It is answered
- 200 `{"ok":true}` if a token was free (after --service-ms),
- else, or during the outage, the throttle status with `Retry-After`, body
  `{"error":"rate limited"}`; a throttled request takes no token.
HTTP/1.1 with keep-alive (a client's `Connection: close` is honoured).

`GET /stats` (not counted) answers, and SIGTERM writes before it exits 0,
the statistics as one JSON object:

  requests, ok, throttled     calls, 200s, throttled answers
  ok_ids, ok_duplicates       distinct body ids answered 200, and 200s for an
                              id answered 200 before
  max_in_flight               most calls being handled at once
  started, first_request, last_request, last_ok
                              Unix epoch seconds (null until they happen)
  ok_times                    every 200's time, Unix epoch seconds, in order
  keys                        per key: requests, ok, throttled, max_in_flight
  config                      the options above
"""

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; starts full."""

    def __init__(self, rate, burst):
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self.last = time.monotonic()

    def refill(self, now):
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now


def r4(t):
    return None if t is None else round(t, 4)


def default_burst(rate):
    return max(1, math.ceil(rate / 10))


class Api:
    """The limiter and the counters, behind one lock."""

    def __init__(self, args):
        self.args = args
        self.lock = threading.Lock()
        self.bucket = TokenBucket(args.rate, args.burst)
        self.key_buckets = {}
        self.started_mono = time.monotonic()
        self.started = time.time()
        self.requests = self.ok = self.throttled = 0
        self.in_flight = self.max_in_flight = 0
        self.first_request = self.last_request = self.last_ok = None
        self.ok_times = []
        self.ok_ids = set()
        self.ok_duplicates = 0
        self.keys = {}

    def begin(self, key):
        """Counts a call in; whether it may go through (takes its tokens)."""
        now_mono, now = time.monotonic(), time.time()
        with self.lock:
            self.requests += 1
            if self.first_request is None:
                self.first_request = now
            self.last_request = now
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            k = None
            if key is not None:
                k = self.keys.setdefault(key, {"requests": 0, "ok": 0, "throttled": 0, "in_flight": 0, "max_in_flight": 0})
                k["requests"] += 1
                k["in_flight"] += 1
                k["max_in_flight"] = max(k["max_in_flight"], k["in_flight"])
            allowed = now_mono - self.started_mono >= self.args.outage
            if allowed:
                self.bucket.refill(now_mono)
                allowed = self.bucket.tokens >= 1
                kb = None
                if allowed and key is not None and self.args.key_rate:
                    kb = self.key_buckets.get(key)
                    if kb is None:
                        kb = self.key_buckets[key] = TokenBucket(self.args.key_rate, default_burst(self.args.key_rate))
                    kb.refill(now_mono)
                    allowed = kb.tokens >= 1
                if allowed:
                    self.bucket.tokens -= 1
                    if kb is not None:
                        kb.tokens -= 1
            if not allowed:
                self.throttled += 1
                if k is not None:
                    k["throttled"] += 1
            return allowed

    def end(self, key, ok, item_id):
        now = time.time()
        with self.lock:
            self.in_flight -= 1
            if key is not None:
                self.keys[key]["in_flight"] -= 1
            if ok:
                self.ok += 1
                self.last_ok = now
                self.ok_times.append(round(now, 4))
                if key is not None:
                    self.keys[key]["ok"] += 1
                if item_id is not None:
                    if item_id in self.ok_ids:
                        self.ok_duplicates += 1
                    else:
                        self.ok_ids.add(item_id)

    def stats(self):
        with self.lock:
            a = self.args
            return {
                "requests": self.requests, "ok": self.ok, "throttled": self.throttled,
                "ok_ids": len(self.ok_ids), "ok_duplicates": self.ok_duplicates,
                "max_in_flight": self.max_in_flight,
                "started": round(self.started, 4), "first_request": r4(self.first_request),
                "last_request": r4(self.last_request), "last_ok": r4(self.last_ok),
                "ok_times": list(self.ok_times),
                "keys": {k: {f: v[f] for f in ("requests", "ok", "throttled", "max_in_flight")}
                         for k, v in self.keys.items()},
                "config": {"rate": a.rate, "burst": a.burst, "retry_after": a.retry_after,
                           "throttle_status": a.throttle_status, "outage": a.outage,
                           "service_ms": a.service_ms, "key_rate": a.key_rate},
            }


def key_and_id(body):
    try:
        doc = json.loads(body) if body else None
    except ValueError:
        return None, None
    if not isinstance(doc, dict):
        return None, None
    key = None
    payload = doc.get("payload")
    if isinstance(payload, dict) and "key" in payload:
        key = payload["key"]
    elif "key" in doc:
        key = doc["key"]
    if key is not None and not isinstance(key, str):
        key = json.dumps(key, sort_keys=True)
    item_id = doc.get("id")
    if item_id is not None and not isinstance(item_id, str):
        item_id = json.dumps(item_id, sort_keys=True)
    return key, item_id


OK_BODY = b'{"ok":true}'
THROTTLED_BODY = b'{"error":"rate limited"}'
REASONS = {200: "OK", 429: "Too Many Requests", 503: "Service Unavailable"}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in one write; no Nagle wait on keep-alive.
    disable_nagle_algorithm = True
    api = None  # set by main

    def log_message(self, *_):
        pass

    def reply(self, status, body, extra=b""):
        head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n").encode()
        if self.close_connection:
            extra += b"Connection: close\r\n"
        self.wfile.write(head + extra + b"\r\n" + body)

    def call(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        if self.command == "GET" and self.path.split("?")[0] == "/stats":
            self.reply(200, json.dumps(self.api.stats()).encode())
            return
        key, item_id = key_and_id(body)
        api = self.api
        allowed = api.begin(key)
        try:
            if allowed:
                if api.args.service_ms:
                    time.sleep(api.args.service_ms / 1000)
                self.reply(200, OK_BODY)
            else:
                self.reply(api.args.throttle_status, THROTTLED_BODY,
                           f"Retry-After: {api.args.retry_after}\r\n".encode())
        finally:
            api.end(key, allowed, item_id)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = call


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--burst", type=float)
    p.add_argument("--retry-after", type=int, default=1)
    p.add_argument("--throttle-status", type=int, choices=[429, 503], default=429)
    p.add_argument("--outage", type=float, default=0.0)
    p.add_argument("--service-ms", type=float, default=0.0)
    p.add_argument("--key-rate", type=float)
    p.add_argument("--stats")
    a = p.parse_args()
    if a.rate <= 0:
        p.error("--rate must be above 0")
    if a.burst is None:
        a.burst = default_burst(a.rate)
    if a.burst < 1:
        p.error("--burst must be at least 1")
    if a.key_rate is not None and a.key_rate <= 0:
        p.error("--key-rate must be above 0")
    if a.retry_after < 0:
        p.error("--retry-after must not be negative")

    Handler.api = Api(a)
    server = Server(("127.0.0.1", a.port), Handler)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    print(server.server_address[1], flush=True)
    while not stop.wait(0.5):
        pass
    text = json.dumps(Handler.api.stats())
    if a.stats:
        with open(a.stats + ".tmp", "w") as f:
            f.write(text + "\n")
        os.replace(a.stats + ".tmp", a.stats)
    else:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    server.server_close()


if __name__ == "__main__":
    main()
