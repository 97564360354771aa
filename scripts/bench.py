#!/usr/bin/env python3
"""Benchmark `settle run` end to end (load included): items/s and peak RSS.

Usage: scripts/bench.py COUNT [--settle PATH] [--workdir DIR] [extra settle run flags...]
Generates COUNT items of the bench mix (10% permanent failures, the rest ok)
once, runs them on a fresh database, and prints one line of figures.
"""
import json, os, platform, resource, shutil, subprocess, sys, time

def main():
    args = sys.argv[1:]
    if not args:
        sys.exit(__doc__)
    count = int(args.pop(0))
    settle, workdir = "target/release/settle", "bench-data"
    while args and args[0] in ("--settle", "--workdir"):
        flag, value = args.pop(0), args.pop(0)
        if flag == "--settle":
            settle = value
        else:
            workdir = value
    os.makedirs(workdir, exist_ok=True)
    items = os.path.join(workdir, f"bench-{count}.jsonl")
    # The items file takes about 50 bytes per item, the database and its WAL
    # about 500 at their largest (4.6 GiB at 10M items). A disk that fills
    # mid-run only wastes the run, so say so before starting.
    need = count * (600 if os.path.exists(items) else 660)
    free = shutil.disk_usage(workdir).free
    if free < need:
        sys.exit(f"not enough free disk in {workdir}: {free / 2**30:.1f} GiB free; "
                 f"a run of {count} items needs about {need / 2**30:.1f} GiB")
    if not os.path.exists(items):
        with open(items + ".tmp", "w") as out:
            subprocess.run([settle, "generate", "--count", str(count), "--mix", "bench"], stdout=out, check=True)
        os.replace(items + ".tmp", items)
    db_dir = os.path.join(workdir, f"db-{count}")
    shutil.rmtree(db_dir, ignore_errors=True)
    cmd = [settle, "--db", os.path.join(db_dir, "settle.db"), "run", "--items", items, "--json", *args]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        sys.exit(f"settle failed ({proc.returncode}):\n{proc.stderr}")
    run = json.loads(proc.stdout.strip().splitlines()[-1])
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    settled = run["succeeded"] + run["failed"]
    assert settled == count and run["pending"] == 0, run
    expected_failed = sum(1 for line in open(items) if "permanent" in line)
    assert run["failed"] == expected_failed, (run, expected_failed)
    db_mib = sum(os.path.getsize(os.path.join(db_dir, f)) for f in os.listdir(db_dir)) / 2**20
    print(f"{count} items ({run['failed']} failed, exact) in {wall:.1f} s = {count / wall:,.0f} items/s "
          f"end to end, load included; peak RSS {peak_mib:.0f} MiB; database {db_mib:.0f} MiB; "
          f"{os.cpu_count()} cores, {platform.machine()}; flags: {' '.join(args) or '(defaults)'}")
    shutil.rmtree(db_dir, ignore_errors=True)

if __name__ == "__main__":
    main()
