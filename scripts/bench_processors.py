#!/usr/bin/env python3
"""Benchmark Settle's processors against a well-known tool doing the same work.

Usage: scripts/bench_processors.py MODE [--settle PATH] [--count N] [--reps N] [--workdir DIR]
  jsonl  `--exec "node bench/node/handler.js" --protocol jsonl` (100,000 items)
         versus BullMQ on a fresh Redis (appendonly yes, appendfsync everysec)
         with the same handler logic (bench/node/bullmq.js).
  http   `--http` against bench/node/http-server.js (100,000 items) versus
         wrk with 64 connections against the same server for 10 s.
  exec   `--exec "cat >/dev/null; echo '{}'"` (5,000 items) versus GNU
         parallel running the same command (sh -c CMD) once per item, the
         item on its stdin, at Settle's default jobs (4 per core) and at
         parallel's own (1 per core).

Settle runs at its default settings (no --concurrency), on a fresh database,
load included; each repetition runs both sides in turn. Every Settle run's
tally is checked exactly. Prints one line per run and a summary, and writes
them as JSON to WORKDIR/results-MODE.json.

CPU is split between Settle's own process and its children (the processor
processes) by sampling /proc/PID/stat every 0.1 s: "settle" is the last
sample of the process's own utime+stime, "children" what wait4 reports on
top of it (processes it reaped) plus, for jsonl, the last sample of each
live descendant it had not reaped.
"""
import argparse, json, shlex, os, platform, shutil, signal, socket, statistics, subprocess, sys, tempfile, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK = os.sysconf("SC_CLK_TCK")
EXEC_CMD = "cat >/dev/null; echo '{}'"


def proc_stat(pid):
    """(ppid, own cpu s, reaped children's cpu s) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2:].split()
    # fields[0] is state (field 3); utime is field 14, so index 11.
    ppid = int(fields[1])
    own = (int(fields[11]) + int(fields[12])) / TICK
    reaped = (int(fields[13]) + int(fields[14])) / TICK
    return ppid, own, reaped


def machine_busy_s():
    """CPU seconds the whole machine has spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / TICK  # less idle and iowait; guest time is in user


def vm_hwm_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class Sampler(threading.Thread):
    """Samples a process (and optionally its live descendants) every 0.1 s."""

    def __init__(self, pid, descendants):
        super().__init__(daemon=True)
        self.pid, self.descendants = pid, descendants
        self.own = 0.0
        self.hwm = 0.0
        self.desc_cpu = {}  # pid -> last own cpu seen
        self.stop = threading.Event()

    def sample(self):
        st = proc_stat(self.pid)
        if st is None:
            return
        self.own = st[1]
        self.hwm = max(self.hwm, vm_hwm_mib(self.pid) or 0.0)
        if self.descendants:
            parents = {}
            for name in os.listdir("/proc"):
                if name.isdigit():
                    s = proc_stat(int(name))
                    if s:
                        parents[int(name)] = (s[0], s[1])
            family = {self.pid}
            grew = True
            while grew:
                grew = False
                for p, (pp, _) in parents.items():
                    if pp in family and p not in family:
                        family.add(p)
                        grew = True
            for p in family - {self.pid}:
                self.desc_cpu[p] = parents[p][1]

    def run(self):
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(0.1)


def run_measured(cmd, descendants=False, env=None, cwd=ROOT):
    """Runs cmd; returns wall s, stdout, stderr, total cpu s (wait4), own cpu s, children cpu s, own peak RSS MiB."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        busy0 = machine_busy_s()
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd)
        sampler = Sampler(proc.pid, descendants)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - started
        busy = machine_busy_s() - busy0
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop.set()
        sampler.join()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    total = usage.ru_utime + usage.ru_stime
    own = sampler.own
    # Children that the process reaped are in wait4's figure; live
    # descendants it never waited for are counted from their last sample.
    reaped_children = max(0.0, total - own)
    unreaped = sum(sampler.desc_cpu.values()) if descendants else 0.0
    children = max(reaped_children, unreaped)
    return {
        "wall_s": wall, "returncode": proc.returncode, "stdout": stdout, "stderr": stderr,
        "cpu_total_s": max(total, own + children), "cpu_own_s": own, "cpu_children_s": children,
        "peak_rss_mib": sampler.hwm or usage.ru_maxrss / 1024,
        # The machine is shared: what else ran (its busy CPU less this run's).
        "machine_busy_s": busy, "load_avg": open("/proc/loadavg").read().split()[0],
    }


def items_file(settle, workdir, count):
    path = os.path.join(workdir, f"items-{count}.jsonl")
    if not os.path.exists(path):
        with open(path + ".tmp", "w") as out:
            subprocess.run([settle, "generate", "--count", str(count), "--mix", "bench"], stdout=out, check=True)
        os.replace(path + ".tmp", path)
    return path


def run_settle(settle, workdir, items, count, processor_args, descendants=False, expect_failed=None):
    db_dir = os.path.join(workdir, "db")
    shutil.rmtree(db_dir, ignore_errors=True)
    cmd = [settle, "--db", os.path.join(db_dir, "settle.db"), "run", "--items", items, "--json", *processor_args]
    r = run_measured(cmd, descendants=descendants)
    if r["returncode"] != 0:
        sys.exit(f"settle failed ({r['returncode']}): {' '.join(cmd)}\n{r['stderr'][-4000:]}")
    run = json.loads(r["stdout"].strip().splitlines()[-1])
    assert run["succeeded"] + run["failed"] == count and run["pending"] == 0, run
    if expect_failed is not None:
        assert run["failed"] == expect_failed, (run, expect_failed)
    shutil.rmtree(db_dir, ignore_errors=True)
    return {
        "items": count, "succeeded": run["succeeded"], "failed": run["failed"],
        "wall_s": round(r["wall_s"], 3), "items_per_s": round(count / r["wall_s"], 1),
        "cpu_settle_s": round(r["cpu_own_s"], 2), "cpu_children_s": round(r["cpu_children_s"], 2),
        "peak_rss_mib": round(r["peak_rss_mib"], 1),
        "machine_busy_s": round(r["machine_busy_s"], 2), "load_avg": r["load_avg"],
        "command": " ".join(cmd[:1] + ["--db", "DB"] + cmd[3:]),
    }


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, what, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited ({proc.returncode}) before listening")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not listen on {port} within {timeout} s")


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_of(pid):
    st = proc_stat(pid)
    return st[1] if st else 0.0


def ratio_line(name, settle_runs, other_runs, key_settle="items_per_s", key_other="items_per_s"):
    s = [r[key_settle] for r in settle_runs]
    o = [r[key_other] for r in other_runs]
    per_rep = [round(a / b, 2) for a, b in zip(s, o)]
    return {
        "settle": s, name: o, "ratio_per_rep": per_rep,
        "settle_median": statistics.median(s), f"{name}_median": statistics.median(o),
        "ratio_of_medians": round(statistics.median(s) / statistics.median(o), 2),
    }


def mode_jsonl(a, items, expect_failed):
    node_dir = os.path.join(ROOT, "bench", "node")
    settle_runs, bull_runs = [], []
    conc = os.environ.get("BULLMQ_CONCURRENCY", "100")
    for rep in range(a.reps):
        r = run_settle(a.settle, a.workdir, items, a.count,
                       ["--exec", "node bench/node/handler.js", "--protocol", "jsonl"],
                       descendants=True, expect_failed=expect_failed)
        settle_runs.append(r)
        print(f"[{rep + 1}] settle jsonl: {r['items_per_s']:,.0f} items/s ({r['wall_s']:.2f} s; "
              f"cpu settle {r['cpu_settle_s']} s, node {r['cpu_children_s']} s; settle peak RSS {r['peak_rss_mib']} MiB)", flush=True)

        # A fresh Redis for every run: its AOF is written from empty.
        redis_dir = os.path.join(a.workdir, "redis")
        shutil.rmtree(redis_dir, ignore_errors=True)
        os.makedirs(redis_dir)
        port = free_port()
        redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", redis_dir,
                                  "--appendonly", "yes", "--appendfsync", "everysec", "--daemonize", "no",
                                  "--logfile", os.path.join(redis_dir, "redis.log")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(port, redis, "redis-server")
            cpu_redis0 = cpu_of(redis.pid)
            m = run_measured(["node", os.path.join(node_dir, "bullmq.js"), items, str(port), conc])
            cpu_redis = cpu_of(redis.pid) - cpu_redis0
        finally:
            stop(redis)
            shutil.rmtree(redis_dir, ignore_errors=True)
        if m["returncode"] != 0:
            sys.exit(f"bullmq.js failed ({m['returncode']}):\n{m['stderr'][-4000:]}")
        out = json.loads(m["stdout"].strip().splitlines()[-1])
        assert out["completed"] + out["failed"] == a.count and out["failed"] == expect_failed, out
        b = {
            "items": a.count, "completed": out["completed"], "failed": out["failed"], "concurrency": out["concurrency"],
            "enqueue_s": round(out["enqueue_s"], 3), "wall_s": round(out["wall_s"], 3),
            "items_per_s": round(out["items_per_s"], 1),
            "cpu_node_s": round(m["cpu_total_s"], 2), "cpu_redis_s": round(cpu_redis, 2),
            "process_wall_s": round(m["wall_s"], 3),
            "machine_busy_s": round(m["machine_busy_s"], 2), "load_avg": m["load_avg"],
            "command": f"node bench/node/bullmq.js ITEMS PORT {conc}",
        }
        bull_runs.append(b)
        print(f"[{rep + 1}] bullmq:       {b['items_per_s']:,.0f} items/s ({b['wall_s']:.2f} s, enqueue {b['enqueue_s']:.2f} s "
              f"of it; concurrency {conc}; cpu node {b['cpu_node_s']} s, redis {b['cpu_redis_s']} s)", flush=True)
    return {"settle": settle_runs, "bullmq": bull_runs, "summary": ratio_line("bullmq", settle_runs, bull_runs)}


def mode_http(a, items, _expect_failed):
    port = free_port()
    server = subprocess.Popen(["node", os.path.join(ROOT, "bench", "node", "http-server.js"), str(port)],
                              stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    settle_runs, wrk_runs = [], []
    try:
        wait_port(port, server, "http-server.js")
        for rep in range(a.reps):
            c0 = cpu_of(server.pid)
            r = run_settle(a.settle, a.workdir, items, a.count, ["--http", url], expect_failed=0)
            r["cpu_server_s"] = round(cpu_of(server.pid) - c0, 2)
            settle_runs.append(r)
            print(f"[{rep + 1}] settle http: {r['items_per_s']:,.0f} items/s ({r['wall_s']:.2f} s; cpu settle "
                  f"{r['cpu_settle_s']} s, server {r['cpu_server_s']} s; peak RSS {r['peak_rss_mib']} MiB)", flush=True)
            c0 = cpu_of(server.pid)
            cmd = ["wrk", "-t2", "-c64", f"-d{a.wrk_seconds}s", "-s", os.path.join(ROOT, "bench", "wrk-post.lua"), url]
            m = run_measured(cmd)
            cpu_server = cpu_of(server.pid) - c0
            if m["returncode"] != 0:
                sys.exit(f"wrk failed:\n{m['stderr']}")
            rps = next(float(line.split()[1]) for line in m["stdout"].splitlines() if line.startswith("Requests/sec:"))
            total = next(int(line.split()[0]) for line in m["stdout"].splitlines() if "requests in" in line)
            errors = [line.strip() for line in m["stdout"].splitlines() if "Non-2xx" in line or "Socket errors" in line]
            w = {"requests_per_s": rps, "requests": total, "errors": errors, "wall_s": round(m["wall_s"], 2),
                 "cpu_wrk_s": round(m["cpu_total_s"], 2), "cpu_server_s": round(cpu_server, 2),
                 "machine_busy_s": round(m["machine_busy_s"], 2), "load_avg": m["load_avg"],
                 "command": f"wrk -t2 -c64 -d{a.wrk_seconds}s -s bench/wrk-post.lua URL"}
            wrk_runs.append(w)
            print(f"[{rep + 1}] wrk:         {rps:,.0f} requests/s ({total} in {m['wall_s']:.1f} s; cpu wrk "
                  f"{w['cpu_wrk_s']} s, server {w['cpu_server_s']} s){' ' + str(errors) if errors else ''}", flush=True)
    finally:
        stop(server)
    return {"settle": settle_runs, "wrk": wrk_runs,
            "summary": ratio_line("wrk", settle_runs, wrk_runs, key_other="requests_per_s")}


def mode_exec(a, items, expect_failed):
    settle_runs, par_runs = [], []
    env = dict(os.environ, PARALLEL_SHELL="/bin/sh")
    jobs_default = os.cpu_count()
    jobs_settle = 4 * os.cpu_count()  # Settle's default for --exec: 4 per core
    for rep in range(a.reps):
        r = run_settle(a.settle, a.workdir, items, a.count, ["--exec", EXEC_CMD], expect_failed=0)
        r["wall_ms_per_item"] = round(1000 * r["wall_s"] / a.count, 3)
        r["cpu_ms_per_item"] = round(1000 * (r["cpu_settle_s"] + r["cpu_children_s"]) / a.count, 3)
        r["cpu_settle_ms_per_item"] = round(1000 * r["cpu_settle_s"] / a.count, 3)
        settle_runs.append(r)
        print(f"[{rep + 1}] settle exec:  {r['items_per_s']:,.0f} items/s ({r['wall_s']:.2f} s, {r['wall_ms_per_item']} ms wall/item; "
              f"cpu/item {r['cpu_ms_per_item']} ms = settle {r['cpu_settle_ms_per_item']} + processes)", flush=True)
        for jobs in (jobs_settle, jobs_default):
            # One job per input line, the line on the stdin of the same
            # command that Settle runs (sh -c CMD). `--pipe -N1` would give
            # the job its line on stdin directly, but is about half as fast.
            job = "printf '%s\\n' @@ | sh -c " + shlex.quote(EXEC_CMD)
            cmd = ["parallel", "--will-cite", "-j", str(jobs), "-I", "@@", job, "::::", items]
            resource_children()
            with open(os.devnull) as stdin:
                started = time.monotonic()
                proc = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
                out, err = proc.communicate()
                wall = time.monotonic() - started
            usage = resource_children()
            if proc.returncode != 0:
                sys.exit(f"parallel failed ({proc.returncode}):\n{err.decode()[-4000:]}")
            lines = out.decode().count("\n")
            assert lines == a.count, (lines, a.count)
            p = {"jobs": jobs, "items": a.count, "wall_s": round(wall, 3), "items_per_s": round(a.count / wall, 1),
                 "wall_ms_per_item": round(1000 * wall / a.count, 3), "cpu_ms_per_item": round(1000 * usage / a.count, 3),
                 "command": "PARALLEL_SHELL=/bin/sh " + shlex.join(cmd[:-1] + ["ITEMS"])}
            par_runs.append(p)
            print(f"[{rep + 1}] parallel -j{jobs}: {p['items_per_s']:,.0f} items/s ({wall:.2f} s, {p['wall_ms_per_item']} ms wall/item; "
                  f"cpu/item {p['cpu_ms_per_item']} ms)", flush=True)
    best = {}
    for p in par_runs:
        best.setdefault(p["jobs"], []).append(p)
    summary = {f"vs_parallel_j{j}": ratio_line(f"parallel_j{j}", settle_runs, runs) for j, runs in best.items()}
    return {"settle": settle_runs, "parallel": par_runs, "summary": summary}


_last_children_cpu = [0.0]


def resource_children():
    """CPU s of children reaped since the previous call."""
    import resource
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    now = ru.ru_utime + ru.ru_stime
    delta = now - _last_children_cpu[0]
    _last_children_cpu[0] = now
    return delta


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["jsonl", "http", "exec"])
    p.add_argument("--settle", default=os.path.join(ROOT, "target", "release", "settle"))
    p.add_argument("--count", type=int)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--wrk-seconds", type=int, default=10)
    p.add_argument("--workdir", default=os.path.join(ROOT, "bench-data", "processors"))
    a = p.parse_args()
    a.settle = os.path.abspath(a.settle)
    a.count = a.count or {"jsonl": 100_000, "http": 100_000, "exec": 5_000}[a.mode]
    os.makedirs(a.workdir, exist_ok=True)
    items = items_file(a.settle, a.workdir, a.count)
    expect_failed = sum(1 for line in open(items) if '"permanent"' in line)
    version = subprocess.run([a.settle, "--version"], capture_output=True, text=True).stdout.strip()
    print(f"{a.mode}: {a.count} items ({expect_failed} permanent), {a.reps} repetitions; {version}; "
          f"{os.cpu_count()} cores, {platform.machine()}", flush=True)
    resource_children()
    result = {"mode_jsonl": mode_jsonl, "mode_http": mode_http, "mode_exec": mode_exec}[f"mode_{a.mode}"](a, items, expect_failed)
    result["machine"] = {"cores": os.cpu_count(), "arch": platform.machine(), "kernel": platform.release(),
                         "settle": version, "node": subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()}
    print("summary:", json.dumps(result["summary"]), flush=True)
    with open(os.path.join(a.workdir, f"results-{a.mode}.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
