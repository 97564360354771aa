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
// retryAfterMs), ThrottledError(message, {retryAfterMs}) when the service
// you call asks to slow down (an HTTP 429: not a failure, it uses none of
// the item's attempts, and the run slows down, waiting retryAfterMs first);
// anything else thrown is retryable, and its stack goes to the item's log.
//
// Up to 128 items are handled at once (`serve(handler, {concurrency: N})`
// to change it): what a handler writes through console.* or
// process.stdout/stderr.write while working on an item is that item's log,
// kept apart from the others' by AsyncLocalStorage and sent with its
// answer. The protocol's answers go to the real stdout, which only this
// module writes; anything written outside an item goes to stderr. With
// `{concurrency: 1}` items are handled one at a time and stderr is the
// item's log (native code writing to fd 2 included). The spec is
// docs/protocol-jsonl.md.
//
// The same handler can be the user's own Lambda function that Settle's
// worker invokes once per batch (docs/lambda.md):
//   exports.handler = settle.lambdaHandler(async (item, ctx) => { ... });
// Each item of the batch is handled at once; what it logs is its own log
// (sent back with its result) and also goes to the function's log.
'use strict';

const readline = require('readline');
const util = require('util');
const { AsyncLocalStorage } = require('async_hooks');

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

// The called service asks to slow down: the item is not failed, and the
// whole run (every process) is slowed down.
class ThrottledError extends Error {
  constructor(message, { retryAfterMs } = {}) {
    super(message);
    this.name = 'ThrottledError';
    this.retryAfterMs = retryAfterMs;
  }
}

// Writes to pipes are synchronous on Linux, so what a one-at-a-time
// handler wrote to stderr is in the pipe before its answer is.
const answerWrite = process.stdout.write.bind(process.stdout);
const toStderr = process.stderr.write.bind(process.stderr);

// Each item's log, while several are in hand: what the handler writes
// through console.* or process.stdout/stderr.write in the item's async
// context is kept with it and sent in its answer.
const MAX_LOG = 8 * 1024;
const items = new AsyncLocalStorage();

function capture(chunk, encoding) {
  const store = items.getStore();
  if (!store) return false;
  const text = typeof chunk === 'string' ? chunk : Buffer.from(chunk, encoding).toString('utf8');
  if (store.echo) toStderr(text);
  store.log += text;
  if (store.log.length > 2 * MAX_LOG) {
    store.cut += store.log.length - MAX_LOG;
    store.log = store.log.slice(store.log.length - MAX_LOG);
  }
  return true;
}

function writer(fallback) {
  return (chunk, encoding, callback) => {
    if (typeof encoding === 'function') [encoding, callback] = [undefined, encoding];
    if (!capture(chunk, encoding)) return fallback(chunk, encoding, callback);
    if (typeof callback === 'function') process.nextTick(callback);
    return true;
  };
}
process.stdout.write = writer(toStderr);
process.stderr.write = writer(toStderr);
const log = (...args) => process.stderr.write(util.format(...args) + '\n');
console.log = log;
console.info = log;
console.debug = log;
console.warn = log;
console.error = log;

function answerFor(id, err, output) {
  if (!err) {
    const line = { id, status: 'ok' };
    if (output !== undefined && output !== null) line.output = output;
    return line;
  }
  const error = (err && err.message) || String(err) || 'error';
  if (err instanceof PermanentError) return { id, status: 'fail', error };
  const throttled = err instanceof ThrottledError;
  const line = { id, status: throttled ? 'throttled' : 'retry', error };
  if ((throttled || err instanceof RetryError) && err.retryAfterMs != null) {
    line.retry_after_ms = Math.max(0, Math.ceil(Number(err.retryAfterMs)) || 0);
  }
  return line;
}

// The answer line; `store` (several items at once) adds the item's log.
function encode(id, err, output, store) {
  const withLog = (line) => {
    if (store && (store.log || store.cut)) {
      const cut = store.cut ? `[settle: ${store.cut} earlier characters of this attempt's log were cut]\n` : '';
      line.log = cut + store.log;
    }
    return JSON.stringify(line);
  };
  try {
    return withLog(answerFor(id, err, output));
  } catch (e) {
    // The same output will not serialize next time either (a cycle, a BigInt).
    return withLog(answerFor(id, new PermanentError(`the output is not JSON: ${e.message}`)));
  }
}

function contextOf(request) {
  const deadlineMs = request.deadline_ms == null ? null : request.deadline_ms;
  return {
    runId: request.run_id,
    attempt: request.attempt,
    idempotencyKey: request.idempotency_key,
    deadlineMs,
    remainingMs: () => (deadlineMs == null ? null : Math.max(0, deadlineMs - Date.now())),
  };
}

async function answer(handler, request, store) {
  const item = { id: request.id, payload: request.payload };
  let output;
  try {
    output = await handler(item, contextOf(request));
  } catch (err) {
    if (!(err instanceof PermanentError) && !(err instanceof RetryError) && !(err instanceof ThrottledError)) {
      process.stderr.write(`${(err && err.stack) || String(err)}\n`);
    }
    return encode(item.id, err, undefined, store);
  }
  return encode(item.id, null, output, store);
}

// Serves items from stdin until it ends. With `concurrency` above 1 (the
// default, 128) the process says hello and takes up to that many items at
// once, each with its own log in its answer; with 1 it takes one at a
// time and its stderr is the item's log.
function serve(handler, { concurrency = 128 } = {}) {
  const lines = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
  const fatal = (err) => {
    toStderr(`settle: ${(err && err.stack) || String(err)}\n`);
    process.exit(70);
  };
  if (concurrency <= 1) {
    (async () => {
      // One item at a time: the next line is read once this one is answered.
      for await (const raw of lines) {
        if (!raw.trim()) continue;
        answerWrite((await answer(handler, JSON.parse(raw))) + '\n');
      }
      // stdin closed: Settle is done with this process.
    })().catch(fatal);
    return;
  }
  answerWrite(JSON.stringify({ hello: 'settle-jsonl', max_in_flight: concurrency }) + '\n');
  // Answers finished in the same turn of the event loop go out in one write.
  let ready = [];
  const flush = () => {
    const out = ready.join('');
    ready = [];
    answerWrite(out);
  };
  lines.on('line', (raw) => {
    if (!raw.trim()) return;
    let request;
    try {
      request = JSON.parse(raw);
    } catch (err) {
      fatal(err);
      return;
    }
    const store = { log: '', cut: 0 };
    items.run(store, () => answer(handler, request, store)).then((line) => {
      if (ready.push(line + '\n') === 1) setImmediate(flush);
    }, fatal);
  });
}

// The user's Lambda function: `{"items": [...]}` in, `{"results": [...]}`
// out, one result per item, each with its own log. An event of another
// shape is an error of the invocation (Settle retries the batch).
function lambdaHandler(handler) {
  return async (event) => {
    if (!event || !Array.isArray(event.items)) {
      throw new Error('not a Settle batch: want {"items": [...]}');
    }
    const results = await Promise.all(event.items.map((request) => {
      const store = { log: '', cut: 0, echo: true };
      return items.run(store, () => answer(handler, request, store)).then(JSON.parse);
    }));
    return { results };
  };
}

module.exports = { serve, lambdaHandler, PermanentError, RetryError, ThrottledError };
