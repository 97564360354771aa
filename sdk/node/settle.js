// Settle's JSON-lines protocol for Node.js: one file, no dependencies.
//
// Run your processor with
//   settle ... --exec "node my_processor.js" --protocol jsonl
//
//   const settle = require('./settle');
//   settle.serve(async (item, ctx) => {
//     console.log('renewing', item.id);          // this item's log (stderr)
//     if (item.payload.card === 'declined') throw new settle.PermanentError('card declined');
//     return { renewed: true };                  // the item's output (any JSON value)
//   });
//
// The handler gets `item` as {id, payload} and `ctx` with runId, attempt,
// idempotencyKey, deadlineMs (Unix epoch ms, or null) and remainingMs().
// Throw PermanentError for a failure that will not change (never retried),
// RetryError(message, {retryAfterMs}) for one that may (retried, not before
// retryAfterMs); anything else thrown is retryable, and its stack goes to
// the item's log.
//
// console.log/info/debug and process.stdout.write go to stderr, the log of
// the item in hand: the protocol's answers go to the real stdout, which only
// this module writes. Items are handled one at a time. The spec is
// docs/protocol-jsonl.md.
'use strict';

const readline = require('readline');
const util = require('util');

class PermanentError extends Error {
  constructor(message) {
    super(message);
    this.name = 'PermanentError';
  }
}

class RetryError extends Error {
  constructor(message, { retryAfterMs } = {}) {
    super(message);
    this.name = 'RetryError';
    this.retryAfterMs = retryAfterMs;
  }
}

// Writes to pipes are synchronous on Linux, so what the handler wrote to
// stderr is in the pipe before its answer is: that is the log boundary.
const answerWrite = process.stdout.write.bind(process.stdout);
const toStderr = process.stderr.write.bind(process.stderr);
process.stdout.write = toStderr;
const log = (...args) => {
  toStderr(util.format(...args) + '\n');
};
console.log = log;
console.info = log;
console.debug = log;

function answerFor(id, err, output) {
  if (!err) {
    const line = { id, status: 'ok' };
    if (output !== undefined && output !== null) line.output = output;
    return line;
  }
  const error = (err && err.message) || String(err) || 'error';
  if (err instanceof PermanentError) return { id, status: 'fail', error };
  const line = { id, status: 'retry', error };
  if (err instanceof RetryError && err.retryAfterMs != null) {
    line.retry_after_ms = Math.max(0, Math.ceil(Number(err.retryAfterMs)) || 0);
  }
  return line;
}

function encode(id, err, output) {
  try {
    return JSON.stringify(answerFor(id, err, output));
  } catch (e) {
    // The same output will not serialize next time either (a cycle, a BigInt).
    return JSON.stringify(answerFor(id, new PermanentError(`the output is not JSON: ${e.message}`)));
  }
}

function serve(handler) {
  const lines = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
  (async () => {
    // One item at a time: the next line is read once this one is answered.
    for await (const raw of lines) {
      if (!raw.trim()) continue;
      const request = JSON.parse(raw);
      const item = { id: request.id, payload: request.payload };
      const deadlineMs = request.deadline_ms == null ? null : request.deadline_ms;
      const ctx = {
        runId: request.run_id,
        attempt: request.attempt,
        idempotencyKey: request.idempotency_key,
        deadlineMs,
        remainingMs: () => (deadlineMs == null ? null : Math.max(0, deadlineMs - Date.now())),
      };
      let line;
      try {
        line = encode(item.id, null, await handler(item, ctx));
      } catch (err) {
        if (!(err instanceof PermanentError) && !(err instanceof RetryError)) {
          toStderr(`${(err && err.stack) || String(err)}\n`);
        }
        line = encode(item.id, err);
      }
      answerWrite(line + '\n');
    }
    // stdin closed: Settle is done with this process.
  })().catch((err) => {
    toStderr(`settle: ${(err && err.stack) || String(err)}\n`);
    process.exit(70);
  });
}

module.exports = { serve, PermanentError, RetryError };
