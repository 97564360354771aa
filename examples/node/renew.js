// Renews a subscription per item, in the style of a payment gateway.
//
//   settle run items.jsonl --exec "node examples/node/renew.js" --protocol jsonl
//
// An item's payload: {"user": "u-1", "plan": "pro", "card": "4242424242424242"}.
// Cards ending 0002 are declined (permanent: retrying will not help), 9995
// have insufficient funds (retried in a minute), 0119 time out at the gateway
// (retried); the rest are charged, once per run thanks to the idempotency key.
'use strict';

const path = require('path');
const settle = require(path.join(__dirname, '..', '..', 'sdk', 'node', 'settle.js'));

const PRICES_CENTS = { basic: 500, pro: 1500, team: 4900 };

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

settle.serve(async (item, ctx) => {
  const { user, plan, card = '' } = item.payload || {};
  if (!(plan in PRICES_CENTS)) throw new settle.PermanentError(`unknown plan ${JSON.stringify(plan)}`);
  const amount = PRICES_CENTS[plan];
  console.log(`renewing ${user} on ${plan}: charging ${amount} cents to card ...${String(card).slice(-4)} (attempt ${ctx.attempt})`);
  // A real gateway takes the idempotency key, so a duplicate delivery of
  // this item in this run cannot charge twice.
  await sleep(10);
  if (String(card).endsWith('0002')) throw new settle.PermanentError('card ...0002 declined: do not honor');
  if (String(card).endsWith('9995')) throw new settle.RetryError('insufficient funds', { retryAfterMs: 60000 });
  if (String(card).endsWith('0119')) throw new Error('gateway timeout');
  const charge = `ch_${ctx.idempotencyKey.replace(/:/g, '_')}`;
  console.log(`charged: ${charge}`);
  return { user, plan, amount_cents: amount, charge };
});
