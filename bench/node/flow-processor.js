// The jsonl processor of `make bench-flow`: POSTs each item to a rate-limited
// API (scripts/flow_server.py) and answers Settle per docs/protocol-jsonl.md.
// Usage: settle run ... --exec "node bench/node/flow-processor.js URL [--as-retry]" --protocol jsonl
//
// It speaks the protocol itself rather than through sdk/node/settle.js, so
// that one file serves runners with and without flow control. Says hello
// (128 items at once, the helper's default) and keeps its connections
// alive. Per item:
//   200           {"id", "status": "ok", "output": <the API's JSON>}
//   429 or 503    {"id", "status": "throttled", "retry_after_ms": Retry-After
//                  in ms (1,000 if absent), "error": "HTTP 429"}; with
//                  --as-retry, for a runner that has no throttled answer,
//                  {"id", "status": "retry", "retry_after_ms", "error"}
//   other 4xx     {"id", "status": "fail", "error": "HTTP N"}
//   5xx, no answer {"id", "status": "retry", "error": ...}
'use strict';
const http = require('http');
const readline = require('readline');

const args = process.argv.slice(2);
const asRetry = args.includes('--as-retry');
const url = new URL(args.find((a) => !a.startsWith('--')) || process.env.FLOW_URL || '');
const MAX_IN_FLIGHT = Number(process.env.FLOW_MAX_IN_FLIGHT || 128);
const agent = new http.Agent({ keepAlive: true, maxSockets: MAX_IN_FLIGHT });

function post(body) {
  return new Promise((resolve, reject) => {
    const req = http.request({
      host: url.hostname, port: url.port, path: url.pathname + url.search, method: 'POST', agent,
      headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) },
    }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks).toString() }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(body);
  });
}

function retryAfterMs(value) {
  if (value == null) return 1000;
  const secs = Number(value);
  if (Number.isFinite(secs)) return Math.max(0, Math.round(secs * 1000));
  const at = Date.parse(value);
  return Number.isFinite(at) ? Math.max(0, at - Date.now()) : 1000;
}

async function answer(request) {
  const id = request.id;
  const body = JSON.stringify({ id, payload: request.payload, run_id: request.run_id, attempt: request.attempt });
  let res;
  try {
    res = await post(body);
  } catch (err) {
    return { id, status: 'retry', error: `no answer: ${err.message}` };
  }
  if (res.status >= 200 && res.status < 300) {
    let output = null;
    try { output = res.body ? JSON.parse(res.body) : null; } catch (_) { output = res.body; }
    return { id, status: 'ok', output };
  }
  if (res.status === 429 || res.status === 503) {
    const ms = retryAfterMs(res.headers['retry-after']);
    return { id, status: asRetry ? 'retry' : 'throttled', retry_after_ms: ms, error: `HTTP ${res.status}` };
  }
  if (res.status >= 400 && res.status < 500 && res.status !== 408 && res.status !== 425) {
    return { id, status: 'fail', error: `HTTP ${res.status}` };
  }
  return { id, status: 'retry', error: `HTTP ${res.status}` };
}

process.stdout.write(JSON.stringify({ hello: 'settle-jsonl', max_in_flight: MAX_IN_FLIGHT }) + '\n');
// Answers finished in the same turn of the event loop go out in one write.
let ready = [];
const flush = () => {
  const out = ready.join('');
  ready = [];
  process.stdout.write(out);
};
const lines = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
let pending = 0;
let closed = false;
// stdin closed: Settle is done with this process; it ends once its answers are out.
const maybeEnd = () => { if (closed && pending === 0) agent.destroy(); };
lines.on('line', (raw) => {
  if (!raw.trim()) return;
  pending += 1;
  answer(JSON.parse(raw)).then((line) => {
    if (ready.push(JSON.stringify(line) + '\n') === 1) setImmediate(flush);
    pending -= 1;
    maybeEnd();
  });
});
lines.on('close', () => { closed = true; maybeEnd(); });
