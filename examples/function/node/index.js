// A user's own Lambda function (Node.js) that Settle's worker invokes once
// per batch: the renewals of examples/node/renew.js, through the SDK's
// Lambda adapter. Deploy sdk/node/settle.js beside this file.
//   handler: index.handler; worker stack parameters:
//   Processor=function, ProcessorFunction=<this function's name>
'use strict';

const settle = require('./settle');

const PRICES = { basic: 500, pro: 1500, team: 4900 };

exports.handler = settle.lambdaHandler(async (item, ctx) => {
  const { user, plan, card } = item.payload;
  const cents = PRICES[plan];
  if (cents === undefined) throw new settle.PermanentError(`unknown plan ${JSON.stringify(plan)}`);
  const last4 = String(card).slice(-4);
  console.log(`renewing ${user} on ${plan}: ${cents} cents to card ...${last4} (attempt ${ctx.attempt})`);
  if (last4 === '0002') throw new settle.PermanentError(`card ...${last4} declined`);
  if (last4 === '0119') throw new settle.RetryError('gateway timeout', { retryAfterMs: 5000 });
  // The gateway's rate limit: no failure, the run slows down.
  if (last4 === '0429') throw new settle.ThrottledError('gateway rate limit (429)', { retryAfterMs: 1000 });
  // A real gateway takes the key, so a duplicate cannot charge twice.
  return { user, amount_cents: cents, charge: `ch_${ctx.idempotencyKey.replace(':', '_')}` };
});
