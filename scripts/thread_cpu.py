#!/usr/bin/env python3
"""Runs a command and reports the CPU time of each of its threads and of its
descendants, sampled from /proc every 0.1 s (the last sample before each
exits), with the wall time. A quick "where does the CPU go" without perf.

Usage: scripts/thread_cpu.py CMD [ARGS...]
"""
import os, subprocess, sys, threading, time
from collections import defaultdict

TICK = os.sysconf("SC_CLK_TCK")


def stat(path):
    try:
        with open(path) as f:
            data = f.read()
    except OSError:
        return None
    comm = data[data.index("(") + 1:data.rindex(")")]
    fields = data[data.rindex(")") + 2:].split()
    return comm, int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK


def main():
    cmd = sys.argv[1:]
    if not cmd:
        sys.exit(__doc__)
    started = time.monotonic()
    proc = subprocess.Popen(cmd)
    threads, others = {}, {}
    done = threading.Event()

    def sample():
        while not done.is_set():
            for tid in os.listdir(f"/proc/{proc.pid}/task") if os.path.exists(f"/proc/{proc.pid}/task") else []:
                s = stat(f"/proc/{proc.pid}/task/{tid}/stat")
                if s:
                    threads[tid] = (s[0], s[2])
            parents = {}
            for name in os.listdir("/proc"):
                if name.isdigit():
                    s = stat(f"/proc/{name}/stat")
                    if s:
                        parents[int(name)] = s
            family, grew = {proc.pid}, True
            while grew:
                grew = False
                for p, s in parents.items():
                    if s[1] in family and p not in family:
                        family.add(p)
                        grew = True
            for p in family - {proc.pid}:
                others[p] = (parents[p][0], parents[p][2])
            done.wait(0.1)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    rc = proc.wait()
    wall = time.monotonic() - started
    done.set()
    t.join()
    by_name = defaultdict(lambda: [0.0, 0])
    for comm, cpu in threads.values():
        by_name[comm][0] += cpu
        by_name[comm][1] += 1
    print(f"--- wall {wall:.2f} s; exit {rc}; threads of pid {proc.pid} (CPU s, % of wall):", file=sys.stderr)
    for comm, (cpu, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0]):
        print(f"  {comm:<20} x{n:<3} {cpu:7.2f} s {100 * cpu / wall:5.0f}%", file=sys.stderr)
    kids = defaultdict(lambda: [0.0, 0])
    for comm, cpu in others.values():
        kids[comm][0] += cpu
        kids[comm][1] += 1
    for comm, (cpu, n) in sorted(kids.items(), key=lambda kv: -kv[1][0]):
        print(f"  child {comm:<14} x{n:<3} {cpu:7.2f} s {100 * cpu / wall:5.0f}%", file=sys.stderr)
    sys.exit(rc)


if __name__ == "__main__":
    main()
