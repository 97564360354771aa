-- wrk: POST the body Settle's --http processor sends for a bench item
-- ({"id", "payload", "run_id", "attempt"} and an Idempotency-Key header),
-- so both clients make the same requests to the same server.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Idempotency-Key"] = "r-01JBENCHRUN0000000000000000:item-0000042"
wrk.body = '{"id":"item-0000042","payload":{"script":"ok"},"run_id":"r-01JBENCHRUN0000000000000000","attempt":1}'
