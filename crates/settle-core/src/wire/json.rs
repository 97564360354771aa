//! The JSON of what Settle writes once per item (work bodies, result
//! bodies, ledger records), written by hand.
//!
//! serde_json's derived serializers pass every field name and every string
//! through a byte-by-byte escaping loop behind an `io::Write` layer, and the
//! id types serialize through a cloned `String`, which makes encoding these
//! three values a large share of the runtime thread's work (the figures
//! are in docs/performance.md).
//! The output here is byte for byte what serde_json writes for the same
//! value (the tests compare the two on arbitrary values), so every reader
//! keeps using serde, and bodies from either writer read the same.

use crate::domain::{Attempt, AttemptOutcome, ErrorKind, ItemId, ItemRecord, RunId};
use crate::wire::message::{ResultBody, WorkBody};

/// A JSON text being written.
struct Out(String);

impl Out {
    fn with_capacity(n: usize) -> Self {
        Self(String::with_capacity(n))
    }
    /// JSON punctuation or field names, already valid JSON text.
    fn raw(&mut self, s: &str) -> &mut Self {
        self.0.push_str(s);
        self
    }
    /// A JSON string. Ids, message ids and most errors need no escaping;
    /// the rare string that does is left to serde_json.
    fn str(&mut self, s: &str) -> &mut Self {
        // No early exit: a branch-free pass over a short string is cheaper.
        let plain = s
            .bytes()
            .fold(true, |ok, b| ok & (b >= 0x20) & (b != b'"') & (b != b'\\'));
        if plain {
            self.0.push('"');
            self.0.push_str(s);
            self.0.push('"');
        } else {
            self.0
                .push_str(&serde_json::to_string(s).expect("a str always serializes"));
        }
        self
    }
    fn num(&mut self, n: u64) -> &mut Self {
        self.0.push_str(itoa::Buffer::new().format(n));
        self
    }
    fn bool(&mut self, b: bool) -> &mut Self {
        self.raw(if b { "true" } else { "false" })
    }
    /// Opens a body with the fields both kinds of message start with.
    fn open_item(&mut self, run: &RunId, item: &ItemId, seq: u64) -> &mut Self {
        self.raw(r#"{"run":"#)
            .str(run.as_str())
            .raw(r#","item":"#)
            .str(item.as_str())
            .raw(r#","seq":"#)
            .num(seq)
    }
    /// The fields of an outcome, as `#[serde(tag = "outcome")]` flattens them.
    fn outcome(&mut self, outcome: &AttemptOutcome) -> &mut Self {
        match outcome {
            AttemptOutcome::Succeeded => self.raw(r#","outcome":"succeeded""#),
            AttemptOutcome::Throttled { nth } => self
                .raw(r#","outcome":"throttled","nth":"#)
                .num((*nth).into()),
            AttemptOutcome::Failed {
                kind,
                error,
                terminal,
            } => self
                .raw(r#","outcome":"failed","kind":""#)
                .raw(ErrorKind::as_str(*kind))
                .raw(r#"","error":"#)
                .str(error)
                .raw(r#","terminal":"#)
                .bool(*terminal),
        }
    }
    /// An attempt's fields from `message_id` on (its `attempt` comes first,
    /// under a name that differs between a record and a result).
    fn attempt_rest(&mut self, a: &Attempt) -> &mut Self {
        self.raw(r#","message_id":"#)
            .str(&a.message_id)
            .raw(r#","started_at":"#)
            .num(a.started_at)
            .raw(r#","duration_ms":"#)
            .num(a.duration_ms)
            .outcome(&a.outcome);
        if let Some(output) = &a.output {
            self.raw(r#","output":"#).raw(output.get());
        }
        if let Some(log) = &a.log {
            self.raw(r#","log":"#).str(log);
        }
        if let Some(at) = a.retry_at {
            self.raw(r#","retry_at":"#).num(at);
        }
        self
    }
}

pub(crate) fn work_body(b: &WorkBody) -> String {
    let payload = b.payload.get();
    let mut o = Out::with_capacity(128 + payload.len() + b.item.as_str().len());
    o.open_item(&b.run, &b.item, b.seq)
        .raw(r#","prior_attempts":"#)
        .num(b.prior_attempts.into());
    if b.round > 0 {
        o.raw(r#","round":"#).num(b.round.into());
    }
    o.raw(r#","max_receives":"#)
        .num(b.max_receives.into())
        .raw(r#","payload":"#)
        .raw(payload);
    if let Some(dead) = &b.dead {
        o.raw(r#","dead":{"error":"#)
            .str(&dead.error)
            .raw(r#","attempts":"#)
            .num(dead.attempts.into())
            .raw("}");
    }
    if b.lost_receives > 0 {
        o.raw(r#","lost_receives":"#).num(b.lost_receives.into());
    }
    if b.resent {
        o.raw(r#","resent":true"#);
    }
    if b.requeued {
        o.raw(r#","requeued":true"#);
    }
    if let Some(at) = b.not_before {
        o.raw(r#","not_before":"#).num(at);
    }
    if let Some(pass) = &b.redrive {
        o.raw(r#","redrive":"#).str(pass);
    }
    if b.throttled > 0 {
        o.raw(r#","throttled":"#).num(b.throttled.into());
    }
    if let Some(key) = &b.key {
        o.raw(r#","key":"#).str(key);
    }
    if let Some(flow) = &b.flow {
        // Rare (a run with limits), and holds floats: serde_json writes it.
        o.raw(r#","flow":"#)
            .raw(&serde_json::to_string(flow).expect("flow limits always serialize"));
    }
    o.raw("}");
    o.0
}

pub(crate) fn result_body(r: &ResultBody) -> String {
    let mut o = Out::with_capacity(192 + r.item.as_str().len());
    o.open_item(&r.run, &r.item, r.seq)
        .raw(r#","attempt":"#)
        .num(r.attempt.attempt.into())
        .attempt_rest(&r.attempt)
        .raw("}");
    o.0
}

pub(crate) fn item_record(rec: &ItemRecord) -> String {
    let mut o = Out::with_capacity(96 + 160 * rec.history.len());
    o.raw(r#"{"status":""#)
        .raw(rec.status.as_str())
        .raw(r#"","attempts":"#)
        .num(rec.attempts.into())
        .raw(r#","last_error":"#);
    match &rec.last_error {
        Some(e) => o.str(e),
        None => o.raw("null"),
    };
    o.raw(r#","history":["#);
    for (i, a) in rec.history.iter().enumerate() {
        o.raw(if i == 0 {
            r#"{"attempt":"#
        } else {
            r#",{"attempt":"#
        })
        .num(a.attempt.into())
        .attempt_rest(a)
        .raw("}");
    }
    o.raw(r#"],"updated_at":"#).num(rec.updated_at);
    if rec.throttled > 0 {
        o.raw(r#","throttled":"#).num(rec.throttled.into());
    }
    if let Some(at) = rec.waiting_until {
        o.raw(r#","waiting_until":"#).num(at);
    }
    o.raw("}");
    o.0
}

#[cfg(test)]
mod tests {
    use crate::domain::{
        null_payload, Attempt, AttemptOutcome, ErrorKind, Item, ItemId, ItemRecord, ItemStatus,
        Output, RunId,
    };
    use crate::wire::message::{DeadLetter, ResultBody, WorkBody};
    use proptest::prelude::*;
    use serde_json::value::RawValue;

    /// Strings with what JSON must escape: quotes, backslashes, control
    /// characters, and some non-ASCII, which it must not.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9-]{1,20}",
            "[\"\\\\\u{0}-\u{1f}\u{7f}é€😀 a-z]{0,12}",
        ]
    }

    fn outcome() -> impl Strategy<Value = AttemptOutcome> {
        prop_oneof![
            Just(AttemptOutcome::Succeeded),
            (any::<bool>(), text(), any::<bool>()).prop_map(|(permanent, error, terminal)| {
                AttemptOutcome::Failed {
                    kind: if permanent {
                        ErrorKind::Permanent
                    } else {
                        ErrorKind::Retryable
                    },
                    error,
                    terminal,
                }
            }),
            any::<u32>().prop_map(|nth| AttemptOutcome::Throttled { nth }),
        ]
    }

    fn output() -> impl Strategy<Value = Option<Output>> {
        proptest::option::of(
            prop_oneof![
                // No "null": an output of null is no output (the worker drops it).
                Just(r#"{"charge":"ch_1","amount":[1, 2.5e3]}"#),
                Just(r#""a\"b\nc""#),
                Just("42"),
            ]
            .prop_map(|j| Output::raw(RawValue::from_string(j.to_owned()).unwrap())),
        )
    }

    fn attempt() -> impl Strategy<Value = Attempt> {
        (
            any::<u32>(),
            text(),
            any::<u64>(),
            any::<u64>(),
            outcome(),
            output(),
            proptest::option::of(text()),
            proptest::option::of(any::<u64>()),
        )
            .prop_map(
                |(attempt, message_id, started_at, duration_ms, outcome, output, log, retry_at)| {
                    Attempt {
                        attempt,
                        message_id,
                        started_at,
                        duration_ms,
                        outcome,
                        output,
                        log,
                        retry_at,
                    }
                },
            )
    }

    fn item_id() -> impl Strategy<Value = ItemId> {
        // What an id may hold: no control characters (ItemId refuses them).
        prop_oneof!["[a-z0-9-]{1,20}", "[\"\\\\/\u{a0}\u{2028}é€😀 a-z]{1,12}"]
            .prop_map(|s| ItemId::new(s).expect("a valid id"))
    }

    proptest! {
        #[test]
        fn item_records_match_serde(
            status in prop_oneof![Just(ItemStatus::Pending), Just(ItemStatus::Succeeded), Just(ItemStatus::Failed)],
            attempts in any::<u32>(),
            last_error in proptest::option::of(text()),
            history in proptest::collection::vec(attempt(), 0..4),
            updated_at in any::<u64>(),
            throttled in any::<u32>(),
            waiting_until in proptest::option::of(any::<u64>()),
        ) {
            let rec = ItemRecord { status, attempts, last_error, history, updated_at, throttled, waiting_until };
            prop_assert_eq!(super::item_record(&rec), serde_json::to_string(&rec).unwrap());
        }

        #[test]
        fn result_bodies_round_trip(item in item_id(), seq in any::<u64>(), attempt in attempt()) {
            let r = ResultBody { run: RunId::generate(1_795_000_000_000), item, seq, attempt };
            prop_assert_eq!(ResultBody::decode(&super::result_body(&r)).unwrap(), r);
        }

        #[test]
        fn work_bodies_match_serde(
            item in item_id(),
            seq in any::<u64>(),
            prior_attempts in any::<u32>(),
            max_receives in any::<u32>(),
            dead in proptest::option::of((text(), any::<u32>())),
            redrive in proptest::option::of("[a-f0-9]{16}"),
            not_before in proptest::option::of(any::<u64>()),
            resent in any::<bool>(),
            requeued in any::<bool>(),
            round in any::<u32>(),
            lost_receives in any::<u32>(),
            throttled in any::<u32>(),
            key in proptest::option::of(text()),
            flow in proptest::option::of((proptest::option::of(0.1f64..1e6), proptest::option::of(0.1f64..1e6), proptest::option::of(any::<u32>()))),
            payload in prop_oneof![Just(r#"{"script":"ok","n":[1, 2.5e3]}"#), Just("null"), Just(r#""x\"y""#)],
        ) {
            let payload = RawValue::from_string(payload.to_owned()).unwrap();
            let mut b = WorkBody::new(RunId::generate(1_795_000_000_000), Item::new(item, payload), seq, max_receives);
            b.prior_attempts = prior_attempts;
            b.dead = dead.map(|(error, attempts)| DeadLetter { error, attempts });
            b.redrive = redrive;
            b.not_before = not_before;
            b.resent = resent;
            b.requeued = requeued;
            b.round = round;
            b.lost_receives = lost_receives;
            b.throttled = throttled;
            b.key = key;
            b.flow = flow.map(|(rate, key_rate, key_concurrency)| crate::flow::FlowLimits { rate, key_rate, key_concurrency });
            prop_assert_eq!(super::work_body(&b), serde_json::to_string(&b).unwrap());
        }
    }

    #[test]
    fn an_empty_record_and_a_null_payload_match_serde() {
        let rec = ItemRecord::default();
        assert_eq!(
            super::item_record(&rec),
            serde_json::to_string(&rec).unwrap()
        );
        let b = WorkBody::new(
            RunId::generate(0),
            Item::new(ItemId::new("a").unwrap(), null_payload()),
            0,
            3,
        );
        assert_eq!(super::work_body(&b), serde_json::to_string(&b).unwrap());
    }
}
