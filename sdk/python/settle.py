"""Settle's JSON-lines protocol for Python: one file, no dependencies.

Run your processor with ``settle ... --exec "python3 my_processor.py" --protocol jsonl``::

    import settle

    def handle(item, ctx):
        print("renewing", item["id"])  # goes to this item's log (stderr)
        if item["payload"].get("card") == "declined":
            raise settle.PermanentError("card declined")
        return {"renewed": True}  # the item's output (any JSON value, or None)

    settle.serve(handle)

``handler(item, ctx)`` gets ``item`` as ``{"id": ..., "payload": ...}`` and
``ctx`` with ``run_id``, ``attempt``, ``idempotency_key``, ``deadline_ms``
(Unix epoch milliseconds, or None) and ``remaining_ms()``. Raise
``PermanentError`` for a failure that will not change (never retried),
``RetryError(message, retry_after_ms=None)`` for one that may (retried, not
before ``retry_after_ms``), ``ThrottledError(message, retry_after_ms=None)``
when the service you call asks to slow down (an HTTP 429: not a failure, it
uses none of the item's attempts, and the run slows down, waiting
``retry_after_ms`` first); any other exception is retryable, and its
traceback goes to the item's log.

Everything the process writes to standard output, ``print()`` included, and
subprocesses too, goes to stderr, which is the log of the item in hand: the
protocol's answers go to the real stdout, which only this module writes.
``serve(handler, concurrency=N)`` handles up to N items at once in threads
(for handlers that wait on the network), each item's ``print()`` output
kept as its own log.
The spec is docs/protocol-jsonl.md.

The same handler can be the user's own Lambda function that Settle's worker
invokes once per batch (docs/lambda.md)::

    handler = settle.lambda_handler(handle)   # the function's handler

Items are handled one after the other; what each prints is its own log
(sent back with its result) and also goes to the function's log.
"""

import json
import os
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

__all__ = ["serve", "lambda_handler", "PermanentError", "RetryError", "ThrottledError", "Context"]


class PermanentError(Exception):
    """The item failed and will fail the same way again: not retried."""


class RetryError(Exception):
    """The item failed but may succeed later: retried, not before
    ``retry_after_ms`` milliseconds if given."""

    def __init__(self, message, retry_after_ms=None):
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class ThrottledError(Exception):
    """The service the handler calls asks to slow down (an HTTP 429): not a
    failure of the item, which is tried again without using an attempt once
    the run, slowed down, lets it; not before ``retry_after_ms`` if given."""

    def __init__(self, message, retry_after_ms=None):
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class Context:
    """What Settle says about the attempt."""

    def __init__(self, line):
        self.run_id = line.get("run_id")
        self.attempt = line.get("attempt")
        self.idempotency_key = line.get("idempotency_key")
        self.deadline_ms = line.get("deadline_ms")

    def remaining_ms(self):
        """Milliseconds left before the attempt is cut off, or None."""
        if self.deadline_ms is None:
            return None
        return max(0, self.deadline_ms - int(time.time() * 1000))

    def __repr__(self):
        return "Context(run_id=%r, attempt=%r)" % (self.run_id, self.attempt)


def _take_stdout():
    """Returns a file for the real stdout, and points fd 1 (and sys.stdout)
    at stderr, so that nothing else can write into the protocol."""
    answers = os.fdopen(os.dup(1), "w", encoding="utf-8", newline="\n")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return answers


def _flush_logs():
    # The log boundary: what the handler wrote must be written before the
    # answer is (Settle reads the two pipes separately).
    for f in (sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if f is not None:
                f.flush()
        except (OSError, ValueError):
            pass


def _answer(item_id, exc=None, output=None):
    if exc is None:
        line = {"id": item_id, "status": "ok"}
        if output is not None:
            line["output"] = output
    elif isinstance(exc, PermanentError):
        line = {"id": item_id, "status": "fail", "error": str(exc) or type(exc).__name__}
    else:
        status = "throttled" if isinstance(exc, ThrottledError) else "retry"
        line = {"id": item_id, "status": status, "error": str(exc) or type(exc).__name__}
        after = getattr(exc, "retry_after_ms", None)
        if after is not None:
            line["retry_after_ms"] = max(0, int(after))
    return line


_MAX_LOG = 8 * 1024
_local = threading.local()


class _ItemLogs:
    """``sys.stdout`` and ``sys.stderr`` while several items are in hand: what
    a handler's thread writes through them goes to its item's log, the rest
    to the real stderr."""

    def __init__(self, fallback, echo=False):
        self._fallback = fallback
        self._echo = echo

    def write(self, text):
        log = getattr(_local, "log", None)
        if log is None:
            return self._fallback.write(text)
        log.append(text)
        if self._echo:
            self._fallback.write(text)
        return len(text)

    def flush(self):
        if getattr(_local, "log", None) is None:
            self._fallback.flush()

    def __getattr__(self, name):
        return getattr(self._fallback, name)


def _answer_line(handler, request, log=None):
    """The answer to one request, as a JSON line without its newline."""
    item_id = request["id"]
    item = {"id": item_id, "payload": request.get("payload")}
    try:
        line = _answer(item_id, output=handler(item, Context(request)))
    except Exception as e:  # noqa: BLE001 - every failure is the item's
        if not isinstance(e, (PermanentError, RetryError, ThrottledError)):
            traceback.print_exc(file=sys.stderr)
        line = _answer(item_id, e)
    if log is not None:
        text = "".join(log)
        if len(text) > _MAX_LOG:
            cut = len(text) - _MAX_LOG
            text = "[settle: %d earlier characters of this attempt's log were cut]\n%s" % (
                cut,
                text[cut:],
            )
        if text:
            line["log"] = text
    try:
        return json.dumps(line)
    except (TypeError, ValueError) as e:
        # The same output will not serialize next time either.
        return json.dumps(_answer(item_id, PermanentError("the output is not JSON: %s" % e)))


def serve(handler, concurrency=1):
    """Answers items from stdin until stdin ends.

    With ``concurrency`` 1 (the default) items are handled one at a time and
    everything the process writes to stderr or stdout, subprocesses
    included, is the item's log. With more, the process says hello and
    handles up to that many at once, each in a thread of its own (for
    handlers that wait on the network): what a handler writes through
    ``sys.stdout`` / ``sys.stderr`` (``print()``, tracebacks) is its item's
    log, sent with the answer; output written straight to file descriptor 2
    (subprocesses, C extensions, logging handlers set up before ``serve``)
    is no item's.
    """
    answers = _take_stdout()
    stdin = sys.stdin.buffer
    if concurrency <= 1:
        while True:
            raw = stdin.readline()
            if not raw:
                return  # stdin closed: Settle is done with this process
            if not raw.strip():
                continue
            line = _answer_line(handler, json.loads(raw))
            _flush_logs()
            answers.write(line + "\n")
            answers.flush()
    logs = _ItemLogs(sys.__stderr__)
    sys.stdout = sys.stderr = logs
    lock = threading.Lock()
    answers.write(json.dumps({"hello": "settle-jsonl", "max_in_flight": concurrency}) + "\n")
    answers.flush()

    def work(request):
        _local.log = []
        try:
            line = _answer_line(handler, request, _local.log)
        finally:
            _local.log = None
        with lock:
            answers.write(line + "\n")
            answers.flush()

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for raw in stdin:
            if raw.strip():
                pool.submit(work, json.loads(raw))


def lambda_handler(handler):
    """The user's Lambda function for Settle's worker: ``{"items": [...]}``
    in, ``{"results": [...]}`` out, one result per item, each with what the
    handler printed for it as its ``log``. An event of another shape raises
    (Settle retries the batch)."""

    def handle(event, context=None):
        if not isinstance(event, dict) or not isinstance(event.get("items"), list):
            raise ValueError('not a Settle batch: want {"items": [...]}')
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _ItemLogs(out, echo=True), _ItemLogs(err, echo=True)
        results = []
        try:
            for request in event["items"]:
                _local.log = []
                try:
                    results.append(json.loads(_answer_line(handler, request, _local.log)))
                finally:
                    _local.log = None
        finally:
            sys.stdout, sys.stderr = out, err
        return {"results": results}

    return handle
