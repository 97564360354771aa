"""Lambda's event sources for the offline stack (infra/emulator.sh up --deployed).

Plays what AWS does between the queues and the functions, over the
emulator's SQS and the Lambda Invoke API of `cargo lambda watch`:

- an SQS event source mapping per function (template.yaml's Events): poll
  the queue, gather up to BatchSize messages (for at most the batching
  window once the first arrived), invoke the function with a real SQS event
  (Records with messageId, receiptHandle, body, attributes incl.
  ApproximateReceiveCount, eventSourceARN, ...), then apply its partial batch
  response: delete every message not named in batchItemFailures and leave
  the named ones to come back after their visibility timeout. An invocation
  that fails as a whole (an error, a timeout, a response that names a
  message not in the batch) deletes nothing: the whole batch comes back.
  At most `concurrency` invocations per function run at once
  (ScalingConfig.MaximumConcurrency).
- the dispatcher's schedule: every `tick` seconds an EventBridge
  "Scheduled Event" (the shape of infra/events/dispatcher-schedule.json,
  with a fresh id and time, as each real tick has), retried twice with the
  same event when it fails (EventInvokeConfig.MaximumRetryAttempts).

It never loses a message: whatever goes wrong, it only skips a delete, and
SQS brings the message back. Logs one line per invocation to --log.

Usage: esm.py --config FILE.json   (written by infra/emulator.sh)
"""
import argparse
import base64
import datetime
import json
import logging
import signal
import threading
import time
import urllib.error
import urllib.request
import uuid

import boto3

log = logging.getLogger("esm")
stopping = threading.Event()


class InvokeError(Exception):
    """The invocation failed as a whole: nothing of its batch is deleted."""


def invoke(lambda_url, function, payload, timeout):
    """A synchronous Invoke (RequestResponse); the function's JSON answer."""
    req = urllib.request.Request(
        f"{lambda_url}/2015-03-31/functions/{function}/invocations",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json",
                 "X-Amz-Invocation-Type": "RequestResponse"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
            error = resp.headers.get("X-Amz-Function-Error")
    except urllib.error.HTTPError as e:
        raise InvokeError(f"HTTP {e.code}: {e.read()[:500]!r}") from None
    except (urllib.error.URLError, OSError) as e:
        raise InvokeError(f"no answer within {timeout} s: {e}") from None
    if error:
        raise InvokeError(f"function error {error}: {body[:500]!r}")
    try:
        answer = json.loads(body) if body.strip() else None
    except ValueError:
        raise InvokeError(f"answer is not JSON: {body[:500]!r}") from None
    if isinstance(answer, dict) and "errorType" in answer:
        raise InvokeError(f"{answer.get('errorType')}: {answer.get('errorMessage')}")
    return answer


def sqs_record(m, arn, region):
    """One record of an SQS event, as Lambda's SQS event source builds it."""
    attrs = {}
    for name, a in (m.get("MessageAttributes") or {}).items():
        attrs[name] = {
            "stringValue": a.get("StringValue"),
            "binaryValue": (base64.b64encode(a["BinaryValue"]).decode()
                            if a.get("BinaryValue") is not None else None),
            "stringListValues": [], "binaryListValues": [],
            "dataType": a.get("DataType"),
        }
    return {
        "messageId": m["MessageId"],
        "receiptHandle": m["ReceiptHandle"],
        "body": m["Body"],
        "attributes": m.get("Attributes", {}),
        "messageAttributes": attrs,
        "md5OfBody": m.get("MD5OfBody"),
        "eventSource": "aws:sqs",
        "eventSourceARN": arn,
        "awsRegion": region,
    }


def failed_ids(answer, batch_ids):
    """The message ids the function handed back, or InvokeError if its answer
    fails the whole batch (Lambda: an id that is empty or not in the batch)."""
    if answer is None or answer == {}:
        return set()
    if not isinstance(answer, dict):
        raise InvokeError(f"answer is not a batch response: {answer!r:.500}")
    failures = answer.get("batchItemFailures") or []
    ids = set()
    for f in failures:
        ident = f.get("itemIdentifier") if isinstance(f, dict) else None
        if not ident or ident not in batch_ids:
            raise InvokeError(f"batchItemFailures names {ident!r}, not in the batch")
        ids.add(ident)
    return ids


class Mapping(threading.Thread):
    """One SQS event source mapping: a queue, a function, its batching."""

    def __init__(self, cfg, m):
        super().__init__(name=f"esm-{m['function']}", daemon=True)
        self.cfg, self.m = cfg, m
        self.sqs = boto3.client("sqs", endpoint_url=cfg["sqs_endpoint"], region_name=cfg["region"])
        self.arn = self.sqs.get_queue_attributes(
            QueueUrl=m["queue_url"], AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        self.slots = threading.Semaphore(m["concurrency"])

    def receive(self, count, wait):
        return self.sqs.receive_message(
            QueueUrl=self.m["queue_url"], MaxNumberOfMessages=min(10, count),
            WaitTimeSeconds=wait, AttributeNames=["All"], MessageAttributeNames=["All"],
        ).get("Messages", [])

    def gather(self):
        """Up to BatchSize messages: what one long poll brings, topped up for
        the batching window once the first message is in."""
        size, window = self.m["batch_size"], self.m["window_seconds"]
        batch = self.receive(size, 1)
        if not batch or window <= 0:
            return batch
        until = time.monotonic() + window
        seen = {x["MessageId"] for x in batch}
        while len(batch) < size and not stopping.is_set():
            left = until - time.monotonic()
            if left <= 0:
                break
            for x in self.receive(size - len(batch), min(1, int(left)) if left >= 1 else 0):
                if x["MessageId"] not in seen:
                    seen.add(x["MessageId"])
                    batch.append(x)
            if left < 1:
                time.sleep(min(left, 0.2))
        return batch

    def run(self):
        while not stopping.is_set():
            self.slots.acquire()
            try:
                batch = self.gather()
            except Exception as e:  # the emulator restarting, say: poll again
                self.slots.release()
                log.warning("%s: receive failed: %s", self.m["function"], e)
                time.sleep(1)
                continue
            if not batch:
                self.slots.release()
                continue
            threading.Thread(target=self.handle, args=(batch,), daemon=True).start()

    def handle(self, batch):
        fn = self.m["function"]
        started = time.monotonic()
        try:
            event = {"Records": [sqs_record(x, self.arn, self.cfg["region"]) for x in batch]}
            ids = {x["MessageId"] for x in batch}
            try:
                failed = failed_ids(
                    invoke(self.cfg["lambda_endpoint"], fn, event, self.m["timeout_seconds"]), ids)
            except InvokeError as e:
                log.error("%s: invocation of %d messages failed, all come back after their "
                          "visibility timeout: %s", fn, len(batch), e)
                return
            done = [x for x in batch if x["MessageId"] not in failed]
            for i in range(0, len(done), 10):
                chunk = done[i:i + 10]
                out = self.sqs.delete_message_batch(QueueUrl=self.m["queue_url"], Entries=[
                    {"Id": str(n), "ReceiptHandle": x["ReceiptHandle"]} for n, x in enumerate(chunk)])
                for f in out.get("Failed", []):
                    log.warning("%s: delete failed (the message comes back): %s", fn, f)
            log.info("%s: %d messages, %d deleted, %d handed back, %.0f ms", fn, len(batch),
                     len(done), len(failed), (time.monotonic() - started) * 1000)
        except Exception:
            log.exception("%s: batch of %d left to its visibility timeout", fn, len(batch))
        finally:
            self.slots.release()


class Schedule(threading.Thread):
    """The dispatcher's EventBridge schedule."""

    def __init__(self, cfg):
        super().__init__(name="schedule", daemon=True)
        self.cfg = cfg
        with open(cfg["tick_event"]) as f:
            self.template = json.load(f)

    def event(self):
        now = datetime.datetime.now(datetime.timezone.utc)
        return dict(self.template, id=str(uuid.uuid4()), region=self.cfg["region"],
                    time=now.strftime("%Y-%m-%dT%H:%M:%SZ"))

    def run(self):
        every = self.cfg["tick_seconds"]
        while not stopping.wait(every):
            event = self.event()
            for attempt in range(3):
                try:
                    answer = invoke(self.cfg["lambda_endpoint"], self.cfg["dispatcher"], event,
                                    self.cfg["dispatcher_timeout_seconds"])
                    log.info("%s: tick %s: %s", self.cfg["dispatcher"], event["id"],
                             json.dumps(answer))
                    break
                except InvokeError as e:
                    log.error("%s: tick %s, attempt %d of 3, failed: %s",
                              self.cfg["dispatcher"], event["id"], attempt + 1, e)
                    if stopping.wait(attempt + 1):
                        return


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--log", required=True)
    args = p.parse_args()
    logging.basicConfig(filename=args.log, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)
    with open(args.config) as f:
        cfg = json.load(f)
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    threads = [Mapping(cfg, m) for m in cfg["mappings"]]
    if cfg.get("tick_seconds", 0) > 0:
        threads.append(Schedule(cfg))
    for t in threads:
        t.start()
    log.info("started: %s; dispatcher tick every %s s", ", ".join(
        f"{m['function']} <- {m['queue_url']} (batch {m['batch_size']}, window "
        f"{m['window_seconds']} s, concurrency {m['concurrency']})" for m in cfg["mappings"]),
        cfg.get("tick_seconds") or "never")
    stopping.wait()
    log.info("stopping")


if __name__ == "__main__":
    main()
