#!/usr/bin/env python3
"""Cold-start init time of a Lambda binary: from process start until its
first `GET /2018-06-01/runtime/invocation/next`, against a tiny fake Lambda
Runtime API on 127.0.0.1. Init includes what `main` does before it polls:
logging setup, config, and `settle_aws::connect` (one SQS GetQueueAttributes
to the emulator). Needs the emulator's environment:

    eval "$(infra/emulator.sh up)"
    python3 scripts/cold_start.py target/debug/worker [--runs 10]
"""
import argparse
import http.server
import os
import statistics
import subprocess
import sys
import threading
import time

NEXT = "/2018-06-01/runtime/invocation/next"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    if not os.environ.get("AWS_ENDPOINT_URL"):
        print("error: AWS_ENDPOINT_URL is not set; run: eval \"$(infra/emulator.sh up)\"", file=sys.stderr)
        return 2
    if not os.path.exists(args.binary):
        print(f"error: {args.binary} not found", file=sys.stderr)
        return 2

    polled = threading.Event()
    at = {}

    class Api(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == NEXT and not polled.is_set():
                at["t"] = time.perf_counter()
                polled.set()
            # Never hand out an event: the measurement ends at the first poll.
            self.send_response(503)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = dict(os.environ,
               AWS_LAMBDA_RUNTIME_API=f"127.0.0.1:{server.server_address[1]}",
               AWS_LAMBDA_FUNCTION_NAME="settle-cold-start",
               AWS_LAMBDA_FUNCTION_VERSION="$LATEST",
               AWS_LAMBDA_FUNCTION_MEMORY_SIZE="256",
               AWS_LAMBDA_LOG_LEVEL="error")
    times = []
    for _ in range(args.runs):
        polled.clear()
        t0 = time.perf_counter()
        p = subprocess.Popen([args.binary], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        ok = polled.wait(30)
        p.kill()
        _, err = p.communicate()
        if not ok:
            print(f"error: no poll within 30 s; stderr:\n{err.decode(errors='replace')}", file=sys.stderr)
            return 1
        times.append((at["t"] - t0) * 1000)
    server.shutdown()
    print(f"{args.binary}: init {statistics.median(times):.1f} ms median, "
          f"min {min(times):.1f}, max {max(times):.1f} over {len(times)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
