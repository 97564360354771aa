//! Property tests of everything that decodes outside input: queue bodies
//! (work and results messages) and items files. Whatever the bytes, the
//! decoders return a value or an error that says what is wrong; they never
//! panic, and what Settle encodes decodes back unchanged. Failing cases are
//! kept in `proptest-regressions/` and replayed first on every run.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use serde_json::value::RawValue;
use settle_core::domain::{Attempt, AttemptOutcome, ErrorKind};
use settle_core::jsonl::JsonlItems;
use settle_core::message::{decode_results, pack_results, ResultBody, WorkBody};
use settle_core::{Item, ItemId, RunId};

/// Bytes shaped like the inputs: JSON fragments, Settle field names and
/// broken UTF-8 mixed with noise, so the decoders get past their first byte.
fn bodyish() -> impl Strategy<Value = Vec<u8>> {
    let pieces = prop_oneof![
        Just(b"{".to_vec()),
        Just(b"}".to_vec()),
        Just(b"[".to_vec()),
        Just(b"]".to_vec()),
        Just(b",".to_vec()),
        Just(b":".to_vec()),
        Just(b"\"run\"".to_vec()),
        Just(b"\"item\"".to_vec()),
        Just(b"\"results\"".to_vec()),
        Just(b"\"payload\"".to_vec()),
        Just(b"\"id\"".to_vec()),
        Just(b"\"r20261124T000000Z-abcdef\"".to_vec()),
        Just(b"\"max_receives\"".to_vec()),
        Just(b"3".to_vec()),
        Just(b"-1".to_vec()),
        Just(b"1e999".to_vec()),
        Just(b"null".to_vec()),
        Just(b"\n".to_vec()),
        Just(vec![0xff, 0xfe]),
        Just(vec![0xe2, 0x82]),
        proptest::collection::vec(any::<u8>(), 0..8),
    ];
    proptest::collection::vec(pieces, 0..40).prop_map(|v| v.concat())
}

fn run_id() -> RunId {
    RunId::parse("r20261124T000000Z-abcdef").unwrap()
}

fn id_text() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[a-zA-Z0-9_\\-\\.:/ é]{1,40}").unwrap()
}

fn payload() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("null".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        id_text().prop_map(|s| serde_json::to_string(&s).unwrap()),
        (id_text(), any::<bool>())
            .prop_map(|(k, b)| serde_json::json!({ k: [b, null] }).to_string()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn queue_bodies_never_panic(bytes in bodyish()) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = WorkBody::decode(&text);
        if let Ok(results) = decode_results(&text) {
            prop_assert!(!results.is_empty(), "an empty results message must be refused");
        }
    }

    #[test]
    fn items_files_never_panic_and_name_their_lines(bytes in bodyish()) {
        let lines = bytes.iter().filter(|b| **b == b'\n').count() as u64 + 1;
        for entry in JsonlItems::new(std::io::Cursor::new(bytes)) {
            let line = match entry {
                Ok((line, _)) => line,
                Err(e) => e.line,
            };
            prop_assert!(line >= 1 && line <= lines, "line {} of {}", line, lines);
        }
    }

    #[test]
    fn work_bodies_round_trip(id in id_text(), p in payload(), seq: u64, prior in 0u32..1000, max in 1u32..1000) {
        let item = Item::new(ItemId::new(id).unwrap(), RawValue::from_string(p.clone()).unwrap());
        let mut body = WorkBody::new(run_id(), item, seq, max);
        body.prior_attempts = prior;
        let back = WorkBody::decode(&body.encode()).unwrap();
        prop_assert_eq!(back.item, body.item);
        prop_assert_eq!(back.payload.get(), p.as_str());
        prop_assert_eq!((back.seq, back.prior_attempts, back.max_receives), (seq, prior, max));
    }

    #[test]
    fn results_messages_round_trip(ids in proptest::collection::vec(id_text(), 1..12),
                                   error in ".{0,300}", attempt in 1u32..50) {
        let results: Vec<ResultBody> = ids.iter().enumerate().map(|(i, id)| ResultBody {
            run: run_id(),
            item: ItemId::new(id.clone()).unwrap(),
            seq: i as u64,
            attempt: Attempt {
                attempt,
                message_id: format!("m{i}"),
                started_at: 1,
                duration_ms: 2,
                outcome: if i % 2 == 0 {
                    AttemptOutcome::Succeeded
                } else {
                    AttemptOutcome::Failed { kind: ErrorKind::Retryable, error: error.clone(), terminal: false }
                },
                output: None,
                log: None,
                retry_at: None,
            },
        }).collect();
        let encoded: Vec<String> = results.iter().map(ResultBody::encode).collect();
        let packed = pack_results(&encoded);
        prop_assert_eq!(packed.len(), 1);
        prop_assert_eq!(decode_results(&packed[0].0).unwrap(), results);
    }
}
