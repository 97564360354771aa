#!/usr/bin/env python3
"""Flow control against a rate-limited API: Settle's three processor kinds and two peers.

Usage: scripts/bench_flow.py [N] [--rate R] [--quick] [--settle PATH]
                             [--kinds http,jsonl,exec] [--peers parallel,bullmq]
                             [--burst B] [--peer-limit S] [--workdir DIR]

The API is scripts/flow_server.py on 127.0.0.1: a token bucket of R requests
a second (burst B, by default R/10), 200 within it, 429 with Retry-After: 1
beyond it. A fresh server for every run, so each starts with a full bucket
and clean counters. N items (default 10,000; --quick: 2,000), each
{"id", "payload": {"key": "k0".."k9", "n"}}.

Settle, on a fresh database per run, at its defaults (no --concurrency):
  http   settle run --items ITEMS --http URL
  jsonl  settle run --items ITEMS --exec "node bench/node/flow-processor.js URL" --protocol jsonl
         (answers a 429 with {"status": "throttled", "retry_after_ms": ...})
  exec   settle run --items ITEMS --exec "sh bench/flow-exec.sh URL"   (exit 75 on a 429)
each with no flow flag, then with --rate R/s. A binary without the --rate
flag has no flow control at all: its --rate runs are skipped, with a note,
and the jsonl processor runs with --as-retry (a 429 is answered as a retry,
the only answer such a binary has for it). Every run's tally is checked with
`settle status RUN --json`: succeeded + failed = N, pending 0.

Peers, same API, same R:
  parallel  GNU parallel -j 8 --delay auto --retries 1000, running
            `sh bench/flow-exec.sh URL` per item (curl; exit 75 on a 429)
  bullmq    bench/node/bullmq-flow.js: a Worker at concurrency 64 with
            limiter {max: R, duration: 1000}; a 429 rate-limits the queue for
            Retry-After and puts the job back (Worker.RateLimitError)
A peer is stopped after --peer-limit seconds (default 2 N/R + 60) and its
figures are those of the requests made until then.

Per run: items succeeded and failed, throughput (200s a second) over the
last 80% of the run's time at the server (from its first request to its
last 200), its ratio to R, the fraction of requests answered 429, and the
wall time. Targets: with no flag, 0 failed, >= 0.85 R, <= 5% 429s; with
--rate R/s, >= 0.95 R, <= 1% 429s. One line per run on stdout; all of it as
JSON in WORKDIR/results-R<R>-B<B>-N<N>.json (default WORKDIR: bench-data/flow).
"""
import argparse, json, os, platform, shlex, shutil, signal, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from bench_processors import free_port, machine_busy_s, stop, wait_port  # noqa: E402

SERVER = os.path.join(ROOT, "scripts", "flow_server.py")
KEYS = 10


def items_file(workdir, count):
    path = os.path.join(workdir, f"items-{count}.jsonl")
    if not os.path.exists(path):
        with open(path + ".tmp", "w") as out:
            for i in range(count):
                out.write(json.dumps({"id": f"item-{i:06d}", "payload": {"key": f"k{i % KEYS}", "n": i}}) + "\n")
        os.replace(path + ".tmp", path)
    return path


class Api:
    """A fresh flow_server.py; its statistics once stopped."""

    def __init__(self, a, stats_path):
        self.stats_path = stats_path
        if os.path.exists(stats_path):
            os.remove(stats_path)
        cmd = [sys.executable, SERVER, "--rate", str(a.rate), "--stats", stats_path]
        if a.burst is not None:
            cmd += ["--burst", str(a.burst)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            sys.exit(f"flow_server.py did not start: {line!r}")
        self.url = f"http://127.0.0.1:{int(line)}/"

    def finish(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        with open(self.stats_path) as f:
            return json.load(f)


def api_figures(stats, rate):
    """Throughput over the last 80% of the run's time at the server, and the 429 fraction."""
    times = stats["ok_times"]
    out = {"requests": stats["requests"], "ok": stats["ok"], "throttled": stats["throttled"],
           "ok_ids": stats["ok_ids"], "ok_duplicates": stats["ok_duplicates"],
           "max_in_flight": stats["max_in_flight"],
           "throttled_fraction": round(stats["throttled"] / stats["requests"], 4) if stats["requests"] else None,
           "ok_per_s_last80": None, "ratio_to_rate": None, "api_span_s": None}
    if times and stats["first_request"] is not None:
        t0, t1 = stats["first_request"], times[-1]
        out["api_span_s"] = round(t1 - t0, 3)
        if t1 > t0:
            start = t0 + 0.2 * (t1 - t0)
            n = sum(1 for t in times if t >= start)
            out["ok_per_s_last80"] = round(n / (t1 - start), 2)
            out["ratio_to_rate"] = round(out["ok_per_s_last80"] / rate, 3)
    return out


def targets(run, rate_flag):
    """The issue's targets for a Settle run: name -> met."""
    t = {}
    ratio, frac = run["ratio_to_rate"] or 0.0, run["throttled_fraction"] or 0.0
    if rate_flag:
        t[">=0.95R"] = ratio >= 0.95
        t["<=1% 429"] = frac <= 0.01
    else:
        t["0 failed"] = run["failed"] == 0
        t[">=0.85R"] = ratio >= 0.85
        t["<=5% 429"] = frac <= 0.05
    return t


def line(name, r, rate):
    ratio = f"{r['ratio_to_rate']:.2f}" if r["ratio_to_rate"] is not None else "-"
    tput = f"{r['ok_per_s_last80']:,.1f}" if r["ok_per_s_last80"] is not None else "-"
    frac = f"{100 * r['throttled_fraction']:.1f}%" if r["throttled_fraction"] is not None else "-"
    s = (f"{name}: {r['succeeded']:,} succeeded, {r['failed']:,} failed; {tput} ok/s over the last 80% = {ratio} x R "
         f"(R {rate:g}/s); 429s {frac} ({r['throttled']:,} of {r['requests']:,} requests); wall {r['wall_s']:.1f} s")
    if r.get("stopped"):
        s += f" (stopped at the {r['stopped']} s limit, {r['succeeded']:,} of {r['items']:,} done)"
    if r.get("targets"):
        s += "; targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in r["targets"].items())
    return s


def settle_accepts(settle, flag):
    out = subprocess.run([settle, "run", "--help"], capture_output=True, text=True).stdout
    return any(part.strip().startswith(flag + " ") or part.strip() == flag for part in out.replace(",", "\n").splitlines())


def processor_args(kind, url, flow_control):
    if kind == "http":
        return ["--http", url]
    if kind == "jsonl":
        extra = "" if flow_control else " --as-retry"
        return ["--exec", f"node {os.path.join(ROOT, 'bench', 'node', 'flow-processor.js')} {url}{extra}", "--protocol", "jsonl"]
    return ["--exec", f"sh {os.path.join(ROOT, 'bench', 'flow-exec.sh')} {url}"]


def run_settle(a, items, kind, flags, flow_control):
    db_dir = os.path.join(a.workdir, "db")
    shutil.rmtree(db_dir, ignore_errors=True)
    db = os.path.join(db_dir, "settle.db")
    api = Api(a, os.path.join(a.workdir, "server-stats.json"))
    try:
        proc_args = processor_args(kind, api.url, flow_control)
        cmd = [a.settle, "--db", db, "run", "--items", items, "--json", *proc_args, *flags]
        busy0, load = machine_busy_s(), open("/proc/loadavg").read().split()[0]
        started = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        wall = time.monotonic() - started
        busy = machine_busy_s() - busy0
    finally:
        stats = api.finish()
    if proc.returncode not in (0, 1, 2) or not proc.stdout.strip():
        sys.exit(f"settle failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    run_id = json.loads(proc.stdout.strip().splitlines()[-1])["run_id"]
    st = subprocess.run([a.settle, "--db", db, "status", run_id, "--json"], capture_output=True, text=True, check=True)
    status = json.loads(st.stdout.strip().splitlines()[-1])
    assert status["total"] == a.count and status["pending"] == 0, status
    assert status["succeeded"] + status["failed"] == a.count, status
    shutil.rmtree(db_dir, ignore_errors=True)
    r = {"tool": "settle", "kind": kind, "flags": " ".join(flags) or "no flag", "items": a.count,
         "succeeded": status["succeeded"], "failed": status["failed"], "status": status.get("status"),
         "wall_s": round(wall, 2), **api_figures(stats, a.rate),
         "machine_busy_s": round(busy, 1), "load_avg_before": load,
         "command": shlex.join(["settle", "--db", "DB", "run", "--items", "ITEMS", "--json"]
                             + [x.replace(api.url, "URL").replace(ROOT + "/", "") for x in proc_args] + flags)}
    # What the API saw must agree with the ledger: every success was a 200.
    if r["ok_ids"] != r["succeeded"]:
        r["note"] = f"the API answered 200 to {r['ok_ids']} distinct items, the ledger has {r['succeeded']} succeeded"
    r["targets"] = targets(r, bool(flags))
    return r


def run_parallel(a, items):
    api = Api(a, os.path.join(a.workdir, "server-stats.json"))
    joblog = os.path.join(a.workdir, "parallel.joblog")
    if os.path.exists(joblog):
        os.remove(joblog)
    job = f"printf '%s\\n' @@ | sh bench/flow-exec.sh {api.url}"
    cmd = ["parallel", "--will-cite", "-j", str(a.parallel_jobs), "--delay", "auto", "--retries", "1000",
           "--joblog", joblog, "-I", "@@", job, "::::", items]
    stopped = None
    try:
        busy0, load = machine_busy_s(), open("/proc/loadavg").read().split()[0]
        started = time.monotonic()
        with open(os.devnull) as devnull:
            proc = subprocess.Popen(cmd, stdin=devnull, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    env=dict(os.environ, PARALLEL_SHELL="/bin/sh"), cwd=ROOT, start_new_session=True)
            try:
                proc.wait(a.peer_limit)
            except subprocess.TimeoutExpired:
                stopped = a.peer_limit
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        wall = time.monotonic() - started
        busy = machine_busy_s() - busy0
    finally:
        stats = api.finish()
    ok = failed = 0
    with open(joblog) as f:
        next(f, None)
        for row in f:
            cols = row.split("\t")
            if len(cols) > 6:
                ok += cols[6] == "0"
                failed += cols[6] != "0"
    r = {"tool": "parallel", "kind": "exec", "flags": f"-j {a.parallel_jobs} --delay auto --retries 1000",
         "items": a.count, "succeeded": ok, "failed": failed, "stopped": stopped,
         "wall_s": round(wall, 2), **api_figures(stats, a.rate),
         "machine_busy_s": round(busy, 1), "load_avg_before": load,
         "command": (f"PARALLEL_SHELL=/bin/sh parallel --will-cite -j {a.parallel_jobs} --delay auto --retries 1000 "
                     "--joblog JOBLOG -I @@ \"printf '%s\\n' @@ | sh bench/flow-exec.sh URL\" :::: ITEMS")}
    return r


def run_bullmq(a, items):
    redis_dir = os.path.join(a.workdir, "redis")
    shutil.rmtree(redis_dir, ignore_errors=True)
    os.makedirs(redis_dir)
    port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", redis_dir,
                              "--appendonly", "yes", "--appendfsync", "everysec", "--daemonize", "no",
                              "--logfile", os.path.join(redis_dir, "redis.log")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = None
    try:
        wait_port(port, redis, "redis-server")
        api = Api(a, os.path.join(a.workdir, "server-stats.json"))
        script = os.path.join(ROOT, "bench", "node", "bullmq-flow.js")
        cmd = ["node", script, items, str(port), api.url, str(int(a.rate)), str(a.bullmq_concurrency), str(a.peer_limit)]
        busy0, load = machine_busy_s(), open("/proc/loadavg").read().split()[0]
        started = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        wall = time.monotonic() - started
        busy = machine_busy_s() - busy0
    finally:
        stats = api.finish() if api else None
        stop(redis)
        shutil.rmtree(redis_dir, ignore_errors=True)
    if proc.returncode != 0:
        sys.exit(f"bullmq-flow.js failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"tool": "bullmq", "kind": "node", "flags": f"limiter {{max: {int(a.rate)}, duration: 1000}}, concurrency {a.bullmq_concurrency}",
            "items": a.count, "succeeded": out["completed"], "failed": out["failed"],
            "stopped": a.peer_limit if out.get("stopped") else None,
            "wall_s": round(wall, 2), **api_figures(stats, a.rate),
            "machine_busy_s": round(busy, 1), "load_avg_before": load,
            "command": f"node bench/node/bullmq-flow.js ITEMS REDIS_PORT URL {int(a.rate)} {a.bullmq_concurrency} {a.peer_limit}"}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("count", type=int, nargs="?", help="items (default 10,000; 2,000 with --quick)")
    p.add_argument("--rate", type=float, default=100.0, help="the API's limit R, requests a second (default 100)")
    p.add_argument("--burst", type=float, help="the API's burst (default R/10 rounded up)")
    p.add_argument("--quick", action="store_true", help="2,000 items")
    p.add_argument("--kinds", default="http,jsonl,exec")
    p.add_argument("--peers", default="parallel,bullmq", help="comma-separated, or 'none'")
    p.add_argument("--settle", default=os.path.join(ROOT, "target", "release", "settle"))
    p.add_argument("--peer-limit", type=int, help="seconds a peer may take (default 2 N/R + 60)")
    p.add_argument("--parallel-jobs", type=int, default=8)
    p.add_argument("--bullmq-concurrency", type=int, default=64)
    p.add_argument("--workdir", default=os.path.join(ROOT, "bench-data", "flow"))
    a = p.parse_args()
    a.settle = os.path.abspath(a.settle)
    a.count = a.count or (2_000 if a.quick else 10_000)
    a.peer_limit = a.peer_limit or int(2 * a.count / a.rate + 60)
    kinds = [k for k in a.kinds.split(",") if k]
    peers = [x for x in a.peers.split(",") if x and x != "none"]
    for k in kinds:
        if k not in ("http", "jsonl", "exec"):
            p.error(f"unknown kind {k!r}")
    for x in peers:
        if x not in ("parallel", "bullmq"):
            p.error(f"unknown peer {x!r}")
    os.makedirs(a.workdir, exist_ok=True)
    items = items_file(a.workdir, a.count)
    version = subprocess.run([a.settle, "--version"], capture_output=True, text=True).stdout.strip()
    has_rate = settle_accepts(a.settle, "--rate")
    burst = a.burst if a.burst is not None else max(1, -(-int(a.rate) // 10))
    print(f"flow: {a.count:,} items, API limit R = {a.rate:g}/s (burst {burst:g}, 429 with Retry-After: 1); {version}; "
          f"{os.cpu_count()} cores, {platform.machine()}", flush=True)
    if not has_rate:
        print(f"note: {version} has no --rate flag: the --rate {a.rate:g}/s runs are skipped", flush=True)

    runs, skipped = [], []
    for kind in kinds:
        for flags in ([], ["--rate", f"{a.rate:g}/s"]):
            name = f"settle {kind} ({' '.join(flags) or 'no flag'})"
            if flags and not has_rate:
                skipped.append(name)
                continue
            r = run_settle(a, items, kind, flags, has_rate)
            runs.append(r)
            print(line(name, r, a.rate), flush=True)
    for peer in peers:
        r = run_parallel(a, items) if peer == "parallel" else run_bullmq(a, items)
        runs.append(r)
        print(line(f"{peer} ({r['flags']})", r, a.rate), flush=True)

    result = {"rate": a.rate, "burst": burst, "retry_after_s": 1, "items": a.count, "runs": runs, "skipped": skipped,
              "machine": {"cores": os.cpu_count(), "arch": platform.machine(), "kernel": platform.release(),
                          "settle": version, "settle_has_rate": has_rate,
                          "node": subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()}}
    path = os.path.join(a.workdir, f"results-R{a.rate:g}-B{burst:g}-N{a.count}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"results: {os.path.relpath(path, ROOT) if path.startswith(ROOT) else path}", flush=True)


if __name__ == "__main__":
    main()
