// The BullMQ side of `make bench-jsonl`: enqueue the items of ITEMS_FILE as
// jobs with addBulk, process them with a Worker running the same logic as
// handler.js (throw for payload.script == "permanent", else answer at once),
// and print one JSON line with the wall time of enqueue + process.
// Usage: node bullmq.js ITEMS_FILE REDIS_PORT [CONCURRENCY (100)] [BULK (1000)]
'use strict';
const fs = require('fs');
const { Queue, Worker } = require('bullmq');

async function main() {
  const [file, port, concurrencyArg, bulkArg] = process.argv.slice(2);
  const concurrency = Number(concurrencyArg || 100);
  const bulk = Number(bulkArg || 1000);
  const connection = { host: '127.0.0.1', port: Number(port) };
  // Read and parse the items before the clock starts (Settle's own run
  // reads its file inside the timed run, so this favours BullMQ slightly).
  const items = fs.readFileSync(file, 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l));
  const total = items.length;
  const queue = new Queue('bench', { connection });
  await queue.waitUntilReady();

  let completed = 0;
  let failed = 0;
  let resolveDone;
  const done = new Promise((r) => { resolveDone = r; });
  const settled = () => { if (completed + failed === total) resolveDone(); };

  const started = process.hrtime.bigint();
  const worker = new Worker('bench', async (job) => {
    if (job.data.payload && job.data.payload.script === 'permanent') {
      throw new Error('permanent failure');
    }
    return { ok: true };
  }, { connection, concurrency });
  worker.on('completed', () => { completed += 1; settled(); });
  worker.on('failed', () => { failed += 1; settled(); });

  // attempts: 1 (BullMQ's default): a thrown error fails the job for good,
  // as a PermanentError does in Settle.
  for (let i = 0; i < total; i += bulk) {
    await queue.addBulk(items.slice(i, i + bulk).map((it) => ({ name: 'item', data: it, opts: { attempts: 1 } })));
  }
  const enqueued = process.hrtime.bigint();
  await done;
  const finished = process.hrtime.bigint();
  const counts = await queue.getJobCounts('completed', 'failed', 'waiting', 'active', 'delayed');
  await worker.close();
  await queue.close();
  const wall = Number(finished - started) / 1e9;
  console.log(JSON.stringify({
    total, completed, failed, concurrency, bulk,
    enqueue_s: Number(enqueued - started) / 1e9, wall_s: wall, items_per_s: total / wall, counts,
  }));
}

main().catch((err) => { console.error(err); process.exit(1); });
