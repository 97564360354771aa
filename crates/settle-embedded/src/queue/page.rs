//! The binary layout of a message page, as the `pages` and `page_bodies`
//! rows hold it:
//!
//! - slots: per message, its visible_at (i64 LE, [`DELETED`] once deleted
//!   or moved) and its receive count (u32 LE), [`SLOT_BYTES`] each;
//! - bodies: per message, its length (u32 LE) and its UTF-8 bytes;
//! - ids (only for messages the redrive policy moved here): per message,
//!   its original id (i64 LE).
//!
//! Fixed-width little-endian fields rather than a general serialisation:
//! a receive, a delete or a visibility change decodes and re-encodes a
//! page's slots on the writer thread, which every caller waits on.

/// Slots per page at most; message ids are `page * SLOTS + slot`.
pub(super) const SLOTS: i64 = 16;
/// Bytes per slot in a page's state: visible_at (i64 LE), receive count (u32 LE).
pub(super) const SLOT_BYTES: usize = 12;
/// visible_at of a deleted (or moved) slot.
pub(super) const DELETED: i64 = -1;

/// One message's state inside its page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Slot {
    pub visible_at: i64,
    pub count: u32,
}

impl Slot {
    pub fn live(&self) -> bool {
        self.visible_at != DELETED
    }
}

/// A page's slots. Trailing bytes short of a whole slot are ignored.
pub(super) fn decode_slots(b: &[u8]) -> Vec<Slot> {
    b.chunks_exact(SLOT_BYTES)
        .map(|c| {
            let (v, n) = c.split_at(8);
            Slot {
                visible_at: i64::from_le_bytes(v.try_into().unwrap_or_default()),
                count: u32::from_le_bytes(n.try_into().unwrap_or_default()),
            }
        })
        .collect()
}

pub(super) fn encode_slots(slots: &[Slot]) -> Vec<u8> {
    let mut b = Vec::with_capacity(slots.len() * SLOT_BYTES);
    for s in slots {
        b.extend_from_slice(&s.visible_at.to_le_bytes());
        b.extend_from_slice(&s.count.to_le_bytes());
    }
    b
}

/// The earliest visible_at over the live slots; `None` when all are gone.
pub(super) fn next_visible(slots: &[Slot]) -> Option<i64> {
    slots
        .iter()
        .filter(|s| s.live())
        .map(|s| s.visible_at)
        .min()
}

/// Bodies, each as a u32 LE length and its bytes.
pub(super) fn encode_bodies<'a>(bodies: impl Iterator<Item = &'a str>) -> Vec<u8> {
    let mut b = Vec::new();
    for body in bodies {
        b.extend_from_slice(&(body.len() as u32).to_le_bytes());
        b.extend_from_slice(body.as_bytes());
    }
    b
}

/// The bodies of `slots` (ascending) from a page's body blob; `None` if
/// the blob is cut short or a body is not UTF-8.
pub(super) fn decode_bodies(blob: &[u8], slots: &[usize]) -> Option<Vec<String>> {
    let mut out = Vec::with_capacity(slots.len());
    let (mut at, mut slot) = (0usize, 0usize);
    for &want in slots {
        loop {
            let len = blob
                .get(at..at + 4)
                .and_then(|l| l.try_into().ok())
                .map(u32::from_le_bytes)? as usize;
            let body = blob.get(at + 4..at + 4 + len)?;
            at += 4 + len;
            slot += 1;
            if slot - 1 == want {
                out.push(String::from_utf8(body.to_vec()).ok()?);
                break;
            }
        }
    }
    Some(out)
}

/// Moved messages' ids, in slot order.
pub(super) fn encode_ids(ids: impl Iterator<Item = i64>) -> Vec<u8> {
    ids.flat_map(i64::to_le_bytes).collect()
}

/// The message id of each slot in `slots`: stored ids for moved messages.
pub(super) fn message_ids(page: i64, ids: Option<&[u8]>, slots: &[usize]) -> Vec<i64> {
    slots
        .iter()
        .map(|&s| {
            ids.and_then(|b| b.get(s * 8..s * 8 + 8))
                .and_then(|b| b.try_into().ok())
                .map(i64::from_le_bytes)
                .unwrap_or(page * SLOTS + s as i64)
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use settle_core::message::MAX_BODY_BYTES;

    fn all(n: usize) -> Vec<usize> {
        (0..n).collect()
    }

    #[test]
    fn slots_round_trip() {
        let slots = vec![
            Slot {
                visible_at: 0,
                count: 0,
            },
            Slot {
                visible_at: DELETED,
                count: 7,
            },
            Slot {
                visible_at: i64::MAX,
                count: u32::MAX,
            },
            Slot {
                visible_at: i64::MIN,
                count: 1,
            },
        ];
        let b = encode_slots(&slots);
        assert_eq!(b.len(), slots.len() * SLOT_BYTES);
        assert_eq!(decode_slots(&b), slots);
    }

    #[test]
    fn an_empty_page_round_trips() {
        assert!(encode_slots(&[]).is_empty());
        assert!(decode_slots(&[]).is_empty());
        assert!(encode_bodies(std::iter::empty()).is_empty());
        assert_eq!(decode_bodies(&[], &[]), Some(vec![]));
        assert_eq!(next_visible(&[]), None);
    }

    #[test]
    fn a_full_page_round_trips() {
        let n = SLOTS as usize;
        let slots: Vec<Slot> = (0..n)
            .map(|i| Slot {
                visible_at: i as i64 * 1000,
                count: i as u32,
            })
            .collect();
        assert_eq!(decode_slots(&encode_slots(&slots)), slots);
        let bodies: Vec<String> = (0..n).map(|i| format!("body {i}")).collect();
        let blob = encode_bodies(bodies.iter().map(String::as_str));
        assert_eq!(decode_bodies(&blob, &all(n)), Some(bodies));
    }

    #[test]
    fn trailing_bytes_short_of_a_slot_are_ignored() {
        let slot = Slot {
            visible_at: 5,
            count: 2,
        };
        let mut b = encode_slots(&[slot]);
        b.extend_from_slice(&[1, 2, 3]);
        assert_eq!(decode_slots(&b), vec![slot]);
    }

    #[test]
    fn bodies_round_trip_empty_non_ascii_and_at_the_size_limit() {
        let largest = "x".repeat(MAX_BODY_BYTES);
        let bodies = [
            "",
            "plain",
            "héllo wörld ✓ 日本語 🦀",
            "{\"id\":\"\u{0}\"}",
            largest.as_str(),
            "",
        ];
        let blob = encode_bodies(bodies.iter().copied());
        let expected_len: usize = bodies.iter().map(|b| 4 + b.len()).sum();
        assert_eq!(blob.len(), expected_len);
        let got = decode_bodies(&blob, &all(bodies.len())).unwrap();
        assert_eq!(got, bodies);
    }

    #[test]
    fn some_bodies_are_read_by_slot() {
        let bodies = ["a", "ß", "c", "🦀🦀", "e"];
        let blob = encode_bodies(bodies.iter().copied());
        assert_eq!(
            decode_bodies(&blob, &[1, 3]).unwrap(),
            vec!["ß".to_owned(), "🦀🦀".to_owned()]
        );
        assert_eq!(decode_bodies(&blob, &[4]).unwrap(), vec!["e".to_owned()]);
        assert_eq!(decode_bodies(&blob, &[]).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn a_damaged_body_blob_does_not_decode() {
        let blob = encode_bodies(["abc", "é"].into_iter());
        // Cut inside a length, inside a body, and a slot past the last body.
        assert_eq!(decode_bodies(&blob[..2], &[0]), None);
        assert_eq!(decode_bodies(&blob[..blob.len() - 1], &[1]), None);
        assert_eq!(decode_bodies(&blob, &[2]), None);
        // A body whose bytes are not UTF-8 (half of "é").
        let mut bad = 1u32.to_le_bytes().to_vec();
        bad.push(0xc3);
        assert_eq!(decode_bodies(&bad, &[0]), None);
        // A length far past the blob.
        let huge = u32::MAX.to_le_bytes();
        assert_eq!(decode_bodies(&huge, &[0]), None);
    }

    #[test]
    fn next_visible_skips_deleted_slots() {
        let slot = |visible_at| Slot {
            visible_at,
            count: 1,
        };
        assert_eq!(next_visible(&[slot(DELETED), slot(9), slot(4)]), Some(4));
        assert_eq!(next_visible(&[slot(DELETED), slot(DELETED)]), None);
    }

    #[test]
    fn ids_are_kept_for_moved_messages_and_derived_otherwise() {
        let page = 7;
        assert_eq!(
            message_ids(page, None, &[0, 3, 15]),
            vec![page * SLOTS, page * SLOTS + 3, page * SLOTS + 15]
        );
        let stored = encode_ids([42, i64::MAX, 0].into_iter());
        assert_eq!(stored.len(), 3 * 8);
        assert_eq!(
            message_ids(page, Some(&stored), &[0, 1, 2]),
            vec![42, i64::MAX, 0]
        );
        // A slot past the stored ids falls back to the derived id.
        assert_eq!(
            message_ids(page, Some(&stored), &[3]),
            vec![page * SLOTS + 3]
        );
    }
}
