#!/usr/bin/env python3
"""Cost per million items on AWS, from the calls of a real run on the emulator.

Usage: scripts/cost.py [COUNT] [--runs R] [--settle PATH] [--worker-ms MS] [--reducer-ms MS]
                       [--output-bytes N] [--log-bytes N]
Needs the emulator's exports in the environment (`make cost` starts it).

Each item's payload asks the scripted processor for an output of
--output-bytes (100 by default) and a log line of --log-bytes (100) on
every attempt (payload.output_bytes, payload.log_bytes): what a real
processor's output and log add to the ledger rows and results messages,
with items of the bench mix's size. 0 leaves them out.

Runs COUNT items of the bench mix (10% permanent failures) through
`settle --backend aws` with local workers, as R runs of COUNT/R items on
one stack (moto's SendMessageBatch slows down linearly with the queue's
length, so a single run of 10,000 queued items would take hours there; the
per-run fixed calls are then paid R times, which errs high). Each run is
three commands (load, dispatch, process), each writing its AWS calls with
--report-calls. The
calls are counted by an SDK interceptor in settle-aws; DynamoDB units are
derived from the requests and responses by DynamoDB's billing rules (moto
reports none for transactions). Lambda is priced from the invocations the
event source mapping would make at the template's batch sizes and an
assumed duration per invocation (the flags), at 128 MB on arm64.
"""
import json, os, random, subprocess, sys, tempfile

# Public prices, us-east-1, on demand, as of 2026 (see README).
SQS_PER_REQUEST = 0.40 / 1e6          # standard queue, per 64 KB request
DDB_PER_WRU = 0.625 / 1e6             # on-demand write request unit
DDB_PER_RRU = 0.125 / 1e6             # on-demand read request unit
LAMBDA_PER_REQUEST = 0.20 / 1e6
LAMBDA_PER_GB_S_ARM = 0.0000133334
MEMORY_GB = 128 / 1024
WORKER_BATCH = 10                     # template.yaml: worker BatchSize
REDUCER_BATCH = 9                     # template.yaml: reducer BatchSize (messages of up to 10 results)


def fresh_stack():
    """A stack of its own on the emulator, so earlier runs change nothing."""
    prefix = f"cost{random.randrange(16**8):08x}-"
    out = subprocess.run([".venv/bin/python", "infra/provision.py", os.environ["AWS_ENDPOINT_URL"], prefix],
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.split())


def settle(binary, args, report, stack):
    cmd = [binary, "--backend", "aws", "--workers", "local", "--report-calls", report, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **stack})
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    with open(report) as f:
        return json.loads(proc.stdout.strip().splitlines()[-1]), json.load(f)


def main():
    args = sys.argv[1:]
    count, binary, runs = 10000, "target/debug/settle", 10
    worker_ms, reducer_ms = 100.0, 200.0
    output_bytes, log_bytes = 100, 100
    while args:
        a = args.pop(0)
        if a == "--settle":
            binary = args.pop(0)
        elif a == "--worker-ms":
            worker_ms = float(args.pop(0))
        elif a == "--reducer-ms":
            reducer_ms = float(args.pop(0))
        elif a == "--output-bytes":
            output_bytes = int(args.pop(0))
        elif a == "--log-bytes":
            log_bytes = int(args.pop(0))
        elif a == "--runs":
            runs = int(args.pop(0))
        else:
            count = int(a)
    if not os.environ.get("AWS_ENDPOINT_URL"):
        sys.exit('AWS_ENDPOINT_URL is not set: run `make cost`, or eval "$(infra/emulator.sh up)" first')
    tmp = tempfile.mkdtemp(prefix="settle-cost-")
    stack = fresh_stack()
    phases = {"load": {}, "dispatch": {}, "process": {}}
    per_run = count // runs
    succeeded = failed = 0

    def add(phase, rep):
        for op, n in rep["calls"].items():
            phases[phase].setdefault("calls", {}).setdefault(op, 0)
            phases[phase]["calls"][op] += n
        for op, u in rep["dynamodb_units"]["billed_estimate"].items():
            phases[phase].setdefault("units", {}).setdefault(op, 0.0)
            phases[phase]["units"][op] += u

    for r in range(runs):
        items = os.path.join(tmp, f"items-{r}.jsonl")
        generated = subprocess.run(
            [binary, "generate", "--count", str(per_run), "--mix", "bench", "--seed", str(r + 1)],
            capture_output=True, text=True, check=True).stdout
        with open(items, "w") as out:
            for line in generated.splitlines():
                item = json.loads(line)
                payload = item.setdefault("payload", {})
                # The scripted processor makes them: the items stay the
                # bench mix's size.
                if output_bytes:
                    payload["output_bytes"] = output_bytes
                if log_bytes:
                    payload["log_bytes"] = log_bytes
                out.write(json.dumps(item, separators=(",", ":")) + "\n")
        expected_failed = sum(1 for line in open(items) if "permanent" in line)
        _, rep = settle(binary, ["load", "--items", items, "--json"], os.path.join(tmp, "load.json"), stack)
        add("load", rep)
        run, rep = settle(binary, ["dispatch", "--json"], os.path.join(tmp, "dispatch.json"), stack)
        add("dispatch", rep)
        done, rep = settle(
            # The work queue's visibility timeout of template.yaml (180 s):
            # the worker function does not extend visibility there, and the
            # local runner's heartbeat (a third of the timeout) then stays
            # out of the count as well.
            binary, ["resume", run["run_id"], "--json", "--processor", "scripted", "--concurrency", "80",
                     "--retry-delay-ms", "100", "--visibility-timeout", "180"],
            os.path.join(tmp, "process.json"), stack)
        add("process", rep)
        if done["total"] != per_run or done["pending"] != 0 or done["failed"] != expected_failed:
            sys.exit(f"run {run['run_id']} did not settle exactly: {done}, expected {expected_failed} failed")
        if r == runs - 1 and output_bytes:
            # The outputs are stored and read back from the deployed ledger.
            res = subprocess.run([binary, "--backend", "aws", "results", run["run_id"]],
                                 capture_output=True, text=True, env={**os.environ, **stack}, check=True)
            lines = [json.loads(l) for l in res.stdout.splitlines()]
            want = {"receipt": "r" * max(1, output_bytes - len('{"receipt":""}'))}
            with_output = sum(1 for l in lines if l.get("output") == want)
            if len(lines) != per_run or with_output != done["succeeded"]:
                sys.exit(f"results of {run['run_id']}: {len(lines)} lines, {with_output} with their output, "
                         f"expected {per_run} and {done['succeeded']}")
        succeeded += done["succeeded"]
        failed += done["failed"]
        print(f"run {r + 1}/{runs} ({run['run_id']}): {done['succeeded']} succeeded, "
              f"{done['failed']} failed (exact)", file=sys.stderr, flush=True)
    count = per_run * runs

    print(f"{count} items in {runs} runs on the emulator: {succeeded} succeeded, {failed} failed (exact); "
          f"outputs of {output_bytes} bytes, logs of {log_bytes} bytes per attempt\n")
    print(f"{'phase':9} {'operation':34} {'calls':>8} {'per item':>9} {'units':>10}")
    totals = {"sqs": 0.0, "sqs_empty": 0.0, "wru": 0.0, "rru": 0.0}
    for phase, rep in phases.items():
        units = rep.get("units", {})
        for op, n in sorted(rep.get("calls", {}).items()):
            u = ""
            if op.startswith("DynamoDB."):
                w, r = units.get(f"{op} WRU", 0.0), units.get(f"{op} RRU", 0.0)
                totals["wru"] += w
                totals["rru"] += r
                u = " ".join(x for x in [f"{w:g} WRU" if w else "", f"{r:g} RRU" if r else ""] if x)
            elif op == "SQS.ReceiveMessage (empty)":
                totals["sqs_empty"] += n
            elif op.startswith("SQS.") and op != "SQS.GetQueueAttributes":
                totals["sqs"] += n
            print(f"{phase:9} {op:34} {n:>8} {n / count:>9.4f} {u:>10}")
    # Idle polls are billed too, but they follow time, not items: the event
    # source mapping long-polls an idle queue (20 s). Per item, count only
    # the receives that returned messages.
    sqs_per_item = (totals["sqs"] - totals["sqs_empty"]) / count
    wru_per_item, rru_per_item = totals["wru"] / count, totals["rru"] / count
    invocations = count / WORKER_BATCH + count / WORKER_BATCH / REDUCER_BATCH
    gb_s = MEMORY_GB * (count / WORKER_BATCH * worker_ms
                        + count / WORKER_BATCH / REDUCER_BATCH * reducer_ms) / 1000
    per_million = {
        "SQS requests": sqs_per_item * 1e6 * SQS_PER_REQUEST,
        "DynamoDB writes": wru_per_item * 1e6 * DDB_PER_WRU,
        "DynamoDB reads": rru_per_item * 1e6 * DDB_PER_RRU,
        "Lambda requests": invocations / count * 1e6 * LAMBDA_PER_REQUEST,
        "Lambda GB-s": gb_s / count * 1e6 * LAMBDA_PER_GB_S_ARM,
    }
    print(f"\nper item: {sqs_per_item:.3f} SQS requests (plus {totals['sqs_empty'] / count:.3f} idle "
          f"receives of the local runner), {wru_per_item:.3f} WRU, {rru_per_item:.3f} RRU, "
          f"{invocations / count:.4f} Lambda invocations")
    print(f"\ncost per million items (us-east-1 on-demand prices; Lambda at 128 MB arm64, "
          f"{worker_ms:g} ms per worker and {reducer_ms:g} ms per reducer invocation):")
    for k, v in per_million.items():
        print(f"  {k:16} ${v:.3f}")
    total = sum(per_million.values())
    print(f"  {'total':16} ${total:.2f}  (target $1.50)")


if __name__ == "__main__":
    main()
