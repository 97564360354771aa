// The BullMQ side of `make bench-flow`: enqueue the items of ITEMS_FILE as
// jobs, and process them with a Worker whose limiter lets RATE jobs a second
// through (`limiter: {max: RATE, duration: 1000}`), each job POSTing its item
// to the rate-limited API (scripts/flow_server.py). A 429 or 503 is handled
// the way BullMQ documents for a throttling API: the queue is rate-limited
// for Retry-After (`queue.rateLimit(ms)`) and the job goes back to wait
// without using an attempt (`throw Worker.RateLimitError()`). Any other
// failure is retried (attempts 3, as Settle's --max-receives).
// Prints one JSON line: completed, failed, throttled answers, wall time.
// With TIME_LIMIT_S it stops after that many seconds and says so ("stopped").
// Usage: node bullmq-flow.js ITEMS_FILE REDIS_PORT URL RATE [CONCURRENCY (64)] [TIME_LIMIT_S]
'use strict';
const fs = require('fs');
const http = require('http');
const { Queue, Worker } = require('bullmq');

async function main() {
  const [file, port, urlArg, rateArg, concurrencyArg, limitArg] = process.argv.slice(2);
  const rate = Number(rateArg);
  const concurrency = Number(concurrencyArg || 64);
  const url = new URL(urlArg);
  const connection = { host: '127.0.0.1', port: Number(port) };
  const agent = new http.Agent({ keepAlive: true, maxSockets: concurrency });
  const items = fs.readFileSync(file, 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l));
  const total = items.length;
  const queue = new Queue('flow', { connection });
  await queue.waitUntilReady();

  const post = (body) => new Promise((resolve, reject) => {
    const req = http.request({
      host: url.hostname, port: url.port, path: url.pathname, method: 'POST', agent,
      headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) },
    }, (res) => {
      res.resume();
      res.on('end', () => resolve({ status: res.statusCode, retryAfter: res.headers['retry-after'] }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(body);
  });

  let completed = 0;
  let failed = 0;
  let throttled = 0;
  let resolveDone;
  let stopped = false;
  const done = new Promise((r) => { resolveDone = r; });
  if (limitArg) {
    setTimeout(() => { stopped = true; resolveDone(); }, Number(limitArg) * 1000).unref();
  }
  const settled = () => { if (completed + failed === total) resolveDone(); };

  const started = process.hrtime.bigint();
  const worker = new Worker('flow', async (job) => {
    const res = await post(JSON.stringify(job.data));
    if (res.status === 429 || res.status === 503) {
      throttled += 1;
      const secs = Number(res.retryAfter);
      await queue.rateLimit(Number.isFinite(secs) ? Math.max(0, secs * 1000) : 1000);
      throw Worker.RateLimitError();
    }
    if (res.status < 200 || res.status >= 300) throw new Error(`HTTP ${res.status}`);
    return { ok: true };
  }, { connection, concurrency, limiter: { max: rate, duration: 1000 } });
  worker.on('completed', () => { completed += 1; settled(); });
  worker.on('failed', (job) => {
    if (job && job.attemptsMade >= (job.opts.attempts || 1)) { failed += 1; settled(); }
  });

  for (let i = 0; i < total; i += 1000) {
    await queue.addBulk(items.slice(i, i + 1000).map((it) => ({ name: 'item', data: it, opts: { attempts: 3 } })));
  }
  const enqueued = process.hrtime.bigint();
  await done;
  const finished = process.hrtime.bigint();
  // A stopped run leaves jobs active: do not wait for them.
  await worker.close(stopped);
  await queue.close();
  agent.destroy();
  const wall = Number(finished - started) / 1e9;
  console.log(JSON.stringify({
    total, completed, failed, throttled, rate, concurrency, stopped,
    enqueue_s: Number(enqueued - started) / 1e9, wall_s: wall, items_per_s: total / wall,
  }));
}

main().then(() => process.exit(0), (err) => { console.error(err); process.exit(1); });
