// The jsonl benchmark's processor: answers at once through Settle's Node
// helper; an item whose payload.script is "permanent" fails permanently
// (10% of the bench mix). bench/node/bullmq.js runs the same logic.
'use strict';
const settle = require('../../sdk/node/settle');

settle.serve(async (item) => {
  if (item.payload && item.payload.script === 'permanent') {
    throw new settle.PermanentError('permanent failure');
  }
  return { ok: true };
});
